"""Gated DeltaNet pieces (Qwen-3.5 / Qwen3-Next linear attention) in JAX.

The gated delta rule keeps a per-head state ``S`` [d_k, d_v] and, for each token,

    S <- exp(g_t) * S                      (decay; g_t <= 0)
    S <- S + k_t (beta_t * (v_t - S^T k_t))^T   (delta-rule write)
    o_t = S^T q_t

with q and k L2-normalised in float32 and q scaled by d_k^-1/2. Two numerically equivalent forms
are given, both matching transformers' torch fallbacks (``torch_recurrent_gated_delta_rule`` and
``torch_chunk_gated_delta_rule``):

* :func:`recurrent_gated_delta_rule` -- a scan over tokens (decode);
* :func:`chunk_gated_delta_rule` -- chunks of 64 tokens: a unit-lower-triangular solve inside each
  chunk (the UT transform) and a scan over chunks (prefill).

Shapes: ``q_BxTxHxK``/``k_BxTxHxK`` already repeated to the value heads, ``v_BxTxHxV``,
``g_BxTxH``, ``beta_BxTxH``, state ``[B, H, K, V]`` (float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2norm(x, eps: float = 1e-6):
    """``x * rsqrt(sum(x^2) + eps)`` over the last axis (the FLA / transformers convention)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _prep(q, k, v, g, beta, l2):
    f32 = jnp.float32
    q, k, v, g, beta = (a.astype(f32) for a in (q, k, v, g, beta))
    if l2:
        q, k = l2norm(q), l2norm(k)
    q = q * jnp.float32(q.shape[-1] ** -0.5)
    return q, k, v, g, beta


def recurrent_gated_delta_rule(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, g_BxTxH, beta_BxTxH, state_BxHxKxV=None,
                               *, use_qk_l2norm: bool = True):
    """Token-by-token gated delta rule. Returns ``(o [B,T,H,V] in q's dtype, final state float32)``."""
    dtype = q_BxTxHxK.dtype
    q, k, v, g, beta = _prep(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, g_BxTxH, beta_BxTxH, use_qk_l2norm)
    b, _, h, dk = k.shape
    dv = v.shape[-1]
    s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if state_BxHxKxV is None else state_BxHxKxV.astype(jnp.float32)

    def step(s, xs):
        q_t, k_t, v_t, g_t, b_t = xs  # [B,H,K], [B,H,K], [B,H,V], [B,H], [B,H]
        s = s * jnp.exp(g_t)[..., None, None]
        kv_mem = jnp.sum(s * k_t[..., None], axis=-2)
        delta = (v_t - kv_mem) * b_t[..., None]
        s = s + k_t[..., None] * delta[..., None, :]
        o_t = jnp.sum(s * q_t[..., None], axis=-2)
        return s, o_t

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta))
    s, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1).astype(dtype), s


def unit_lower_inverse(a_NxCxC):
    """``(I + A)^-1`` for strictly lower-triangular ``A`` (nilpotent: ``A^C = 0``) by doubling:
    ``(I - A)(I + A^2)(I + A^4)...``, log2(C) rounds of two batched matmuls.

    ``chunk_gated_delta_rule(solve="doubling")`` uses it (plus one refinement step) in place of a
    batched triangular solve; it is as exact, but in float32 at HIGHEST precision it measured slower
    than the solve on an H100 (2.9 vs 2.6 ms for 8 x 256 tokens of the 122B shape) and on the CPU."""
    c = a_NxCxC.shape[-1]
    hi = jax.lax.Precision.HIGHEST
    eye = jnp.eye(c, dtype=a_NxCxC.dtype)
    inv = eye - a_NxCxC
    p = a_NxCxC
    span = 2
    while span < c:
        p = jnp.matmul(p, p, precision=hi)
        inv = jnp.matmul(inv, eye + p, precision=hi)
        span *= 2
    return inv


