#!/usr/bin/env bash
# One nvidia-h200 device call (seventh session), issue 16's misses with profiles: prefill + capture at batch 16
# and 4 against transformers, with one profiled forward each (device time by kernel kind, the matmul kernels'
# rate); then the decode step at 8 rows profiled (time per step by kernel kind, the matmul kernels' weight read
# rate) and at 256 rows against transformers' step (item (a)'s missing reference).
# Usage (device machine, repo root): bash bench/gpu_profiles.sh
DEFAULT_BUDGET=585; source "$(dirname "$0")/_gpu_env.sh"
timeout $(( $(left) - 330 )) python3 bench/bench_prefill.py --preset gemma3-27b --batches 16,4 --seq 256 --repeats 5 \
    --trace /tmp/trace_prefill 2>&1 | grep -v "^W0000\|^I0000\|^JSON" | tail -40 | tee "$OUT/prefill.txt"
echo "# left: $(left) s"
timeout $(( $(left) - 5 )) python3 bench/bench_engine.py --preset gemma3-27b --batch 8,256 --decode-kernels auto \
    --hf-batch 256 --gen-batch '' --skip-engine --stacked-max-batch 0 --steps 10 --trace /tmp/trace_steps \
    --trace-batch 8 --torch-timeout $(( $(left) - 150 )) 2>&1 | grep -v "^W0000\|^I0000\|result {" | tee "$OUT/steps.txt"
echo "# left: $(left) s"
