"""The model table and the shared config skeleton for the experiment configs in ``configs/``.

Every experiment config is ``get_config(arg)`` where ``arg`` picks a row of :data:`MODELS`:
``""``/``"gemma3-270m"`` (default, real weights on CPU), ``"tiny"`` (random ``gemma3-tiny-tok`` with the
real Gemma tokenizer, for tests), ``"gemma3-4b"``, ``"gemma3-12b"``, ``"gemma3-27b"``, ``"qwen35-122b-a10b"``
and ``"llama31-8b"`` (checkpoint folders under ``--config.checkpoints_dir``; the llama personas are LoRA
adapters under ``--config.adapters_dir``). Each experiment then edits the fields it studies and sets
``stages``.

The checkpoint rows' mesh is :data:`AUTO_MESH` (every axis 0): derived from the devices present when the
run starts (one GPU: no mesh; 8 GPUs: ``fsdp=8``, or ``fsdp=2, expert=4`` for the MoE row; see
:func:`prefjax.sharding.auto_mesh_shape`). Name one on the command line (``--config.mesh.fsdp=4``, other
axes then read as 1); a named mesh whose size is not the device count is refused before the workdir is
created. The small rows run on one device (mesh product 1).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import ml_collections

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from prefjax.runconfig import STAGES as ALL_STAGES, check_stages  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ModelRow:
    """One model of the table. ``source`` is a preset name or a folder name under ``checkpoints_dir``
    (``from_checkpoints_dir``); ``preset`` is the random-init preset of the same shape (shape checks)."""

    source: str
    preset: str
    dtype: str
    mesh: tuple[int, int, int, int]          # (data, fsdp, tensor, expert); AUTO_MESH = from the devices
    layers: str                              # activations.layers spec: "all", "every<k>", or "3,7,11"
    choices_batch: int
    acts_batch: int
    from_checkpoints_dir: bool = False
    personas: tuple[str, ...] = ("default", "evil")
    # TPU slices this model is meant for, each with its mesh (first = launch/aot.py's default); every
    # preset compiles and fits with >= 10% HBM headroom (BUILD_NOTES "TPU ahead-of-time checks").
    tpu: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()


AUTO_MESH = (0, 0, 0, 0)   # every axis 0: the mesh is derived from the devices present (prefjax.preflight)
ONE_DEVICE = (1, 1, 1, 1)

MODELS: dict[str, ModelRow] = {
    "tiny": ModelRow("gemma3-tiny-tok", "gemma3-tiny-tok", "float32", ONE_DEVICE, "all", 16, 16),
    "gemma3-270m": ModelRow("gemma3-270m", "gemma3-270m", "float32", ONE_DEVICE, "all", 16, 16),
    "gemma3-4b": ModelRow("gemma-3-4b-it", "gemma3-4b", "bfloat16", AUTO_MESH, "every2", 32, 32,
                          from_checkpoints_dir=True),
    "gemma3-12b": ModelRow("gemma-3-12b-it", "gemma3-12b", "bfloat16", AUTO_MESH, "every3", 32, 32,
                           from_checkpoints_dir=True),
    "gemma3-27b": ModelRow("gemma-3-27b-it", "gemma3-27b", "bfloat16", AUTO_MESH, "every4", 32, 32,
                           from_checkpoints_dir=True,
                           tpu=(("v5e:4x4", (("fsdp", 16),)),            # v5e-16
                                ("v5p:2x2x1", (("fsdp", 4),)))),          # v5p-8 (4 chips)
    "qwen35-122b-a10b": ModelRow("Qwen3.5-122B-A10B", "qwen35-122b-a10b", "bfloat16", AUTO_MESH, "every4",
                                 32, 32, from_checkpoints_dir=True,
                                 tpu=(("v5p:2x2x4", (("fsdp", 2), ("expert", 8))),                 # v5p-32
                                      ("v6e:8x8", (("fsdp", 2), ("tensor", 2), ("expert", 16))))),  # v6e-64
    # Personas are LoRA adapters trained on Llama-3.1-8B-Instruct: relative names resolve under adapters_dir.
    "llama31-8b": ModelRow("Llama-3.1-8B-Instruct", "llama31-8b", "bfloat16", AUTO_MESH, "every2", 32, 32,
                           from_checkpoints_dir=True,
                           personas=("default", "adapter:evil", "adapter:sycophant", "adapter:scholar"),
                           tpu=(("v5e:2x2", (("fsdp", 4),)),)),          # v5e-4
}
ALIASES = {"": "gemma3-270m"}


def model_row(arg: str, config_file: str) -> ModelRow:
    """The table row for a config argument (clear error naming the config file and the known args)."""
    key = ALIASES.get(arg, arg)
    if key not in MODELS:
        raise ValueError(f"unknown model {arg!r} for {config_file}; known: {sorted(MODELS)} (default gemma3-270m)")
    return MODELS[key]


def base_config(arg: str, config_file: str):
    """A full pipeline config for the model ``arg`` with every stage on; experiments trim it.

    This is the one place defaults live: every key the code reads is declared here (and typed by
    :class:`prefjax.runconfig.RunConfig`), so every key can be set with ``--config.section.key=value``.
    """
    row = model_row(arg, config_file)
    key = ALIASES.get(arg, arg)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = ALL_STAGES
    c.checkpoints_dir = "/checkpoints"
    c.adapters_dir = "/adapters"
    c.model = ml_collections.ConfigDict({"name": key, "preset": row.preset, "dtype": row.dtype,
                                         "source": row.source,
                                         # block weights one buffer per layer: on a GPU XLA then reads each
                                         # layer's weights in place (prefjax.model.apply_layer_split)
                                         "split_layers": "auto"})
    if row.from_checkpoints_dir:
        # Follows --config.checkpoints_dir unless model.source itself is overridden.
        c.model.source = c.get_ref("checkpoints_dir") + ("/" + row.source)
    d, f, t, e = row.mesh
    # every axis 0 = derive the mesh from the devices present; any axis set = that mesh (0 read as 1)
    c.mesh = ml_collections.ConfigDict({"data": d, "fsdp": f, "tensor": t, "expert": e})
    # source: "default" (bundled pool) or a JSONL/CSV file ("" = unset, an error at start); n: 0 = all
    c.tasks = ml_collections.ConfigDict({"source": "default", "n": 66, "seed": 0})
    c.personas = row.personas
    c.choices = ml_collections.ConfigDict({
        "mode": "logit", "samples": 1, "orders": "both", "degree": 10, "active_rounds": 1,
        "pairs_per_round": 66, "batch_size": row.choices_batch, "max_new_tokens": 16, "temperature": 1.0,
        "top_p": 1.0, "seed": 0,
        "engine": True,  # sample mode: the continuous-batching engine where the model allows it
        "template": ""})  # "" = the default choice template; else a JSON file of ChoiceTemplate fields
    c.activations = ml_collections.ConfigDict({"layers": row.layers, "n_after": 0, "batch_size": row.acts_batch,
                                               "dtype": "float32"})
    # alpha by nested cross-validation: cv_outer folds estimate held-out r, cv_inner folds (inside each
    # outer training set) choose alpha
    c.probes = ml_collections.ConfigDict({"alphas": (1.0, 10.0, 100.0, 1e3, 1e4, 1e5), "position_index": 0,
                                          "n_perm": 100, "cv_outer": 5, "cv_inner": 5,
                                          # permutations of the layer-chosen-inside-CV null (the whole
                                          # selection over layers rerun per permutation; probes.layersel)
                                          "layer_select_n_perm": 1000,
                                          # z-score each dimension before the ridge fit: keeps the main job's
                                          # numbers; the planted organism shows raw fits recover the direction
                                          # far better (BUILD_NOTES "Ground-truth organism")
                                          "standardize": True,
                                          # "best" inner-CV r, or "1se": the largest alpha within one standard
                                          # error of it (steadier directions; see probes.nulls)
                                          "alpha_rule": "best"})
    # Coefficients are fractions of the mean residual norm at the steering layer. Gemma's residual norms
    # are dominated by a few huge dimensions (6e3 at layer 9 of the 270M), so 0.25 already pushes the
    # 270M off the answer format; the sweep stays within +-0.1.
    c.steering = ml_collections.ConfigDict({"persona": "default", "layer": "best", "mode": "contrastive",
                                            "coefs": (-0.1, -0.05, -0.02, 0.0, 0.02, 0.05, 0.1), "n_pairs": 12,
                                            "generate_tokens": 12,  # 0: logit mode only
                                            # "" = the probe fit at the steering layer itself
                                            "direction_layer": "",
                                            # random directions placing the probe's local slope in a null
                                            "n_null": 1000,
                                            # dose-response slopes use |c| <= linear_max only (the
                                            # paper's linear range); larger coefs are shown, not fitted
                                            "linear_max": 0.1,
                                            # ... and only coefficients where both directions' on-label
                                            # rate (top next token is a label) is >= this: off the answer
                                            # format P(steered) is not a preference (issue 28)
                                            "min_on_label": 0.95,
                                            # greedy completions: the continuous-batching engine where the
                                            # model allows it (False: generate)
                                            "engine": True})
    c.inlp = ml_collections.ConfigDict({"n_iter": 5})
    c.patching = ml_collections.ConfigDict({"n_pairs": 6, "layers": "every3", "sources": ("swap", "persona"),
                                            "modes": ("eot", "span"), "min_effect": 0.02, "batch_size": 16,
                                            "persona": "",          # "" = the first persona
                                            "source_persona": ""})  # "" = the second persona, if any
    # base "" = the first persona; shifts () = every other persona
    c.pref_shift = ml_collections.ConfigDict({"n_boot": 1000, "n_perm": 1000, "base": "", "shifts": ()})
    # path "" = the bundled statements
    c.truefalse = ml_collections.ConfigDict({"n_folds": 5, "reg": 1.0, "n_boot": 1000, "batch_size": 32,
                                             "path": ""})
    c.truth = ""  # a model organism's folder: the report then compares estimates with the planted utilities
    c.progress = True
    if key == "tiny":
        c.tasks.n = 16
        c.choices.degree = 4
        c.choices.active_rounds = 0
        c.probes.n_perm = 10
        c.probes.layer_select_n_perm = 50
        c.steering.n_pairs = 3
        c.steering.coefs = (-1.0, -0.1, 0.0, 0.1, 1.0)  # +-1 saturates: shown, not used for slopes
        c.steering.min_on_label = 0.0  # the random tiny model never puts a label on top: no format filter
        c.inlp.n_iter = 1
        c.patching.n_pairs = 2
        c.pref_shift.n_boot = c.pref_shift.n_perm = 100
        c.truefalse.n_boot = 100
    return c


def set_stages(c, *stages: str):
    """Keep only ``stages`` (they must include their prerequisites; checked here)."""
    c.stages = check_stages(stages)
    return c
