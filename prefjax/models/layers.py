"""Shared numerics: norms, rotary embeddings, masks and dot-product attention.

Every function here is written to reproduce Hugging Face transformers' float32 arithmetic operation
for operation (same order of multiplies, same upcasts), because prefjax's contract is that captured
activations equal what transformers computes. Where a model family differs (Gemma's ``1 + w`` norm
weight, Llama's cast-before-multiply) the difference is an argument, not a copy.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
import numpy as np

from prefjax.models import decode_pallas
from prefjax.models.moe_layout import target_platform

NEG_INF = -1e30  # finite: a fully masked (padding) row must not produce NaN

DECODE_KERNELS = ("auto", "xla", "pallas", "pallas-interpret")
_DECODE_KERNEL = contextvars.ContextVar("prefjax_decode_kernel", default=("auto", ()))


@contextlib.contextmanager
def decode_kernel(kind: str, **options):
    """Choose how one-token-per-row attention (a decode step) is computed inside the block:

    * ``"auto"`` (default): the Pallas kernel of :mod:`prefjax.models.decode_pallas` where the trace is
      for one GPU (no mesh of several devices: XLA would gather a custom call's sharded operands), with
      at least :data:`PALLAS_MIN_ROWS` rows of 16-bit inputs, and it tiles the shapes; else
      :func:`decode_attention` (XLA);
    * ``"xla"``: always :func:`decode_attention`;
    * ``"pallas"`` / ``"pallas-interpret"``: always the kernel (compiled by Triton / run by the Pallas
      interpreter, which is how the CPU tests check it); an error if it cannot tile the shapes.

    ``options`` go to :func:`prefjax.models.decode_pallas.decode_attention` (``block``, ``num_warps``,
    ``splits``, ``products``) whenever the kernel is used.

    The choice is made at trace time and prefjax's compiled programs are cached by jit, so entering and
    leaving this context clears JAX's caches (programs compiled inside are recompiled outside). Meant for
    tests and benchmarks that compare the two paths.
    """
    if kind not in DECODE_KERNELS:
        raise ValueError(f"decode kernel must be one of {DECODE_KERNELS}, got {kind!r}")
    jax.clear_caches()
    token = _DECODE_KERNEL.set((kind, tuple(sorted(options.items()))))
    try:
        yield
    finally:
        _DECODE_KERNEL.reset(token)
        jax.clear_caches()


def rms_norm(x, w, eps: float, *, plus_one: bool, cast_before_weight: bool = False):
    """RMSNorm computed in float32.

    ``plus_one``: Gemma / Qwen-3.5 scale by ``1 + w`` (weights stored zero-centred).
    ``cast_before_weight``: Llama casts the normalised value back to the input dtype *before* the
    weight multiply (``w * x.to(dtype)``); Gemma multiplies in float32 and casts after.
    """
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + eps)
    if cast_before_weight:
        y = y.astype(dtype)
        return (w.astype(dtype) * y) if not plus_one else ((1.0 + w.astype(jnp.float32)).astype(dtype) * y)
    scale = (1.0 + w.astype(jnp.float32)) if plus_one else w.astype(jnp.float32)
    return (y * scale).astype(dtype)


def rope_inv_freq(head_dim: int, base: float, *, rotary_dim: int | None = None,
                  rope_type: str = "default", factor: float = 1.0, **scaling) -> np.ndarray:
    """Inverse frequencies as transformers builds them (float32 throughout), on the host.

    ``rotary_dim`` < head_dim gives partial RoPE (Qwen-3.5 rotates the first 25%).
    Supported ``rope_type``: ``default``, ``linear`` (divide by factor), ``llama3``.
    """
    dim = rotary_dim or head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    # torch raises to the power in float32 with its own vectorised pow; numpy's float32 pow disagrees
    # with it in ~19% of entries (1 ulp), the float64 power rounded to float32 in 0.2% (measured over
    # 6 bases x 6 head dims). The reciprocal is then taken in float32, as torch does.
    powed = (np.float64(np.float32(base)) ** exponent.astype(np.float64)).astype(np.float32)
    inv = (np.float32(1.0) / powed).astype(np.float32)
    if rope_type == "default":
        return inv
    if rope_type == "linear":
        return (inv / np.float32(factor)).astype(np.float32)
    if rope_type == "llama3":
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, inv_l).astype(np.float32)
    raise NotImplementedError(f"rope_type {rope_type!r} is not supported")


def rope_cos_sin(pos_BxT, inv_freq, dtype, attention_scaling: float = 1.0):
    """cos/sin of shape [B, T, rotary_dim] (frequencies repeated twice, as HF concatenates them)."""
    freqs = pos_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x_BxTxNxH, cos_BxTxR, sin_BxTxR):
    """Rotate-half RoPE on the first R dims of the head (the rest pass through)."""
    r = cos_BxTxR.shape[-1]
    x_rot, x_pass = x_BxTxNxH[..., :r], x_BxTxNxH[..., r:]
    cos, sin = cos_BxTxR[:, :, None, :], sin_BxTxR[:, :, None, :]
    half = r // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos + rotated * sin
    return out if x_pass.shape[-1] == 0 else jnp.concatenate([out, x_pass], axis=-1)


def write_kv(state, k_BxTxKxH, v_BxTxKxH, start):
    """Write this call's keys and values at slots ``start ..`` of a KV cache ``state`` (``{"k", "v"}``
    [B, S, K, H], or None for a forward without cache). Returns ``(keys, values, new state)``: the whole
    cache's keys and values (in the cache's dtype), or this call's own when there is no cache."""
    if state is None:
        return k_BxTxKxH, v_BxTxKxH, None
    k_all = jax.lax.dynamic_update_slice_in_dim(state["k"], k_BxTxKxH.astype(state["k"].dtype), start, axis=1)
    v_all = jax.lax.dynamic_update_slice_in_dim(state["v"], v_BxTxKxH.astype(state["v"].dtype), start, axis=1)
    return k_all, v_all, {"k": k_all, "v": v_all}


