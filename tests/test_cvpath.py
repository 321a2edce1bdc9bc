"""The one-decomposition probes arithmetic (prefjax.probes.cvpath) against c031b3c's refit-every-training-set
arithmetic in float64 (tests/probes_reference.py): same numbers to float64 tolerance, far fewer
decompositions."""

import numpy as np
import pytest

import probes_reference as ref
from prefjax.probes import controls, cvpath, nulls
from prefjax.probes.cvpath import FactorSet, RidgeFactor, decomposition_count, fit_rows, predict_rows
from prefjax.probes.protocol import run_decompositions

ALPHAS = (0.3, 3.0, 30.0, 300.0, 3000.0)


def _data(n, d, seed=0, n_topics=5):
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(n, d)) * rng.uniform(0.2, 3.0, d) + rng.normal(size=d) * 4).astype(np.float32)
    w = rng.normal(size=d)
    y = (X - X.mean(0)) @ w / np.sqrt(d) + rng.normal(size=n) * 2.0
    topics = np.array([f"t{i % n_topics}" for i in rng.permutation(n)])
    return X, y, topics


def _close(a, b, tol=1e-8, path="out"):
    """Recursive comparison of two result dicts (floats to ``tol`` relative+absolute, the rest exactly)."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))} differ"
        for k in a:
            _close(a[k], b[k], tol, f"{path}.{k}")
    elif isinstance(a, (list, tuple, np.ndarray)) and not isinstance(a, str):
        a_, b_ = np.asarray(a, dtype=object if a is None else None), np.asarray(b)
        if a_.dtype == object or b_.dtype == object:
            assert len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b)):
                _close(x, y, tol, f"{path}[{i}]")
            return
        if a_.dtype.kind in "fc" or b_.dtype.kind in "fc":
            np.testing.assert_allclose(a_.astype(float), b_.astype(float), rtol=tol, atol=tol, err_msg=path,
                                       equal_nan=True)
        else:
            np.testing.assert_array_equal(a_, b_, err_msg=path)
    elif isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            assert a is b, f"{path}: {a} vs {b}"
        else:
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=path)
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


@pytest.mark.parametrize("n,d", [(48, 12), (30, 70)])
@pytest.mark.parametrize("standardize", [False, True])
def test_fit_without_rows_equals_refit(n, d, standardize):
    X, y, _ = _data(n, d)
    rng = np.random.default_rng(1)
    fs = FactorSet(X, standardize=standardize)
    train = np.sort(rng.choice(n, 2 * n // 3, replace=False))
    held = np.setdiff1d(np.arange(n), train)
    factor, fit = fit_rows(fs, train, y[:, None], ALPHAS)
    got = predict_rows(fs, factor, fit, held)[:, :, 0]
    (want,) = ref._path_predictions(X[train], y[train, None], [X[held]], np.asarray(ALPHAS), standardize)
    np.testing.assert_allclose(got, want[:, :, 0], rtol=1e-9, atol=1e-9)
    # the removed rows' labels do not reach the fit (exactly, up to rounding)
    y2 = y.copy()
    y2[held] += 100.0
    _, fit2 = fit_rows(fs, train, y2[:, None], ALPHAS)
    np.testing.assert_allclose(predict_rows(fs, factor, fit2, held)[:, :, 0], got, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("rule", ["best", "1se"])
def test_nested_cv_equals_refit(standardize, rule):
    X, y, topics = _data(60, 16)
    kw = dict(alphas=ALPHAS, outer=4, inner=3, n_perm=6, n_boot=200, seed=3, standardize=standardize,
              alpha_rule=rule)
    _close(nulls.nested_cv_ridge(X, y, **kw), ref.nested_cv_ridge(X, y, **kw))
    _close(nulls.nested_cv_ridge(X, y, groups=topics, **kw), ref.nested_cv_ridge(X, y, groups=topics, **kw))
    test = np.arange(0, 60, 5)
    kw["outer"] = [test]
    _close(nulls.nested_cv_ridge(X, y, **kw), ref.nested_cv_ridge(X, y, **kw))


def test_nested_cv_dual_equals_refit():
    X, y, _ = _data(40, 90, seed=2)
    kw = dict(alphas=ALPHAS, outer=4, inner=3, n_perm=4, n_boot=200, seed=1, standardize=False)
    _close(nulls.nested_cv_ridge(X, y, **kw), ref.nested_cv_ridge(X, y, **kw))


def test_standardized_inner_folds_use_the_outer_scale():
    """The one protocol change: with ``standardize`` the inner folds keep the outer training set's scale.
    c031b3c's own-scale inner fits give different inner curves on the same data, so the comparison above
    would catch the old protocol (this is what makes the gate able to fail)."""
    X, y, _ = _data(60, 16)
    kw = dict(alphas=ALPHAS, outer=4, inner=3, n_boot=200, seed=3, standardize=True)
    new = nulls.nested_cv_ridge(X, y, **kw)
    ids = nulls.kfold_ids(45, 3, 4)  # outer fold 0's inner folds (seed + 1 + k)
    folds = nulls._fold_list(60, 4, 3, None)
    train = np.setdiff1d(np.arange(60), folds[0])
    own, _ = ref._inner_choice(X[train], y[train, None], nulls.kfold_ids(len(train), 3, 4), np.asarray(ALPHAS),
                               True, "best")
    assert len(ids) == 45 and not np.allclose(own[:, 0], new["inner_r"][0], atol=1e-6)


@pytest.mark.parametrize("standardize", [False, True])
def test_loto_transfer_inlp_equal_refit(standardize):
    X, y, topics = _data(60, 14, seed=4)
    kw = dict(alphas=ALPHAS, inner=3, seed=2, standardize=standardize, alpha_rule="1se")
    new, old = controls.leave_one_topic_out(X, y, topics, **kw), ref.leave_one_topic_out(X, y, topics, **kw)
    _close(new, old)
    rng = np.random.default_rng(5)
    Xs = np.stack([X, X + rng.normal(size=X.shape).astype(np.float32)])
    Ys = np.stack([y, y + rng.normal(size=y.shape)])
    for inner in (None, 3):
        tkw = dict(alphas=ALPHAS, seed=1, standardize=standardize, inner=inner, n_boot=200)
        _close(controls.transfer_matrix(Xs, Ys, **tkw), ref.transfer_matrix(Xs, Ys, **tkw))
    nkw = dict(alphas=ALPHAS, outer=3, inner=3, n_perm=5, n_boot=200, seed=0, standardize=standardize)
    _close(nulls.nested_transfer(Xs, Ys, **nkw), ref.nested_transfer(Xs, Ys, **nkw))
    if not standardize:
        ikw = dict(n_iter=2, alphas=ALPHAS, topics=topics, seed=0, inner=3)
        _close(controls.inlp(X, y, **ikw), ref.inlp(X, y, **ikw), tol=1e-7)


def test_decompositions_per_layer():
    """The probes stage's calls on one layer share one FactorSet: raw features need one decomposition for
    the nested CV (outer + inner + null), the fixed split, the saved probe's fit and leave-one-topic-out;
    standardised features one per distinct outer training set."""
    X, y, topics = _data(60, 12, seed=6)
    test = np.arange(0, 60, 5)
    for standardize, expect in ((False, 1), (True, 5 + 1 + 5)):  # 5 outer folds + the split + 5 topics
        fs = FactorSet(X, standardize=standardize)
        before = decomposition_count()
        kw = dict(alphas=ALPHAS, inner=3, seed=0, standardize=standardize, factors=fs)
        nulls.nested_cv_ridge(X, y, outer=5, n_perm=20, final_alpha=False, **kw)
        split = nulls.nested_cv_ridge(X, y, outer=[test], final_alpha=False, **kw)
        fit_rows(fs, np.setdiff1d(np.arange(60), test), y[:, None], [split["fold_alpha"][0]])
        controls.leave_one_topic_out(X, y, topics, **kw)
        assert decomposition_count() - before == fs.decompositions == expect
        # the count aot.workload states is the count made (one layer, one persona: the layer + the baseline)
        dec = run_decompositions(n_layers=1, personas=1, standardize=standardize, outer=5, n_topics=5, inlp_iter=0)
        assert dec["probes"] == 2 * expect


def test_factor_set_refuses_mismatch():
    X, y, _ = _data(30, 8)
    fs = FactorSet(X, standardize=False)
    with pytest.raises(ValueError, match="standardize"):
        nulls.nested_cv_ridge(X, y, outer=3, inner=2, factors=fs, standardize=True)
    with pytest.raises(ValueError, match="shape"):
        nulls.nested_cv_ridge(X[:20], y[:20], outer=3, inner=2, factors=fs, standardize=False)
    with pytest.raises(ValueError, match="non-finite"):
        FactorSet(np.where(np.arange(8) == 3, np.nan, X), standardize=False)
    with pytest.raises(KeyError, match="not among"):
        RidgeFactor(X, np.arange(10), standardize=True).to_local([12])


@pytest.mark.parametrize("standardize", [False, True])
def test_hat_cache_path_equals_rebuilt_blocks(monkeypatch, standardize):
    """The cached full hat matrices (one grid per factor, final single-alpha fits served from it) give the
    same nested CV and leave-one-topic-out as rebuilding each ``H_MM`` block from the basis rows; the cache
    is really used on the first path and really off on the second."""
    X, y, topics = _data(60, 16, seed=3)
    kw = dict(alphas=ALPHAS, outer=4, inner=3, n_perm=5, seed=0, standardize=standardize, alpha_rule="1se")

    def run():
        fs = FactorSet(X, standardize=standardize)
        nested = nulls.nested_cv_ridge(X, y, factors=fs, **kw)
        loto = controls.leave_one_topic_out(X, y, topics, alphas=ALPHAS, inner=3, seed=0,
                                            standardize=standardize, alpha_rule="1se", factors=fs)
        return nested, loto, fs.hat_builds

    monkeypatch.setenv("PREFJAX_HAT_BYTES", str(2**30))
    cached, loto_c, builds = run()
    monkeypatch.setenv("PREFJAX_HAT_BYTES", "0")
    plain, loto_p, builds0 = run()
    assert builds >= 1 and builds0 == 0
    _close(cached, plain, 1e-9)
    _close(loto_c, loto_p, 1e-9)


def test_row_buckets_bound_padding_and_programs():
    """Removed-row counts pad to few buckets (<= 12.5% padding above 64 rows), and leave-one-topic-out over
    topics of many sizes compiles one downdate program per bucket, not one per size; the padded solves give
    the reference numbers (the float64 tests above run through the same padding)."""
    sizes = np.arange(1, 5000)
    b = np.array([cvpath.row_bucket(m) for m in sizes])
    assert np.all(b >= sizes) and np.all(np.diff(b) >= 0)
    assert np.all(b[sizes > 64] <= np.ceil(sizes[sizes > 64] * 1.125))
    assert len(np.unique(b)) < 80
    rng = np.random.default_rng(5)
    n = 200
    X = rng.normal(size=(n, 10)).astype(np.float32)
    y = X @ rng.normal(size=10) + rng.normal(size=n)
    topics = np.repeat([f"t{k}" for k in range(15)], np.r_[np.arange(3, 17), n - np.arange(3, 17).sum()])
    before = cvpath._downdate_hat._cache_size()
    fs = FactorSet(X, standardize=False)
    got = controls.leave_one_topic_out(X, y, topics, alphas=ALPHAS, inner=3, seed=0, standardize=False,
                                       alpha_rule="1se", factors=fs)
    compiled = cvpath._downdate_hat._cache_size() - before
    want = ref.leave_one_topic_out(X, y, topics, alphas=ALPHAS, inner=3, seed=0, standardize=False,
                                   alpha_rule="1se")
    _close(got, want, 1e-8)
    distinct_sizes = 15 * 4  # each topic's own removal and its 3 inner folds come in many sizes
    assert compiled <= 12 < distinct_sizes
