"""Activation extraction sorted by length with bucketed widths: the same vectors as one task at a time,
a bounded number of compiled programs, pool order for every reader, and an exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import prefjax
from prefjax import model as model_mod
from prefjax.activations import (MIN_WIDTH, boundary_positions, extract, processing_order, task_token_ids,
                                 width_bucket, width_buckets)
from prefjax.store import StoreError, open_existing, open_for_host, open_or_create, read_rows
from prefjax.tasks import TaskPool, load_default_pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKS = ("blocks.0.hook_resid_post", "blocks.2.hook_resid_post", "blocks.3.hook_resid_post")


@pytest.fixture(scope="module")
def model():
    return prefjax.load("gemma3-tiny-tok")


def _spread_pool(model, n: int) -> TaskPool:
    """``n`` tasks of the default pool, in a shuffled pool order, spread over the length range."""
    full = load_default_pool()
    lens = [len(s) for s in task_token_ids(model, full, None)]
    by_len = np.argsort(lens, kind="stable")
    pick = by_len[np.linspace(0, len(by_len) - 1, n).round().astype(int)]
    pick = np.random.default_rng(0).permutation(np.unique(pick))
    return TaskPool([full[int(i)] for i in pick])


# ---------------------------------------------------------------------------------------------
# The bucket rule and the order

def test_width_bucket_rule():
    assert [width_bucket(n) for n in (1, 16, 17, 24, 25, 33, 49, 65, 97, 129, 200)] == \
        [16, 16, 24, 24, 32, 48, 64, 96, 128, 192, 256]
    assert width_buckets(1024) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    assert width_buckets(1000)[-2:] == [768, 1000]  # capped at the context, exactly
    for n in range(1, 3000):
        w = width_bucket(n)
        assert w >= max(n, MIN_WIDTH) and (w <= 1.5 * n or w == MIN_WIDTH)
        m, k = w, 0
        while m % 2 == 0:
            m, k = m // 2, k + 1
        assert m in (1, 3), w  # 2**k or 3 * 2**(k-1)
    assert width_bucket(900, cap=1000) == 1000 and width_bucket(1000, cap=1000) == 1000
    with pytest.raises(ValueError, match="longer than the width cap 1000"):
        width_bucket(1001, cap=1000)


def test_processing_order_is_a_stable_length_sort():
    seqs = [[0] * 5, [0] * 3, [0] * 5, [0] * 1, [0] * 3]
    assert processing_order(seqs) == [3, 1, 4, 0, 2]


# ---------------------------------------------------------------------------------------------
# Same numbers as one task at a time; pool order for every reader; compile count

def test_bucketed_extraction_matches_unpadded_runs(model, tmp_path):
    pool = _spread_pool(model, 13)
    seqs = task_token_ids(model, pool, None)
    assert processing_order(seqs) != list(range(len(pool)))  # the sort really reorders
    st = extract(model, pool, str(tmp_path / "b4"), hooks=HOOKS, n_after=2, batch_size=4)
    one = extract(model, pool, str(tmp_path / "b1"), hooks=HOOKS, n_after=2, batch_size=1)
    assert st.complete and st.order.tolist() == processing_order(seqs)
    full = st.read()
    assert full.shape == (len(pool), len(HOOKS), 3, model.d_model)
    np.testing.assert_allclose(full, one.read(), rtol=1e-4, atol=1e-4)
    # an independent reference: each task alone, unpadded, straight through the model
    for r, (t, s) in enumerate(zip(pool, seqs)):
        pos = np.asarray([boundary_positions(model, s, 2, task_id=t.id)], np.int32)
        _, cache = model.run(np.asarray([s], np.int32), capture=HOOKS, positions=pos, logits=False)
        for h, name in enumerate(HOOKS):
            np.testing.assert_allclose(full[r, h], np.asarray(cache[name])[0], rtol=1e-4, atol=1e-4,
                                       err_msg=f"task {t.id} hook {name}")
    # every reader is in pool order: read(rows=...), read_rows by id (any id order), reopened stores
    ids = list(pool.ids)
    np.testing.assert_array_equal(st.read(rows=[4, 0], hook=HOOKS[1]), full[[4, 0], 1])
    np.testing.assert_array_equal(st.read(rows=slice(2, 7)), full[2:7])
    np.testing.assert_array_equal(open_existing(str(tmp_path / "b4")).read(hook=HOOKS[2]), full[:, 2])
    rev = ids[::-1]
    got = read_rows(str(tmp_path / "b4"), HOOKS[1], rev, position=1)
    assert got.dtype == np.float32 and got.shape == (len(pool), model.d_model)
    np.testing.assert_array_equal(got, full[::-1, 1, 1])
    np.testing.assert_array_equal(read_rows(str(tmp_path / "b4"), 0, None, position=0), full[:, 0, 0])
    # norms are order-free up to float summation
    np.testing.assert_allclose(list(st.mean_norms().values()),
                               np.linalg.norm(full.astype(np.float64), axis=-1).mean(axis=(0, 2)), rtol=1e-9)
    with pytest.raises(StoreError, match=r"1 of 2 requested ids are not committed.*'nope'"):
        read_rows(str(tmp_path / "b4"), HOOKS[0], [ids[0], "nope"])
    with pytest.raises(StoreError, match="position 3 out of range"):
        read_rows(str(tmp_path / "b4"), HOOKS[0], ids, position=3)
    with pytest.raises(StoreError, match="is not in store"):
        read_rows(str(tmp_path / "b4"), "blocks.1.hook_resid_post", ids)
    with pytest.raises(StoreError, match="no activation store"):
        read_rows(str(tmp_path / "absent"), HOOKS[0], ids)


def test_compiled_widths_bounded_by_buckets(model, tmp_path, monkeypatch):
    pool = _spread_pool(model, 24)
    seqs = task_token_ids(model, pool, None)
    order = processing_order(seqs)
    bs = 3
    batches = [order[i:i + bs] for i in range(0, len(order), bs)]
    buckets = {width_bucket(max(len(seqs[i]) for i in b)) for b in batches}
    raw_pool_order = {max(len(s) for s in seqs[i:i + bs]) for i in range(0, len(seqs), bs)}
    assert len(buckets) < len(raw_pool_order)  # the old per-batch widths would compile more programs
    shapes = []
    real_run = type(model).run

    def counting_run(self, ids, **kw):
        shapes.append(np.asarray(ids).shape)
        return real_run(self, ids, **kw)

    monkeypatch.setattr(type(model), "run", counting_run)
    hooks = ("blocks.1.hook_resid_mid", "blocks.3.hook_resid_pre")  # a capture spec no other test compiles
    before = model_mod._run_jit._cache_size()
    extract(model, pool, str(tmp_path / "acts"), hooks=hooks, batch_size=bs)
    compiled = model_mod._run_jit._cache_size() - before
    assert len(shapes) == len(batches)
    assert {s[0] for s in shapes} == {bs}  # the short last batch is filled: one program per width
    assert {s[1] for s in shapes} == buckets
    assert compiled == len(buckets) <= len(width_buckets(model.config.max_position_embeddings))


def test_per_host_stores_read_by_id(model, tmp_path):
    """Two hosts' length-sorted sub-stores read back in any id order through the one reader."""
    pool = _spread_pool(model, 10)
    halves = [TaskPool([pool[i] for i in range(h, len(pool), 2)]) for h in (0, 1)]
    path = str(tmp_path / "acts")
    ref = extract(model, pool, str(tmp_path / "single"), hooks=HOOKS, batch_size=2).read()
    for h, part in enumerate(halves):
        seqs = task_token_ids(model, part, None)
        st = open_for_host(path, len(part), list(HOOKS), 1, model.d_model, "float32", {"host": h},
                           process_index=h, row_ids=list(part.ids), order=processing_order(seqs))
        x = extract(model, part, str(tmp_path / f"tmp{h}"), hooks=HOOKS, batch_size=2).read()
        for s in range(len(part)):  # write slot by slot in the processing order
            st.write(s, x[st.order[s]][None])
    ids = list(np.random.default_rng(1).permutation(list(pool.ids)))
    where = {t: k for k, t in enumerate(pool.ids)}
    for hook in range(len(HOOKS)):
        got = read_rows(path, HOOKS[hook], ids, position=0)
        np.testing.assert_allclose(got, ref[[where[t] for t in ids], hook, 0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# SIGKILL mid-way, then resume: the same store contents as an uninterrupted run

_CHILD = textwrap.dedent("""
    import sys, time
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py sets it
    import prefjax
    from prefjax.activations import extract
    from prefjax.store import ActivationStore
    from prefjax.tasks import TaskPool, load_default_pool
    path, ids, slow = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3])
    full = load_default_pool()
    pool = TaskPool([full[i] for i in ids])
    real = ActivationStore.write
    def slow_write(self, *a, **k):  # leave time between commits for the kill to land mid-run
        out = real(self, *a, **k)
        time.sleep(slow)
        return out
    ActivationStore.write = slow_write
    extract(prefjax.load("gemma3-tiny-tok"), pool, path, hooks=%r, n_after=1, batch_size=2)
    print("finished")
""") % (HOOKS,)


def _child(path, ids, slow):
    env = dict(os.environ, PREFJAX_PROGRESS="0", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-c", _CHILD, path, ",".join(ids), str(slow)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _committed(path):
    try:
        with open(os.path.join(path, "committed.json")) as f:
            return json.load(f)["committed"]
    except (OSError, ValueError):
        return 0


def test_sigkill_mid_extraction_resumes_to_the_same_store(model, tmp_path):
    pool = _spread_pool(model, 12)
    ids = list(pool.ids)
    ref = extract(model, pool, str(tmp_path / "ref"), hooks=HOOKS, n_after=1, batch_size=2)
    path = str(tmp_path / "killed")
    p = _child(path, ids, 1.0)
    t0 = time.time()
    while _committed(path) < 4 and p.poll() is None and time.time() - t0 < 240:
        time.sleep(0.05)
    time.sleep(0.5)  # land between or inside commits
    p.send_signal(signal.SIGKILL)
    out = p.communicate()[0].decode(errors="replace")
    assert p.returncode == -signal.SIGKILL, out[-2000:]
    n_at_kill = _committed(path)
    assert 0 < n_at_kill < len(pool), (n_at_kill, out[-2000:])
    res = extract(model, pool, path, hooks=HOOKS, n_after=1, batch_size=2)  # the same call resumes
    assert res.committed == ref.committed == len(pool)
    assert res.layout == ref.layout
    np.testing.assert_array_equal(res.read(), ref.read())
    assert res.mean_norms() == ref.mean_norms()


def test_pool_order_store_from_before_the_sort_is_continued_in_pool_order(model, tmp_path):
    """A partial store written in pool order (no ``order`` in its layout) resumes in pool order."""
    pool = _spread_pool(model, 7)
    ref = extract(model, pool, str(tmp_path / "ref"), hooks=HOOKS, batch_size=2)
    path = str(tmp_path / "legacy")
    meta = {"model": str(model.source), "persona": None, "n_after": 0, "positions": "end_of_turn+0"}
    old = open_or_create(path, len(pool), list(HOOKS), 1, model.d_model, "float32", meta, row_ids=list(pool.ids))
    old.write(0, ref.read(rows=[0, 1, 2]))  # what the old code committed: the first pool rows
    st = extract(model, pool, path, hooks=HOOKS, batch_size=2)
    assert st.layout["order"] is None and st.complete
    np.testing.assert_allclose(st.read(), ref.read(), rtol=1e-4, atol=1e-4)
