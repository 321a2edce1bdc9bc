"""Experiment 9: true/false statement discrimination. Does the preference probe's score separate true from
false statements (bundled, written for the project), next to classifiers trained on them directly?

    python launch/main.py --config configs/truefalse.py:gemma3-27b --workdir runs/truefalse-gemma3-27b

``arg`` picks the model from ``configs/common.py``.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs.common import base_config, set_stages  # noqa: E402

STAGES = ('tasks', 'choices', 'utilities', 'activations', 'probes', 'truefalse', 'report')


def get_config(arg: str = ""):
    c = base_config(arg, "configs/truefalse.py")
    set_stages(c, *STAGES)
    return c
