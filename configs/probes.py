"""Experiment 3: linear (ridge) probes of the utilities: held-out split, leave-one-topic-out, content-only
baseline and a shuffled-label null, per layer and per persona.

    python launch/main.py --config configs/probes.py:gemma3-27b --workdir runs/probes-gemma3-27b

``arg`` picks the model from ``configs/common.py`` (``tiny``, ``gemma3-270m`` = default, ``gemma3-27b``,
``qwen35-122b-a10b``, ``llama31-8b``). Stages: tasks, choices, utilities, activations, probes, report.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs.common import base_config, set_stages  # noqa: E402

STAGES = ('tasks', 'choices', 'utilities', 'activations', 'probes', 'report')


def get_config(arg: str = ""):
    c = base_config(arg, "configs/probes.py")
    set_stages(c, *STAGES)
    c.activations.n_after = 4
    c.probes.position_index = 0      # 0 = <end_of_turn>; 1..4 = the tokens after it
    c.probes.n_perm = 10 if c.model.name == "tiny" else 1000
    return c
