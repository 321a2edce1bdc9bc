"""Decode attention as a Pallas (Triton) GPU kernel that reads the [B, S, K, H] KV cache in place and
only over each row's valid slots.

One query token per row attends to its cache. XLA's fused multiply-and-sum
(:func:`prefjax.models.layers.decode_attention`) reads every slot of every row and ran at 29% of the
read bound at batch 64 on an H200 (BUILD_NOTES.md). This kernel:

* runs a grid of (row, KV head, split of the slots): each program loads blocks of ``block`` slots of
  one head's keys and values (``block`` x head_dim, strided by K x head_dim in memory: no transpose);
* visits only the blocks between the row's first and last valid slot (the engine keeps a row's tokens
  contiguous, so that is the row's context, not the whole cache), masking inside them;
* keeps an online softmax (running max, running sum, unnormalised output) in float32 per query head of
  the group, and the splits are merged afterwards in XLA (flash-decoding), so small batches still fill
  the GPU.

Numerics: scores are float32 sums of products, rounded to the input dtype and scaled in it (as
:func:`~prefjax.models.layers.dot_attention`); the softmax is the online form in float32, and the
unnormalised probabilities, rounded to the value dtype, weight the values with float32 sums (the
batched path rounds the normalised probabilities instead; in float32 both agree to rounding). A row with no valid slot averages every slot's value
uniformly, as the batched path's finite ``NEG_INF`` mask does.

``interpret=True`` runs the same kernel through the Pallas interpreter (the CPU tests use this).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from prefjax.models.moe_pallas import pow2_tile

NEG_INF = -1e30  # matches prefjax.models.layers.NEG_INF (kept local: layers imports this module)


def block_size(n_slots: int, pref: int = 32) -> int:
    """The default tile of slots: the largest power of two <= ``pref`` (32: fastest at 64 rows on an H200)
    dividing ``n_slots``."""
    return pow2_tile(n_slots, pref)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supported(n_heads: int, n_kv: int, head_dim: int, n_slots: int, min_block: int = 8) -> bool:
    """Whether the kernel tiles these shapes (Triton wants power-of-two tiles: group size and head
    dim) with tiles of at least ``min_block`` slots dividing the slot count (smaller tiles work but are
    slow: the ``"auto"`` choice of :func:`prefjax.models.layers.decode_kernel` asks for 8)."""
    return (n_heads % n_kv == 0 and _pow2(n_heads // n_kv) and _pow2(head_dim) and head_dim >= 16
            and block_size(n_slots) >= min_block)


def _kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, m_ref, l_ref, *,
            block: int, per_split: int, scale: float, dtype, products: str):
    from jax.experimental import pallas as pl
    p = pl.program_id(2)
    lo, hi = lo_ref[0], hi_ref[0]
    empty = hi <= lo  # no valid slot: uniform weights over every slot (the batched path's result)
    n_blocks = mask_ref.shape[0] // block
    first = jnp.where(empty, 0, lo // block)
    last = jnp.where(empty, n_blocks, (hi + block - 1) // block)
    b0 = jnp.maximum(first, p * per_split)
    b1 = jnp.minimum(last, (p + 1) * per_split)
    q = q_ref[...]  # [G, H] (G padded to 16 rows for "dot")
    g = q.shape[0]

    def body(i, carry):
        acc, m, l = carry
        sl = pl.ds(i * block, block)
        if products == "dot":  # tensor-core products, float32 accumulation
            s = jnp.dot(q, k_ref[sl, :].T, preferred_element_type=jnp.float32)  # [G, block]
        else:
            s = jnp.sum(q.astype(jnp.float32)[:, None, :] * k_ref[sl, :].astype(jnp.float32)[None, :, :], axis=-1)
        s = (s.astype(dtype) * jnp.asarray(scale, dtype)).astype(jnp.float32)
        valid = (mask_ref[sl] != 0) | empty
        s = jnp.where(empty, 0.0, s)
        s = jnp.where(valid[None, :], s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # [G]
        corr = jnp.exp(m - m_new)
        e = jnp.exp(s - m_new[:, None])  # [G, block]
        v = v_ref[sl, :]  # [block, H]
        if products == "dot":  # the unnormalised weights rounded to the value dtype, as tensor cores take them
            pv = jnp.dot(e.astype(v.dtype), v, preferred_element_type=jnp.float32)
        else:
            pv = jnp.sum(e[:, :, None] * v.astype(jnp.float32)[None, :, :], axis=1)
        acc = acc * corr[:, None] + pv
        return acc, m_new, l * corr + jnp.sum(e, axis=-1)

    init = (jnp.zeros((g, q.shape[1]), jnp.float32), jnp.full((g,), NEG_INF, jnp.float32),
            jnp.zeros((g,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(b0, jnp.maximum(b0, b1), body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("scale", "block", "splits", "products", "interpret", "num_warps",
                                             "num_stages"))
def decode_attention(q_Bx1xNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1x1xS, *, scale: float, block: int = 0,
                     splits: int = 0, products: str = "dot", interpret: bool = False, num_warps: int = 4,
                     num_stages: int = 2):
    """Attention of one query token per row over a [B, S, K, H] cache, returning [B, 1, N, H] in the
    query dtype (the contract of :func:`prefjax.models.layers.decode_attention`).

    ``block`` slots per loaded tile (0: :func:`block_size`); ``splits`` programs per (row, head) over
    the slots (0: enough that the grid has about 2,048 programs, at most one per block). ``products``:
    ``"dot"`` (matrix products on tensor cores, the query group padded to 16 rows, the unnormalised
    weights rounded to the value dtype before weighting the values) or ``"sum"`` (float32 products
    and sums; measured slower on an H200, kept for the comparison in ``bench/attention_probe.py``).
    """
    from jax.experimental import pallas as pl
    b, _, n, h = q_Bx1xNxH.shape
    s_len, kv = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    g = n // kv
    if not supported(n, kv, h, s_len, min_block=1):
        raise ValueError(f"decode kernel: unsupported shapes heads={n} kv_heads={kv} head_dim={h} slots={s_len}")
    block = block or block_size(s_len)
    n_blocks = s_len // block
    if splits <= 0:
        splits = max(1, min(n_blocks, -(-2048 // (b * kv))))
    per_split = -(-n_blocks // splits)
    mask = mask_Bx1x1xS[:, 0, 0, :]
    idx = jnp.arange(s_len, dtype=jnp.int32)
    any_valid = jnp.any(mask, axis=-1)
    lo = jnp.where(any_valid, jnp.min(jnp.where(mask, idx, s_len), axis=-1), 0).astype(jnp.int32)
    hi = jnp.where(any_valid, jnp.max(jnp.where(mask, idx, -1), axis=-1) + 1, 0).astype(jnp.int32)
    q = q_Bx1xNxH.reshape(b, kv, g, h)
    if products not in ("dot", "sum"):
        raise ValueError(f"products must be 'dot' or 'sum', got {products!r}")
    gp = max(g, 16) if products == "dot" else g  # Triton's matrix products want 16 rows at least
    if gp != g:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    kw = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton
        kw["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    kernel = functools.partial(_kernel, block=block, per_split=per_split, scale=scale, dtype=q.dtype,
                               products=products)
    o, m, l = pl.pallas_call(
        kernel,
        name="prefjax_decode_attention",  # the kernel's name in a profile
        grid=(b, kv, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j, p: (i,)),
            pl.BlockSpec((1,), lambda i, j, p: (i,)),
            pl.BlockSpec((None, None, gp, h), lambda i, j, p: (i, j, 0, 0)),
            pl.BlockSpec((None, s_len, None, h), lambda i, j, p: (i, 0, j, 0)),
            pl.BlockSpec((None, s_len, None, h), lambda i, j, p: (i, 0, j, 0)),
            pl.BlockSpec((None, s_len), lambda i, j, p: (i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, h), lambda i, j, p: (i, j, p, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, j, p: (i, j, p, 0)),
            pl.BlockSpec((None, None, None, gp), lambda i, j, p: (i, j, p, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kv, splits, gp, h), jnp.float32),
            jax.ShapeDtypeStruct((b, kv, splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, kv, splits, gp), jnp.float32),
        ],
        interpret=interpret, **kw,
    )(lo, hi, q, k_BxSxKxH, v_BxSxKxH, mask.astype(jnp.int32))
    # merge the splits: each holds sum_j e_j v_j and sum_j e_j relative to its own running max
    o, m, l = o[..., :g, :], m[..., :g], l[..., :g]
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - m_all)  # a split that saw no block has m = NEG_INF and l = 0: weight exp(-huge) = 0
    num = jnp.sum(o * w[..., None], axis=2)
    den = jnp.sum(l * w, axis=2)
    return (num / den[..., None]).astype(q.dtype).reshape(b, 1, n, h)
