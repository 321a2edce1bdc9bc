"""The expert-sorted, block-padded row layout shared by the blocked (:mod:`prefjax.models.moe`) and
Pallas (:mod:`prefjax.models.moe_pallas`) expert paths, and the platform a trace targets.

Both paths sort the ``N*k`` (token, slot) rows by expert, start each expert at a multiple of
``block`` rows, run every block with its own expert's weights and gather each token's outputs back.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class BlockLayout(NamedTuple):
    """Where each (token, slot) row goes in an expert-sorted, block-padded buffer.

    ``src[r]`` is the sorted row held at padded slot ``r`` (``m`` = an empty slot, reading a zero row),
    ``token_of[i]`` the token of sorted row ``i`` (with a trailing 0 for the empty slot),
    ``slot_of[n, j]`` the padded slot holding token ``n``'s ``j``-th choice, ``top_w`` its routing
    weight, ``block_e[b]`` the expert of block ``b`` and ``n_used`` how many leading blocks hold rows
    (the rest are padding).
    """

    src: jax.Array
    token_of: jax.Array
    slot_of: jax.Array
    top_w: jax.Array
    block_e: jax.Array
    n_used: jax.Array
    n_blocks: int
    block: int


def block_layout(top_w_NxK, top_i_NxK, n_exp: int, block: int, multiple: int = 1, valid_NxK=None) -> BlockLayout:
    """Sort the ``N*k`` (token, slot) rows by expert and start each expert at a multiple of ``block``.

    ``valid_NxK`` (optional) marks the rows to run; the others (another device's experts) take no
    slot and add nothing.

    The static number of blocks is the tight bound ``ceil((m + u*(block-1)) / block)`` with
    ``u = min(n_exp, m)`` experts that can be hit (rounded up to ``multiple``): empty experts take no
    block, so a decode step with 64 rows needs at most 64 blocks however many experts exist.
    """
    n, k = top_i_NxK.shape
    m = n * k
    flat_e = top_i_NxK.reshape(-1)
    if valid_NxK is not None:  # invalid rows sort last, under a sentinel expert id
        flat_e = jnp.where(valid_NxK.reshape(-1), flat_e, n_exp)
        top_w_NxK = jnp.where(valid_NxK, top_w_NxK, 0)
    order = jnp.argsort(flat_e, stable=True)
    sorted_e = flat_e[order]
    sizes = jnp.bincount(flat_e, length=n_exp + 1)[:n_exp].astype(jnp.int32)
    padded = (sizes + block - 1) // block * block
    pad_start = jnp.cumsum(padded) - padded                        # where expert e's rows begin
    row_start = jnp.cumsum(sizes) - sizes                          # where they begin in sorted order
    n_blocks = -(-(m + min(n_exp, m) * (block - 1)) // block)
    n_blocks = -(-n_blocks // multiple) * multiple
    length = n_blocks * block
    e_c = jnp.minimum(sorted_e, n_exp - 1)
    dest = pad_start[e_c] + (jnp.arange(m, dtype=jnp.int32) - row_start[e_c])  # slot of each row
    dest = jnp.where(sorted_e < n_exp, dest, length)                             # invalid: no slot
    src = jnp.full((length,), m, jnp.int32).at[dest].set(jnp.arange(m, dtype=jnp.int32), mode="drop")
    token_of = jnp.concatenate([order // k, jnp.zeros((1,), order.dtype)]).astype(jnp.int32)
    slot_of = jnp.zeros((m,), jnp.int32).at[order].set(jnp.minimum(dest, length - 1)).reshape(n, k)
    # expert of each block: the last expert whose padded range starts at or before the block
    block_e = jnp.clip(jnp.searchsorted(pad_start + padded, jnp.arange(n_blocks) * block, side="right"),
                       0, n_exp - 1).astype(jnp.int32)
    n_used = (jnp.sum(padded) // block).astype(jnp.int32)
    return BlockLayout(src, token_of, slot_of, top_w_NxK, block_e, n_used, n_blocks, block)


def gather_rows(x_NxD, lay: BlockLayout):
    """The padded row buffer ``[n_blocks*block, D]`` (zeros in empty slots)."""
    m = lay.token_of.shape[0] - 1
    x_pad = jnp.concatenate([x_NxD, jnp.zeros((1, x_NxD.shape[1]), x_NxD.dtype)])
    return jnp.where((lay.src < m)[:, None], jnp.take(x_pad, lay.token_of[lay.src], axis=0), 0)


def combine_rows(y_LxD, lay: BlockLayout, like_NxD):
    """Each token's routing-weighted sum of its k expert outputs, gathered from their padded slots
    (a gather rather than a scatter-add: on an H100 the scatter took 1.2 ms of a 7 ms layer)."""
    y = jnp.take(y_LxD, lay.slot_of, axis=0)                       # [N, k, D]
    return jnp.einsum("nkd,nk->nd", y, lay.top_w.astype(y.dtype)).astype(like_NxD.dtype)


def target_platform() -> str:
    """The platform the current trace is for: the devices' platform of the mesh set with ``jax.set_mesh``
    (so a compile for a TPU slice from a CPU host, :mod:`prefjax.aot`, takes the TPU paths), else
    ``jax.default_backend()``."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        platform = getattr(getattr(mesh, "abstract_device", None), "platform", None)
        if platform:
            return str(platform)
    return jax.default_backend()
