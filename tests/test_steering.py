"""Steering: exact no-op at c=0, exact vector at the layer, sweeps as one batch, prefill/decode modes."""

import functools

import numpy as np
import pytest

import prefjax
from prefjax.generation import generate
from prefjax.experiments.steering import completion_loglik, dose_response, format_table
from prefjax.stats_small import wilson_interval
from prefjax.steering import SteerSpec, SteeringError, random_direction, steer, token_span_mask

LAYER = 3
NAMES = tuple(f"blocks.{l}.hook_resid_post" for l in range(7))


@pytest.fixture(scope="module")
def model():
    return prefjax.load("gemma3-tiny")


@pytest.fixture(scope="module")
def batch():
    rng = np.random.RandomState(0)
    toks = rng.randint(3, 512, size=(3, 12)).astype(np.int32)
    valid = np.ones_like(toks, bool)
    valid[1, :4] = False  # a left-padded row
    return toks, valid


def direction(d, seed=1):
    return np.random.RandomState(seed).randn(d).astype(np.float32) * 3.0


def test_zero_coef_is_bit_exact(model, batch):
    toks, valid = batch
    base_logits, base = model.run(toks, attention_mask=valid, capture=NAMES)
    spec = SteerSpec(layer=(1, LAYER), direction=direction(model.d_model), coef=0.0, scale=5.0)
    logits, cap = steer(model.run, spec)(toks, attention_mask=valid, capture=NAMES)
    assert np.array_equal(np.asarray(logits), np.asarray(base_logits))
    for n in NAMES:
        assert np.array_equal(np.asarray(cap[n]), np.asarray(base[n]))
    # a per-example coef with zeros: those rows bit-exact, the others not
    spec = spec.replace(coef=np.array([0.0, 2.0, 0.0]))
    logits, _ = model.run(toks, attention_mask=valid, steer=spec)
    logits, base_logits = np.asarray(logits), np.asarray(base_logits)
    assert np.array_equal(logits[[0, 2]], base_logits[[0, 2]])
    assert not np.allclose(logits[1], base_logits[1])


def test_vector_added_exactly_on_masked_tokens(model, batch):
    toks, valid = batch
    v = direction(model.d_model)
    mask = np.zeros(toks.shape, np.float32)
    mask[0, 2:5] = 1.0
    mask[1, 6:8] = -1.0  # signed (contrastive) entries
    mask[2, 11] = 1.0
    coef, scale = 1.5, 4.0
    _, base = model.run(toks, attention_mask=valid, capture=NAMES)
    _, cap = model.run(toks, attention_mask=valid, capture=NAMES,
                       steer=SteerSpec(layer=LAYER, direction=v, coef=coef, scale=scale, tokens=mask))
    unit = (v.astype(np.float64) / np.linalg.norm(v.astype(np.float64))).astype(np.float32)
    w = np.float32(coef * scale) * mask
    expect = np.asarray(base[NAMES[LAYER]]) + w[:, :, None] * unit[None, None, :]
    got = np.asarray(cap[NAMES[LAYER]])
    np.testing.assert_array_equal(got, expect)
    delta = got - np.asarray(base[NAMES[LAYER]])
    on = mask != 0
    np.testing.assert_allclose(np.linalg.norm(delta[on], axis=-1), coef * scale, rtol=1e-5)
    assert np.array_equal(delta[~on], np.zeros_like(delta[~on]))
    for l in range(LAYER):  # earlier layers untouched, bit for bit
        assert np.array_equal(np.asarray(cap[NAMES[l]]), np.asarray(base[NAMES[l]]))
    later = np.asarray(cap[NAMES[LAYER + 1]]) - np.asarray(base[NAMES[LAYER + 1]])
    assert np.abs(later).max() > 1e-3  # later layers see the edit


