"""The pipeline on the ground-truth organism: the real Gemma-3-270M with a planted preference circuit.

    python launch/plant.py --out runs/planted/model                      # plant (about a minute, CPU)
    python launch/main.py --config configs/organism_planted.py:runs/planted/model --workdir runs/planted/run
    python launch/plant.py --out runs/planted/model --score runs/planted/run   # every target vs the truth

``:arg`` is the organism folder (default ``runs/planted/model``; see ``prefjax.organism_planted``).
The run is the ordinary pipeline in logit mode (the planted model has no decode state) on the
organism's held-out tasks, with three personas: ``default``, ``assistant`` (planted with inverted
utilities) and ``minimalist`` (planted to share one of the two features with ``default``), steering at the planted layer with the
probe fit there.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs.common import base_config, set_stages  # noqa: E402

PLANTED_LAYER = 6  # must match the organism's planted layer (PlantSpec.layer)


def get_config(arg: str = ""):
    folder = arg or os.path.join("runs", "planted", "model")
    c = base_config("", "configs/organism_planted.py")
    c.model.source = folder
    c.truth = folder                     # report.md opens with every target against the planted truth
    c.tasks.source = os.path.join(folder, "eval_tasks.jsonl")
    c.tasks.n = 0                        # every held-out task
    c.personas = ("default", "assistant", "minimalist")
    c.choices.mode = "logit"
    c.choices.degree = 4
    c.choices.active_rounds = 0
    c.activations.layers = f"{PLANTED_LAYER - 3},{PLANTED_LAYER},{PLANTED_LAYER + 3}"
    c.steering.layer = str(PLANTED_LAYER)
    c.steering.generate_tokens = 0       # logit mode only: the planted circuit runs full sequences
    c.steering.n_pairs = 16
    c.steering.coefs = (-0.02, 0.0, 0.02)
    c.steering.n_null = 200
    c.probes.n_perm = 50
    # raw activations: per-dimension z-scoring reweights the probe's direction by 1/variance and caps its
    # cosine with the planted direction near 0.5 (BUILD_NOTES "Ground-truth organism"); raw fits need a
    # grid scaled to the residual's variance (about 2e5 along the planted directions)
    c.probes.standardize = False
    c.probes.alphas = tuple(float(10 ** (e / 2)) for e in range(6, 17))  # 1e3 .. 1e8, half decades
    # The r curve is flat over five decades: the best-r alpha (1e3) predicts at r 0.98 along a direction
    # almost orthogonal to the planted one (cosine 0.04); the one-standard-error rule picks the most
    # regularised probe the inner folds cannot tell apart from it (cosine ~0.9).
    c.probes.alpha_rule = "1se"
    set_stages(c, "tasks", "choices", "utilities", "activations", "probes", "transfer", "steering", "report")
    return c
