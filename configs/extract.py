"""Experiment 2: residual-stream activations of every task at the user turn boundary, over layers and
the ``n_after`` tokens after the end-of-turn token, one store per persona.

    python launch/main.py --config configs/extract.py:gemma3-27b --workdir runs/extract-gemma3-27b

``arg`` picks the model from ``configs/common.py`` (``tiny``, ``gemma3-270m`` = default, ``gemma3-27b``,
``qwen35-122b-a10b``, ``llama31-8b``). Stages: tasks, activations.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs.common import base_config, set_stages  # noqa: E402

STAGES = ('tasks', 'activations')


def get_config(arg: str = ""):
    c = base_config(arg, "configs/extract.py")
    set_stages(c, *STAGES)
    c.activations.layers = "all"
    # <end_of_turn> and the 4 tokens after it (Gemma: "\n", "<start_of_turn>", "model", "\n").
    c.activations.n_after = 4
    return c