def test_coef_sweep_equals_separate_runs(model):
    rng = np.random.RandomState(3)
    one = rng.randint(3, 512, size=(1, 10)).astype(np.int32)
    coefs = np.array([-4.0, 0.0, 1.0, 8.0], np.float32)
    v = direction(model.d_model, seed=4)
    spec = SteerSpec(layer=2, direction=v, coef=coefs, scale=2.0)
    swept, _ = model.run(np.repeat(one, len(coefs), 0), steer=spec)
    swept = np.asarray(swept)
    for i, c in enumerate(coefs):
        single, _ = model.run(one, steer=spec.replace(coef=float(c)))
        np.testing.assert_allclose(swept[i], np.asarray(single)[0], rtol=1e-6, atol=1e-6)
    # a new coef array with the same shape reuses the compiled program
    from prefjax.model import _run_jit
    before = _run_jit._cache_size()
    model.run(np.repeat(one, len(coefs), 0), steer=spec.replace(coef=coefs * 3))
    assert _run_jit._cache_size() == before


def test_steer_composes_and_prompt_mode_equals_all_in_run(model, batch):
    toks, valid = batch
    v1, v2 = direction(model.d_model, 5), direction(model.d_model, 6)
    a = SteerSpec(layer=1, direction=v1, coef=2.0)
    b = SteerSpec(layer=4, direction=v2, coef=-3.0, tokens="prompt")
    both, _ = steer(steer(model.run, a), b)(toks, attention_mask=valid)
    tup, _ = model.run(toks, attention_mask=valid, steer=(a, b.replace(tokens="all")))
    assert np.array_equal(np.asarray(both), np.asarray(tup))
    gen_only, _ = model.run(toks, attention_mask=valid, steer=SteerSpec(LAYER, v1, 5.0, tokens="generated"))
    base, _ = model.run(toks, attention_mask=valid)
    assert np.array_equal(np.asarray(gen_only), np.asarray(base))  # run is all prompt


def test_validation_errors(model, batch):
    toks, valid = batch
    d = model.d_model
    bad = [
        (SteerSpec(layer=7, direction=direction(d)), "layer 7 is outside"),
        (SteerSpec(layer=(1, -1), direction=direction(d)), "layer -1 is outside"),
        (SteerSpec(layer=1, direction=np.ones(d + 1)), r"shape \(65,\)"),
        (SteerSpec(layer=1, direction=np.zeros(d)), "zero norm"),
        (SteerSpec(layer=1, direction=np.full(d, np.nan)), "NaN"),
        (SteerSpec(layer=1, direction=direction(d), coef=np.array([1.0, np.nan, 0.0])), "coef contains NaN"),
        (SteerSpec(layer=1, direction=direction(d), coef=np.ones(4)), r"coef has shape \(4,\)"),
        (SteerSpec(layer=1, direction=direction(d), tokens=np.ones((3, 11))), r"mask has shape \(3, 11\)"),
        (SteerSpec(layer=1, direction=direction(d), tokens="span"), "tokens='span'"),
    ]
    for spec, msg in bad:
        with pytest.raises(SteeringError, match=msg):
            model.run(toks, attention_mask=valid, steer=spec)


def test_steered_generation_prefill_and_decode(model):
    rng = np.random.RandomState(7)
    prompts = [[int(t) for t in rng.randint(3, 512, size=n)] for n in (6, 11)]
    v = direction(model.d_model, 8)
    gen = functools.partial(generate, model, max_new_tokens=6, temperature=0, stop_ids=())
    base = gen(prompts)
    zero = steer(gen, SteerSpec(LAYER, v, np.array([0.0, 0.0]), scale=10.0, tokens="generated"))(prompts)
    assert zero.token_ids == base.token_ids
    # prompt-only steering: the first new token differs from a generated-only run's (which is unsteered)
    big = 60.0
    p_only = gen(prompts, steer=SteerSpec(LAYER, v, big, tokens="prompt"))
    g_only = gen(prompts, steer=SteerSpec(LAYER, v, big, tokens="generated"))
    assert [t[0] for t in g_only.token_ids] == [t[0] for t in base.token_ids]
    assert g_only.token_ids != base.token_ids  # decode steps are steered
    assert p_only.token_ids != base.token_ids
    # reference for "generated": recompute with model.run, steering only the positions after the prompt
    width = 11 + 6  # one left-padded width for every step: one compile
    for b, p in enumerate(prompts):
        seq = list(p)
        for i in range(6):
            toks = np.zeros((1, width), np.int32)
            toks[0, width - len(seq):] = seq
            valid = np.arange(width)[None] >= width - len(seq)
            mask = np.zeros((1, width), np.float32)
            mask[0, width - len(seq) + len(p):] = 1.0
            lg, _ = model.run(toks, attention_mask=valid, steer=SteerSpec(LAYER, v, big, tokens=mask))
            seq.append(int(np.argmax(np.asarray(lg)[0, -1])))
        assert seq[len(p):] == g_only.token_ids[b]
    # a per-prompt mask (aligned with each prompt's own tokens) == "prompt" mode when it covers the prompt
    m = np.zeros((2, 11), np.float32)
    m[0, :6] = 1.0
    m[1, :11] = 1.0
    masked = gen(prompts, steer=SteerSpec(LAYER, v, big, tokens=m))
    assert masked.token_ids == p_only.token_ids
    # a per-example coef sweep in one generate call equals separate calls
    sweep = gen(prompts, steer=SteerSpec(LAYER, v, np.array([0.0, big]), tokens="prompt"))
    assert sweep.token_ids[0] == base.token_ids[0] and sweep.token_ids[1] == p_only.token_ids[1]


