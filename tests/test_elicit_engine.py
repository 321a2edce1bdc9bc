"""Sample-mode elicitation through the continuous-batching engine: the same comparison rows as the
batched-generate path (greedy), rows committed in job order, a run interrupted mid-way and restarted
equal to an uninterrupted one, Qwen-3.5 (recurrent state) served by the engine, and the fallback for
models the engine refuses (a family without a decode-state layout)."""

import glob
import json
import os

import pytest

import prefjax
from prefjax.elicit.personas import get_persona
from prefjax.elicit.runner import ElicitConfig, make_jobs, run_choices
from prefjax.store import ComparisonsStore
from prefjax.tasks import load_default_pool

from engine_variants import qwen35_with_tokenizer_of, without_state_layout

VALUE_KEYS = ("task_a", "task_b", "order", "persona", "sample", "choice", "status", "refusal", "raw")


@pytest.fixture(scope="module")
def model():
    return prefjax.load("gemma3-tiny-tok", dtype="float32")


@pytest.fixture(scope="module")
def setup():
    pool = load_default_pool().subset(6, seed=0)
    ids = pool.ids
    pairs = [(ids[0], ids[1]), (ids[2], ids[3]), (ids[4], ids[5]), (ids[1], ids[4])]
    personas = {p: get_persona(p) for p in ("default", "evil")}  # no system prompt, and one
    jobs = make_jobs(pairs, list(personas), samples=3)
    return pool, jobs, personas


def rows_in_file_order(path):
    out = []
    for seg in sorted(glob.glob(os.path.join(path, "seg-*.jsonl"))):
        with open(seg) as f:
            out += [json.loads(line) for line in f if line.strip()]
    return [{k: r[k] for k in VALUE_KEYS} for r in out]


def run(model, setup, path, **kw):
    pool, jobs, personas = setup
    cfg = ElicitConfig(mode="sample", max_new_tokens=12, batch_size=5, **kw)
    store = ComparisonsStore(str(path))
    counts = run_choices(model, pool, jobs, personas, store, cfg)
    return counts, rows_in_file_order(path)


def test_engine_path_equals_generate_path_greedy(model, setup, tmp_path):
    c_old, old = run(model, setup, tmp_path / "old", temperature=0.0, engine=False)
    c_new, new = run(model, setup, tmp_path / "new", temperature=0.0, engine=True)
    assert len(old) == len(setup[1]) == 4 * 2 * 2 * 3
    assert new == old  # same rows, same values, same order on disk
    assert c_new == c_old
    assert len({r["raw"] for r in old}) > 1  # the replies differ between prompts


def test_engine_path_equals_generate_path_sampled(model, setup, tmp_path):
    # the same per-job stream: sample k of a job draws the same tokens on both paths
    _, old = run(model, setup, tmp_path / "old", temperature=1.0, seed=3, engine=False)
    _, new = run(model, setup, tmp_path / "new", temperature=1.0, seed=3, engine=True)
    assert new == old
    by_prompt = {}
    for r in new:
        by_prompt.setdefault((r["task_a"], r["task_b"], r["order"], r["persona"]), set()).add(r["raw"])
    assert any(len(v) > 1 for v in by_prompt.values())  # the samples of one prompt differ


class Killed(Exception):
    pass


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_interrupted_and_restarted_equals_uninterrupted(model, setup, tmp_path, monkeypatch, temperature):
    _, ref = run(model, setup, tmp_path / "ref", temperature=temperature, seed=1)
    # "kill" the run inside its second commit of the first persona: the store keeps one batch
    real = ComparisonsStore.append
    calls = {"n": 0}

    def dying_append(self, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed
        return real(self, rows)

    monkeypatch.setattr(ComparisonsStore, "append", dying_append)
    with pytest.raises(Killed):
        run(model, setup, tmp_path / "res", temperature=temperature, seed=1)
    monkeypatch.setattr(ComparisonsStore, "append", real)
    assert 0 < len(rows_in_file_order(tmp_path / "res")) < len(ref)
    _, res = run(model, setup, tmp_path / "res", temperature=temperature, seed=1)
    assert res == ref


def test_refused_model_falls_back_with_a_log_line(setup, tmp_path, capfd):
    pool, jobs, personas = setup
    m = without_state_layout(prefjax.load("gemma3-tiny-tok", dtype="float32"))
    store = ComparisonsStore(str(tmp_path / "s"))
    cfg = ElicitConfig(mode="sample", max_new_tokens=4, batch_size=8, temperature=0.0)
    run_choices(m, pool, jobs[:6], personas, store, cfg)
    assert len(store) == 6
    err = capfd.readouterr().err
    assert "the engine does not serve this model" in err and "declares no decode-state layout" in err


def test_qwen35_goes_through_the_engine(model, setup, tmp_path, capfd):
    qwen = qwen35_with_tokenizer_of(model)
    pool, jobs, personas = setup
    two = list(dict.fromkeys((j.task_a, j.task_b) for j in jobs))[:2]
    some = (pool, [j for j in jobs if j.persona == "evil" and (j.task_a, j.task_b) in two], personas)
    assert len(some[1]) == 12  # two pairs, both orders, three samples
    _, old = run(qwen, some, tmp_path / "old", temperature=1.0, seed=3, engine=False)
    capfd.readouterr()
    _, new = run(qwen, some, tmp_path / "new", temperature=1.0, seed=3, engine=True)
    err = capfd.readouterr().err
    assert "engine: 4 prompts, 12 samples" in err and "batched generate instead" not in err
    assert new == old  # the same per-job streams on both paths
    assert len({r["raw"] for r in new}) > 1
