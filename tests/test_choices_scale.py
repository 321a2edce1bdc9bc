"""The choices stage at scale (issue 26): logit mode in bounded chunks of prefix-cache rows (the same rows
as one cache for every task, and resumable), and sample mode through one engine per run whose programs
compile once (bucketed widths and cache length, reused across rounds and personas, LoRA personas through
``Engine.run(model=...)``), with its row count from free device memory on a GPU."""

import dataclasses
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prefjax
import prefjax.elicit.runner as runner
from prefjax import engine as engine_mod
from prefjax.elicit.personas import Persona, get_persona
from prefjax.elicit.prompts import DEFAULT_TEMPLATE
from prefjax.elicit.runner import ChoiceEngines, ElicitConfig, make_jobs, run_choices
from prefjax.engine import Engine, EngineError, Request, auto_rows, state_bytes_per_row
from prefjax.lora import LoraAdapter
from prefjax.model import Model
from prefjax.store import ComparisonsStore
from prefjax.tasks import load_default_pool

VALUE_KEYS = ("task_a", "task_b", "order", "persona", "sample", "choice", "status", "refusal", "raw")


@pytest.fixture(scope="module")
def model():
    return prefjax.load("gemma3-tiny-tok", dtype="float32")


@pytest.fixture(scope="module")
def wide(model):
    """The tiny model with a sliding window wider than any prompt: the engine then shares the prompt
    prefix (the tiny window of 16 slots rules it out), so the prefix buckets are exercised too."""
    return dataclasses.replace(model, config=dataclasses.replace(model.config, sliding_window=4096))


@pytest.fixture(scope="module")
def pool():
    return load_default_pool().subset(8, seed=0)


def stored_rows(path):
    out = []
    for seg in sorted(glob.glob(os.path.join(path, "seg-*.jsonl"))):
        with open(seg) as f:
            out += [json.loads(line) for line in f if line.strip()]
    return out


def by_key(rows):
    return {(r["task_a"], r["task_b"], r["order"], r["persona"], r["sample"]): r for r in rows}


# ---------------------------------------------------------------------------------------------
# Logit mode in chunks.

def logit_jobs(pool):
    ids = pool.ids
    pairs = [(ids[a], ids[b]) for a, b in ((0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7), (6, 0),
                                          (7, 1), (2, 5))]
    personas = {p: get_persona(p) for p in ("default", "evil")}
    return make_jobs(pairs, list(personas), samples=1), personas


def run_logit(model, pool, path, **kw):
    jobs, personas = logit_jobs(pool)
    store = ComparisonsStore(str(path))
    run_choices(model, pool, jobs, personas, store, ElicitConfig(mode="logit", batch_size=4, **kw))
    return stored_rows(path)


@pytest.fixture(scope="module")
def logit_runs(model, pool, tmp_path_factory):
    """``(one cache, chunked, cache rows of each chunked prefill)``."""
    tmp = tmp_path_factory.mktemp("logit")
    one = run_logit(model, pool, tmp / "one")  # 8 tasks <= 64: one chunk, today's single cache
    seen = []
    real = Model.prefill_rows

    def counting(self, seqs, **kw):
        cache = real(self, seqs, **kw)
        seen.append((cache.batch, cache.length))
        return cache

    Model.prefill_rows = counting
    try:
        chunked = run_logit(model, pool, tmp / "chunked", logit_rows=3)
    finally:
        Model.prefill_rows = real
    return one, chunked, seen


def test_logit_chunked_equals_one_cache(logit_runs):
    one, chunked, seen = logit_runs
    jobs_n = 10 * 2 * 2
    assert len(one) == len(chunked) == jobs_n
    # 8 first-shown tasks per persona, 2 per chunk (plus the filler row): 4 chunks each, every cache 3 rows
    assert [b for b, _ in seen] == [3] * 8
    assert len(set(seen[:4])) == len(set(seen[4:])) == 1  # one cache shape (rows, slots) per persona
    a, b = by_key(one), by_key(chunked)
    assert a.keys() == b.keys()
    for k in a:
        ra, rb = a[k], b[k]
        assert ra["status"] == rb["status"] == "ok" and not rb["refusal"]
        np.testing.assert_allclose(rb["p_a"], ra["p_a"], rtol=1e-5, atol=1e-6, err_msg=str(k))
        if abs(ra["p_a"] - 0.5) > 1e-4:
            assert rb["choice"] == ra["choice"], k
        assert rb["raw"] == ra["raw"] and rb["extra"] == ra["extra"], k
    assert len({round(r["p_a"], 4) for r in one}) > 5  # the pairs differ


