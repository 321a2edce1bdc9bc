#!/usr/bin/env bash
# One nvidia-h200-x2 call (at most 600 s): Qwen-3.5-122B-A10B (random bf16 weights, the whole 48-layer text
# model, 227 GiB) on two H200s, prefjax against transformers in the same call (bench/bench_workload.py):
#   (a) one sampled decode step at 8 and 64 rows (prefjax: the engine's compiled step on the mesh expert=2;
#       transformers: a cached decode loop, placed over both GPUs as device_map="auto" places a checkpoint);
#   (b) the elicitation workload: 32 pair prompts x K=5 samples, at most 128 new tokens, stopping at Qwen's
#       <|im_end|>/<|endoftext|>; the engine with 64 rows against transformers generate in static batches;
#   then, if time is left, (c) the same workload with 64 distinct steering vectors.
# transformers runs first, for at most HF_SHARE seconds (it stops starting generate batches in time), then
# JAX gets all that is left of DEADLINE (its compile time is the least predictable part); each part prints
# partial results if cut short.
# Usage (device machine, repo root): bash bench/gpu_qwen35_x2.sh
# CPU smoke of the same command path (tiny MoE preset, 8 fake CPU devices, transformers on the CPU):
#   PRESET=qwen35-moe-tiny DEVICE=cpu EXTRA="--hf-spread --new 8 --rows 4 --step-batches 2,4" PAIRS=4 \
#     DEADLINE=170 HF_SHARE=40 bash bench/gpu_qwen35_x2.sh
# flash-linear-attention / causal-conv1d wheels carried in .whl/ (ignored by git; pass it in carry) are
# installed first, offline; without them transformers runs its PyTorch fallbacks (the report says which).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PREFJAX_PROGRESS=0
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
DEADLINE="${DEADLINE:-575}"   # seconds for everything below, from the start of this script
HF_SHARE="${HF_SHARE:-230}"   # transformers' share
PAIRS="${PAIRS:-32}"
PRESET="${PRESET:-qwen35-122b-a10b}"; DEVICE="${DEVICE:-auto}"; MOE_IMPL="${MOE_IMPL:-pallas}"; EXTRA="${EXTRA:-}"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install --no-index --no-deps -q .whl/*.whl 2>&1 | tail -3
fi
left=$((DEADLINE - SECONDS))
echo "bench_workload deadline ${left}s (script at ${SECONDS}s)"
# shellcheck disable=SC2086
timeout $((left + 15)) python3 bench/bench_workload.py --preset "$PRESET" --mesh expert=2 --device "$DEVICE" \
  --moe-impl "$MOE_IMPL" --pairs "$PAIRS" --step-batches 8,64 --reference-first --hf-reserve "$HF_SHARE" \
  --deadline "$left" --budget 100000 --hf-budget 100000 $EXTRA \
  > >(tee "$OUT/qwen35_x2.txt") 2> >(tee "$OUT/qwen35_x2.err" >&2)
echo "rc=$? at ${SECONDS}s"
