"""The continuous-batching engine on Qwen-3.5 (Gated DeltaNet + full attention, a recurrent decode
state) against generate run one request at a time: ragged prompts with early stops and refilled rows
(dense and MoE, scanned and unrolled decode step), shared-prefill samples, per-row steering on a
DeltaNet and an attention layer, and a refilled row that must forget its previous request."""

import jax
import numpy as np
import pytest

import prefjax
from prefjax.engine import Engine, Request, RowSteer, engine_refusal
from prefjax.generation import generate
from prefjax.steering import SteerSpec, random_direction

jax.config.update("jax_default_matmul_precision", "highest")

HEAD = 10  # tokens every prompt of the ragged test starts with: share_prefix must leave them alone


@pytest.fixture(scope="module")
def dense():
    return prefjax.load("qwen35-tiny", dtype="float32")


@pytest.fixture(scope="module")
def moe():
    return prefjax.load("qwen35-moe-tiny", dtype="float32")


def prompts_of(lengths, seed=0, vocab=512):
    rng = np.random.RandomState(seed)
    return [[int(t) for t in rng.randint(3, vocab, size=n)] for n in lengths]


def reference(model, prompts, news, stops, **kw):
    return [generate(model, [p], max_new_tokens=n, temperature=0.0, stop_ids=stops, **kw) for p, n in zip(prompts, news)]


def test_qwen35_is_served():
    m = prefjax.load("qwen35-tiny", dtype="float32")
    assert engine_refusal(m) is None
    assert not m.prefix_ok()  # prefix caches still refuse it: the engine has its own check
    layout = m.family.state_layout
    assert layout.slot_leaves == ("k", "v") and set(layout.row_leaves) == {"conv_q", "conv_k", "conv_v", "rec"}


@pytest.mark.parametrize("which,unroll", [("dense", False), ("moe", True)])
def test_greedy_ragged_refills_and_stops_equal_generate(which, unroll, request):
    model = request.getfixturevalue(which)
    head = prompts_of([HEAD], seed=10)[0]
    prompts = [head + t for t in prompts_of([2, 13, 1, 6, 9], seed=11)]
    news = [6, 4, 6, 4, 6]
    free = reference(model, prompts, news, ())
    stop = free[0].token_ids[0][2]  # from the middle of a continuation: that row stops early
    refs = reference(model, prompts, news, (stop,))
    assert any(r.finished[0] for r in refs) and any(len(r.token_ids[0]) < n for r, n in zip(refs, news))
    eng = Engine(model, rows=2, temperature=0.0, stop_ids=(stop,), sync_every=2, unroll=unroll)
    res = eng.run([Request(p, n) for p, n in zip(prompts, news)])
    for i, (r, g) in enumerate(zip(res, refs)):
        assert r[0].token_ids == g.token_ids[0], i
        assert r[0].finished == g.finished[0], i
    assert eng.stats.prefills >= 3  # rows were refilled mid-run
    assert eng.stats.prefix_tokens == 0  # a recurrent state is not shared as a prefix cache


