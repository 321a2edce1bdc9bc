"""Experiment 5: steering with the best probe's direction: dose-response of the choice over coefficients
(in units of the mean residual norm) against a random direction of the same norm. ``steering.mode`` is
``contrastive`` (+v on Task A's tokens, -v on Task B's) or ``single`` (+v on Task A's only).

    python launch/main.py --config configs/steering.py:gemma3-27b --workdir runs/steering-gemma3-27b

``arg`` picks the model from ``configs/common.py`` (``tiny``, ``gemma3-270m`` = default, ``gemma3-27b``,
``qwen35-122b-a10b``, ``llama31-8b``). Stages: tasks, choices, utilities, activations, probes, steering, report.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs.common import base_config, set_stages  # noqa: E402

STAGES = ('tasks', 'choices', 'utilities', 'activations', 'probes', 'steering', 'report')


def get_config(arg: str = ""):
    c = base_config(arg, "configs/steering.py")
    set_stages(c, *STAGES)
    c.steering.mode = "contrastive"
    if c.model.name != "tiny":
        c.steering.n_pairs = 64
    return c
