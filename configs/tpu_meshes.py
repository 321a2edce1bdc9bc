"""TPU mesh presets per model (declared in ``configs/common.py``'s model table): which slice each model runs
on and how its arrays are split.

``tpu_mesh(model, topology)`` gives the mesh ``{axis: size}`` (axes of :data:`prefjax.sharding.MESH_AXES`)
for a model of ``configs/common.py`` on a TPU slice (``"v5e:4x4"``, or an accelerator-type name such as
``"v5e-16"``). Every preset below compiles for its slice with ``launch/aot.py`` (the paper's workload:
batch 32, 256-token task prompts, 512-token pair prompts, 128 steering rows) and leaves at least 10% of
each chip's HBM free for prefill + capture, generation's prefill and decode step, the steered
variants and the coherence score (log-likelihoods at the completion's positions only).

Why these shapes:

* Gemma-3-27B (54 GB of bf16 weights): pure FSDP. 16 x v5e (16 GiB each) or 4 x v5p (95 GiB);
  the batch is split over the same chips, so a batch that is a multiple of the chip count runs
  data-parallel between the weight all-gathers.
* Qwen-3.5-122B-A10B (244 GB): the 256 routed experts split over ``expert`` (each chip runs only the
  rows routed to its experts, ``ragged_dot`` on TPU) and everything else over ``fsdp``; on 64 x v6e a
  2-way ``tensor`` axis (the model has 2 KV heads) keeps the batch split at 32, so a batch of 32 still
  divides.
* Llama-3.1-8B (16 GB): FSDP over a v5e-4.
* Pairs not listed: FSDP over every chip for the large models above, data-parallel for the small ones
  (tiny, gemma3-270m); :func:`tpu_mesh` gives these when it is told the chip count.

Multi-host slices (v5e-16 is 4 hosts, v5p-32 is 4, v6e-64 is 16): start the same command once per host;
the launcher calls ``jax.distributed.initialize()`` (TPU pods are detected from the environment), every
process sees the whole slice, and the mesh spans all of its chips.
"""

from __future__ import annotations

from configs.common import MODELS

# The presets live in the model table (configs/common.py, ModelRow.tpu); these are views of it.
# (model, topology) -> mesh. Topologies in libtpu's '<generation>:<chips per axis>' form.
TPU_MESHES: dict[tuple[str, str], dict[str, int]] = {
    (model, topo): dict(mesh) for model, row in MODELS.items() for topo, mesh in row.tpu}

# The slices each large model is meant for (first = default for launch/aot.py's --topology=preset).
TPU_SLICES: dict[str, tuple[str, ...]] = {model: tuple(t for t, _ in row.tpu) for model, row in MODELS.items() if row.tpu}

# Accelerator-type names accepted for the topology (v5p counts TensorCores, two per chip).
_ALIASES = {"v5e-4": "v5e:2x2", "v5e-16": "v5e:4x4", "v5p-8": "v5p:2x2x1", "v5p-32": "v5p:2x2x4",
            "v6e-16": "v6e:4x4", "v6e-64": "v6e:8x8"}


def tpu_mesh(model: str, topology: str, n_chips: int | None = None) -> dict[str, int] | None:
    """The preset mesh for ``model`` on ``topology``. Pairs without a preset, when ``n_chips`` is given:
    ``{"fsdp": n_chips}`` for the large models of :data:`TPU_SLICES`, ``{"data": n_chips}`` (data-parallel)
    for the rest; else None."""
    topo = _ALIASES.get(topology, topology)
    mesh = TPU_MESHES.get((model, topo))
    if mesh is not None:
        return dict(mesh)
    if n_chips is None:
        return None
    return {"fsdp" if model in TPU_SLICES else "data": int(n_chips)}
