#!/usr/bin/env bash
# One device call: the probes, transfer and INLP arithmetic at the Gemma-3-27B shape (10,000 tasks, d = 5,376),
# two measured layers x two personas, projected to 62 layers (bench/bench_probes.py). Repo root, device machine:
#   bash bench/gpu_probes.sh [bench_probes.py options...]
set -uo pipefail
DEFAULT_BUDGET="${LIMIT:-420}"
. bench/_gpu_env.sh
sk=""; python3 -c "import sklearn" 2>/dev/null && sk="--sklearn"
timeout $(( $(left) - 5 )) python3 bench/bench_probes.py --n 10000 --d 5376 --layers 2 --full-layers 62 \
  --personas 2 $sk "$@" 2>&1 | grep -v "^W0000\|^I0000" | tee "$OUT/bench_probes.txt"
