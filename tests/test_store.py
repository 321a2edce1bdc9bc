"""Kill-safety and aggregation of the comparisons store and the activation store."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from prefjax import store as store_mod
from prefjax.store import (ActivationStore, Comparison, ComparisonsStore, StoreError, open_existing, read_rows,
                           host_store_paths, mean_norms_all_hosts, open_for_host, open_or_create,
                           read_all_hosts)


def _row(a, b, order, sample, choice, persona="base", status="ok", **kw):
    return dict(task_a=a, task_b=b, order=order, persona=persona, sample=sample, choice=choice,
                status=status, refusal=status == "refusal", raw=f"Task {choice}: ...", model="tiny",
                seed=0, **kw)


# ------------------------------------------------------------------------------------------
# ComparisonsStore
# ------------------------------------------------------------------------------------------

def test_comparison_fills_chosen_task_from_order():
    c = Comparison.from_dict(_row("t1", "t2", "BA", 0, "A"))
    assert c.chosen_task == "t2"  # in BA, task_b is shown as "Task A"
    c = Comparison.from_dict(_row("t1", "t2", "AB", 0, "B"))
    assert c.chosen_task == "t2"
    with pytest.raises(StoreError, match="chosen_task"):
        Comparison.from_dict(_row("t1", "t2", "AB", 0, "A", chosen_task="t2"))
    with pytest.raises(StoreError, match="'order'"):
        Comparison.from_dict(_row("t1", "t2", "XY", 0, "A"))
    with pytest.raises(StoreError, match="unknown field"):
        Comparison.from_dict({**_row("t1", "t2", "AB", 0, "A"), "colour": 1})


def test_duplicate_appends_skipped_across_reopen(tmp_path):
    s = ComparisonsStore(tmp_path / "cmp")
    batch = [_row("t1", "t2", "AB", i, "A") for i in range(3)]
    assert s.append(batch) == 3
    assert s.append(batch) == 0
    # same key inside one batch, and a batch mixing old and new keys
    assert s.append(batch[:1] + [_row("t1", "t2", "BA", 0, "B"), _row("t1", "t2", "BA", 0, "A")]) == 1
    s2 = ComparisonsStore(tmp_path / "cmp")
    assert len(s2) == 4
    assert s2.append(batch) == 0
    lines = open(os.path.join(tmp_path / "cmp", os.listdir(tmp_path / "cmp")[0])).read().splitlines()
    assert len(lines) == 4
    assert ("t1", "t2", "BA", "base", 0) in s2.keys()
    # the first write of a key wins: BA/0 chose "B" -> task_a
    (r,) = [r for r in s2.rows() if r["order"] == "BA"]
    assert r["chosen_task"] == "t1"


def test_torn_last_line_truncated_on_open_and_resume(tmp_path, capfd):
    s = ComparisonsStore(tmp_path / "cmp")
    s.append([_row("t1", "t2", "AB", i, "A") for i in range(2)])
    (seg,) = [os.path.join(tmp_path / "cmp", f) for f in os.listdir(tmp_path / "cmp")]
    good_size = os.path.getsize(seg)
    torn = json.dumps(_row("t1", "t2", "AB", 2, "B"))[:25]
    with open(seg, "a") as f:  # a kill mid-write leaves a partial line without newline
        f.write(torn)
    ro = ComparisonsStore(tmp_path / "cmp", readonly=True)
    assert len(ro) == 2 and ro.torn_lines == 1
    assert os.path.getsize(seg) > good_size  # read-only leaves the file alone
    s2 = ComparisonsStore(tmp_path / "cmp")
    assert s2.torn_lines == 1
    assert os.path.getsize(seg) == good_size
    assert "torn" in capfd.readouterr().err
    assert s2.append([_row("t1", "t2", "AB", i, "B") for i in range(4)]) == 2  # samples 2, 3 only
    s3 = ComparisonsStore(tmp_path / "cmp")
    assert s3.torn_lines == 0 and len(s3) == 4
    assert all(json.loads(l) for l in open(seg).read().splitlines())


def test_to_arrays_aggregates_both_orders(tmp_path):
    s = ComparisonsStore(tmp_path / "cmp")
    ids = ["t0", "t1", "t2"]
    rows = [
        # pair (t0, t1) stored as task_a=t1, task_b=t0 to check canonical ordering
        _row("t1", "t0", "AB", 0, "A"),  # t1 wins
        _row("t1", "t0", "BA", 0, "A"),  # t0 shown first, t0 wins
        _row("t1", "t0", "BA", 1, "A"),  # t0 wins
        _row("t1", "t0", "AB", 1, None, status="refusal"),
        _row("t1", "t0", "AB", 2, None, status="unparseable"),
        _row("t1", "t0", "AB", 3, None, status="both"),
        # pair (t0, t2)
        _row("t0", "t2", "AB", 0, "B"),  # t2
        _row("t0", "t2", "BA", 0, "A"),  # t2
        _row("t0", "t2", "BA", 1, "B"),  # t0
        # other persona: must not count
        _row("t0", "t2", "AB", 0, "A", persona="pirate"),
    ]
    s.append(rows)
    i, j, wi, wj = s.to_arrays(ids, "base")
    assert i.dtype == np.int32 and wi.dtype == np.float32
    got = {(int(a), int(b)): (float(x), float(y)) for a, b, x, y in zip(i, j, wi, wj)}
    assert got == {(0, 1): (2.0, 1.0), (0, 2): (1.0, 2.0)}
    assert np.all(i < j)
    assert s.counts("base") == {"ok": 6, "refusal": 1, "unparseable": 1, "both": 1}
    assert s.counts()["ok"] == 7
    with pytest.raises(StoreError, match="'t2'"):
        s.to_arrays(["t0", "t1"], "base")
    i2, j2, _, _ = s.to_arrays(["t0", "t1"], "base", strict=False)
    assert list(zip(i2, j2)) == [(0, 1)]


def test_to_arrays_soft_uses_p_a(tmp_path):
    s = ComparisonsStore(tmp_path / "cmp")
    s.append([_row("x", "y", "AB", 0, "A", p_a=0.8), _row("x", "y", "BA", 0, "A", p_a=0.3)])
    i, j, wi, wj = s.to_arrays(["x", "y"], "base", soft=True)
    # AB: x first -> x gets 0.8; BA: y first -> y gets 0.3, x gets 0.7
    np.testing.assert_allclose([wi[0], wj[0]], [1.5, 0.5], rtol=1e-6)
    _, _, hi, hj = s.to_arrays(["x", "y"], "base")
    assert (hi[0], hj[0]) == (1.0, 1.0)


def test_segments_roll_over(tmp_path):
    s = ComparisonsStore(tmp_path / "cmp", segment_bytes=300)
    for n in range(6):
        s.append([_row("a", "b", "AB", n, "A")])
    assert len(os.listdir(tmp_path / "cmp")) > 1
    assert len(ComparisonsStore(tmp_path / "cmp")) == 6


# ------------------------------------------------------------------------------------------
# ActivationStore
# ------------------------------------------------------------------------------------------

HOOKS = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]


def _acts(rng, b, k=2, d=8):
    return rng.normal(size=(b, len(HOOKS), k, d)).astype(np.float32)


def test_activation_write_read_and_norms(tmp_path):
    rng = np.random.default_rng(0)
    s = open_or_create(tmp_path / "acts", 10, HOOKS, 2, 8, "float32", {"model": "tiny"},
                       row_ids=[f"t{i}" for i in range(10)], chunk_rows=4)
    x1, x2 = _acts(rng, 3), _acts(rng, 4)
    assert s.write(0, x1) == 3
    assert s.write(3, x2) == 7
    full = np.concatenate([x1, x2])
    np.testing.assert_array_equal(s.read(), full)
    np.testing.assert_array_equal(s.read(hook=HOOKS[1]), full[:, 1])
    np.testing.assert_array_equal(s.read(rows=[5, 1], hook=0), full[[5, 1], 0])
    np.testing.assert_array_equal(s.read(rows=slice(2, 6)), full[2:6])
    want = np.linalg.norm(full.astype(np.float64), axis=-1).mean(axis=(0, 2))
    np.testing.assert_allclose([s.mean_norms()[h] for h in HOOKS], want, rtol=1e-12)
    with pytest.raises(StoreError, match="committed"):
        s.read(rows=[7])
    with pytest.raises(StoreError, match="committed"):
        s.write(2, x1)  # not at the counter
    with pytest.raises(StoreError, match="capacity"):
        s.write(7, _acts(rng, 4))
    with pytest.raises(StoreError, match="shape"):
        s.write(7, rng.normal(size=(1, 2, 2, 9)))


def test_bfloat16_store(tmp_path):
    rng = np.random.default_rng(1)
    s = open_or_create(tmp_path / "acts", 4, HOOKS, 2, 8, "bfloat16", {})
    x = _acts(rng, 4)
    s.write(0, x)
    got = s.read()
    assert got.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got, x.astype(ml_dtypes.bfloat16))
    # norms are of the stored (rounded) values
    want = np.linalg.norm(x.astype(ml_dtypes.bfloat16).astype(np.float64), axis=-1).mean(axis=(0, 2))
    np.testing.assert_allclose(list(s.mean_norms().values()), want, rtol=1e-12)


@pytest.mark.parametrize("field,kwargs", [
    ("hooks", dict(hooks=HOOKS[:1])),
    ("'d'|d=", dict(d=16)),
    ("dtype", dict(dtype="bfloat16")),
    ("meta", dict(meta={"model": "other"})),
    ("n_rows", dict(n_rows=12)),
])
def test_incompatible_reopen_names_field(tmp_path, field, kwargs):
    base = dict(n_rows=6, hooks=HOOKS, positions_k=2, d=8, dtype="float32", meta={"model": "tiny"})
    open_or_create(tmp_path / "acts", **base)
    with pytest.raises(StoreError, match=field):
        open_or_create(tmp_path / "acts", **{**base, **kwargs})
    assert open_or_create(tmp_path / "acts", **base).committed == 0  # identical reopen is fine


def test_crash_between_array_write_and_commit_rewrites(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    args = (tmp_path / "acts", 8, HOOKS, 2, 8, "float32", {"m": 1})
    s = open_or_create(*args, chunk_rows=4)
    x = _acts(rng, 8)
    s.write(0, x[:3])
    norms_after_first = s.norm_sums()

    def boom(self, counter):
        raise KeyboardInterrupt("killed before the counter commit")

    garbage = np.full((3, len(HOOKS), 2, 8), 1e6, np.float32)
    monkeypatch.setattr(ActivationStore, "_commit", boom)
    with pytest.raises(KeyboardInterrupt):
        s.write(3, garbage)  # data lands in rows 3..5, counter stays at 3
    monkeypatch.undo()

    s2 = open_or_create(*args)
    assert s2.committed == 3
    np.testing.assert_array_equal(s2.norm_sums()[0], norms_after_first[0])
    assert s2.read().shape[0] == 3  # the half-written rows are never read
    with pytest.raises(StoreError):
        s2.read(rows=[3])
    s2.write(3, x[3:6])  # resume rewrites the uncommitted rows
    s2.write(6, x[6:])
    np.testing.assert_array_equal(s2.read(), x)

    # identical mean norm to an uninterrupted run with the same batches
    ref = open_or_create(tmp_path / "ref", 8, HOOKS, 2, 8, "float32", {"m": 1}, chunk_rows=4)
    ref.write(0, x[:3]); ref.write(3, x[3:6]); ref.write(6, x[6:])
    assert s2.mean_norms() == ref.mean_norms()
    assert json.load(open(tmp_path / "acts" / "committed.json"))["committed"] == 8


def test_counter_written_atomically(tmp_path, monkeypatch):
    s = open_or_create(tmp_path / "acts", 4, HOOKS, 2, 8, "float32", {})
    s.write(0, _acts(np.random.default_rng(3), 2))
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(store_mod.os, "replace", failing_replace)
    with pytest.raises(OSError):
        s.write(2, _acts(np.random.default_rng(4), 2))
    monkeypatch.setattr(store_mod.os, "replace", real_replace)
    assert json.load(open(tmp_path / "acts" / "committed.json"))["committed"] == 2
    assert open_or_create(tmp_path / "acts", 4, HOOKS, 2, 8, "float32", {}).committed == 2


def test_per_host_substores(tmp_path):
    rng = np.random.default_rng(5)
    xs = []
    for host, rows in ((1, 2), (0, 3)):
        s = open_for_host(tmp_path / "acts", 4, HOOKS, 2, 8, "float32", {}, process_index=host,
                          row_ids=[f"h{host}r{i}" for i in range(4)])
        x = _acts(rng, rows)
        s.write(0, x)
        xs.append((host, x))
    assert [os.path.basename(p) for p in host_store_paths(tmp_path / "acts")] == ["host_0", "host_1"]
    acts, ids = read_all_hosts(tmp_path / "acts")
    want = np.concatenate([x for _, x in sorted(xs, key=lambda t: t[0])])
    np.testing.assert_array_equal(acts, want)
    assert ids == ["h0r0", "h0r1", "h0r2", "h1r0", "h1r1"]
    pooled = mean_norms_all_hosts(tmp_path / "acts")
    np.testing.assert_allclose([pooled[h] for h in HOOKS],
                               np.linalg.norm(want.astype(np.float64), axis=-1).mean(axis=(0, 2)),
                               rtol=1e-12)
    one_hook, _ = read_all_hosts(tmp_path / "acts", hook=HOOKS[0])
    np.testing.assert_array_equal(one_hook, want[:, 0])


def test_to_arrays_feeds_fit_thurstonian(tmp_path):
    from prefjax.utility import fit_thurstonian

    rng = np.random.default_rng(7)
    ids = [f"t{n}" for n in range(6)]
    mu_true = np.linspace(-1.5, 1.5, 6)
    rows = []
    for a in range(6):
        for b in range(a + 1, 6):
            for order in ("AB", "BA"):
                for s in range(8):
                    p_a_wins = 0.5 * (1 + np.tanh((mu_true[a] - mu_true[b])))  # any monotone link
                    winner = a if rng.random() < p_a_wins else b
                    first = a if order == "AB" else b
                    rows.append(_row(ids[a], ids[b], order, s, "A" if winner == first else "B"))
    s = ComparisonsStore(tmp_path / "cmp")
    s.append(rows)
    i, j, wi, wj = s.to_arrays(ids, "base")
    assert len(i) == 15 and float(wi.sum() + wj.sum()) == 15 * 16
    fit = fit_thurstonian(i, j, wi, wj, len(ids))
    mu = np.asarray(fit.mu)
    assert np.corrcoef(mu, mu_true)[0, 1] > 0.9
    assert mu[-1] > mu[0]


def test_bad_p_a_and_extra_rejected_before_write(tmp_path):
    s = ComparisonsStore(tmp_path / "cmp")
    with pytest.raises(StoreError, match="p_a"):
        s.append([_row("a", "b", "AB", 0, "A", p_a=float("nan"))])
    with pytest.raises(StoreError, match="extra"):
        s.append([_row("a", "b", "AB", 0, "A", extra={"obj": object()})])
    s.append([_row("a", "b", "AB", 0, "A", extra={"n_tokens": np.int64(7)})])
    assert ComparisonsStore(tmp_path / "cmp").rows()[0]["extra"] == {"n_tokens": 7}
    assert len(ComparisonsStore(tmp_path / "cmp")) == 1


# ------------------------------------------------------------------------------------------
# Processing order: slots written in order, every reader by row
# ------------------------------------------------------------------------------------------

def test_processing_order_reads_back_in_row_order(tmp_path):
    rng = np.random.default_rng(6)
    order = [3, 0, 5, 1, 4, 2]
    ids = [f"t{i}" for i in range(6)]
    s = open_or_create(tmp_path / "acts", 6, HOOKS, 2, 8, "float32", {}, row_ids=ids, order=order, chunk_rows=4)
    x_rows = _acts(rng, 6)  # what row r should hold
    s.write(0, x_rows[order[:2]])  # slots 0, 1 = rows 3, 0
    assert s.committed == 2 and s.committed_rows().tolist() == [0, 3] and s.committed_row_ids() == ["t0", "t3"]
    np.testing.assert_array_equal(s.read(), x_rows[[0, 3]])
    with pytest.raises(StoreError, match=r"row 1 \(id 't1'\) requested but it is not committed"):
        s.read(rows=[1])
    with pytest.raises(StoreError, match="not committed"):
        s.read(rows=slice(0, 2))
    s.write(2, x_rows[order[2:]])
    assert s.complete and s.order.tolist() == order
    np.testing.assert_array_equal(s.read(), x_rows)
    np.testing.assert_array_equal(s.read(hook=HOOKS[1]), x_rows[:, 1])
    np.testing.assert_array_equal(s.read(rows=[5, 1], hook=0), x_rows[[5, 1], 0])
    np.testing.assert_array_equal(s.read(rows=slice(1, 5)), x_rows[1:5])
    np.testing.assert_array_equal(s.read_position([4, 0, 2], HOOKS[0], 1), x_rows[[4, 0, 2], 0, 1])
    want = np.linalg.norm(x_rows.astype(np.float64), axis=-1).mean(axis=(0, 2))
    np.testing.assert_allclose([s.mean_norms()[h] for h in HOOKS], want, rtol=1e-12)
    # a reopen keeps the order; read_rows reads by id in any order, one hook and position
    s2 = open_existing(str(tmp_path / "acts"))
    np.testing.assert_array_equal(s2.read(), x_rows)
    np.testing.assert_array_equal(read_rows(tmp_path / "acts", HOOKS[1], ["t5", "t0", "t2"], position=1),
                                  x_rows[[5, 0, 2], 1, 1])
    np.testing.assert_array_equal(read_rows(tmp_path / "acts", 0, None, 0), x_rows[:, 0, 0])


def test_order_is_validated_and_checked_on_reopen(tmp_path):
    args = (tmp_path / "s", 4, HOOKS, 1, 2, "float32", {})
    with pytest.raises(StoreError, match="permutation of range"):
        open_or_create(*args, order=[0, 1, 1, 3])
    with pytest.raises(StoreError, match="permutation of range"):
        open_or_create(*args, order=[0, 1, 2])
    open_or_create(*args, order=[2, 0, 3, 1])
    with pytest.raises(StoreError, match="processing order differs"):
        open_or_create(*args, order=[0, 2, 3, 1])
    with pytest.raises(StoreError, match="processing order differs"):
        open_or_create(*args)  # nor may a store written in an order be continued without it
    # the identity is stored as None: the same layout as a store written before orders existed
    assert open_or_create(tmp_path / "t", 3, HOOKS, 1, 2, order=[0, 1, 2]).layout["order"] is None


def test_read_rows_across_hosts_and_errors(tmp_path):
    rng = np.random.default_rng(7)
    want = {}
    for host, order in ((0, [2, 0, 1]), (1, [1, 0, 2])):
        ids = [f"h{host}r{i}" for i in range(3)]
        s = open_for_host(tmp_path / "acts", 3, HOOKS, 2, 8, "float32", {}, process_index=host,
                          row_ids=ids, order=order)
        x = _acts(rng, 3)
        s.write(0, x[order[:2]] if host == 1 else x[order])  # host 1 is one row short
        for r in (order[:2] if host == 1 else order):
            want[ids[r]] = x[r]
    acts, ids = read_all_hosts(tmp_path / "acts", hook=HOOKS[1])  # row order within each host
    assert ids == ["h0r0", "h0r1", "h0r2", "h1r0", "h1r1"]
    np.testing.assert_array_equal(acts, np.stack([want[i][1] for i in ids]))
    ask = ["h1r1", "h0r2", "h0r0", "h1r0"]
    np.testing.assert_array_equal(read_rows(tmp_path / "acts", HOOKS[0], ask, position=1),
                                  np.stack([want[i][0, 1] for i in ask]))
    with pytest.raises(StoreError, match=r"1 of 2 requested ids are not committed.*'h1r2'"):
        read_rows(tmp_path / "acts", HOOKS[0], ["h0r0", "h1r2"])
    with pytest.raises(StoreError, match="no activation store"):
        read_rows(tmp_path / "nothing", HOOKS[0], ["a"])
    bare = open_or_create(tmp_path / "bare", 2, HOOKS, 1, 8, "float32", {})
    bare.write(0, _acts(rng, 2, k=1))
    with pytest.raises(StoreError, match="has no row ids"):
        read_rows(tmp_path / "bare", HOOKS[0], ["x"])
    assert read_rows(tmp_path / "bare", HOOKS[0], None).shape == (2, 8)
    dup = open_for_host(tmp_path / "acts", 3, HOOKS, 2, 8, "float32", {}, process_index=2,
                        row_ids=["h0r0", "x1", "x2"])
    dup.write(0, _acts(rng, 1))
    with pytest.raises(StoreError, match="'h0r0' is held by both"):
        read_rows(tmp_path / "acts", HOOKS[0], ["h0r0"])
