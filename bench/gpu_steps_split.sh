#!/usr/bin/env bash
# One nvidia-h200 device call (seventh session): issue 16 item (a) again with the block weights split into one
# buffer per layer (no weight-slice copies; gpu_per_layer_weights.sh), the decode step at 8, 64 and 256 rows
# against transformers' step at the same batches in the same call, the 256-row step profiled.
# Usage (device machine, repo root): bash bench/gpu_steps_split.sh
DEFAULT_BUDGET=500; source "$(dirname "$0")/_gpu_env.sh"
timeout $(( $(left) - 3 )) python3 bench/bench_engine.py --preset gemma3-27b --batch 8,64,256 --decode-kernels auto \
    --hf-batch 8,64,256 --gen-batch '' --skip-engine --stacked-max-batch 0 --steps 10 --trace /tmp/trace_steps \
    --trace-batch 256 --per-layer-weights --torch-timeout $(( $(left) - 120 )) 2>&1 \
    | grep -v "^W0000\|^I0000\|result {" | tee "$OUT/steps.txt"
echo "# left: $(left) s"