def test_samples_share_the_prefill_and_follow_generate_streams(moe):
    prompts = prompts_of([6, 13], seed=2)
    k, n = 3, 6
    eng = Engine(moe, rows=4, temperature=1.0, top_k=50, seed=3, stop_ids=())
    res = eng.run([Request(p, n, n_samples=k, example_id=100 * i) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        g = generate(moe, [p] * k, max_new_tokens=n, temperature=1.0, top_k=50, seed=3, stop_ids=(),
                     example_ids=[100 * i + s for s in range(k)])
        assert [s.token_ids for s in res[i]] == g.token_ids
    assert len({tuple(s.token_ids) for s in res[0]}) > 1  # the samples differ
    assert eng.stats.prefills == 2  # one prefill per request, not per sample (rows=4 < 6 samples)


def test_steered_rows_equal_single_request_steered_generate(dense):
    cfg = dense.config
    prompts = prompts_of([9, 12, 7], seed=4)
    n = 5
    assert cfg.layer_types[1] == "linear_attention" and cfg.layer_types[3] == "full_attention"
    d0, d1 = random_direction(cfg.d_model, 0), random_direction(cfg.d_model, 1)
    mask = np.zeros(12, np.float32)
    mask[1:4], mask[6:9] = 1.0, -1.0
    steers = [(RowSteer(1, d0, 6.0, scale=20.0), SteerSpec(1, d0, 6.0, 20.0)),  # a DeltaNet layer, every token
              (RowSteer(3, d1, -5.0, scale=20.0, tokens=mask), SteerSpec(3, d1, -5.0, 20.0, tokens=mask[None])),
              (None, None)]
    reqs, refs = [], []
    for p, (rs, ss) in zip(prompts, steers):
        reqs.append(Request(p, n, steer=rs))
        refs.append(generate(dense, [p], max_new_tokens=n, temperature=0.0, stop_ids=(), steer=ss).token_ids[0])
    reqs.append(Request(prompts[0], n))  # the first prompt unsteered, in the same run
    refs.append(generate(dense, [prompts[0]], max_new_tokens=n, temperature=0.0, stop_ids=()).token_ids[0])
    res = Engine(dense, rows=2, temperature=0.0, stop_ids=()).run(reqs)
    assert [r[0].token_ids for r in res] == refs
    assert refs[0] != refs[-1]  # the steering changed the output


def test_refilled_row_forgets_its_previous_request(moe):
    a, b = prompts_of([11, 7], seed=5)
    n = 6
    fresh = Engine(moe, rows=1, temperature=0.0, stop_ids=()).run([Request(b, n)])[0][0].token_ids
    # one row: b is admitted into the row a just left (its conv windows and delta-rule state full of a)
    eng = Engine(moe, rows=1, temperature=0.0, stop_ids=())
    after = eng.run([Request(a, n), Request(b, n)])[1][0].token_ids
    assert eng.stats.prefills == 2 and eng.stats.waves == 1
    assert after == fresh == generate(moe, [b], max_new_tokens=n, temperature=0.0, stop_ids=()).token_ids[0]
    # a's history would change b's continuation (so a row that kept it would fail the check above)
    assert generate(moe, [a + b], max_new_tokens=n, temperature=0.0, stop_ids=()).token_ids[0] != fresh


def test_row_writer_does_not_materialize_the_admitted_rows_state(dense, monkeypatch):
    """The recurrent state is written into the admitted rows one row at a time: the compiled row writer's
    scratch memory stays well under the state of the rows it admits. A scatter of all admitted rows at once
    needs them whole as its updates (64 rows of Qwen-3.5-122B: 9.47 GiB, which ran out of memory on an
    H200); with that scatter this test fails (CPU: 337 kB of scratch against 400 kB of state for 8 rows)."""
    import prefjax.engine as engine_mod
    real = engine_mod._insert
    seen = []

    def measured(state, rowvars, pre_state, logits, src, dst, *a, **k):
        compiled = real.lower(state, rowvars, pre_state, logits, src, dst, *a, **k).compile()
        layout = k["family"].state_layout
        per_row = sum(state[n].nbytes // state[n].shape[1] for n in layout.row_leaves)  # stacked [L, B, ...]
        seen.append((compiled.memory_analysis().temp_size_in_bytes, per_row * dst.shape[0]))
        return real(state, rowvars, pre_state, logits, src, dst, *a, **k)

    monkeypatch.setattr(engine_mod, "_insert", measured)
    eng = Engine(dense, rows=8, temperature=0.0, stop_ids=(), unroll=False)
    res = eng.run([Request(p, 3, n_samples=3) for p in prompts_of([12, 13, 14], seed=3)])
    assert [len(s.token_ids) for r in res for s in r] == [3] * 9
    assert seen
    for temp, admitted in seen:
        assert admitted > 0 and temp < admitted / 2, (temp, admitted)
