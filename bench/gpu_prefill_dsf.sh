#!/usr/bin/env bash
# One nvidia-h200 device call (seventh session): prefill + capture at batch 16 and 4 against transformers with
# one profiled forward each (issue 16 item (d)); then the decode step at 8 and 64 rows with XLA's dynamic-slice
# fusion switched on, profiled at 8 rows: does the one device-to-device copy per layer (memcpy128 x62 per step,
# 1.25 ms at 8 rows, gpu_profiles.sh) go away? Usage (device machine, repo root): bash bench/gpu_prefill_dsf.sh
DEFAULT_BUDGET=480; source "$(dirname "$0")/_gpu_env.sh"
timeout $(( $(left) - 150 )) python3 bench/bench_prefill.py --preset gemma3-27b --batches 16,4 --seq 256 --repeats 3 \
    --trace /tmp/trace_prefill 2>&1 | grep -v "^W0000\|^I0000\|^JSON" | tee "$OUT/prefill.txt"
echo "# left: $(left) s"
XLA_FLAGS="--xla_gpu_enable_dynamic_slice_fusion=true" timeout $(( $(left) - 3 )) python3 bench/bench_engine.py \
    --preset gemma3-27b --batch 8,64 --decode-kernels auto --no-hf --gen-batch '' --skip-engine --stacked-max-batch 0 \
    --steps 10 --trace /tmp/trace_steps --trace-batch 8 2>&1 | grep -v "^W0000\|^I0000\|result {" | tee "$OUT/steps_dsf.txt"
echo "# left: $(left) s"
