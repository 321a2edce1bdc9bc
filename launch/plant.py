"""Plant the ground-truth organism (real Gemma-3-270M + a planted preference circuit), run the
unchanged pipeline on its held-out tasks, and score every issue-15 target against the truth.

    python launch/plant.py --out runs/planted                 # plant + pipeline + score
    python launch/plant.py --out runs/planted --score-only    # score an existing run
    python launch/plant.py --out runs/planted --read tokens   # the broken organism (read bypasses the residual)

Writes ``<out>/model`` (the organism folder), ``<out>/run`` (the pipeline workdir) and
``<out>/score.json``; prints the checks as a table. Killed at any point, the same command resumes
(the organism is only re-planted when its folder is incomplete; the pipeline resumes by stage).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.organism_planted import get_config as planted_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/planted")
    ap.add_argument("--score-only", action="store_true")
    ap.add_argument("--read", default="residual", choices=("residual", "tokens"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from prefjax.api import PLANTED_FILE
    from prefjax.organism_planted import HIDDEN_FILE, PlantSpec, format_checks, plant, score_run
    from prefjax.pipeline import run_pipeline
    model_dir, workdir = os.path.join(args.out, "model"), os.path.join(args.out, "run")
    if not args.score_only:
        done = all(os.path.isfile(os.path.join(model_dir, f)) for f in (PLANTED_FILE, HIDDEN_FILE))
        if not done:
            plant(PlantSpec(read=args.read, seed=args.seed), model_dir)
        run_pipeline(planted_config(model_dir), workdir)
    score = score_run(workdir, model_dir)
    with open(os.path.join(args.out, "score.json"), "w") as f:
        json.dump(score, f, indent=1)
    print(format_checks(score))
    print("all targets met" if score["passed"] else "some targets NOT met")


if __name__ == "__main__":
    main()