class Killed(Exception):
    pass


def test_logit_chunked_killed_and_resumed_equals_uninterrupted(model, pool, tmp_path, logit_runs, monkeypatch):
    _, ref, _ = logit_runs
    real = ComparisonsStore.append
    calls = {"n": 0}

    def dying_append(self, rows):
        calls["n"] += 1
        if calls["n"] == 3:  # inside the second chunk of the first persona
            raise Killed
        return real(self, rows)

    monkeypatch.setattr(ComparisonsStore, "append", dying_append)
    with pytest.raises(Killed):
        run_logit(model, pool, tmp_path / "res", logit_rows=3)
    monkeypatch.setattr(ComparisonsStore, "append", real)
    assert 0 < len(stored_rows(tmp_path / "res")) < len(ref)
    res = run_logit(model, pool, tmp_path / "res", logit_rows=3)
    assert len(res) == len(ref)  # nothing lost or duplicated
    a, b = by_key(ref), by_key(res)
    assert a.keys() == b.keys()
    for k in a:  # the same chunks and batches: the same numbers exactly
        assert b[k]["p_a"] == a[k]["p_a"] and b[k]["raw"] == a[k]["raw"], k


def test_logit_rows_is_validated(model, pool, tmp_path):
    with pytest.raises(ValueError, match="logit_rows must be a positive int"):
        run_logit(model, pool, tmp_path / "bad", logit_rows=0)


# ---------------------------------------------------------------------------------------------
# Sample mode: one engine per run, programs compiled once.

def rounds_of(pool, tok):
    """Two "rounds" of pairs: among the shorter tasks, then among the longer ones (longer prompts)."""
    order = sorted(pool.ids, key=lambda t: len(tok.encode(pool[t].prompt, add_bos=False)))
    short, long_ = order[:4], order[4:]
    return [[(short[0], short[1]), (short[2], short[3])], [(long_[0], long_[1]), (long_[2], long_[3])]]


SAMPLE = dict(mode="sample", max_new_tokens=6, batch_size=4, temperature=1.0, seed=2)


def sample_run(model, pool, personas, path, engines_of, *, rounds, **kw):
    """Every (round, persona) as its own run_choices call, as elicit_persona makes them; ``engines_of()``
    gives each call's ChoiceEngines (one shared object, or None: a fresh one per call)."""
    store = ComparisonsStore(str(path))
    cfg = ElicitConfig(**{**SAMPLE, **kw})
    for r, pairs in enumerate(rounds):
        for pname in personas:
            jobs = make_jobs(pairs, [pname], samples=2)
            run_choices(model, pool, jobs, personas, store, cfg, desc=f"round {r}", engines=engines_of())
    return [{k: row[k] for k in VALUE_KEYS} for row in stored_rows(path)]


def program_counts():
    return {f.__name__: f._cache_size() for f in (engine_mod._step, engine_mod._prefill, engine_mod._insert)}


