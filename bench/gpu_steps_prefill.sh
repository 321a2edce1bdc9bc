#!/usr/bin/env bash
# One nvidia-h200 device call (sixth session): the decode step at 8, 64 and 256 rows with the default kernel
# choice ("auto": XLA at 8 rows, the Pallas decode-attention kernel at 64 and 256), transformers' step at the
# same batches in the same call (issue 16 item (a)); then prefill + capture at batch 4 (item (d); batch 16 was
# measured in the workload call).  Usage (device machine, repo root): bash bench/gpu_steps_prefill.sh
DEFAULT_BUDGET=470; source "$(dirname "$0")/_gpu_env.sh"
timeout $(( $(left) - 130 )) python3 bench/bench_engine.py --preset gemma3-27b --batch 8,64,256 --decode-kernels auto \
    --hf-batch 8,64,256 --gen-batch '' --skip-engine --stacked-max-batch 0 --steps 10 --budget 200 \
    --torch-timeout 120 2>&1 | grep -v "^W0000\|^I0000\|result {" | tee "$OUT/steps.txt"
echo "# left: $(left) s"
if [ "$(left)" -gt 60 ]; then
  timeout $(( $(left) - 3 )) python3 bench/bench_prefill.py --preset gemma3-27b --batches 4 --seq 256 --repeats 5 \
      2>&1 | grep -v "^W0000\|^I0000" | tail -8 | tee "$OUT/prefill.txt"
fi
