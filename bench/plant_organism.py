"""Plant a model organism, run the unchanged pipeline on its held-out tasks, compare with the truth.

    python bench/plant_organism.py --out runs/organism              # plant + pipeline + recovery
    python bench/plant_organism.py --out runs/organism --small      # the regression test's settings
    python bench/plant_organism.py --out runs/organism --skip-plant # reuse runs/organism/model

Writes ``<out>/model`` (the organism), ``<out>/run`` (the pipeline workdir) and
``<out>/recovery.json`` (:func:`prefjax.organism.evaluate_recovery`), and prints the numbers.
"""

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(arg: str):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "organism.py")
    spec = importlib.util.spec_from_file_location("_organism_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, mod.get_config(arg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/organism")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--skip-plant", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="override organism.steps")
    args = ap.parse_args()
    from prefjax.organism import evaluate_recovery, plant_organism
    from prefjax.pipeline import run_pipeline
    model_dir = os.path.join(args.out, "model")
    mod, cfg = _config(("small:" if args.small else "") + model_dir)
    if args.steps:
        cfg.organism.steps = args.steps
    spec = mod.spec_from_config(cfg.organism)
    t0 = time.time()
    if not args.skip_plant:
        info = plant_organism(spec, model_dir)
        print(json.dumps({k: v for k, v in info.items() if k != "losses"}, indent=1))
    t1 = time.time()
    run_pipeline(cfg, os.path.join(args.out, "run"))
    t2 = time.time()
    rec = evaluate_recovery(os.path.join(args.out, "run"), model_dir)
    rec["seconds"] = {"plant": t1 - t0, "pipeline": t2 - t1}
    with open(os.path.join(args.out, "recovery.json"), "w") as f:
        json.dump(rec, f, indent=1)
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
