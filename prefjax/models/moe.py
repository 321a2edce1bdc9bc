"""Mixture-of-experts feed-forward (Qwen-3.5 MoE / Qwen3-Next style) in JAX.

Router: ``softmax(x @ W_router)`` in float32, top-k, renormalised to sum to one, cast back to the
activation dtype. Experts: SwiGLU ``down(silu(x @ gate) * (x @ up))``. A shared expert is added,
scaled by ``sigmoid(x @ w_shared_gate)``.

Four expert paths give the same numbers (``moe_block(impl=...)``):

* :func:`experts_dense` -- every expert on every token, weighted by the (mostly zero) routing
  weights. A reference; cost grows with the number of experts.
* :func:`experts_grouped` -- token-expert assignments sorted by expert and run with
  ``jax.lax.ragged_dot`` (one grouped matmul per projection); cost grows with top-k. On GPUs
  (JAX 0.11) ``ragged_dot`` lowers to a computation over every expert for every row: a
  Qwen-3.5-122B layer slice at 8 x 256 tokens asked for a 28.6 GiB buffer on an H100.
* :func:`experts_blocked` -- the same sort, each expert's rows padded to a multiple of ``block``
  rows, and every block multiplied by its own expert's weights (gathered per block, a chunk of blocks
  at a time). Static shapes, memory bounded by the chunk, weights read about once per block.
* ``"pallas"`` (:mod:`prefjax.models.moe_pallas`) -- the same layout through Pallas/Triton kernels
  that read each block's expert weights in place (the GPU default; the Pallas interpreter elsewhere).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.models.moe_layout import block_layout, combine_rows, gather_rows
from prefjax.models.moe_pallas import experts_pallas


def route(x_NxD, w_router_DxE, top_k: int):
    """Return ``(weights [N, k] in x's dtype, expert ids [N, k] int32)``."""
    logits = x_NxD @ w_router_DxE.astype(x_NxD.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_w, top_i = jax.lax.top_k(probs, top_k)
    top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    return top_w.astype(x_NxD.dtype), top_i.astype(jnp.int32)


def experts_dense(x_NxD, top_w_NxK, top_i_NxK, gate_ExDxF, up_ExDxF, down_ExFxD, act=jax.nn.silu):
    """Reference: run every expert on every token and sum with the routing weights."""
    n_exp = gate_ExDxF.shape[0]
    dense_w = jnp.sum(jax.nn.one_hot(top_i_NxK, n_exp, dtype=top_w_NxK.dtype) * top_w_NxK[..., None], axis=1)
    h = act(jnp.einsum("nd,edf->nef", x_NxD, gate_ExDxF)) * jnp.einsum("nd,edf->nef", x_NxD, up_ExDxF)
    y = jnp.einsum("nef,efd->ned", h, down_ExFxD)
    return jnp.einsum("ned,ne->nd", y, dense_w)


def experts_grouped(x_NxD, top_w_NxK, top_i_NxK, gate_ExDxF, up_ExDxF, down_ExFxD, act=jax.nn.silu, *, valid=None):
    """Sort (token, slot) pairs by expert and run grouped matmuls with ``jax.lax.ragged_dot``.

    ``valid`` [N, k] (optional) marks the rows to run: the others (routed to another device's experts)
    sort last, outside every group, so they take no expert's matmul and add nothing."""
    n, k = top_i_NxK.shape
    n_exp = gate_ExDxF.shape[0]
    flat_e = top_i_NxK.reshape(-1)
    if valid is not None:
        flat_e = jnp.where(valid.reshape(-1), flat_e, n_exp)
    order = jnp.argsort(flat_e, stable=True)
    token_of = order // k
    xs = jnp.take(x_NxD, token_of, axis=0)
    sizes = jnp.bincount(flat_e, length=n_exp + 1)[:n_exp].astype(jnp.int32)
    h = act(jax.lax.ragged_dot(xs, gate_ExDxF, sizes)) * jax.lax.ragged_dot(xs, up_ExDxF, sizes)
    y = jax.lax.ragged_dot(h, down_ExFxD, sizes)
    y = y * jnp.take(top_w_NxK.reshape(-1), order)[:, None]
    if valid is not None:  # rows past the last group are not written by ragged_dot: never let them in
        y = jnp.where((jnp.take(flat_e, order) < n_exp)[:, None], y, 0)
    return jnp.zeros_like(x_NxD).at[token_of].add(y.astype(x_NxD.dtype))


def experts_blocked(x_NxD, top_w_NxK, top_i_NxK, gate_ExDxF, up_ExDxF, down_ExFxD, act=jax.nn.silu, *,
                    block: int = 64, chunk: int = 16, valid=None):
    """Expert-sorted, block-padded grouped matmul without ``ragged_dot`` (plain XLA).

    Rows are laid out by :func:`prefjax.models.moe_layout.block_layout`, so every block belongs to one expert. Blocks are
    processed ``chunk`` at a time with their expert's weights gathered per block; padding rows read
    a zero row and are dropped on the way back.
    """
    lay = block_layout(top_w_NxK, top_i_NxK, gate_ExDxF.shape[0], block, multiple=chunk, valid_NxK=valid)
    rows = gather_rows(x_NxD, lay)

    def run(args):
        xb_CxBxD, e_C = args
        h = act(jnp.einsum("cbd,cdf->cbf", xb_CxBxD, jnp.take(gate_ExDxF, e_C, axis=0))) \
            * jnp.einsum("cbd,cdf->cbf", xb_CxBxD, jnp.take(up_ExDxF, e_C, axis=0))
        return jnp.einsum("cbf,cfd->cbd", h, jnp.take(down_ExFxD, e_C, axis=0))

    n_chunks = lay.n_blocks // chunk
    xb = rows.reshape(n_chunks, chunk, block, -1)
    y = jax.lax.map(run, (xb, lay.block_e.reshape(n_chunks, chunk))).reshape(lay.n_blocks * block, -1)
    return combine_rows(y, lay, x_NxD)


IMPLS = ("grouped", "dense", "blocked", "pallas")


def swiglu(x, gate_DxF, up_DxF, down_FxD, act=jax.nn.silu):
    """Plain SwiGLU MLP: ``down(act(x @ gate) * (x @ up))``."""
    return (act(x @ gate_DxF) * (x @ up_DxF)) @ down_FxD


EXPERT_WEIGHTS = ("experts_gate", "experts_up", "experts_down")


def _expert_fn(impl: str):
    return {"grouped": experts_grouped, "dense": experts_dense, "blocked": experts_blocked, "pallas": experts_pallas}[impl]


def run_experts(impl: str, x_NxD, top_w_NxK, top_i_NxK, weights, act, *, layer=None, valid_NxK=None):
    """Routed experts through path ``impl``, whatever form the weights come in.

    ``weights`` are (gate, up, down), each ``[E, ...]`` or a layer stack ``[n_layers, E, ...]`` with
    ``layer`` the one to use (the Pallas path reads it in place, the others take the slice).
    ``valid_NxK`` marks the rows to run (the rest add nothing; the block-layout paths skip them).
    """
    kw = {}
    if weights[0].ndim == 4:
        if impl == "pallas":
            kw["layer"] = layer
        else:
            weights = tuple(jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False) for a in weights)
    if valid_NxK is not None:
        if impl in ("pallas", "blocked", "grouped"):  # these paths drop the rows (and their weights)
            kw["valid"] = valid_NxK
        else:
            top_w_NxK = jnp.where(valid_NxK, top_w_NxK, 0)
    return _expert_fn(impl)(x_NxD, top_w_NxK, top_i_NxK, *weights, act, **kw)


def experts_parallel(x_NxD, top_w_NxK, top_i_NxK, weights, act, *, impl: str, mesh, layer=None):
    """Routed experts, expert- and tensor-parallel under ``shard_map`` on ``mesh``.

    Each device holds ``E / |expert|`` experts and ``F / |tensor|`` of their width (the layout the
    parameter sharding rules give them, less any ``fsdp`` split of the model width, which is gathered)
    and the tokens of its batch shard. The batch is also split over the ``expert`` axis (the rules map
    ``batch`` to it), so the attention and DeltaNet layers run data-parallel there; here the token
    shards of the expert axis are all-gathered, each device runs only the rows routed to its own
    experts (the others are dropped before the grouped matmul), and the partial outputs are summed:
    ``psum_scatter`` over the gathered axes hands each device back its own tokens, ``psum`` over the
    rest (the tensor axis, and expert axes the batch could not be split over). ``weights`` may be
    layer stacks (``layer`` then picks one).
    """
    from jax.sharding import PartitionSpec as P

    from prefjax.sharding import spec_for
    if impl != "pallas" and weights[0].ndim == 4 and layer is not None:
        # Only the Pallas kernels read a layer of the stack in place; for the others take the layer here,
        # so the gather of its fsdp split below covers one layer's experts (with the whole stack as the
        # shard_map operand, XLA all-gathers every layer's experts at once, hoisted out of the layer scan:
        # 12 GiB per chip for Qwen-3.5-122B on a v5p-32 with fsdp=2).
        weights = tuple(jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False) for a in weights)
        layer = None
    lead = (None,) * (weights[0].ndim - 3)
    w_specs = tuple(spec_for(w.shape, lead + axes, mesh) for w, axes in
                    zip(weights, (("experts", None, "expert_mlp"),) * 2 + (("experts", "expert_mlp", None),)))
    tok = spec_for(x_NxD.shape[:1], ("batch",), mesh)
    as_tuple = lambda part: () if part is None else (part if isinstance(part, tuple) else (part,))
    e_ax = as_tuple(w_specs[0][len(lead)])
    gather = tuple(a for a in as_tuple(tok[0]) if a in e_ax)  # token shards that must meet every expert shard
    sum_axes = tuple(a for a in e_ax + as_tuple(w_specs[0][len(lead) + 2]) if a not in gather)

    def local(x, w, i, li, *ws):
        if gather:
            x, w, i = (jax.lax.all_gather(a, gather, axis=0, tiled=True) for a in (x, w, i))
        n_local = ws[0].shape[-3]
        shard = jnp.int32(0)
        for a in e_ax:  # this device's position along the expert axes (row-major)
            shard = shard * mesh.shape[a] + jax.lax.axis_index(a)
        off = shard * n_local
        mine = (i >= off) & (i < off + n_local)
        y = run_experts(impl, x, w, jnp.where(mine, i - off, 0), ws, act, layer=li, valid_NxK=mine)
        if gather:
            y = jax.lax.psum_scatter(y, gather, scatter_dimension=0, tiled=True)
        return jax.lax.psum(y, sum_axes) if sum_axes else y

    li = jnp.asarray(0 if layer is None else layer, jnp.int32)
    return jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, P(), *w_specs), out_specs=tok,
                         check_vma=False)(x_NxD, top_w_NxK, top_i_NxK, li, *weights)


