# Sourced by the bench/gpu_*.sh device-call drivers (run from the repo root on the device machine): the
# environment every bench needs, $OUT (what comes back from the call), a `left` timer counting down from
# ${BUDGET:-$DEFAULT_BUDGET} seconds since sourcing, and the card's name in $OUT/gpu.txt.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PREFJAX_PROGRESS=0
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
T0=$(date +%s); left() { echo $(( ${BUDGET:-${DEFAULT_BUDGET:-580}} - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