def test_one_engine_compiles_once_over_rounds_and_personas(wide, pool, tmp_path, monkeypatch):
    personas = {p: get_persona(p) for p in ("default", "evil")}  # no system prompt, and one
    rounds = rounds_of(pool, wide.tokenizer)
    built, shapes = [], []
    real_init, real_run = Engine.__init__, Engine.run

    def init(self, *a, **kw):
        built.append(kw.get("rows"))
        real_init(self, *a, **kw)

    def run(self, *a, **kw):
        out = real_run(self, *a, **kw)
        shapes.append((self._lw, self._p0, self._s))  # (prefix slots, prompt width, cache length)
        return out

    monkeypatch.setattr(Engine, "__init__", init)
    monkeypatch.setattr(Engine, "run", run)
    engines = ChoiceEngines()
    # top_k=7: static settings no other test uses, so jit's caches of the engine's pieces start empty for them;
    # rows=4 on every backend (a GPU would pick more from its free memory: more row-writer sizes)
    before = program_counts()
    shared = sample_run(wide, pool, personas, tmp_path / "shared", lambda: engines, rounds=rounds, top_k=7, rows=4)
    after = program_counts()
    assert len(shared) == 2 * 2 * 2 * 2 * 2  # rounds x pairs x orders x personas x samples
    assert engines.builds == 1 and len(built) == 1  # one engine for the 4 calls, never rebuilt per call
    assert len(shapes) == 4
    # the buckets: both personas' shared prefixes (59 and 122 tokens: no system prompt, and one) in one
    # reserved power-of-two width, tail widths from width_bucket's set, one power-of-two cache for the run
    (lw,), (s,) = {lw for lw, _, _ in shapes}, {s for _, _, s in shapes}
    assert lw == 128 and s == 256
    assert {p0 - lw for _, p0, _ in shapes} == {48, 64}  # the two rounds' widths: two buckets, both personas
    grown = {k: after[k] - before[k] for k in after}
    # one decode step for the run; one prefill and one row writer (rows <= 8: one row count) per width
    assert grown == {"_step": 1, "_prefill": 2, "_insert": 2}
    # each call fitted exactly (the old arrangement: an engine per call) would compile 4 of each
    exact = []
    for pairs in rounds:
        for pname in personas:
            jobs = make_jobs(pairs, [pname], samples=1)
            reqs = [Request(wide.tokenizer.encode_chat(runner._messages(pool, j, personas[pname], DEFAULT_TEMPLATE)),
                            SAMPLE["max_new_tokens"]) for j in jobs]
            e = Engine(wide, rows=4)
            exact.append((e.cache_len_for(reqs), e._p0))
    assert len({s for s, _ in exact}) == len({p for _, p in exact}) == 4

    # the same rows as a fresh engine per call (today's arrangement), which compiles nothing new here
    monkeypatch.setattr(Engine, "__init__", real_init)
    monkeypatch.setattr(Engine, "run", real_run)
    fresh = sample_run(wide, pool, personas, tmp_path / "fresh", lambda: None, rounds=rounds, top_k=7, rows=4)
    assert fresh == shared
    assert program_counts() == after
    assert len({r["raw"] for r in shared}) > 1


def test_reused_engine_equals_generate_path_greedy(model, pool, tmp_path):
    """The tiny model itself (window 16: no shared prefix), greedy: the shared, bucketed engine gives the
    batched-generate path's rows, refusals and unparseable replies kept as they are."""
    personas = {p: get_persona(p) for p in ("default", "evil")}
    rounds = rounds_of(pool, model.tokenizer)
    engines = ChoiceEngines()
    new = sample_run(model, pool, personas, tmp_path / "engine", lambda: engines, rounds=rounds, temperature=0.0)
    old = sample_run(model, pool, personas, tmp_path / "generate", lambda: None, rounds=rounds, temperature=0.0,
                     engine=False)
    assert engines.builds == 1
    assert new == old
    assert {r["status"] for r in new} - {"ok"}  # the random tiny model's replies do not parse: kept, counted


def tiny_adapter(model, seed=0, r=4, scale=0.2):
    """A random on-the-fly LoRA adapter on ``q`` and ``down`` of every layer (prefjax layout)."""
    shapes = model.family.param_shapes(model.config)
    rs = np.random.RandomState(seed)
    factors = {}
    for t, split in (("q", 2), ("down", 2)):
        w = shapes[f"blocks/{t}"][0]  # [L, *in_dims, *out_dims]
        factors[t] = {"A": jnp.asarray(scale * rs.randn(*w[:split], r), jnp.float32),
                      "B": jnp.asarray(scale * rs.randn(w[0], r, *w[split:]), jnp.float32),
                      "scale": jnp.ones((w[0],), jnp.float32)}
    return LoraAdapter(path=f"random-{seed}", r=r, alpha=float(r), use_rslora=False, targets=("q", "down"),
                       layers=tuple(range(model.n_layers)), factors=factors, family=model.family.name)


def test_lora_persona_runs_on_the_shared_engine(model, pool, tmp_path, monkeypatch):
    ad = tiny_adapter(model)
    real = runner._persona_model
    monkeypatch.setattr(runner, "_persona_model",
                        lambda m, p: m.with_adapter(ad) if p.adapter == "lora-test" else real(m, p))
    personas = {"default": get_persona("default"), "lora": Persona("lora", adapter="lora-test")}
    rounds = rounds_of(pool, model.tokenizer)[:1]
    engines = ChoiceEngines()
    before = program_counts()
    # sampled with top_k=9: static settings no other test uses (greedy drops top_k), so the step's count is exact
    new = sample_run(model, pool, personas, tmp_path / "engine", lambda: engines, rounds=rounds, top_k=9)
    grown = program_counts()["_step"] - before["_step"]
    old = sample_run(model, pool, personas, tmp_path / "generate", lambda: None, rounds=rounds, top_k=9,
                     engine=False)
    assert engines.builds == 1
    assert new == old  # the adapter's weights were used on the shared engine (the same per-job streams)
    assert ([r["raw"] for r in new if r["persona"] == "lora"] != [r["raw"] for r in new if r["persona"] == "default"])
    assert grown == 2  # the base weights' step, and one for the adapter's pytree (its factors are weights)


