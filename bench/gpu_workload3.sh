#!/usr/bin/env bash
# One nvidia-h200 device call (sixth session): the Gemma-3-27B elicitation workload at 64 rows with the engine's
# time split, its own decode step and a profile of its first two waves (where the ~23% of engine time outside
# the bare step goes), against transformers in the same call; then prefill + capture MFU (issue 16 item (d))
# with the time left.  Usage (device machine, repo root): bash bench/gpu_workload3.sh
DEFAULT_BUDGET=580; source "$(dirname "$0")/_gpu_env.sh"
timeout $(( $(left) - 150 )) python3 bench/bench_workload.py --preset gemma3-27b --pairs 64 --rows ${ROWS:-64} \
    --no-steered --step-batches ${ROWS:-64} --trace /tmp/trace_workload --deadline $(( $(left) - 160 )) \
    --hf-reserve 150 --hf-budget 110 2>&1 | grep -v "^W0000\|^I0000" | tee "$OUT/workload.txt" | grep -v "^\[" 
echo "# left: $(left) s"
if [ "$(left)" -gt 100 ]; then
  timeout $(( $(left) - 5 )) python3 bench/bench_prefill.py --preset gemma3-27b --batches ${PREFILL_BATCHES:-16,4} \
      --seq 256 --repeats 5 2>&1 | grep -v "^W0000\|^I0000" | tail -15 | tee "$OUT/prefill.txt"
fi