def _active_mesh():
    """The mesh set with ``jax.set_mesh`` around this trace, if it has more than one device (then
    each device runs its own token shard and experts; a Pallas call left to GSPMD would instead see
    gathered inputs)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not any(v > 1 for v in mesh.shape.values()):
        return None
    return mesh


def moe_block(x_BxTxD, p, top_k: int, *, impl: str = "grouped", act=jax.nn.silu, experts=None, layer=None):
    """Routed experts + gated shared expert on [B, T, D]. ``p`` holds router, experts_*, shared_*.

    ``experts`` may instead hold the three expert weights stacked over layers (``[n_layers, E, ...]``)
    with ``layer`` (an int, or a traced scalar under a layer scan) the one to use: the Pallas path
    reads it in place, the others take the layer's slice. Under ``jax.set_mesh`` with several devices
    the routed experts run under ``shard_map`` (:func:`experts_parallel`).
    """
    b, t, d = x_BxTxD.shape
    x = x_BxTxD.reshape(b * t, d)
    shared = swiglu(x, p["shared_gate"], p["shared_up"], p["shared_down"], act)
    top_w, top_i = route(x, p["router"], top_k)
    weights = tuple((p if experts is None else experts)[k] for k in EXPERT_WEIGHTS)
    mesh = _active_mesh()
    if mesh is not None:
        routed = experts_parallel(x, top_w, top_i, weights, act, impl=impl, mesh=mesh, layer=layer)
    else:
        routed = run_experts(impl, x, top_w, top_i, weights, act, layer=layer)
    gate = jax.nn.sigmoid(x @ p["shared_expert_gate"][:, None].astype(x.dtype))
    out = routed + gate * shared
    return out.reshape(b, t, d)
