"""Experiment 7: end-of-turn activation patching. Does the turn boundary carry the choice? The residual at
the end-of-turn token (or the whole turn boundary) of a source prompt (the same pair in the other order,
or under the other persona) is patched into the target prompt, layer by layer, and the share of the
source's P(A) that moves over is reported.

    python launch/main.py --config configs/patching.py:gemma3-27b --workdir runs/patching-gemma3-27b

``arg`` picks the model from ``configs/common.py``. Stages: tasks, patching, report (patching needs no
utilities; the report then shows the utilities section only if a utilities stage ran).
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs.common import base_config, set_stages  # noqa: E402

STAGES = ('tasks', 'choices', 'utilities', 'patching', 'report')


def get_config(arg: str = ""):
    c = base_config(arg, "configs/patching.py")
    set_stages(c, *STAGES)
    c.patching.n_pairs = 2 if c.model.name == "tiny" else 32
    c.patching.layers = "all" if c.model.name in ("tiny", "gemma3-270m") else "every2"
    return c
