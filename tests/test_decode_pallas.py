"""The Pallas decode-attention kernel (``models.decode_pallas``), run by the Pallas interpreter on the CPU:
against a float64 reference under the project's gate (at most twice the batched-matmul path's error,
floor 1e-6 relative), over ragged rows, masks with holes, sliding windows, an empty row and every split
count; a gate that fails on a one-slot mistake; and whole models (greedy ``generate`` and the engine)
with the kernel in the decode step equal to the XLA path."""

import jax.numpy as jnp
import numpy as np
import pytest

import prefjax
from prefjax.engine import Engine, Request
from prefjax.generation import generate
from prefjax.models import decode_pallas
from prefjax.models.layers import NEG_INF, attention_mask, decode_kernel, dot_attention

S, H = 48, 16


def reference(q, k, v, mask, scale):  # float64 numpy, [B, 1, N, H]
    b, _, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, kv, n // kv, h)
    s = np.einsum("bkgh,bskh->bkgs", qg, k) * scale
    s = np.where(mask[:, 0, 0, None, None, :], s, NEG_INF)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bkgs,bskh->bkgh", p, v).reshape(b, 1, n, h)


def inputs(seed, n_kv, group, window=None):
    rng = np.random.RandomState(seed)
    b = 5
    q = rng.randn(b, 1, n_kv * group, H) * 2
    k, v = rng.randn(b, S, n_kv, H), rng.randn(b, S, n_kv, H)
    valid = np.zeros((b, S), bool)
    valid[0, 3:29] = True  # a contiguous row not aligned to blocks
    valid[1] = True
    valid[1, 17:21] = False  # a hole (padding between a shared prefix and a tail)
    valid[2, 40:] = True  # only the last blocks
    valid[3, :1] = True  # one slot
    # row 4: nothing to attend to (uniform average, as the batched path's finite NEG_INF gives)
    mask = np.asarray(attention_mask(jnp.array([S - 1]), jnp.arange(S), jnp.asarray(valid), window))
    return q, k, v, mask


def batched(q, k, v, mask, scale):
    q2 = jnp.concatenate([jnp.asarray(q, jnp.float32)] * 2, axis=1)  # T = 2 takes the batched-matmul path
    m2 = jnp.concatenate([jnp.asarray(mask)] * 2, axis=2)
    out = dot_attention(q2, jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), m2, scale)
    return np.asarray(out[:, :1], np.float64)


def kernel(q, k, v, mask, scale, **kw):
    out = decode_pallas.decode_attention(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                         jnp.asarray(v, jnp.float32), jnp.asarray(mask), scale=scale,
                                         interpret=True, **kw)
    return np.asarray(out, np.float64)


def rel(a, ref):
    return np.max(np.abs(a - ref)) / np.max(np.abs(ref))


@pytest.mark.parametrize("n_kv,group", [(2, 2), (1, 4), (2, 1)])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("splits", [1, 3, 6])
@pytest.mark.parametrize("products", ["dot", "sum"])
def test_kernel_within_gate_of_the_batched_path(n_kv, group, window, splits, products):
    scale = H ** -0.5
    q, k, v, mask = inputs(n_kv * 10 + group, n_kv, group, window)
    ref = reference(q, k, v, mask, scale)
    new = kernel(q, k, v, mask, scale, block=8, splits=splits, products=products)
    old = batched(q, k, v, mask, scale)
    assert rel(new, ref) <= 2 * max(rel(old, ref), 1e-6), (rel(new, ref), rel(old, ref))
    np.testing.assert_allclose(new[4], ref[4], rtol=0, atol=1e-6)  # the empty row


def test_gate_fails_on_a_one_slot_mistake():
    # the comparison above can fail: losing a row's last valid slot (an off-by-one in the block range)
    scale = H ** -0.5
    q, k, v, mask = inputs(3, 2, 2)
    ref = reference(q, k, v, mask, scale)
    short = mask.copy()
    short[0, 0, 0, 28] = False  # row 0's last valid slot
    assert rel(kernel(q, k, v, short, scale, block=8), ref) > 100 * 1e-6


def test_default_tiling_and_refusal():
    assert decode_pallas.block_size(336) == 16 and decode_pallas.block_size(320) == 32
    assert decode_pallas.supported(32, 16, 128, 336)
    assert not decode_pallas.supported(12, 4, 128, 336)  # group of 3 is not a power of two
    assert not decode_pallas.supported(8, 4, 128, 13)  # no tile of 8 slots divides 13 ("auto" takes XLA)
    q, k, v, mask = inputs(0, 2, 2)
    with pytest.raises(ValueError, match="head_dim=8"):
        kernel(q[..., :8], k[:, :13, :, :8], v[:, :13, :, :8], mask[..., :13], 0.25)
    # forced, it still runs with one-slot tiles
    new = kernel(q, k[:, :13], v[:, :13], mask[..., :13], 0.25)
    ref = reference(q, k[:, :13], v[:, :13], mask[..., :13], 0.25)
    assert rel(new, ref) <= 2 * max(rel(batched(q, k[:, :13], v[:, :13], mask[..., :13], 0.25), ref), 1e-6)
    with pytest.raises(ValueError, match="decode kernel must be one of"):
        with decode_kernel("triton"):
            pass


@pytest.fixture(scope="module")
def gemma():
    return prefjax.load("gemma3-tiny")  # sliding window 8: the prompts below run past it


@pytest.fixture
def traced(monkeypatch):
    """Counts the traces of the kernel (so a test cannot pass on programs compiled without it)."""
    calls = []
    real = decode_pallas.decode_attention

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(decode_pallas, "decode_attention", spy)
    return calls


def test_generate_with_the_kernel_equals_xla(gemma, traced):
    prompts = [[5, 9, 13, 2, 7, 11, 3, 8, 4, 6, 10, 12], [21, 5, 9]]
    ref = generate(gemma, prompts, max_new_tokens=6, temperature=0.0, stop_ids=())
    assert not traced  # "auto" on a CPU: the XLA path
    with decode_kernel("pallas-interpret"):
        got = generate(gemma, prompts, max_new_tokens=6, temperature=0.0, stop_ids=())
    assert traced  # the context cleared jit's caches: the decode step was traced again, with the kernel
    assert got.token_ids == ref.token_ids


def test_engine_with_the_kernel_equals_xla(gemma, traced):
    rng = np.random.RandomState(4)
    prompts = [[int(t) for t in rng.randint(3, 512, size=n)] for n in (9, 3, 14)]
    news = [5, 7, 4]

    def run():
        eng = Engine(gemma, rows=2, temperature=0.0, stop_ids=(), unroll=True)
        return [r[0].token_ids for r in eng.run([Request(p, n) for p, n in zip(prompts, news)])]

    ref = run()
    assert not traced
    with decode_kernel("pallas-interpret"):
        got = run()
    assert traced and got == ref
