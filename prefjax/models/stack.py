"""The layer stack as a fold that takes the intervention as a function.

Every decoder family in prefjax writes one *block function*

    block_fn(p_l, x_BxTxD, layer, aux_l, hook, state_l) -> (x_BxTxD, state_l)

where ``p_l`` is the block's slice of the stacked parameters, ``layer`` is the block index (a traced
int32 under scan, a Python int when unrolled), ``aux_l`` is per-layer static-shaped data (layer type
flags, ...), ``state_l`` is the block's decode state (KV cache, recurrent state; None in a plain
forward), and ``hook(point, x) -> x`` must be called at every named intercept point. :func:`fold`
supplies ``hook``: it applies the caller's intervention and records what the capture spec asks for,
gathered at the requested token positions, so only those activations are ever materialised.

``fold`` runs the blocks with ``jax.lax.scan`` over the leading ``layer`` axis; ``unroll=True`` runs a
Python loop over the same block function and gives the same numbers. Blocks split per layer
(:func:`split_layers`) always run the Python loop: a scan would have to stack them again, a copy of every
weight per call.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from prefjax.hooks import CaptureSpec, InterventionContext, hook_name


def gather_positions(x_BxTxD, pos_BxK):
    """``x[b, pos[b, k]]`` -> [B, K, D]; ``pos_BxK=None`` returns x unchanged."""
    if pos_BxK is None:
        return x_BxTxD
    return jnp.take_along_axis(x_BxTxD, pos_BxK[:, :, None].astype(jnp.int32), axis=1)


class StepInputs(NamedTuple):
    """What every family derives from (valid mask, decode state, start slot) before its layers run."""

    kv_valid_BxS: Any       # which key slots hold real tokens (the cache's, updated with this call's)
    pos_ids_BxT: Any        # RoPE positions: count of real tokens before each one
    q_slot_T: Any           # slot index of each query token
    kv_slot_S: Any          # slot index of each key
    layer_state: Any        # the per-layer part of the decode state (None in a plain forward)
    ctx: InterventionContext


def step_inputs(valid_BxT, *, state=None, start=0, pos_ids_BxT=None, is_prompt=True) -> StepInputs:
    """Shared preamble of every family's ``forward``.

    Without ``state`` the keys are this call's tokens. With ``state`` (a dict holding ``valid`` [B, S]
    plus per-layer arrays) this call's tokens occupy slots ``start .. start+T-1``. Positions default to
    ``cumsum(valid) - 1`` counted over everything already in the cache, so left padding never shifts
    RoPE. ``is_prompt`` (bool or [B, T]) tells interventions which tokens are prompt tokens.
    """
    b, t = valid_BxT.shape
    valid_BxT = valid_BxT.astype(bool)
    if state is None:
        kv_valid = valid_BxT
        layer_state = None
        if pos_ids_BxT is None:
            pos_ids_BxT = jnp.cumsum(valid_BxT.astype(jnp.int32), axis=1) - 1
    else:
        kv_valid = jax.lax.dynamic_update_slice_in_dim(state["valid"], valid_BxT, start, axis=1)
        layer_state = {k: v for k, v in state.items() if k != "valid"}
        if pos_ids_BxT is None:
            s = kv_valid.shape[1]
            before = jnp.sum(state["valid"].astype(jnp.int32) * (jnp.arange(s) < start)[None], axis=1)
            pos_ids_BxT = before[:, None] + jnp.cumsum(valid_BxT.astype(jnp.int32), axis=1) - 1
    is_prompt_BxT = jnp.full((b, t), bool(is_prompt)) if isinstance(is_prompt, bool) else is_prompt
    return StepInputs(kv_valid, pos_ids_BxT, start + jnp.arange(t, dtype=jnp.int32),
                      jnp.arange(kv_valid.shape[1], dtype=jnp.int32), layer_state,
                      InterventionContext(token_pos_BxT=pos_ids_BxT, is_prompt_BxT=is_prompt_BxT))


def next_state(state, inputs: StepInputs, layer_state):
    """The decode state after a call (None in a plain forward)."""
    return None if state is None else {**layer_state, "valid": inputs.kv_valid_BxS}


class ForwardOut(NamedTuple):
    """What every family's ``forward`` returns. Unpacks as the 4-tuple it replaces:
    ``logits, captured, h, state = forward(...)``."""

    logits: Any     # [B, K|T, V], or None when called with logits=False
    captured: Any   # hook name -> [B, K|T, D]
    h: Any          # final-normed hidden state [B, K|T, D]
    state: Any      # the decode state after the call (None in a plain forward)


def forward_tail(x_BxTxD, captured, *, pos_BxK, capture: CaptureSpec, final_norm: Callable,
                 unembed: Callable | None, state, inputs: StepInputs, layer_state) -> ForwardOut:
    """The end every family's ``forward`` shares: gather the requested positions, apply the final norm
    (``final_norm(h)``), record ``ln_final.hook_normalized`` when asked, unembed (``unembed(h)``; None
    skips the logits) and assemble the new decode state."""
    h = final_norm(gather_positions(x_BxTxD, pos_BxK))
    if capture.final:
        captured["ln_final.hook_normalized"] = h
    return ForwardOut(None if unembed is None else unembed(h), captured, h, next_state(state, inputs, layer_state))


def kv_state(n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype) -> dict[str, Any]:
    """An empty KV cache of ``max_len`` slots for every layer, plus the slot-validity mask."""
    shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "valid": jnp.zeros((batch, max_len), bool)}


@jax.tree_util.register_pytree_node_class
class PerLayer:
    """One array per layer standing in for a stacked ``[n_layers, ...]`` leaf of a decode state.

    With ``unroll=True`` each layer's cache is then its own buffer: a jitted decode step that donates
    the state updates it in place (one slot written), where a stacked leaf is sliced per layer by copy
    and re-stacked by copy every step. ``per_layer[l]`` is layer ``l``'s array, like ``stacked[l]``.
    """

    def __init__(self, items):
        self.items = tuple(items)

    def __getitem__(self, l):
        return self.items[l]

    def __len__(self):
        return len(self.items)

    def tree_flatten(self):
        return self.items, None

    @classmethod
    def tree_unflatten(cls, _aux, children):
        return cls(children)


def _is_per_layer(a) -> bool:
    return isinstance(a, PerLayer)


def unstack_layers(tree, n_layers: int):
    """Every array leaf of ``tree`` whose leading axis is ``n_layers`` as a :class:`PerLayer` (traceable)."""
    def one(a):
        if _is_per_layer(a) or getattr(a, "ndim", 0) < 1 or a.shape[0] != n_layers:
            return a
        return PerLayer(a[l] for l in range(n_layers))
    return jax.tree_util.tree_map(one, tree, is_leaf=_is_per_layer)


def stack_layers(tree):
    """The inverse of :func:`unstack_layers`: every :class:`PerLayer` leaf stacked into one array."""
    return jax.tree_util.tree_map(lambda a: jnp.stack(a.items) if _is_per_layer(a) else a, tree,
                                  is_leaf=_is_per_layer)


def _layer_slice(tree, l):
    return jax.tree_util.tree_map(lambda a: a[l], tree, is_leaf=_is_per_layer)


def fold(block_fn: Callable, blocks, x_BxTxD, *, n_layers: int, aux=None, state=None,
         capture: CaptureSpec = CaptureSpec(), pos_BxK=None, intervene=None,
         ctx: InterventionContext | None = None, unroll: bool = False):
    """Run ``n_layers`` blocks over ``x``.

    Returns ``(x_BxTxD, captured, new_state)`` where ``captured`` maps hook names (block points
    only) to arrays [B, K or T, D] and ``new_state`` has the same structure as ``state``.
    """
    points = capture.block_points

    def make_hook(layer, records):
        def hook(point, x):
            if intervene is not None:
                x = intervene(point, layer, x, ctx)
            if point in points and (not isinstance(layer, int) or layer in capture.layers_for(point)):
                records[point] = gather_positions(x, pos_BxK)
            return x
        return hook

    if unroll or is_split(blocks):
        captured = {}
        new_states = []
        for l in range(n_layers):
            records: dict[str, Any] = {}
            st = None if state is None else _layer_slice(state, l)
            x_BxTxD, st = block_fn(_layer_slice(blocks, l), x_BxTxD, l,
                                   None if aux is None else _layer_slice(aux, l),
                                   make_hook(l, records), st)
            new_states.append(st)
            for point, val in records.items():
                captured[hook_name(l, point)] = val
        new_state = None if state is None else jax.tree_util.tree_map(
            lambda a, *xs: PerLayer(xs) if _is_per_layer(a) else jnp.stack(xs), state, *new_states,
            is_leaf=_is_per_layer)
        return x_BxTxD, captured, new_state

    per_layer = state is not None and any(_is_per_layer(a) for a in jax.tree_util.tree_leaves(
        state, is_leaf=_is_per_layer))
    if per_layer:  # the scan needs stacked leaves: stack, run, and hand the per-layer layout back
        x_BxTxD, captured, new_state = fold(block_fn, blocks, x_BxTxD, n_layers=n_layers, aux=aux,
                                            state=stack_layers(state), capture=capture, pos_BxK=pos_BxK,
                                            intervene=intervene, ctx=ctx, unroll=False)
        return x_BxTxD, captured, unstack_layers(new_state, n_layers)

    def body(x, xs):
        p_l, aux_l, st_l, layer = xs
        records: dict[str, Any] = {}
        x, st_l = block_fn(p_l, x, layer, aux_l, make_hook(layer, records), st_l)
        return x, (records, st_l)

    layers = jnp.arange(n_layers, dtype=jnp.int32)
    x_BxTxD, (ys, new_state) = jax.lax.scan(body, x_BxTxD, (blocks, aux, state, layers))
    captured = {}
    for point in points:
        wanted = capture.layers_for(point)
        stacked = ys[point]
        for l in wanted:
            captured[hook_name(l, point)] = stacked[l]
    return x_BxTxD, captured, new_state


def is_split(tree) -> bool:
    """Whether ``tree`` (e.g. a model's params) holds layer-split leaves (:class:`PerLayer`, :func:`split_layers`)."""
    return any(_is_per_layer(a) for a in jax.tree_util.tree_leaves(tree, is_leaf=_is_per_layer))


def split_layers(tree, n_layers: int):
    """Every ``[n_layers, ...]`` array leaf of ``tree`` (e.g. ``params["blocks"]``) as a :class:`PerLayer` of
    ``n_layers`` separate buffers, split outside any trace, one leaf at a time with the stacked leaf donated,
    so the peak memory is the tree plus its largest leaf.

    Why: an unrolled layer loop reads layer ``l``'s weights as the static slice ``stacked[l]``, and XLA on a
    GPU copies such a slice into a buffer of its own before every cuBLAS matmul that reads it (one
    ``memcpy`` per such matmul per call); separate buffers are read in place. :func:`fold` runs split blocks
    unrolled whatever its ``unroll`` says (a scan would stack them again, a copy per call). Dense families only: a kernel that indexes a stacked expert tensor by layer (the MoE Pallas
    path) needs the stack.
    """
    def one(a):
        if _is_per_layer(a) or getattr(a, "ndim", 0) < 1 or a.shape[0] != n_layers:
            return a
        with warnings.catch_warnings():  # donated to be freed early, not reused: XLA says it could not alias it
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            return PerLayer(_split(a, n_layers))
    return jax.tree_util.tree_map(one, tree, is_leaf=_is_per_layer)


def _split_impl(a, n_layers: int):
    return tuple(a[l] for l in range(n_layers))


_split = jax.jit(_split_impl, static_argnums=1, donate_argnums=0)
