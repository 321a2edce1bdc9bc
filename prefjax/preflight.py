"""Checks of a run's inputs that need no compute: run before the workdir is created or a weight loaded.

:func:`prefjax.pipeline.run_pipeline` calls these right after the config is typed, so a bad input is a
clear error naming the config field and leaves nothing behind:

* :func:`check_tasks_source` / :func:`check_task_count`: ``tasks.source`` left unset (configs/paper.py
  leaves it for the user), or ``tasks.n`` larger than the pool;
* :func:`check_model_source`: ``model.source`` names a checkpoint that does not exist, or a Hugging Face
  folder whose ``config.json`` does not have ``model.preset``'s shape (hidden size, layers, heads,
  MLP widths, experts, vocabulary: :data:`SHAPE_FIELDS`); read from ``config.json`` alone;
* :func:`resolve_mesh_shape`: the ``mesh`` section, auto (every axis 0) derived from the devices
  present (:func:`prefjax.sharding.auto_mesh_shape`), or named and then refused unless its size is
  the device count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from prefjax.api import PLANTED_FILE, REAL_PRESETS
from prefjax.checkpoints.hf import read_config
from prefjax.models import family_for_model_type, family_for_preset
from prefjax.runconfig import MeshConfig, ModelConfig, RunConfig, TasksConfig
from prefjax.sharding import MESH_AXES, auto_mesh_shape

# Fields of the family configs that set parameter shapes -> their config.json name (for the error).
SHAPE_FIELDS: dict[str, str] = {
    "vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
    "d_ff": "intermediate_size", "n_experts": "num_experts", "top_k": "num_experts_per_tok",
    "d_expert": "moe_intermediate_size", "d_shared": "shared_expert_intermediate_size",
    "lin_n_k_heads": "linear_num_key_heads", "lin_n_v_heads": "linear_num_value_heads",
    "lin_k_dim": "linear_key_head_dim", "lin_v_dim": "linear_value_head_dim", "layer_types": "layer_types",
}
TASK_SOURCE_HINT = "--config.tasks.source=<file.jsonl|csv>"


class PreflightError(ValueError):
    """A run input that cannot work (config field named in the message), found before any compute."""


# ---------------------------------------------------------------------------------------------
# Tasks

def check_tasks_source(tasks: TasksConfig) -> None:
    """Refuse an unset ``tasks.source`` (""), naming the flag that sets it."""
    if not str(tasks.source).strip():
        raise PreflightError(f"config field 'tasks.source' is not set: this config reads the tasks from your "
                             f"file; pass {TASK_SOURCE_HINT} (or 'default' for the bundled pool)")


def check_task_count(tasks: TasksConfig, n_pool: int) -> None:
    """Refuse ``tasks.n`` above the pool's size (0 = every task), naming both numbers."""
    if tasks.n > n_pool:
        raise PreflightError(f"config field 'tasks.n' is {tasks.n} but the task pool (tasks.source="
                             f"{tasks.source!r}) has {n_pool} tasks; set --config.tasks.n to at most {n_pool} "
                             "(0 = every task) or give a larger task file")


# ---------------------------------------------------------------------------------------------
# Model source and shape

def _is_hf_folder(source: str) -> bool:
    """``source`` is a Hugging Face checkpoint folder (``config.json``, not a planted organism)."""
    p = Path(source)
    return p.is_dir() and (p / "config.json").is_file() and not (p / PLANTED_FILE).is_file()


def checkpoint_config(source: str):
    """The family config of the HF folder ``source``, from its ``config.json`` alone (no weight read)."""
    where = str(Path(source) / "config.json")
    hf = read_config(source)
    if "model_type" not in hf:
        raise PreflightError(f"model.source {source!r}: {where} has no model_type field")
    fam = family_for_model_type(hf["model_type"], source=where)
    try:
        return fam, fam.config_from_hf(hf, source=where)
    except KeyError as e:
        raise PreflightError(f"model.source {source!r}: {where} lacks the field {e.args[0]!r} that the "
                             f"{fam.name} port reads") from None


def model_shape_config(model: ModelConfig):
    """The model's family config without loading it: ``model.preset``'s, else the checkpoint folder's
    ``config.json``, else ``model.source`` read as a preset name; None when none applies (e.g. a GGUF)."""
    for name in (model.preset, model.source):
        if name:
            try:
                fam = family_for_preset(name)
            except ValueError:
                continue
            return fam.presets[name]
    if model.source and _is_hf_folder(model.source):
        return checkpoint_config(model.source)[1]
    return None


def shape_mismatches(ckpt_cfg, preset_cfg) -> list[tuple[str, Any, Any]]:
    """``(field, checkpoint value, preset value)`` for every :data:`SHAPE_FIELDS` entry that differs."""
    out = []
    for f in SHAPE_FIELDS:
        if hasattr(ckpt_cfg, f) or hasattr(preset_cfg, f):
            a, b = getattr(ckpt_cfg, f, None), getattr(preset_cfg, f, None)
            if a != b:
                out.append((f, a, b))
    return out


