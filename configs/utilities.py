"""Experiment 1: revealed-preference utilities per persona by active learning (Thurstonian fits).

    python launch/main.py --config configs/utilities.py:gemma3-27b --workdir runs/utilities-gemma3-27b

``arg`` picks the model from ``configs/common.py`` (``tiny``, ``gemma3-270m`` = default, ``gemma3-27b``,
``qwen35-122b-a10b``, ``llama31-8b``). Stages: tasks, choices, utilities, report.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs.common import base_config, set_stages  # noqa: E402

STAGES = ('tasks', 'choices', 'utilities', 'report')


def get_config(arg: str = ""):
    c = base_config(arg, "configs/utilities.py")
    set_stages(c, *STAGES)
    # Several active-learning rounds: each proposes pairs whose outcome is least certain under the current fit.
    c.choices.active_rounds = 1 if c.model.name == "tiny" else 4
    c.choices.pairs_per_round = c.tasks.n
    return c
