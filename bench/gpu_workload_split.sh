#!/usr/bin/env bash
# One nvidia-h200 device call (seventh session, the last ~5 minutes of device time): the Gemma-3-27B elicitation
# workload with the block weights split per layer (Model.split_layers; the engine then unrolls its prefills)
# against transformers in the same call, 64 rows, lookahead on. Usage (device machine): bash bench/gpu_workload_split.sh
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PREFJAX_PROGRESS=0
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
timeout ${LIMIT:-285} python3 bench/bench_workload.py --preset gemma3-27b --pairs 64 --rows 64 --no-steered \
    --step-batches 64 --per-layer-weights --deadline $(( ${LIMIT:-285} - 5 )) --hf-reserve 125 --hf-budget 100 \
    2>&1 | grep -v "^W0000\|^I0000" | tee "$OUT/workload.txt" | grep -v "^\[jax\] RESULT\|^\[torch\] RESULT"
