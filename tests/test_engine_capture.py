"""Decode-time activation capture in the engine (RowCapture): captured vectors equal a full-forward
recompute over prompt + generated tokens (plain, steered, refilled rows, early stops, the last step),
sampling is unchanged by capturing, and bad capture requests are refused before any compute.

Tolerance: the engine computes a generated token's activations in a one-token decode step against the
KV cache, the recompute in one forward over the whole sequence, so float32 sums run in another order.
On these float32 tiny models the two agree to ~1e-6 of the hook's largest entry (the largest of the
35 comparisons below measured 1.3e-6); ``close`` allows 1e-5 of it. The neighbouring position (an
off-by-one step) differs by O(1) of it (0.92 in the first test's check), five orders of magnitude more.
"""

import numpy as np
import pytest

import prefjax
from prefjax.engine import Engine, EngineError, Request, RowCapture, RowSteer
from prefjax.generation import generate
from prefjax.steering import SteerSpec, random_direction


@pytest.fixture(scope="module")
def model():
    return prefjax.load("gemma3-tiny")  # sliding window 8: prompts and continuations run past it


def prompts_of(lengths, seed=0, vocab=512):
    rng = np.random.RandomState(seed)
    return [[int(t) for t in rng.randint(3, vocab, size=n)] for n in lengths]


def recompute(model, prompt, sample, hooks, steer=None):
    """The hooks at the positions of generated tokens ``sample.capture_steps`` in one plain forward."""
    ids = np.asarray([list(prompt) + list(sample.token_ids)], np.int32)
    pos = np.asarray([[len(prompt) + s for s in sample.capture_steps]], np.int32)
    _, cache = model.run(ids, capture=hooks, positions=pos, steer=steer)
    return {h: np.asarray(cache[h][0], np.float32) for h in hooks}


def close(got, want):
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


def check_captures(model, prompt, sample, cap, steer=None):
    assert sample.capture_steps == [s for s in sorted(cap.steps) if s < len(sample.token_ids)]
    assert list(sample.captures) == list(cap.hooks)
    if not sample.capture_steps:
        assert all(v.shape == (0, model.config.d_model) for v in sample.captures.values())
        return
    want = recompute(model, prompt, sample, cap.hooks, steer)
    for h in cap.hooks:
        assert sample.captures[h].shape == (len(sample.capture_steps), model.config.d_model)
        assert sample.captures[h].dtype == np.float32
        close(sample.captures[h], want[h])


LENS = [5, 14, 3, 20, 9, 11, 7]
NEWS = [6, 3, 9, 5, 2, 8, 7]
CAPS = [
    RowCapture(("blocks.0.hook_resid_post", "blocks.1.hook_attn_out", "blocks.4.hook_resid_pre"), (0, 2, 5)),
    None,
    RowCapture(("blocks.1.hook_mlp_out", "blocks.0.hook_resid_post"), (8, 1, 4, 6)),  # any order; last step
    RowCapture(("blocks.6.hook_resid_post", "ln_final.hook_normalized"), (4, 0)),
    RowCapture(("blocks.2.hook_resid_mid",), (1,)),
    RowCapture(("blocks.0.hook_resid_post", "blocks.3.hook_resid_pre"), tuple(range(8))),  # every step
    RowCapture(("blocks.1.hook_attn_out",), (3, 6)),
]


def test_greedy_ragged_captures_equal_recompute(model):
    prompts = prompts_of(LENS)
    free = [generate(model, [p], max_new_tokens=n, temperature=0.0, stop_ids=()) for p, n in zip(prompts, NEWS)]
    stop = free[0].token_ids[0][3]  # as in test_engine: some rows stop early and are refilled
    refs = [generate(model, [p], max_new_tokens=n, temperature=0.0, stop_ids=(stop,)).token_ids[0]
            for p, n in zip(prompts, NEWS)]
    eng = Engine(model, rows=3, temperature=0.0, stop_ids=(stop,), sync_every=2)
    done = {}
    res = eng.run([Request(p, n, capture=c) for p, n, c in zip(prompts, NEWS, CAPS)],
                  on_done=lambda i, s: done.setdefault(i, s[0].captures))
    assert [r[0].token_ids for r in res] == refs  # capturing leaves the tokens alone
    assert eng.stats.prefills >= 3  # rows were refilled mid-run
    short = [i for i, (c, r) in enumerate(zip(CAPS, res)) if c and max(c.steps) >= len(r[0].token_ids)]
    assert short and any(res[i][0].finished for i in short)  # a stop cut some requested steps off
    assert any(c and max(c.steps) == n - 1 and len(r[0].token_ids) == n for c, n, r in zip(CAPS, NEWS, res))
    for i, (p, c, r) in enumerate(zip(prompts, CAPS, res)):
        if c is None:
            assert r[0].captures is None and r[0].capture_steps is None
            continue
        check_captures(model, p, r[0], c)
        assert done[i] is r[0].captures  # on_done saw the filled captures
    # the comparison tells neighbouring positions apart: one position early (an off-by-one step) fails it
    smp, h = res[0][0], CAPS[0].hooks[0]
    pos = np.asarray([[len(prompts[0]) + s - 1 for s in smp.capture_steps]], np.int32)
    _, early = model.run(np.asarray([prompts[0] + smp.token_ids], np.int32), capture=(h,), positions=pos)
    with pytest.raises(AssertionError):
        close(smp.captures[h], np.asarray(early[h][0]))


