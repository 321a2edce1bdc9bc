"""Experiment 8: preference-shift tracking. When a system prompt moves the utilities (persona B vs the base
persona A), does the base persona's probe score move with the measured utility change, while the content
baseline (task text alone) cannot?

    python launch/main.py --config configs/pref_shift.py:gemma3-27b --workdir runs/pref-shift-gemma3-27b

``arg`` picks the model from ``configs/common.py``; the first persona is the base, the others the shifts.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs.common import base_config, set_stages  # noqa: E402

STAGES = ('tasks', 'choices', 'utilities', 'activations', 'probes', 'pref_shift', 'report')


def get_config(arg: str = ""):
    c = base_config(arg, "configs/pref_shift.py")
    set_stages(c, *STAGES)
    if c.model.name != "llama31-8b":  # the LoRA personas are the shifts there
        c.personas = ("default", "evil", "mathematician", "novelist")
    return c