def test_steered_prefix_cache_then_decode(model):
    """The steering stage's batched path: prompts (but their last token) prefilled once under per-row
    coefficients of two directions, then the forced-prefix logits and a greedy decode read from that
    cache, equal steering the whole prompts; c = 0 rows equal the unsteered cache bit for bit."""
    rng = np.random.RandomState(11)
    prompts = [[int(t) for t in rng.randint(3, 512, size=n)] for n in (7, 10)]
    m = np.zeros((2, 10), np.float32)
    m[0, 2:4], m[1, 5:9] = 1.0, -1.0  # masks inside each prompt's body
    v, r = direction(model.d_model, 12), direction(model.d_model, 13)
    coefs = np.array([30.0, 0.0], np.float32)
    specs = (SteerSpec(LAYER, v, coefs, tokens=m), SteerSpec(LAYER, r, np.zeros(2, np.float32), tokens=m))
    want = generate(model, prompts, max_new_tokens=5, temperature=0, stop_ids=(), steer=specs)
    body = np.zeros((2, 9), np.int32)
    valid = np.zeros((2, 9), bool)
    bm = np.zeros((2, 9), np.float32)
    for b, p in enumerate(prompts):
        n = len(p) - 1
        body[b, 9 - n:], valid[b, 9 - n:], bm[b, 9 - n:] = p[:-1], True, m[b, :n]
    cache = model.prefill(body, attention_mask=valid, steer=tuple(s.replace(tokens=bm) for s in specs))
    got = generate(model, [[p[-1]] for p in prompts], max_new_tokens=5, temperature=0, stop_ids=(), prefix=cache,
                   pad_multiple=1)
    assert got.token_ids == want.token_ids
    plain = model.prefill(body, attention_mask=valid)
    for k in ("k", "v"):
        a, b = np.asarray(cache.state[k]), np.asarray(plain.state[k])
        assert np.array_equal(a[:, 1], b[:, 1]) and not np.array_equal(a[:, 0], b[:, 0])
    # the forced-prefix read: one more token on top of the cache, as logit mode does
    lg, _ = model.run(np.asarray([[p[-1], 9] for p in prompts]), positions=np.asarray([[1], [1]]), prefix=cache)
    full = np.zeros((2, 11), np.int32)
    fv = np.zeros((2, 11), bool)
    fm = np.zeros((2, 11), np.float32)
    for b, p in enumerate(prompts):
        full[b, 11 - len(p) - 1:], fv[b, 11 - len(p) - 1:] = p + [9], True
        fm[b, 11 - len(p) - 1:11 - 2] = m[b, :len(p) - 1]
    ref, _ = model.run(full, attention_mask=fv, positions=np.asarray([[10], [10]]),
                       steer=tuple(s.replace(tokens=fm) for s in specs))
    np.testing.assert_allclose(np.asarray(lg), np.asarray(ref), atol=2e-5, rtol=1e-5)


