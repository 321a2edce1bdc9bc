"""``layers.decode_attention`` (one query per row, products summed in float32) against a float64
reference, held to the project's gate: its error is at most twice that of the batched-matmul path it
replaced (``dot_attention`` with two query tokens), floor 1e-6 relative; padding rows and windows included."""

import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.models.layers import NEG_INF, attention_mask, decode_attention, dot_attention

B, S, K, G, H = 3, 23, 2, 3, 16


def reference(q, k, v, mask, scale):  # float64 numpy, [B, 1, N, H]
    b, _, n, h = q.shape
    qg = q.reshape(b, K, G, h)
    s = np.einsum("bkgh,bskh->bkgs", qg, k) * scale
    s = np.where(mask[:, 0, 0, None, None, :], s, NEG_INF)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bkgs,bskh->bkgh", p, v).reshape(b, 1, n, h)


def inputs(seed, window=None):
    rng = np.random.RandomState(seed)
    q = rng.randn(B, 1, K * G, H)
    k, v = rng.randn(B, S, K, H), rng.randn(B, S, K, H)
    valid = rng.rand(B, S) < 0.8
    valid[2] = False  # a padding row: nothing to attend to
    mask = np.asarray(attention_mask(jnp.array([S - 1]), jnp.arange(S), jnp.asarray(valid), window))
    return q, k, v, mask


def old_path(q, k, v, mask, scale, dtype):
    q2 = jnp.concatenate([jnp.asarray(q, dtype)] * 2, axis=1)  # T = 2 takes the batched-matmul path
    m2 = jnp.concatenate([jnp.asarray(mask)] * 2, axis=2)
    return np.asarray(dot_attention(q2, jnp.asarray(k, dtype), jnp.asarray(v, dtype), m2, scale)[:, :1], np.float64)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_attention_within_gate_of_the_batched_path(window, dtype):
    scale = H ** -0.5
    q, k, v, mask = inputs(0, window)
    if dtype == jnp.bfloat16:  # the reference sees the same rounded inputs
        q, k, v = (np.asarray(jnp.asarray(a, dtype), np.float64) for a in (q, k, v))
    ref = reference(q, k, v, mask, scale)
    new = np.asarray(decode_attention(jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
                                      jnp.asarray(mask), scale), np.float64)
    old = old_path(q, k, v, mask, scale, dtype)
    assert new.shape == ref.shape
    rel = lambda a: np.max(np.abs(a - ref)) / np.max(np.abs(ref))  # noqa: E731
    assert rel(new) <= 2 * max(rel(old), 1e-6), (rel(new), rel(old))
    # the padding row attends uniformly (finite NEG_INF), as the batched path does
    np.testing.assert_allclose(new[2], ref[2], rtol=0, atol=2e-2 if dtype == jnp.bfloat16 else 1e-6)


def test_decode_attention_sees_the_mask():
    # a gate that can fail: dropping the mask (or masking the wrong axis) moves the output far
    scale = H ** -0.5
    q, k, v, mask = inputs(1, 5)
    ref = reference(q, k, v, mask, scale)
    unmasked = np.asarray(decode_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                           jnp.ones_like(jnp.asarray(mask)), scale), np.float64)
    assert np.max(np.abs(unmasked - ref)) > 1e-2