def _show(v) -> str:
    if isinstance(v, tuple) and len(v) > 6:
        kinds = sorted(set(v))
        return f"{len(v)} entries ({', '.join(f'{v.count(k)} {k}' for k in kinds)})"
    return repr(v)


def check_model_source(model: ModelConfig) -> None:
    """Refuse a ``model.source`` that names a missing checkpoint, and an HF folder whose ``config.json``
    does not have ``model.preset``'s shape (only when both are set; nothing but config.json is read).

    The error names each differing field (prefjax name and config.json name), the checkpoint's value
    and the preset's."""
    src = str(model.source)
    if not src:
        raise PreflightError("config field 'model.source' is empty; give a checkpoint folder, a .gguf file or a "
                             "preset name")
    p = Path(src)
    if src in REAL_PRESETS:
        return
    if not p.exists():
        if src.endswith(".gguf") or "/" in src or p.suffix:
            raise PreflightError(f"config field 'model.source' is {src!r}, which does not exist (expected a "
                                 "Hugging Face folder with config.json, a .gguf file or a preset name; the "
                                 "model rows' folders sit under --config.checkpoints_dir)")
        try:
            family_for_preset(src)  # a preset name: an unknown one is an error listing the presets
        except ValueError as e:
            raise PreflightError(f"config field 'model.source' is {src!r}: no such file or folder, and {e}") from None
        return
    if not model.preset or not _is_hf_folder(src):
        return
    try:
        pfam = family_for_preset(model.preset)
    except ValueError as e:
        raise PreflightError(f"config field 'model.preset': {e}") from None
    fam, ck = checkpoint_config(src)
    preset = pfam.presets[model.preset]
    if fam is not pfam:
        raise PreflightError(f"model.source {src!r} is a {fam.name} checkpoint but config field 'model.preset' is "
                             f"{model.preset!r}, a {pfam.name} preset; set --config.model.preset to the "
                             "checkpoint's preset")
    bad = shape_mismatches(ck, preset)
    if bad:
        lines = "; ".join(f"{f} (config.json {SHAPE_FIELDS[f]}) is {_show(a)} in the checkpoint, {_show(b)} in the "
                          f"preset" for f, a, b in bad)
        raise PreflightError(f"model.source {src!r} does not have the shape of config field 'model.preset' "
                             f"{model.preset!r}: {lines}. Point model.source at a {model.preset} checkpoint or set "
                             "--config.model.preset to the checkpoint's shape")


# ---------------------------------------------------------------------------------------------
# Mesh

def _named(mesh: MeshConfig) -> dict[str, int]:
    return {a: int(getattr(mesh, a) or 1) for a in MESH_AXES}


def resolve_mesh_shape(cfg: RunConfig, n_devices: int, *, platform: str = "", model_cfg=None) -> dict[str, int] | None:
    """The mesh axis sizes for this run on ``n_devices`` local devices; None for a single device.

    Auto (every ``mesh`` axis 0): derived from the devices (:func:`prefjax.sharding.auto_mesh_shape`,
    experts from ``model_cfg`` or :func:`model_shape_config`). Named: as given (0 read as 1); a product
    of 1 runs on one device, any other product must equal ``n_devices`` (a :class:`PreflightError`
    naming the mesh and the device count otherwise)."""
    if cfg.mesh.auto:
        if n_devices <= 1:
            return None
        mc = model_cfg if model_cfg is not None else model_shape_config(cfg.model)
        return auto_mesh_shape(n_devices, int(getattr(mc, "n_experts", 0) or 0))
    shape = _named(cfg.mesh)
    size = int(np.prod(list(shape.values())))
    if size <= 1:
        return None
    if size != n_devices:
        named = {a: v for a, v in shape.items() if v > 1}
        on = f" {platform}" if platform else ""
        raise PreflightError(f"config field 'mesh' names the mesh {named} of {size} devices, but this process has "
                             f"{n_devices}{on} device(s); set the mesh axes so they multiply to {n_devices}, or "
                             "set every mesh axis to 0 (--config.mesh.data=0 --config.mesh.fsdp=0 "
                             "--config.mesh.tensor=0 --config.mesh.expert=0) to derive it from the devices")
    return shape


def describe_mesh(shape: dict[str, int] | None) -> str:
    """``{'fsdp': 8}``-style text of a mesh shape (axes of size 1 left out), or "one device"."""
    if shape is None:
        return "one device"
    return str({a: v for a, v in shape.items() if v > 1})


__all__ = ["PreflightError", "SHAPE_FIELDS", "check_tasks_source", "check_task_count", "checkpoint_config",
           "model_shape_config", "shape_mismatches", "check_model_source", "resolve_mesh_shape", "describe_mesh"]