def test_steered_rows_capture_the_steered_residual(model):
    cfg = model.config
    prompts = prompts_of([9, 12, 6], seed=4)
    news = [6, 5, 7]
    d0, d1 = random_direction(cfg.d_model, 0), random_direction(cfg.d_model, 1)
    hooks = ("blocks.2.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.4.hook_resid_pre")
    cap = RowCapture(hooks, (0, 3, 4))
    reqs = [Request(prompts[0], news[0], steer=RowSteer(2, d0, 6.0, 20.0), capture=cap),
            Request(prompts[1], news[1], steer=RowSteer(2, d1, -5.0, 20.0, tokens="generated"), capture=cap),
            Request(prompts[2], news[2], capture=cap)]
    res = Engine(model, rows=2, temperature=0.0, stop_ids=()).run(reqs)
    gen_mask = np.zeros((1, len(prompts[1]) + news[1]), np.float32)
    gen_mask[0, len(prompts[1]):] = 1.0  # Model.run sees every token as a prompt token: steer the generated ones
    specs = [SteerSpec(2, d0, 6.0, 20.0), SteerSpec(2, d1, -5.0, 20.0, tokens=gen_mask), None]
    assert len(res[1][0].token_ids) == news[1]  # no stop ids: the mask covers every generated token
    for p, r, ss in zip(prompts, res, specs):
        check_captures(model, p, r[0], cap, steer=ss)
    for p, r in zip(prompts[:2], res[:2]):  # the edit is in the capture: unsteered recompute is far off
        plain = recompute(model, p, r[0], hooks[:1])[hooks[0]]
        assert np.abs(r[0].captures[hooks[0]] - plain).max() > 1.0


def test_sampling_unchanged_by_capture(model):
    prompts = prompts_of([6, 13, 4, 9], seed=2)
    news = [7, 5, 6, 4]
    caps = [RowCapture(("blocks.1.hook_resid_post",), (0, n - 1)) for n in news]  # last steps run one step more
    kw = dict(rows=3, temperature=1.0, top_k=50, seed=3, stop_ids=(), sync_every=3)
    plain = Engine(model, **kw).run([Request(p, n, n_samples=2) for p, n in zip(prompts, news)])
    eng = Engine(model, **kw)
    got = eng.run([Request(p, n, n_samples=2, capture=c) for p, n, c in zip(prompts, news, caps)])
    assert [[s.token_ids for s in r] for r in got] == [[s.token_ids for s in r] for r in plain]
    assert len({tuple(s.token_ids) for r in got for s in r}) > 4  # really sampled
    for p, c, r in zip(prompts, caps, got):
        for s in r:
            check_captures(model, p, s, c)


def test_llama_unrolled_captures_equal_recompute():
    m = prefjax.load("llama31-tiny")
    prompts = prompts_of([6, 15, 3], seed=7, vocab=m.config.vocab_size)
    news = [4, 6, 5]
    cap = RowCapture(("blocks.0.hook_mlp_out", "blocks.1.hook_resid_mid"), (0, 1, 3))
    res = Engine(m, rows=2, temperature=0.0, stop_ids=(), unroll=True).run(
        [Request(p, n, capture=cap) for p, n in zip(prompts, news)])
    for p, r in zip(prompts, res):
        check_captures(m, p, r[0], cap)


def test_bad_capture_named_before_compute(model):
    p = prompts_of([6])[0]
    eng = Engine(model, rows=2, temperature=0.0)
    before = eng.stats  # run replaces its stats only once the requests passed the host checks
    ok = Request(p, 4)
    h = "blocks.1.hook_resid_post"
    cases = [
        (RowCapture(("blocks.1.hook_resid_psot",), (0,)), r"request 1: capture: unknown hook point 'hook_resid_psot'"),
        (RowCapture(("blocks.7.hook_resid_post",), (0,)), r"request 1: capture: hook 'blocks.7.hook_resid_post' "
                                                          r"names layer 7, but the model has layers 0..6"),
        (RowCapture(("resid",), (0,)), r"request 1: capture: unknown hook 'resid'"),
        (RowCapture((h,), (0, -1)), r"request 1: capture: step -1 is outside \[0, max_new_tokens=4\)"),
        (RowCapture((h,), (4,)), r"request 1: capture: step 4 is outside \[0, max_new_tokens=4\)"),
        (RowCapture((h,), (2, 0, 2)), r"request 1: capture: step 2 is asked for twice"),
        (RowCapture((h,), (1.0,)), r"request 1: capture: step 1.0 is not an int"),
        (RowCapture((h,), ()), r"request 1: capture: no steps"),
        (RowCapture((), (0,)), r"request 1: capture: no hooks"),
        (RowCapture((h, h), (0,)), r"request 1: capture: duplicate hooks"),
        ({"hooks": (h,)}, r"request 1: capture must be a RowCapture, got dict"),
    ]
    for cap, msg in cases:
        with pytest.raises(EngineError, match=msg):
            eng.run([ok, Request(p, 4, capture=cap)])
        assert eng.stats is before
