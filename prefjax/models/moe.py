"""Mixture-of-experts feed-forward (Qwen-3.5 MoE / Qwen3-Next style) in JAX.

Router: ``softmax(x @ W_router)`` in float32, top-k, renormalised to sum to one, cast back to the
activation dtype. Experts: SwiGLU ``down(silu(x @ gate) * (x @ up))``. A shared expert is added,
scaled by ``sigmoid(x @ w_shared_gate)``.

Two expert paths give the same numbers:

* :func:`experts_dense` -- every expert on every token, weighted by the (mostly zero) routing
  weights. A reference; cost grows with the number of experts.
* :func:`experts_grouped` -- token-expert assignments sorted by expert and run with
  ``jax.lax.ragged_dot`` (one grouped matmul per projection); cost grows with top-k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def experts_grouped(x_NxD, top_w_NxK, top_i_NxK, gate_ExDxF, up_ExDxF, down_ExFxD, act=jax.nn.silu):
    """Sort (token, slot) pairs by expert and run grouped matmuls with ``jax.lax.ragged_dot``."""
    n, k = top_i_NxK.shape
    n_exp = gate_ExDxF.shape[0]
    flat_e = top_i_NxK.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    token_of = order // k
    xs = jnp.take(x_NxD, token_of, axis=0)
    sizes = jnp.bincount(flat_e, length=n_exp).astype(jnp.int32)
    h = act(jax.lax.ragged_dot(xs, gate_ExDxF, sizes)) * jax.lax.ragged_dot(xs, up_ExDxF, sizes)
    y = jax.lax.ragged_dot(h, down_ExFxD, sizes)
    y = y * jnp.take(top_w_NxK.reshape(-1), order)[:, None]
    return jnp.zeros_like(x_NxD).at[token_of].add(y.astype(x_NxD.dtype))


def swiglu(x, gate_DxF, up_DxF, down_FxD, act=jax.nn.silu):
    """Plain SwiGLU MLP: ``down(act(x @ gate) * (x @ up))``."""
    return (act(x @ gate_DxF) * (x @ up_DxF)) @ down_FxD


def moe_block(x_BxTxD, p, top_k: int, *, impl: str = "grouped", act=jax.nn.silu):
    """Routed experts + gated shared expert on [B, T, D]. ``p`` holds router, experts_*, shared_*."""
    b, t, d = x_BxTxD.shape
    x = x_BxTxD.reshape(b * t, d)
    shared = swiglu(x, p["shared_gate"], p["shared_up"], p["shared_down"], act)
    top_w, top_i = route(x, p["router"], top_k)
    fn = {"grouped": experts_grouped, "dense": experts_dense}[impl]
    routed = fn(x, top_w, top_i, p["experts_gate"], p["experts_up"], p["experts_down"], act)
    gate = jax.nn.sigmoid(x @ p["shared_expert_gate"][:, None].astype(x.dtype))
    out = routed + gate * shared
    return out.reshape(b, t, d)
