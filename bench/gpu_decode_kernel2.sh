#!/usr/bin/env bash
# One nvidia-h200 device call (second decode-kernel call): the tensor-core Pallas kernel against XLA at the
# Gemma-3-27B shape; if a kernel tiling beats XLA's decode_attention at B=64 in the probe, the decode step
# at B=64 and 256 and the elicitation workload run with it; then prefill + capture MFU if time is left.
# Usage (device machine, repo root): bash bench/gpu_decode_kernel2.sh
DEFAULT_BUDGET=575; source "$(dirname "$0")/_gpu_env.sh"
timeout 100 python3 bench/attention_probe.py --slots 384 --batch 64 256 --json "$OUT/probe.json" 2>&1 \
    | grep -v "^W0000\|^I0000" | tee "$OUT/attention_probe.txt"
BEST=$(python3 - "$OUT/probe.json" <<'PY'
import json, re, sys
try:
    r = json.load(open(sys.argv[1]))["64"]
except Exception:
    print(""); raise SystemExit
best = min((t, n) for n, t in r.items() if n.startswith("pallas"))
if best[0] < r["decode_attention"]:
    m = re.match(r"pallas (\w+) b=(\d+) w=(\d+)(?: p=(\d+))?", best[1])
    opts = [f"products={m[1]}", f"block={m[2]}", f"num_warps={m[3]}"] + ([f"splits={m[4]}"] if m[4] else [])
    print("pallas:" + ";".join(opts))
PY
)
echo "# best kernel at B=64: ${BEST:-none (XLA decode_attention is faster)}" | tee "$OUT/choice.txt"
if [ -n "$BEST" ]; then
  timeout 150 python3 bench/bench_engine.py --preset gemma3-27b --batch 64 \
      --decode-kernels "$BEST" --stacked-max-batch 0 --gen-batch '' --hf-batch '' --no-hf --skip-engine \
      --steps 10 2>&1 | grep -v "^W0000\|^I0000" | tail -8 | tee "$OUT/decode_step.txt"
  timeout $(( $(left) - 5 )) python3 bench/bench_workload.py --preset gemma3-27b --pairs 64 --decode-kernel "$BEST" \
      --budget 200 --hf-budget 90 2>&1 | grep -v "^W0000\|^I0000" | tail -25 | tee "$OUT/workload.txt"
fi
if [ "$(left)" -gt 120 ]; then
  timeout $(( $(left) - 5 )) python3 bench/bench_prefill.py --preset gemma3-27b --batches 4,16 --seq 256 --repeats 5 \
      2>&1 | grep -v "^W0000\|^I0000" | tail -15 | tee "$OUT/prefill.txt"
fi
