"""Experiment 6: iterative nullspace projection: remove the probe direction, refit, repeat; how fast the
held-out and leave-one-topic-out r fall (versus a shuffled-label run).

    python launch/main.py --config configs/inlp.py:gemma3-27b --workdir runs/inlp-gemma3-27b

``arg`` picks the model from ``configs/common.py`` (``tiny``, ``gemma3-270m`` = default, ``gemma3-27b``,
``qwen35-122b-a10b``, ``llama31-8b``). Stages: tasks, choices, utilities, activations, probes, inlp, report.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs.common import base_config, set_stages  # noqa: E402

STAGES = ('tasks', 'choices', 'utilities', 'activations', 'probes', 'inlp', 'report')


def get_config(arg: str = ""):
    c = base_config(arg, "configs/inlp.py")
    set_stages(c, *STAGES)
    c.inlp.n_iter = 2 if c.model.name == "tiny" else 10
    return c