def chunk_gated_delta_rule(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, g_BxTxH, beta_BxTxH, state_BxHxKxV=None,
                           *, chunk: int = 64, use_qk_l2norm: bool = True, solve: str = "triangular"):
    """Chunked-parallel gated delta rule (same result as the recurrent form up to float32 rounding).

    The sequence is zero-padded to a multiple of ``chunk`` (zero g, beta, k: the padded tail neither
    decays nor writes the state). Returns ``(o [B,T,H,V] in q's dtype, final state float32)``.
    """
    dtype = q_BxTxHxK.dtype
    q, k, v, g, beta = _prep(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, g_BxTxH, beta_BxTxH, use_qk_l2norm)
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    pad = (-t) % chunk
    if pad:
        padt = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        q, k, v, g, beta = (padt(a) for a in (q, k, v, g, beta))
    n = (t + pad) // chunk
    # -> [B, H, N, C, ...]
    to_chunks = lambda a: jnp.moveaxis(a, 2, 1).reshape((b, h, n, chunk) + a.shape[3:])
    q, k, v, g, beta = (to_chunks(a) for a in (q, k, v, g, beta))
    k_beta = k * beta[..., None]
    v_beta = v * beta[..., None]
    cum = jnp.cumsum(g, axis=-1)  # [B,H,N,C]
    lower = jnp.tril(jnp.ones((chunk, chunk), bool))
    decay_CxC = jnp.exp(jnp.where(lower, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    ut = jnp.einsum("bhnik,bhnjk->bhnij", k_beta, k) * decay_CxC
    intra = jnp.einsum("bhnik,bhnjk->bhnij", q, k) * decay_CxC
    # (I + strict_lower(ut)) X = rhs; the diagonal is ignored (unit_diagonal), as torch's unitriangular.
    # One solve for both right-hand sides (XLA:CPU's batched triangular solve is slow per call).
    rhs = jnp.concatenate([v_beta, k_beta * jnp.exp(cum)[..., None]], axis=-1)
    if solve == "doubling":
        # the inverse by doubling, then one step of iterative refinement with it
        hi = jax.lax.Precision.HIGHEST
        a = jnp.where(lower & ~jnp.eye(chunk, dtype=bool), ut, 0.0)
        inv = unit_lower_inverse(a)
        sol = jnp.matmul(inv, rhs, precision=hi)
        resid = rhs - sol - jnp.matmul(a, sol, precision=hi)
        sol = sol + jnp.matmul(inv, resid, precision=hi)
    else:
        sol = jax.lax.linalg.triangular_solve(ut, rhs, left_side=True, lower=True, unit_diagonal=True)
    u, w = sol[..., :dv], sol[..., dv:]  # "new values" [.., V]; decayed keys reading the old state [.., K]
    q_dec = q * jnp.exp(cum)[..., None]
    k_dec = k * jnp.exp(cum[..., -1:] - cum)[..., None]
    chunk_decay = jnp.exp(cum[..., -1])                  # [B,H,N]
    s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if state_BxHxKxV is None else state_BxHxKxV.astype(jnp.float32)

    def step(s, xs):
        u_c, w_c, q_c, k_c, intra_c, d_c = xs
        v_new = u_c - w_c @ s
        o = q_c @ s + intra_c @ v_new
        s = s * d_c[..., None, None] + jnp.swapaxes(k_c, -1, -2) @ v_new
        return s, o

    xs = tuple(jnp.moveaxis(a, 2, 0) for a in (u, w, q_dec, k_dec, intra, chunk_decay))
    s, o = jax.lax.scan(step, s0, xs)  # o: [N, B, H, C, V]
    o = jnp.moveaxis(o, 0, 2).reshape(b, h, n * chunk, dv)[:, :, :t]
    return jnp.moveaxis(o, 1, 2).astype(dtype), s


def causal_conv(x_BxTxC, w_KxC, window_BxKm1xC=None):
    """Depthwise causal conv1d (no bias) over time, as ``F.conv1d(..., groups=C)`` with left padding.

    ``window`` holds the K-1 inputs before this call (zeros when None). Returns ``(y [B,T,C], new
    window = the last K-1 inputs of concat(window, x))``; y is in x's dtype, computed in w's dtype.
    """
    kk = w_KxC.shape[0]
    b, t, c = x_BxTxC.shape
    if window_BxKm1xC is None:
        window_BxKm1xC = jnp.zeros((b, kk - 1, c), x_BxTxC.dtype)
    xp = jnp.concatenate([window_BxKm1xC.astype(x_BxTxC.dtype), x_BxTxC], axis=1).astype(w_KxC.dtype)
    y = xp[:, 0:t] * w_KxC[0]
    for j in range(1, kk):
        y = y + xp[:, j:j + t] * w_KxC[j]
    return y.astype(x_BxTxC.dtype), xp[:, t:].astype(x_BxTxC.dtype)
