"""The main job: the whole pipeline on the real Gemma-3-270M (CPU, about 6 minutes on 2 cores).

    python launch/main.py --config configs/default.py --workdir runs/default
    python launch/main.py --config configs/default.py:tiny --workdir /tmp/t   # random tiny model (tests)

``arg`` picks a model of ``configs/common.py`` (``""`` = gemma3-270m, ``tiny``, ``gemma3-27b``,
``qwen35-122b-a10b``, ``llama31-8b``); every stage runs. Any field can be overridden on the command line,
e.g. ``--config.tasks.n=40 --config.personas='("default","evil","novelist")'``; a misspelt field is an error.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs.common import base_config  # noqa: E402


def get_config(arg: str = ""):
    c = base_config(arg, "configs/default.py")
    if c.model.name == "gemma3-270m":
        c.choices.degree = 8  # ~250 pairs x 2 orders per persona + one active-learning round of 66 pairs
    if c.model.name == "tiny":
        c.tasks.n = 24
    return c
