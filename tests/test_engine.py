"""The continuous-batching engine against generate: ragged prompts, early stops, refilled rows, new
waves, shared-prefill samples, per-row steering, the per-layer cache layout, input errors and the models
the engine refuses (Qwen-3.5: tests/test_engine_qwen35.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prefjax
from prefjax.engine import Engine, EngineError, Request, RowSteer, engine_refusal
from prefjax.generation import generate, per_layer_cache
from prefjax.hooks import CaptureSpec
from prefjax.models import FAMILIES
from prefjax.models.family import Family, StateLayout
from prefjax.models.stack import PerLayer
from prefjax.sharding import make_mesh
from prefjax.steering import SteerSpec, random_direction


@pytest.fixture(scope="module")
def model():
    return prefjax.load("gemma3-tiny")  # sliding window 8: prompts below run past it


def prompts_of(lengths, seed=0, vocab=512):
    rng = np.random.RandomState(seed)
    return [[int(t) for t in rng.randint(3, vocab, size=n)] for n in lengths]


LENS = [5, 14, 3, 20, 9, 11, 7]
NEWS = [6, 3, 9, 5, 2, 8, 7]


def reference(model, prompts, news, stops, **kw):
    return [generate(model, [p], max_new_tokens=n, temperature=0.0, stop_ids=stops, **kw) for p, n in zip(prompts, news)]


def test_greedy_ragged_refills_and_stops_equal_generate(model):
    prompts = prompts_of(LENS)
    free = reference(model, prompts, NEWS, ())
    # a stop id taken from the middle of two continuations: those rows stop early and are refilled
    stop = free[0].token_ids[0][3]
    refs = reference(model, prompts, NEWS, (stop,))
    assert sum(r.finished[0] for r in refs) >= 1 and any(len(r.token_ids[0]) < n for r, n in zip(refs, NEWS))
    eng = Engine(model, rows=3, temperature=0.0, stop_ids=(stop,), sync_every=2)
    res = eng.run([Request(p, n) for p, n in zip(prompts, NEWS)])
    for i, (r, g) in enumerate(zip(res, refs)):
        assert r[0].token_ids == g.token_ids[0], i
        assert r[0].finished == g.finished[0], i
    assert eng.stats.prefills >= 3  # rows were refilled mid-run
    assert eng.stats.generated_tokens > 0
    st = eng.stats  # where the wall time went: admissions and decode chunks are parts of the run
    assert st.admit_seconds > 0 and st.decode_seconds > 0
    assert st.admit_seconds + st.decode_seconds <= st.run_seconds


@pytest.mark.parametrize("sync_every", [1, 2, 5])
def test_lookahead_changes_no_token(model, sync_every):
    # launching the next chunk's first step before reading a chunk moves refills by a step and runs stopped
    # rows one step more; every sample's tokens stay those of the engine without it (greedy with stops and
    # refills; sampled, where each sample's stream is its own)
    prompts = prompts_of(LENS)
    free = reference(model, prompts, NEWS, ())
    stop = free[0].token_ids[0][3]
    greedy = [Request(p, n) for p, n in zip(prompts, NEWS)]
    sampled = [Request(p, n, n_samples=2, example_id=10 * i) for i, (p, n) in enumerate(zip(prompts, NEWS))]
    for reqs, kw in ((greedy, dict(temperature=0.0)), (sampled, dict(temperature=1.0, top_k=20, seed=4))):
        off = Engine(model, rows=3, stop_ids=(stop,), sync_every=sync_every, lookahead=False, **kw)
        on = Engine(model, rows=3, stop_ids=(stop,), sync_every=sync_every, **kw)
        a, b = off.run(reqs), on.run(reqs)
        assert [[(s.token_ids, s.finished) for s in r] for r in b] == [[(s.token_ids, s.finished) for s in r] for r in a]
        if reqs is greedy:
            assert any(s.finished for r in a for s in r)  # some rows stopped early (and were refilled)
        assert off.stats.lookahead_steps == 0 and on.stats.lookahead_steps > 0


def test_new_waves_when_the_cache_runs_out(model):
    prompts = prompts_of(LENS, seed=1)
    refs = reference(model, prompts, NEWS, ())
    eng = Engine(model, rows=2, temperature=0.0, stop_ids=(), cache_len=32 + 12, sync_every=3)
    res = eng.run([Request(p, n) for p, n in zip(prompts, NEWS)])
    assert [r[0].token_ids for r in res] == [g.token_ids[0] for g in refs]
    assert eng.stats.waves >= 2


def test_samples_share_the_prefill_and_follow_generate_streams(model):
    prompts = prompts_of([6, 13, 4], seed=2)
    k, news = 3, [7, 5, 6]
    eng = Engine(model, rows=4, temperature=1.0, top_k=50, seed=3, stop_ids=())
    res = eng.run([Request(p, n, n_samples=k, example_id=100 * i) for i, (p, n) in enumerate(zip(prompts, news))])
    for i, (p, n) in enumerate(zip(prompts, news)):
        g = generate(model, [p] * k, max_new_tokens=n, temperature=1.0, top_k=50, seed=3, stop_ids=(),
                     example_ids=[100 * i + s for s in range(k)])
        assert [s.token_ids for s in res[i]] == g.token_ids
    assert len({tuple(s.token_ids) for s in res[0]}) > 1  # the samples differ
    assert eng.stats.prefills <= 3  # one prefill per request, not per sample (rows=4 < 9 samples)


@pytest.mark.parametrize("mode", ["all", "span", "generated", "signed_mask"])
def test_steered_rows_equal_single_request_steered_generate(model, mode):
    cfg = model.config
    prompts = prompts_of([9, 12, 6, 10], seed=4)
    news = [6, 5, 7, 4]
    dirs = [random_direction(cfg.d_model, i) for i in range(len(prompts))]
    layers = [1, 3, 5, 2]
    coefs = [6.0, -5.0, 4.0, 0.0]
    sc = 20.0

    def specs(i):
        n = len(prompts[i])
        if mode == "all":
            return RowSteer(layers[i], dirs[i], coefs[i], scale=sc), SteerSpec(layers[i], dirs[i], coefs[i], sc)
        if mode == "generated":
            return (RowSteer(layers[i], dirs[i], coefs[i], sc, tokens="generated"),
                    SteerSpec(layers[i], dirs[i], coefs[i], sc, tokens="generated"))
        if mode == "span":
            m = np.zeros((1, n), np.float32)
            m[0, n - 5:n - 2] = 1
            return (RowSteer(layers[i], dirs[i], coefs[i], sc, tokens=(n - 5, n - 2)),
                    SteerSpec(layers[i], dirs[i], coefs[i], sc, tokens=m))
        m = np.zeros(n, np.float32)
        m[1:3], m[4:6] = 1.0, -1.0
        return (RowSteer(layers[i], dirs[i], coefs[i], sc, tokens=m),
                SteerSpec(layers[i], dirs[i], coefs[i], sc, tokens=m[None]))

    reqs, refs = [], []
    for i, (p, n) in enumerate(zip(prompts, news)):
        rs, ss = specs(i)
        reqs.append(Request(p, n, steer=rs))
        refs.append(generate(model, [p], max_new_tokens=n, temperature=0.0, stop_ids=(), steer=ss).token_ids[0])
    reqs.append(Request(prompts[0], news[0]))  # an unsteered row in the same batch
    refs.append(generate(model, [prompts[0]], max_new_tokens=news[0], temperature=0.0, stop_ids=()).token_ids[0])
    res = Engine(model, rows=3, temperature=0.0, stop_ids=()).run(reqs)
    assert [r[0].token_ids for r in res] == refs
    assert refs[0] != refs[-1]  # the steering changed the output (same prompt, steered vs not)


def test_per_layer_cache_layout_equals_stacked(model):
    cfg, fam, params = model.config, model.family, model.params
    rng = np.random.RandomState(5)
    state = fam.init_state(cfg, 2, 12, jnp.float32)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    state = {**state, "k": jax.random.normal(k1, state["k"].shape), "v": jax.random.normal(k2, state["v"].shape),
             "valid": state["valid"].at[:, :9].set(True)}
    tok = jnp.asarray(rng.randint(3, 512, size=(2, 1)), jnp.int32)
    outs = []
    for unroll in (False, True):
        st = per_layer_cache(state, cfg.n_layers, unroll)
        assert isinstance(st["k"], PerLayer) == unroll
        lg, _, _, new = fam.forward(cfg, params, tok, jnp.ones((2, 1), bool), capture=CaptureSpec(), state=st,
                                    start=9, is_prompt=False, unroll=unroll)
        assert isinstance(new["k"], PerLayer) == unroll
        k = jnp.stack(new["k"].items) if unroll else new["k"]
        outs.append((np.asarray(lg), np.asarray(k)))
    np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-5)
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-5)
    assert np.abs(outs[1][1][:, :, 9]).sum() > 0  # the new slot was written
    # the scan path also takes a per-layer state (stacks it and hands the layout back)
    lg, _, _, new = fam.forward(cfg, params, tok, jnp.ones((2, 1), bool), capture=CaptureSpec(),
                                state=per_layer_cache(state, cfg.n_layers, True), start=9, is_prompt=False,
                                unroll=False)
    assert isinstance(new["k"], PerLayer)
    np.testing.assert_allclose(np.asarray(lg), outs[0][0], atol=1e-5)


@pytest.mark.parametrize("prefill_unroll", [False, True])
def test_engine_unrolled_per_layer_cache_equals_generate(model, prefill_unroll):
    # the GPU default: an unrolled decode step over per-layer buffers, fed by scanned (layer-stacked) prefills
    prompts = prompts_of([7, 11, 4], seed=6)
    news = [5, 3, 6]
    refs = reference(model, prompts, news, ())
    eng = Engine(model, rows=2, temperature=0.0, stop_ids=(), unroll=True, prefill_unroll=prefill_unroll)
    res = eng.run([Request(p, n) for p, n in zip(prompts, news)])
    assert [r[0].token_ids for r in res] == [g.token_ids[0] for g in refs]


def test_llama_greedy_equals_generate():
    m = prefjax.load("llama31-tiny")
    prompts = prompts_of([6, 15, 3, 9], seed=7, vocab=m.config.vocab_size)
    news = [4, 6, 5, 3]
    refs = reference(m, prompts, news, ())
    res = Engine(m, rows=2, temperature=0.0, stop_ids=()).run([Request(p, n) for p, n in zip(prompts, news)])
    assert [r[0].token_ids for r in res] == [g.token_ids[0] for g in refs]


def test_bad_input_names_the_request(model):
    cfg = model.config
    p = prompts_of([6, 30])
    eng = Engine(model, rows=2, temperature=0.0, cache_len=32)
    with pytest.raises(EngineError, match=r"request 1: prompt of 30 tokens plus max_new_tokens=8 needs 40 cache slots; the engine's cache has 32"):
        eng.run([Request(p[0], 4), Request(p[1], 8)])
    eng = Engine(model, rows=2, temperature=0.0)
    d = random_direction(cfg.d_model, 0)
    with pytest.raises(EngineError, match=r"request 1: steering layer 7 does not exist \(layers 0..6\)"):
        eng.run([Request(p[0], 4), Request(p[0], 4, steer=RowSteer(cfg.n_layers, d))])
    with pytest.raises(EngineError, match=r"request 0: steering: direction has zero norm"):
        eng.run([Request(p[0], 4, steer=RowSteer(1, np.zeros(cfg.d_model)))])
    with pytest.raises(EngineError, match=r"request 0: steering: direction has shape"):
        eng.run([Request(p[0], 4, steer=RowSteer(1, np.ones(3)))])
    with pytest.raises(EngineError, match=r"request 1: steering span \(4, 9\) is outside its prompt of 6 tokens"):
        eng.run([Request(p[0], 4), Request(p[0], 4, steer=RowSteer(1, d, tokens=(4, 9)))])
    with pytest.raises(EngineError, match=r"request 0: steering mask has 3 weights for a prompt of 6 tokens"):
        eng.run([Request(p[0], 4, steer=RowSteer(1, d, tokens=np.ones(3)))])
    with pytest.raises(EngineError, match=r"request 0: token id 9999 outside the vocabulary"):
        eng.run([Request([1, 9999], 4)])
    with pytest.raises(EngineError, match=r"request 0: max_new_tokens must be a positive int"):
        eng.run([Request(p[0], 0)])
    with pytest.raises(EngineError, match=r"request 0: empty prompt"):
        eng.run([Request([], 3)])
    with pytest.raises(EngineError, match="no requests"):
        eng.run([])


def test_models_the_engine_cannot_serve_are_refused(model):
    # a mesh within one process is served (tests/test_engine_mesh.py: meshes of fake devices, and the
    # multi-process refusal); so is Qwen-3.5's recurrent state (tests/test_engine_qwen35.py)
    assert engine_refusal(dataclasses.replace(model, mesh=make_mesh())) is None
    # a family without a declared decode-state layout (the planted organism has no decode state)
    planted = dataclasses.replace(model, family=FAMILIES["gemma3_planted"])
    with pytest.raises(EngineError, match="declares no decode-state layout"):
        Engine(planted)
    # a layout that misses a leaf of init_state
    odd = Family(**{**{f.name: getattr(model.family, f.name) for f in dataclasses.fields(Family)},
                    "name": "odd", "plain_kv_state": False, "state_layout": StateLayout(slot_leaves=("k",))})
    with pytest.raises(EngineError, match=r"init_state's leaves \['k', 'v', 'valid'\] are not those"):
        Engine(dataclasses.replace(model, family=odd))
    assert engine_refusal(model) is None


@pytest.mark.parametrize("preset", ["llama31-tiny", "gemma3-tiny"])
def test_shared_prompt_prefix_prefilled_once_equals_generate(preset):
    m = prefjax.load(preset)
    head = prompts_of([12], seed=8, vocab=m.config.vocab_size)[0]  # a "system prompt" every request starts with
    tails = prompts_of([3, 9, 5, 1, 7], seed=9, vocab=m.config.vocab_size)
    prompts = [head + t for t in tails]
    news = [5, 3, 6, 4, 2]
    refs = reference(m, prompts, news, ())
    eng = Engine(m, rows=2, temperature=0.0, stop_ids=())
    res = eng.run([Request(p, n) for p, n in zip(prompts, news)])
    assert [r[0].token_ids for r in res] == [g.token_ids[0] for g in refs]
    # Llama has no sliding window: the 12 shared tokens run once; Gemma's window of 8 slots would be
    # shortened by the padding between the prefix and a shorter tail, so the prefix is not shared there
    assert eng.stats.prefix_tokens == (12 if preset == "llama31-tiny" else 0)
    # a steered prefix token makes the prefix per request again
    st = [Request(p, n, steer=RowSteer(1, random_direction(m.config.d_model, 0), 3.0, tokens=(2, 4)) if i == 0
                  else None) for i, (p, n) in enumerate(zip(prompts, news))]
    eng.run(st)
    assert eng.stats.prefix_tokens == 0


def test_decode_step_probe_compiled_ahead_equals_jit(model):
    # Engine.decode_step is what benchmarks time: compiled ahead of time or through jit, the same tokens
    eng = Engine(model, rows=2, temperature=1.0, stop_ids=())
    jit_probe, aot_probe = eng.decode_step(3, 32, seed=3), eng.decode_step(3, 32, seed=3)
    aot_probe.compile(5)
    a = [np.asarray(jit_probe.step(5 + i)) for i in range(3)]
    b = [np.asarray(aot_probe.step(5 + i)) for i in range(3)]
    assert all(x.shape == (3,) for x in a)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    other = eng.decode_step(3, 32, seed=4)
    assert [np.asarray(other.step(5 + i)).tolist() for i in range(3)] != [x.tolist() for x in a]
    with pytest.raises(EngineError, match="rows must be a positive int, got 0"):
        eng.decode_step(0)


def test_decode_step_reuses_the_program_run_compiled(model):
    # a benchmark times "the engine's step" as the program run() dispatched, found in jit's cache: placing the
    # probe's rows differently (committed to a device) compiled a second program inside the timing on an H200
    import prefjax.engine as engine_mod
    eng = Engine(model, rows=2, cache_len=32, temperature=1.0, stop_ids=())
    eng.run([Request([5, 6, 7, 8], 3, n_samples=2)])
    before = engine_mod._step._cache_size()
    probe = eng.decode_step(2, 32)
    np.asarray(probe.step(6))
    assert engine_mod._step._cache_size() == before
