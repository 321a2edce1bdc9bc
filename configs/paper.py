"""The paper's run: one command on the devices you have, with your task file.

    python launch/main.py --config configs/paper.py:gemma3-27b --config.tasks.source=tasks.jsonl \\
        --config.checkpoints_dir=/ckpt --workdir runs/paper

The protocol: every task of your file (``tasks.source``, JSONL or CSV as :func:`prefjax.tasks.load_tasks`
reads them; ``tasks.n=0`` = all, a larger ``tasks.n`` than the file holds is an error), sampled choices
with K = 5 samples per ordered pair (``choices.mode="sample"``, ``choices.samples=5``) from a d-regular
start plus the active-learning rounds of ``configs/common.py``, every persona of the model row,
activations at every layer (``activations.layers="all"``), the steering sweep, and every stage.

``arg`` picks the model row of ``configs/common.py`` (``""`` = ``gemma3-27b``, the paper's model):
``gemma3-27b``, ``gemma3-12b``, ``gemma3-4b``, ``qwen35-122b-a10b``, ``llama31-8b`` read their checkpoint
folder under ``--config.checkpoints_dir`` (``/ckpt/gemma-3-27b-it`` above; its config.json must have
the row's shape, ``model.preset``); ``tiny`` is the random tiny model for tests (the bundled pool is its
default task source, and its choices are read from the label logits: random weights never write a
parseable answer). The mesh is derived from the devices present (one GPU: none; 8 GPUs: ``fsdp=8``,
``fsdp=2, expert=4`` for the MoE row); name one with ``--config.mesh.fsdp=...`` (refused unless its
size is the device count).

Checked before the run's workdir is created (a bad input leaves nothing behind): ``tasks.source``
unset (this config leaves it for you: ``--config.tasks.source=<file.jsonl|csv>``), ``tasks.n`` above
the pool, too few tasks for the probes' folds, a missing checkpoint or one whose shape is not the
row's preset, a named mesh that does not fit the devices.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from configs.common import ALL_STAGES, base_config  # noqa: E402

CONFIG_FILE = "configs/paper.py"
DEFAULT_MODEL = "gemma3-27b"
SAMPLES = 5                 # K: sampled completions per ordered pair
STEERING_PAIRS = 64         # pairs of the steering dose-response (tiny: configs/common.py's)


def get_config(arg: str = ""):
    """The paper's protocol on model row ``arg`` (see the module docstring); ``tasks.source`` is left
    unset ("") for the user, except on ``tiny`` (the bundled pool, 24 tasks, logit-mode choices: a random
    model's sampled completions never parse)."""
    c = base_config(arg or DEFAULT_MODEL, CONFIG_FILE)
    c.stages = ALL_STAGES
    c.tasks.source = ""     # the user's file: run_pipeline refuses to start without it
    c.tasks.n = 0           # every task of the file
    c.choices.mode = "sample"
    c.choices.samples = SAMPLES
    c.activations.layers = "all"
    c.steering.n_pairs = STEERING_PAIRS
    # raw features and the one-standard-error alpha: the settings the planted organism validates
    # (BUILD_NOTES "Ground-truth organism"); raw features also let one float64 decomposition per layer and
    # persona serve the whole probes protocol (prefjax.probes.cvpath), where z-scoring needs one per outer
    # training set
    c.probes.standardize = False
    c.probes.alpha_rule = "1se"
    if c.model.name == "tiny":
        # random weights never write "Task A: ...", so every sampled choice would be unparseable and the
        # utilities stage would stop: tiny reads its choices from the label logits instead
        c.choices.mode = "logit"
        c.tasks.source = "default"
        c.tasks.n = 24      # enough for the nested folds (5 outer x 5 inner), small enough for a test
        c.steering.n_pairs = 3
    return c