def test_random_direction_and_dose_response():
    r = random_direction(64, seed=3)
    assert r.shape == (64,) and abs(np.linalg.norm(r) - 1) < 1e-6
    assert not np.allclose(r, random_direction(64, seed=4))
    lo, hi = wilson_interval(8, 10)
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3  # textbook values
    rows = dose_response({1.0: ["A"] * 8 + ["B"] * 2 + ["refusal", None],
                          -1.0: [{"choice": "B", "refusal": False}] * 3 + [{"choice": None, "refusal": True}]})
    assert [r["coef"] for r in rows] == [-1.0, 1.0]
    assert rows[0]["p_a"] == 0.0 and rows[0]["refusal_rate"] == 0.25 and rows[0]["n"] == 4
    assert rows[1]["n_a"] == 8 and rows[1]["n_unparsed"] == 1 and abs(rows[1]["p_a_lo"] - lo) < 1e-12
    table = format_table(rows).splitlines()
    assert len(table) == 3 and table[0].split()[:3] == ["coef", "n", "P(A)"]
    assert table[2].split()[:3] == ["1", "12", "0.800"]  # 12 records; 8 of the 10 A/B answers chose A
    with pytest.raises(ValueError, match="'C'"):
        dose_response({0.0: ["C"]})


def test_completion_loglik(model):
    rng = np.random.RandomState(9)
    p = [[int(t) for t in rng.randint(3, 512, size=n)] for n in (5, 9)]
    c = [[int(t) for t in rng.randint(3, 512, size=n)] for n in (3, 1)]
    got = completion_loglik(model, p, c)
    import jax
    for b in range(2):
        seq = np.array([p[b] + c[b]], np.int32)
        lg, _ = model.run(seq)
        lp = np.asarray(jax.nn.log_softmax(np.asarray(lg, np.float32)[0], axis=-1))
        ref = np.mean([lp[len(p[b]) + j - 1, c[b][j]] for j in range(len(c[b]))])
        assert abs(got[b] - ref) < 1e-5
    assert np.isnan(completion_loglik(model, [[4, 5]], [[]])[0])


class _FakeTok:
    """Whitespace tokenizer with offsets (the Tokenizer interface used by token_span_mask)."""

    def encode_with_offsets(self, text):
        import re
        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        return list(range(len(spans))), spans


def test_token_span_mask():
    user = "Pick one.\nTask A:\nwrite a poem\n\nTask B:\nsort numbers"
    text = "<start> " + user + " <end>"
    spans = {"A": (user.index("write"), user.index("poem") + 4), "B": (user.index("sort"), len(user))}
    ids, mask = token_span_mask(_FakeTok(), text, spans, signs={"A": 1, "B": -1}, within=user)
    words = text.split()
    assert [w for w, m in zip(words, mask) if m == 1] == ["write", "a", "poem"]
    assert [w for w, m in zip(words, mask) if m == -1] == ["sort", "numbers"]
    with pytest.raises(SteeringError, match="outside the text"):
        token_span_mask(_FakeTok(), text, [(5, 5000)])


def test_readout_gradient_equals_finite_differences_of_steering(model):
    """<readout_gradient, u> is the slope of the readout under SteerSpec steering along u (central
    differences through Model.run), for a signed token mask with left padding; a wrong layer is refused."""
    from prefjax.steering import readout_gradient
    rng = np.random.default_rng(3)
    b, t, v = 3, 10, model.config.vocab_size
    ids = rng.integers(5, v, size=(b, t)).astype(np.int32)
    att = np.ones((b, t), np.int32)
    att[1, :3] = 0  # left padding
    mask = np.zeros((b, t), np.float32)
    mask[0, 2:5], mask[0, 6:8] = 1.0, -1.0
    mask[1, 4:7] = 1.0
    mask[2, 1:9] = 0.5
    pos = np.full(b, t - 1)
    readout = np.zeros((b, v), np.float32)
    readout[np.arange(b), [11, 12, 13]] = [1.0, -2.0, 0.5]
    readout[np.arange(b), [21, 22, 23]] = [-1.0, 1.0, -0.5]
    layer = 1
    grad = readout_gradient(model, ids, att, pos, mask, layer, readout, batch_size=2)
    assert np.linalg.norm(grad) > 0

    def value(u, c):
        spec = SteerSpec(layer=layer, direction=u, coef=np.full(b, c, np.float32), scale=1.0, tokens=mask)
        logits, _ = model.run(ids, attention_mask=att, positions=pos[:, None], steer=spec)
        return float(np.sum(np.asarray(logits[:, 0, :], np.float64) * readout))

    for seed in range(3):
        u = rng.standard_normal(model.config.d_model)
        u /= np.linalg.norm(u)
        eps = 1e-2
        fd = (value(u, eps) - value(u, -eps)) / (2 * eps)
        np.testing.assert_allclose(grad @ u, fd, rtol=2e-3, atol=1e-4 * np.abs(grad).sum())
    # a gradient taken at another layer gives other slopes
    other = readout_gradient(model, ids, att, pos, mask, 0, readout)
    assert np.linalg.norm(other - grad) > 1e-3 * np.linalg.norm(grad)
    with pytest.raises(SteeringError, match="layer 99 is outside"):
        readout_gradient(model, ids, att, pos, mask, 99, readout)
    with pytest.raises(SteeringError, match="readout has shape"):
        readout_gradient(model, ids, att, pos, mask, layer, readout[:, :5])