def attention_mask(q_idx_T, kv_idx_S, kv_valid_BxS, window):
    """Boolean [B, 1, T, S] mask: causal, key not padding, and (optionally) inside the window.

    Indices are slot indices in the key sequence (as transformers uses cache positions).
    ``window`` may be None, a Python int, or a traced scalar (0 or less means no window).
    transformers' sliding rule: ``kv_idx > q_idx - window``.
    """
    q = q_idx_T[:, None]
    k = kv_idx_S[None, :]
    m = k <= q
    if window is not None:
        if isinstance(window, int):
            m = m & (k > q - window)
        else:
            m = m & ((window <= 0) | (k > q - window))
    return m[None, None] & kv_valid_BxS[:, None, None, :]


# "auto" takes the kernel from this many rows up: measured faster than decode_attention at 64 and 256 rows
# of the Gemma-3-27B shape on an H200 (BUILD_NOTES.md); at 8 rows only the first, slower form was measured
PALLAS_MIN_ROWS = 64


def _pallas_by_default(q_BxTxNxH, k_BxSxKxH) -> bool:
    """``"auto"``'s choice: the kernel on one GPU, shapes it tiles, at least :data:`PALLAS_MIN_ROWS` rows,
    16-bit inputs (Triton's float32 matrix products default to TF32 on GPUs: float32 runs keep XLA)."""
    b, _, n, h = q_BxTxNxH.shape
    if b < PALLAS_MIN_ROWS or not decode_pallas.supported(n, k_BxSxKxH.shape[2], h, k_BxSxKxH.shape[1]):
        return False
    if q_BxTxNxH.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    mesh = jax.sharding.get_abstract_mesh()
    one_device = mesh.empty or mesh.size == 1  # XLA cannot split a custom call over a mesh
    return one_device and target_platform() == "gpu"


def dot_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale: float):
    """Eager attention, grouped-query: scores in the input dtype, softmax in float32.

    Mirrors transformers' eager path: ``(q @ kᵀ) * scale + mask``, softmax upcast to float32 and cast
    back to the query dtype before multiplying the values.
    """
    b, t, n, h = q_BxTxNxH.shape
    if t == 1:
        kind, options = _DECODE_KERNEL.get()
        if kind == "auto":
            kind = "pallas" if _pallas_by_default(q_BxTxNxH, k_BxSxKxH) else "xla"
        if kind == "xla":
            return decode_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale)
        return decode_pallas.decode_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale=scale,
                                              interpret=kind == "pallas-interpret", **dict(options))
    kv = k_BxSxKxH.shape[2]
    g = n // kv
    q = q_BxTxNxH.reshape(b, t, kv, g, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_BxSxKxH) * jnp.asarray(scale, q.dtype)
    mask = mask_Bx1xTxS[:, :, None]  # [B, 1, 1, T, S]
    scores = jnp.where(mask, scores.astype(jnp.float32), NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH)
    return out.reshape(b, t, n, h)


