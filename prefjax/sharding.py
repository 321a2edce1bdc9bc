"""Meshes and logical-axis rules.

Model code names array axes logically (``batch``, ``embed``, ``heads``, ...). A rules table maps
each logical axis to zero or more mesh axes (``data``, ``fsdp``, ``tensor``, ``expert``). The same
model code then runs on one CPU, 8 fake CPU devices, a GPU box or a TPU pod.

An axis whose size does not divide evenly over its mesh axes is replicated instead (e.g. the single
KV head of an MQA model on a 4-way tensor axis); :func:`spec_for` reports that choice.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp", "expert")),  # expert devices also split the batch outside the MoE
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("experts", ("expert",)),
    ("expert_mlp", ("tensor",)),
    ("layers", ()),
    ("head_dim", ()),
    ("norm", ()),
    ("seq", ()),
    ("conv", ()),
    ("comparisons", ("data", "fsdp")),
)


def make_mesh(shape: dict[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
    """A mesh over the given devices. ``shape`` is ``{"data": 2, "tensor": 4}`` (missing axes get 1)
    or a tuple in :data:`MESH_AXES` order. ``None`` puts every device on ``data``."""
    devices = list(devices if devices is not None else jax.devices())
    if shape is None:
        sizes = {"data": len(devices)}
    elif isinstance(shape, dict):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {MESH_AXES}")
        sizes = dict(shape)
    else:
        sizes = dict(zip(MESH_AXES, shape))
    dims = tuple(int(sizes.get(a, 1)) for a in MESH_AXES)
    if int(np.prod(dims)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} needs {int(np.prod(dims))} devices, "
                         f"have {len(devices)}")
    return Mesh(np.array(devices).reshape(dims), MESH_AXES)


def auto_mesh_shape(n_devices: int, n_experts: int = 0) -> dict[str, int] | None:
    """The mesh derived from the device count (``mesh`` config all zeros: "auto").

    One device: ``None`` (no mesh). Several, dense model (``n_experts`` 0): every device on ``fsdp``
    (weights and batch split n ways). Several, mixture of experts: ``expert`` = the largest divisor of
    ``n_devices`` that divides ``n_experts`` while leaving ``fsdp`` >= 2 once there are >= 4 devices (so the
    dense weights are split too), ``fsdp`` = the rest: ``{fsdp: 2, expert: 4}`` on 8 devices for 256
    experts, the hand-chosen layout of the Qwen-3.5-122B rows (and of its v5p-32 preset at 16)."""
    n = int(n_devices)
    if n < 1:
        raise ValueError(f"auto_mesh_shape: need at least one device, got {n}")
    if n == 1:
        return None
    if int(n_experts) <= 1:
        return {"fsdp": n}
    cap = n // 2 if n >= 4 else n
    expert = max(d for d in range(1, cap + 1) if n % d == 0 and int(n_experts) % d == 0)
    return {k: v for k, v in (("fsdp", n // expert), ("expert", expert)) if v > 1}


def mesh_context(mesh: Mesh | None):
    """``jax.set_mesh(mesh)`` (a no-op context without one): traces inside see the mesh, which the
    Qwen-3.5 MoE uses to run its experts expert-parallel under ``shard_map``."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def spec_for(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """PartitionSpec for an array with logical ``axes``; non-divisible axes are replicated."""
    table = dict(rules)
    used: set[str] = set()
    parts = []
    for size, ax in zip(shape, axes):
        mesh_axes = tuple(a for a in table.get(ax, ()) if a in mesh.shape and mesh.shape[a] > 1
                          and a not in used) if ax else ()
        n = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if mesh_axes and size % n == 0:
            parts.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
            used.update(mesh_axes)
        else:
            parts.append(None)
    return P(*parts)


def named(shape, axes, mesh: Mesh | None, rules=DEFAULT_RULES):
    """NamedSharding for logical ``axes`` on ``mesh`` (None when there is no mesh)."""
    if mesh is None:
        return None
    return NamedSharding(mesh, spec_for(shape, axes, mesh, rules))


def batch_axes(mesh: Mesh | None, rules=DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the batch, as the rules map ``batch``."""
    if mesh is None:
        return ()
    return tuple(a for a in dict(rules).get("batch", ()) if a in mesh.shape and mesh.shape[a] > 1)


def batch_multiple(mesh: Mesh | None, rules=DEFAULT_RULES) -> int:
    """How many ways the batch is split on ``mesh`` (a batch that is a multiple of this shards)."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh, rules)])) if mesh is not None else 1


def batch_sharding(mesh: Mesh | None, ndim: int, batch: int, rules=DEFAULT_RULES):
    """Sharding for a [batch, ...] array: batch over the data axes, the rest replicated."""
    if mesh is None:
        return None
    return named((batch,) + (1,) * (ndim - 1), ("batch",) + (None,) * (ndim - 1), mesh, rules)