def test_dose_slopes_drop_off_format_coefficients():
    """Both directions flat on format; at |c| = 0.1 the probe's replies leave the answer format (on-label rate
    0.88) and its P(steered) jumps. Fitted over every linear-range coefficient, that makes a spurious probe
    slope and probe - random difference; the format filter leaves +-0.1 out and the slope is ~0."""
    from prefjax.experiments.steering import dose_slopes, on_format_coefs
    rng = np.random.default_rng(0)
    coefs = [-0.1, -0.05, -0.02, 0.0, 0.02, 0.05, 0.1]
    n_pairs = 24
    flat = lambda: 0.5 + 0.01 * rng.standard_normal((len(coefs), 2 * n_pairs))
    p = {"probe": flat(), "random": flat()}
    c = np.asarray(coefs)
    off = np.abs(c) > 0.07
    p["probe"][off] += 0.3 * np.sign(c[off])[:, None]  # spurious: read off labels the model no longer emits
    on_label = {"probe": np.where(off, 0.88, 1.0), "random": np.ones(len(coefs))}
    raw = dose_slopes(coefs, p, linear_max=0.1)
    assert raw["used_coefs"] == coefs and raw["off_format_coefs"] == []
    assert raw["slope"]["probe"] > 2.0 and raw["difference"]["p_value"] < 1e-6  # the spurious finding
    d = dose_slopes(coefs, p, linear_max=0.1, on_label=on_label, min_on_label=0.95)
    assert d["used_coefs"] == [-0.05, -0.02, 0.0, 0.02, 0.05] and d["off_format_coefs"] == [-0.1, 0.1]
    assert d["linear_coefs"] == coefs and d["min_on_label"] == 0.95
    assert d["on_label"]["probe"][0] == 0.88
    assert abs(d["slope"]["probe"]) < 0.2 and d["difference"]["p_value"] > 0.01
    ref = np.polyfit(c[~off], p["probe"][~off].mean(1), 1)[0]
    assert d["slope"]["probe"] == pytest.approx(ref)
    # the random direction going off format drops the coefficient too (both directions must be on format)
    both = dose_slopes(coefs, p, linear_max=0.1, min_on_label=0.95,
                       on_label={"probe": np.ones(len(coefs)), "random": np.where(c == 0.05, 0.5, 1.0)})
    assert both["off_format_coefs"] == [0.05] and 0.05 not in both["used_coefs"]
    # nothing left: no slope, and the note says why
    none = dose_slopes(coefs, p, linear_max=0.1, min_on_label=0.95,
                       on_label={"probe": np.where(c == 0.0, 1.0, 0.5), "random": np.ones(len(coefs))})
    assert none["slope"] == {"probe": None, "random": None} and "on-label rate >= 0.95" in none["note"]
    assert on_format_coefs(coefs, None, 0.95) == (coefs, [])
    with pytest.raises(ValueError, match="min_on_label"):
        on_format_coefs(coefs, None, 1.5)
    with pytest.raises(ValueError, match="one rate per coefficient"):
        dose_slopes(coefs, p, linear_max=0.1, on_label={"probe": [1.0]}, min_on_label=0.95)
