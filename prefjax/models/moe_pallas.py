"""Grouped expert matmuls as Pallas (Triton) GPU kernels.

XLA in JAX 0.11 has no grouped-matmul kernel for GPUs: ``jax.lax.ragged_dot`` runs every expert on
every row, and gathering each block's expert weights (:func:`prefjax.models.moe.experts_blocked`)
writes and re-reads a copy of them. These kernels read the weights in place.

The rows come in the expert-sorted, block-padded layout of :func:`prefjax.models.moe_layout.block_layout`:
block ``b`` (``block`` rows) belongs to expert ``block_e[b]``, and blocks from ``n_used`` on are
padding. One kernel, :func:`grouped_matmul`, over a grid of (row block, output tile), serves both
projections:

* :func:`gate_up` -- ``act(x @ gate[e]) * (x @ up[e])`` with both products accumulated in float32
  from the same loaded rows;
* :func:`down` -- ``h @ down[e]``.

Padding blocks store zeros and read no weights, so a decode step reads only the experts it hits.
``interpret=True`` runs the same kernels through the Pallas interpreter (the CPU tests use this).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefjax.models import moe_layout as ML


def pow2_tile(n: int, pref: int) -> int:
    """Largest power of two <= ``pref`` that divides ``n`` (a Triton tile along an axis of length ``n``)."""
    t = pref
    while t > 1 and n % t:
        t //= 2
    return t


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def supported(d_model: int, d_expert: int) -> bool:
    """Whether the kernels tile these widths (Triton needs power-of-two tiles of at least 16)."""
    return pow2_tile(d_model, 64) >= 16 and pow2_tile(d_expert, 64) >= 16


def _call(kernel, out_shape, grid, in_specs, out_spec, interpret, num_warps, num_stages, name):
    from jax.experimental import pallas as pl
    kw = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton
        kw["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_spec,
                          interpret=interpret, name=name, **kw)


def _stacked(w, layer):
    """Weights as ``[n_layers, E, ...]`` and the layer to read as a ``[1]`` int32 array."""
    if w.ndim == 3:
        return w[None], jnp.zeros((1,), jnp.int32)
    return w, jnp.asarray(layer, jnp.int32).reshape(1)


def grouped_matmul(rows_LxK, block_e, n_used, weights, *, block: int, combine=None, layer=None,
                   interpret: bool = False, bn: int = 128, bk: int = 64, num_warps: int = 4, num_stages: int = 3):
    """For each block ``b`` of ``block`` rows: ``combine(rows_b @ w[e] for w in weights)`` with
    ``e = block_e[b]``, accumulated in float32; ``[L, N]`` in rows' dtype. Blocks from ``n_used`` on
    store zeros and read no weights.

    Each weight is ``[E, K, N]``, or ``[n_layers, E, K, N]`` with ``layer`` (an int or a traced
    scalar) saying which layer to read: the kernel indexes the stack in place, so an unrolled or
    scanned layer loop never copies a layer's experts out of it. The grid is (row block, N tile).
    """
    from jax.experimental import pallas as pl
    stacked = [_stacked(w, layer) for w in weights]
    lidx, ws = stacked[0][1], [w for w, _ in stacked]
    combine = combine or (lambda acc: acc)
    length, kdim = rows_LxK.shape
    n = ws[0].shape[3]
    bn, bk = pow2_tile(n, bn), pow2_tile(kdim, bk)
    n_k = kdim // bk

    def kernel(li_ref, be_ref, nu_ref, x_ref, *refs):
        w_refs, o_ref = refs[:-1], refs[-1]
        b, j = pl.program_id(0), pl.program_id(1)
        cols = pl.ds(j * bn, bn)

        @pl.when(b < nu_ref[0])
        def _():
            li, e = li_ref[0], be_ref[b]

            def step(kk, accs):
                ks = pl.ds(kk * bk, bk)
                x = x_ref[:, ks]
                return tuple(acc + _dot(x, w_ref[li, e, ks, cols]) for acc, w_ref in zip(accs, w_refs))

            zero = jnp.zeros((block, bn), jnp.float32)
            accs = jax.lax.fori_loop(0, n_k, step, tuple(zero for _ in w_refs))
            o_ref[...] = combine(*accs).astype(o_ref.dtype)

        @pl.when(b >= nu_ref[0])
        def _():
            o_ref[...] = jnp.zeros((block, bn), o_ref.dtype)

    whole = pl.BlockSpec()
    return _call(
        kernel, jax.ShapeDtypeStruct((length, n), rows_LxK.dtype), (length // block, n // bn),
        [whole, whole, whole, pl.BlockSpec((block, kdim), lambda b, j: (b, 0))] + [whole] * len(ws),
        pl.BlockSpec((block, bn), lambda b, j: (b, j)), interpret, num_warps, num_stages,
        f"prefjax_experts_{len(ws)}w",  # the kernel's name in a profile: 2 weights gate/up, 1 down
    )(lidx, block_e, n_used.reshape(1), rows_LxK, *ws)


def gate_up(rows_LxD, block_e, n_used, w_gate, w_up, *, act=jax.nn.silu, **kw):
    """``act(rows @ gate[e]) * (rows @ up[e])`` per block, both products from the same loaded rows."""
    return grouped_matmul(rows_LxD, block_e, n_used, (w_gate, w_up), combine=lambda g, u: act(g) * u, **kw)


def down(h_LxF, block_e, n_used, w_down, **kw):
    """``h @ down[e]`` per block."""
    return grouped_matmul(h_LxF, block_e, n_used, (w_down,), **kw)


def pick_block(m: int, n_exp: int) -> int:
    """Rows per block: half the mean rows per expert, a power of two in [16, 128]. On an H100, for a
    Qwen-3.5-122B layer at 2048 tokens (64 rows per expert), 32-row blocks took 4.4 ms, 64-row 5.2 and
    128-row 8.3 (bench/qwen35_layer_probe.py --tune)."""
    want = m / (2 * n_exp)
    b = 16
    while b < 128 and b < want:
        b *= 2
    return b


def experts_pallas(x_NxD, top_w_NxK, top_i_NxK, gate_ExDxF, up_ExDxF, down_ExFxD, act=jax.nn.silu, *,
                   block: int | None = None, interpret: bool | None = None, layer=None, valid=None, **tiles):
    """Routed experts through the Pallas kernels; same numbers as :func:`prefjax.models.moe.experts_dense`.

    The expert weights may be whole layer stacks ``[n_layers, E, ...]`` with ``layer`` the one to
    use (read in place). ``valid`` [N, k] (optional) drops rows routed elsewhere. ``tiles`` (``bn``, ``bk``, ``num_warps``, ``num_stages``) go to both kernels; by default 8 warps
    for blocks of 128 rows, else 4.
    """
    n, k = top_i_NxK.shape
    n_exp = gate_ExDxF.shape[-3]
    if interpret is None:  # Triton kernels only where the trace is for a GPU (the interpreter elsewhere)
        interpret = ML.target_platform() != "gpu"
    block = block or pick_block(n * k, n_exp)
    tiles.setdefault("num_warps", 8 if block >= 128 else 4)
    lay = ML.block_layout(top_w_NxK, top_i_NxK, n_exp, block, valid_NxK=valid)
    rows = ML.gather_rows(x_NxD, lay)
    h = gate_up(rows, lay.block_e, lay.n_used, gate_ExDxF, up_ExDxF, block=block, layer=layer, act=act,
                interpret=interpret, **tiles)
    y = down(h, lay.block_e, lay.n_used, down_ExFxD, block=block, layer=layer, interpret=interpret, **tiles)
    return ML.combine_rows(y, lay, x_NxD)

