"""The pipeline on a model organism with planted preferences (ground truth for every stage).

First plant an organism (a small Gemma-3-architecture model trained so that its revealed choices
follow hidden, content-determined utilities under each persona), then run the unchanged pipeline
on the organism's held-out tasks, then compare with the truth:

    python bench/plant_organism.py --out runs/organism/model            # plant (+ run + compare)
    python launch/main.py --config configs/organism.py:runs/organism/model --workdir runs/organism/run

``:arg`` is the organism folder (default ``runs/organism/model``); ``small:<folder>`` is the
cheaper variant the regression test uses. The ``organism`` block is the :class:`OrganismSpec`
used by ``bench/plant_organism.py`` (topic values, content feature, persona transforms, model
shape, training); the pipeline itself ignores it (it is kept in run.json for provenance).
Analysis choices to test against known truth: ``activations.n_after`` + ``probes.position_index``
(which turn-boundary token), ``activations.layers``, ``probes.alphas``, ``steering.*``.
"""

import importlib.util
import os

import ml_collections


def _default_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
    spec = importlib.util.spec_from_file_location("_prefjax_default_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("")


def organism_block(small: bool = False) -> ml_collections.ConfigDict:
    """The planting spec as a ConfigDict (fields of :class:`prefjax.organism.OrganismSpec`)."""
    from prefjax.organism import OrganismSpec
    spec = OrganismSpec()
    d = spec.to_dict()
    if small:
        d.update(steps=600)
    return ml_collections.ConfigDict(d)


def spec_from_config(block):
    """An :class:`OrganismSpec` from the config's ``organism`` block."""
    from prefjax.organism import OrganismSpec
    d = block.to_dict() if hasattr(block, "to_dict") else dict(block)
    return OrganismSpec.from_dict(d)


def get_config(arg: str = ""):
    small = arg == "small" or arg.startswith("small:")
    folder = arg.split(":", 1)[1] if arg.startswith("small:") else ("" if arg == "small" else arg)
    folder = folder or os.path.join("runs", "organism", "model")
    c = _default_config()
    c.model.source = folder
    c.truth = folder                   # the report compares every estimate with the planted utilities
    c.tasks.source = os.path.join(folder, "eval_tasks.jsonl")
    c.tasks.n = 0                      # every held-out task
    c.personas = ("default", "evil")   # must match the organism's persona transforms
    c.choices.degree = 8
    c.choices.active_rounds = 0
    c.choices.batch_size = 32
    c.activations.layers = "all"
    c.activations.batch_size = 32
    c.probes.n_perm = 50
    c.steering.n_pairs = 32
    c.steering.layer = "0"           # span steering at the LAST layer cannot reach the label position
    c.steering.coefs = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
    c.inlp.n_iter = 2
    if small:
        c.model.preset = ""            # the small organism is its own shape: no preset to check it against
        c.choices.degree = 6
        c.probes.n_perm = 20
        c.steering.n_pairs = 16
        c.steering.coefs = (-2.0, 0.0, 2.0)
        c.inlp.n_iter = 0
    c.organism = organism_block(small)
    return c