def test_run_with_another_model_is_refused_by_name(model):
    eng = Engine(model, rows=2, temperature=0.0, bucket_shapes=True)
    other = dataclasses.replace(model, config=dataclasses.replace(model.config, sliding_window=32))
    with pytest.raises(EngineError, match="model's config"):
        eng.run([Request([5, 6, 7], 2)], model=other)
    with pytest.raises(EngineError, match="reserve\\(\\) needs an engine with bucket_shapes"):
        Engine(model, rows=2).reserve(128)


def test_bucketed_cache_never_shrinks(model):
    eng = Engine(model, rows=2, temperature=0.0, bucket_shapes=True)
    long_ = eng.cache_len_for([Request(list(range(10, 110)), 8)])
    assert long_ == 256  # 100 tokens -> width 128, + 4 x 8 = 160 -> 256 slots (a power of two)
    eng.reserve(long_)
    assert eng.cache_len_for([Request([5, 6, 7], 2)]) == long_  # a short run keeps the reserved cache
    assert Engine(model, rows=2, temperature=0.0).cache_len_for([Request([5, 6, 7], 2)]) < long_


class FakeDevice:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_auto_rows_from_free_memory(model):
    per_row = state_bytes_per_row(model, 1024)
    # k and v: layers x slots x kv heads x head dim x 4 bytes, plus valid, the row's logits and rowvars
    cfg = model.config
    assert per_row >= 2 * cfg.n_layers * 1024 * cfg.n_kv_heads * cfg.head_dim * 4 + 1024 + 4 * cfg.vocab_size
    free = 40 * per_row + 123
    dev = FakeDevice({"bytes_limit": free + 10 ** 6, "bytes_in_use": 10 ** 6})
    assert auto_rows(model, 1024, device=dev) == 16  # half of 40 rows fit: 20, down to a power of two
    assert auto_rows(model, 1024, device=dev, fraction=1.0) == 32
    assert auto_rows(model, 1024, device=dev, fraction=1.0, cap=24) == 24
    assert auto_rows(model, 1024, device=FakeDevice({"bytes_limit": 10, "bytes_in_use": 10})) == 1
    assert auto_rows(model, 1024, device=FakeDevice(None)) is None  # the CPU: keep the configured rows
    if jax.default_backend() == "cpu":
        cfg_rows, how = runner.choice_rows(model, ElicitConfig(batch_size=6), 1024)
        assert (cfg_rows, how) == (6, "batch_size")
    assert runner.choice_rows(model, ElicitConfig(rows=12), 1024) == (12, "ElicitConfig.rows")


def test_elicit_persona_shares_one_engine_over_rounds_and_personas(model, pool, tmp_path, monkeypatch):
    """The pipeline's choices: two personas x two active-learning rounds on one ChoiceEngines (as
    choices_stage passes it) build one engine, with the rows of an engine set per persona."""
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from configs.default import get_config
    from prefjax.pipeline import elicit_persona
    from prefjax.runconfig import RunConfig
    choices = dataclasses.replace(RunConfig.from_config(get_config("tiny")).choices, mode="sample", samples=2,
                                  degree=2, active_rounds=1, pairs_per_round=4, batch_size=4, max_new_tokens=4,
                                  temperature=1.0, seed=5, engine=True)
    personas = {p: get_persona(p) for p in ("default", "evil")}
    built = []
    real_init = Engine.__init__

    def init(self, *a, **kw):
        built.append(1)
        real_init(self, *a, **kw)

    monkeypatch.setattr(Engine, "__init__", init)

    def run(path, shared):
        store = ComparisonsStore(str(path))
        engines = ChoiceEngines() if shared else None
        out = {p: elicit_persona(choices, model, pool, personas, p, store, engines=engines) for p in personas}
        return out, [{k: r[k] for k in VALUE_KEYS} for r in stored_rows(path)]

    out, shared = run(tmp_path / "shared", True)
    assert len(built) == 1 and all(o["rounds"] == 2 for o in out.values())
    built.clear()
    _, per_persona = run(tmp_path / "per_persona", False)
    assert len(built) == 2  # elicit_persona without engines: one per persona (still shared by its rounds)
    assert shared == per_persona and len(shared) > 16
