#!/usr/bin/env bash
# One device call: environment check, then the Gemma-3-27B prefill and decode benchmarks.
# Usage (device machine, repo root): bash bench/gpu_gemma.sh
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PREFJAX_PROGRESS=0
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 - <<'PY'
import numpy as np, prefjax, jax
m = prefjax.load("gemma3-tiny")
lg, c = m.run(np.arange(12).reshape(1, 12) + 3, capture=("blocks.2.hook_resid_post",), positions=np.array([[11]]))
print("smoke ok", lg.shape, float(np.abs(np.asarray(lg)).mean()))
PY
python3 bench/bench_prefill.py --preset gemma3-27b --batches 4,16 --seq 256 --repeats 10 2>&1 | tee "$OUT/prefill.txt"
python3 bench/bench_decode.py --preset gemma3-27b --batch 8,64 --prompt 256 --new 64 --repeats 3 --hf-weights random 2>&1 | tee "$OUT/decode.txt"
