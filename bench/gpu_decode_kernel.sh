#!/usr/bin/env bash
# One nvidia-h200 device call: the decode-attention kernel at Gemma-3-27B's shape.
#   1. bench/attention_probe.py: one layer's attention, XLA against the Pallas kernel's tilings (and cuDNN);
#   2. bench/bench_engine.py: one decode step at B = 8, 64, 256 with the Pallas kernel ("auto") and with the
#      XLA path, logits compared, and transformers generate at B = 8, 64 as the reference (same call).
# Usage (device machine, repo root): bash bench/gpu_decode_kernel.sh
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PREFJAX_PROGRESS=0
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 120 python3 bench/attention_probe.py --slots 320 --batch 8 64 256 2>&1 | grep -v "^W0000\|^I0000" | tee "$OUT/attention_probe.txt"
timeout 430 python3 bench/bench_engine.py --preset gemma3-27b --batch 8,64,256 --decode-kernels auto,xla \
    --stacked-max-batch 0 --gen-batch '' --hf-batch 8,64 --skip-engine --budget 300 --torch-timeout 150 \
    2>&1 | grep -v "^W0000\|^I0000" | tee "$OUT/decode_step.txt"