def decode_attention(q_Bx1xNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1x1xS, scale: float):
    """:func:`dot_attention` for one query token per row (a decode step), written as products summed
    in float32 instead of two batched matrix products.

    The cache is laid out [B, S, K, H]; a batched matrix product wants the batch axes (B, K) leading,
    so on GPUs XLA copied each layer's whole cache into [B, K, S, H] every step (see BUILD_NOTES.md).
    Multiply-and-sum fuses into one pass that reads the cache in place. Rounding mirrors
    :func:`dot_attention`: scores rounded to the input dtype before the scale, softmax in float32,
    probabilities rounded to the input dtype before weighting the values, sums accumulated in float32.
    """
    b, _, n, h = q_Bx1xNxH.shape
    kv = k_BxSxKxH.shape[2]
    g = n // kv
    f32 = jnp.float32
    q = q_Bx1xNxH.reshape(b, 1, kv, g, h).astype(f32)  # [B, 1, K, G, H] against keys [B, S, K, 1, H]
    scores = jnp.sum(q * k_BxSxKxH[:, :, :, None, :].astype(f32), axis=-1)  # [B, S, K, G]
    scores = scores.astype(q_Bx1xNxH.dtype) * jnp.asarray(scale, q_Bx1xNxH.dtype)
    mask = mask_Bx1x1xS[:, 0, 0, :, None, None]  # [B, S, 1, 1]
    probs = jax.nn.softmax(jnp.where(mask, scores.astype(f32), NEG_INF), axis=1).astype(q_Bx1xNxH.dtype)
    out = jnp.sum(probs[..., None].astype(f32) * v_BxSxKxH[:, :, :, None, :].astype(f32), axis=1)  # [B, K, G, H]
    return out.astype(q_Bx1xNxH.dtype).reshape(b, 1, n, h)


def lora_delta(x, lora, name, eq_a, eq_b):
    """``scale * ((x @ A) @ B)`` for LoRA target ``name``, or None when the adapter does not touch it.

    ``lora`` is the per-layer ``params["blocks"]["lora"]`` subtree built by :mod:`prefjax.lora`.
    """
    if lora is None or name not in lora:
        return None
    t = lora[name]
    return jnp.einsum(eq_b, jnp.einsum(eq_a, x, t["A"]), t["B"]) * t["scale"].astype(x.dtype)


def linear(x, p, lora, name, eq, eq_a, eq_b):
    """``einsum(eq, x, p[name])`` plus the LoRA update for ``name`` if an adapter targets it."""
    y = jnp.einsum(eq, x, p[name])
    delta = lora_delta(x, lora, name, eq_a, eq_b)
    return y if delta is None else y + delta


def gelu_tanh(x):
    """GELU with the tanh approximation (``gelu_pytorch_tanh``), written as ``x * sigmoid(2u)``.

    ``0.5 * x * (1 + tanh(u)) == x / (1 + exp(-2u))`` with ``u = sqrt(2/pi) * (x + 0.044715 x^3)``.
    transformers (and ``jax.nn.gelu(approximate=True)``) take the tanh form, whose ``1 + tanh(u)``
    cancels for negative x; XLA:CPU's float32 tanh is up to 4 ulp off (torch's 0.6), so through that
    cancellation jax.nn.gelu was ~3.5x further from the float64 GELU than torch's float32 (mean relative
    error 2e-5 against 6e-6) and tipped the real Gemma-3-270M over the float64 parity gate at
    ln_final. The exp form has no cancellation (mean relative error 8e-8 on XLA:CPU, max 1.3e-6).

    ``2u`` is floored at 90% of ``-log(dtype max)`` (-79.8 in float32 and bfloat16): unfloored,
    ``exp(-2u)`` overflows to inf for very negative x, which leaves the value right (0) but makes the
    gradient inf/inf = NaN. Below the floor the true value is under ``|x| * exp(floor)`` (2e-35 in
    float32: zero at the format's precision). Gemma's beginning-of-sequence token reaches such inputs
    in its early layers, so every backward pass through them (``steering.readout_gradient``) was NaN.
    """
    if x.dtype == jnp.float16:  # x^3 and exp(-2u) overflow float16's range: compute in float32
        return gelu_tanh(x.astype(jnp.float32)).astype(jnp.float16)
    two_u = jnp.asarray(2 * math.sqrt(2 / math.pi), x.dtype) * (x + jnp.asarray(0.044715, x.dtype) * x * x * x)
    floor = jnp.asarray(-0.9 * math.log(float(jnp.finfo(x.dtype).max)), x.dtype)
    return x / (1 + jnp.exp(-jnp.maximum(two_u, floor)))


ACTIVATIONS = {
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
