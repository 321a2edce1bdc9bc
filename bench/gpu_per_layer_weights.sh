#!/usr/bin/env bash
# One nvidia-h200 device call (seventh session): the profiles of gpu_profiles.sh / gpu_prefill_dsf.sh showed XLA
# copying a layer's weight slice out of the stacked weights before each cuBLAS matmul of an unrolled program
# (memcpy128: 62 per decode step at 8 rows, 248 per batch-16 prefill); XLA's dynamic-slice fusion flag did not
# remove them. This call repeats prefill + capture (batch 16 and 4, against transformers) and the decode step
# (8 and 64 rows) with the block weights split into one buffer per layer (--per-layer-weights), profiled.
# Usage (device machine, repo root): bash bench/gpu_per_layer_weights.sh
DEFAULT_BUDGET=560; source "$(dirname "$0")/_gpu_env.sh"
timeout $(( $(left) - 200 )) python3 bench/bench_prefill.py --preset gemma3-27b --batches 16,4 --seq 256 --repeats 3 \
    --per-layer-weights --trace /tmp/trace_prefill 2>&1 | grep -v "^W0000\|^I0000\|^JSON" | tee "$OUT/prefill.txt"
echo "# left: $(left) s"
timeout $(( $(left) - 3 )) python3 bench/bench_engine.py --preset gemma3-27b --batch 8,64 --decode-kernels auto \
    --no-hf --gen-batch '' --skip-engine --stacked-max-batch 0 --steps 10 --trace /tmp/trace_steps --trace-batch 8 \
    --per-layer-weights 2>&1 | grep -v "^W0000\|^I0000\|result {" | tee "$OUT/steps.txt"
echo "# left: $(left) s"
