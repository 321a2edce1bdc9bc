#!/usr/bin/env bash
# One device call: the paper's run through launch/main.py on one GPU, measured per stage (issue 26; see
# bench/paper_run.py). Usage (device machine, repo root):
#
#   bash bench/gpu_paper.sh ROW [N_TASKS] [paper_run.py options...] [-- launch/main.py overrides...]
#   bash bench/gpu_paper.sh gemma3-4b 1000
#   bash bench/gpu_paper.sh gemma3-4b 1000 --kill-at probes
#   bash bench/gpu_paper.sh gemma3-27b 1000 -- --config.choices.batch_size=64
#
# carry: .whl/paper (wheels of ml_collections, absl-py and matplotlib + deps; only the ones whose module the
# device lacks are installed). bench/data/gemma3_tokenizer.tar.gz and bench/data/paper_tasks_2k.jsonl.gz are
# untracked, not ignored: they travel with the working tree. LIMIT (default 590) is the call's seconds; the
# launcher gets what is left after the checkpoint, minus 25 s for the table. The checkpoint and the workdir
# stay under runs/paper/ (ignored), so the same call on a warm machine resumes the run and skips the write.
set -uo pipefail
ROW="${1:?usage: bash bench/gpu_paper.sh ROW [N_TASKS] [options] [-- overrides]}"; shift
N=0; if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then N="$1"; shift; fi
DEFAULT_BUDGET="${LIMIT:-590}"
. bench/_gpu_env.sh
export PREFJAX_LOG=1 TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
# carried wheels, only for modules this python lacks (a second copy of a present package could shadow it)
if compgen -G ".whl/paper/*.whl" >/dev/null; then
  need=$(python3 - <<'EOF'
import glob, importlib.util, os
mod = {"absl_py": "absl", "fonttools": "fontTools", "python_dateutil": "dateutil", "PyYAML": "yaml"}
for w in sorted(glob.glob(".whl/paper/*.whl")):
    dist = os.path.basename(w).split("-")[0]
    if importlib.util.find_spec(mod.get(dist, dist)) is None:
        print(w)
EOF
)
  if [[ -n "$need" ]]; then
    echo "installing carried wheels: $(echo $need | xargs -n1 basename | tr '\n' ' ')"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $need \
      || exit 1
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  fi
fi
python3 -c "import jax, ml_collections, matplotlib, flax, optax, orbax.checkpoint, tensorstore, chex, tokenizers, \
transformers, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, '| transformers', \
transformers.__version__)" 2>&1 | grep -v "^W0000\|^I0000" | tee "$OUT/env.txt"
df -h / /tmp 2>/dev/null | tail -n +2 | tee -a "$OUT/env.txt"
python3 bench/paper_run.py "$ROW" --n "$N" --time-limit $(( $(left) - 25 )) --out "$OUT" "$@"
