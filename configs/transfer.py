"""Experiment 4: probe transfer across personas (train on one persona's activations/utilities, test on
another's) and across layers, with the utility correlation between personas as the baseline.

    python launch/main.py --config configs/transfer.py:gemma3-27b --workdir runs/transfer-gemma3-27b

``arg`` picks the model from ``configs/common.py`` (``tiny``, ``gemma3-270m`` = default, ``gemma3-27b``,
``qwen35-122b-a10b``, ``llama31-8b``). Stages: tasks, choices, utilities, activations, probes, transfer, report.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs.common import base_config, set_stages  # noqa: E402

STAGES = ('tasks', 'choices', 'utilities', 'activations', 'probes', 'transfer', 'report')


def get_config(arg: str = ""):
    c = base_config(arg, "configs/transfer.py")
    set_stages(c, *STAGES)
    if c.model.name != "llama31-8b":
        c.personas = ("default", "evil", "novelist") if c.model.name != "tiny" else ("default", "evil")
    return c
