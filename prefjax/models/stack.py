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
Python loop over the same block function and gives the same numbers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from prefjax.hooks import BLOCK_POINTS, CaptureSpec, InterventionContext, hook_name


def gather_positions(x_BxTxD, pos_BxK):
    """``x[b, pos[b, k]]`` -> [B, K, D]; ``pos_BxK=None`` returns x unchanged."""
    if pos_BxK is None:
        return x_BxTxD
    return jnp.take_along_axis(x_BxTxD, pos_BxK[:, :, None].astype(jnp.int32), axis=1)


def _layer_slice(tree, l):
    return jax.tree_util.tree_map(lambda a: a[l], tree)


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

    if unroll:
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
            lambda *xs: jnp.stack(xs), *new_states)
        return x_BxTxD, captured, new_state

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


def check_block_points(called: set[str]):
    """Used by family tests: every family must call every block point exactly once per block."""
    missing = set(BLOCK_POINTS) - called
    if missing:
        raise AssertionError(f"block never called hook points {sorted(missing)}")
