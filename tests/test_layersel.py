"""The layer chosen inside the cross-validation (prefjax.probes.layersel): recovery of a planted layer, the
optimism of the naive best layer on pure noise, exact agreement with a refit-everything reference."""

import json

import numpy as np
import pytest
from scipy import stats

from prefjax.probes import kfold_ids, nested_cv_ridge
from prefjax.probes.cvpath import FactorSet
from prefjax.probes.layersel import LayerSelection, select_layer_cv

ALPHAS = (1.0, 10.0, 100.0, 1000.0)


def noise_layers(n, d, L, rng):
    return [rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, d) + rng.normal(0, 2, d) for _ in range(L)]


# ---------------------------------------------------------------------------------------------------------
# a brute-force reference: every fit a fresh numpy ridge solve


def _ridge_predict(X_tr, y_tr, X_ev, alpha, scale):
    """Ridge with an unpenalised intercept (centred on the training rows), features divided by ``scale``."""
    m = X_tr.mean(0)
    Z = (X_tr - m) / scale
    w = np.linalg.solve(Z.T @ Z + alpha * np.eye(Z.shape[1]), Z.T @ (y_tr - y_tr.mean()))
    return y_tr.mean() + ((X_ev - m) / scale) @ w


def _pearson0(a, b):
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def _scale(X, standardize):
    if not standardize:
        return np.ones(X.shape[1])
    sd = X.std(0)
    return np.where(sd > 1e-12 * max(1.0, np.abs(X).max()), sd, 1.0)


def brute_select(Xs, y_cols, alphas, outer_ids, inner_ids, standardize, rule):
    """Per label column: out-of-fold predictions of the layer-inside-CV procedure, the fold choices, and
    each layer's own nested predictions -- all by refitting. Inner folds keep the outer training set's
    scale (centred on their own rows), as the factor set does."""
    n, P = y_cols.shape
    K, L, A = int(outer_ids.max()) + 1, len(Xs), len(alphas)
    sel = np.full((n, P), np.nan)
    per_layer = np.full((L, n, P), np.nan)
    choice = np.zeros((K, P, 2), int)
    for p in range(P):
        y = y_cols[:, p]
        for k in range(K):
            test, train = np.flatnonzero(outer_ids == k), np.flatnonzero(outer_ids != k)
            ids = inner_ids[k]
            best = (-np.inf, None, None)
            for l, X in enumerate(Xs):
                s = _scale(X[train], standardize)
                r_FxA = np.zeros((ids.max() + 1, A))
                for f in range(ids.max() + 1):
                    tr, ev = train[ids != f], train[ids == f]
                    for a, alpha in enumerate(alphas):
                        r_FxA[f, a] = _pearson0(_ridge_predict(X[tr], y[tr], X[ev], alpha, s), y[ev])
                mean_A = r_FxA.mean(0)
                a_best = int(np.argmax(mean_A))
                if rule == "1se":
                    se = r_FxA.std(0, ddof=1)[a_best] / np.sqrt(len(r_FxA))
                    ok = np.flatnonzero(mean_A >= mean_A[a_best] - se)
                    a_rule = int(max(ok, key=lambda a: alphas[a]))
                else:
                    a_rule = a_best
                per_layer[l, test, p] = _ridge_predict(X[train], y[train], X[test], alphas[a_rule], s)
                if mean_A[a_best] > best[0]:
                    best = (mean_A[a_best], l, a_rule)
            choice[k, p] = best[1:]
            sel[test, p] = per_layer[best[1], test, p]
    return sel, per_layer, choice


def _fold_mean(pred, y, outer_ids):
    K = int(outer_ids.max()) + 1
    w = np.bincount(outer_ids, minlength=K) / len(y)
    return sum(w[k] * _pearson0(pred[outer_ids == k], y[outer_ids == k]) for k in range(K))


@pytest.mark.parametrize("standardize,d,rule", [(False, 5, "best"), (True, 5, "1se"), (True, 40, "best"),
                                                (False, 40, "1se")])
def test_equals_brute_force_refits(standardize, d, rule):
    rng = np.random.default_rng(3)
    n, L, outer, inner, n_perm, seed = 30, 3, 3, 3, 6, 4
    Xs = noise_layers(n, d, L, rng)
    y = Xs[1][:, :3] @ np.array([1.0, -0.5, 0.3]) / 3 + rng.normal(size=n)
    res = select_layer_cv(Xs, y, alphas=ALPHAS, outer=outer, inner=inner, n_perm=n_perm, n_boot=100, seed=seed,
                          standardize=standardize, alpha_rule=rule, names=[3, 6, 9])
    outer_ids = kfold_ids(n, outer, seed)
    inner_ids = [kfold_ids(int(np.sum(outer_ids != k)), inner, seed + 1 + k) for k in range(outer)]
    # the permuted labels: the stream nested_cv_ridge draws them from
    prng = np.random.default_rng([seed, 1])
    Y = np.stack([y] + [y[prng.permutation(n)] for _ in range(n_perm)], 1)
    sel, per_layer, choice = brute_select(Xs, Y, ALPHAS, outer_ids, inner_ids, standardize, rule)
    np.testing.assert_allclose(res["predictions"], sel[:, 0], rtol=0, atol=1e-8)
    r_P = np.array([_fold_mean(sel[:, p], Y[:, p], outer_ids) for p in range(n_perm + 1)])
    assert res["r"] == pytest.approx(r_P[0], abs=1e-8)
    assert res["fold_layer"] == [[3, 6, 9][l] for l in choice[:, 0, 0]]
    assert res["fold_alpha"] == [ALPHAS[a] for a in choice[:, 0, 1]]
    assert res["null"]["p_value"] == pytest.approx((1 + np.sum(r_P[1:] >= r_P[0])) / (1 + n_perm))
    assert res["null"]["mean"] == pytest.approx(r_P[1:].mean(), abs=1e-8)
    np.testing.assert_allclose(res["null"]["values"], r_P[1:], rtol=0, atol=1e-8)
    R_LxP = np.array([[_fold_mean(per_layer[l, :, p], Y[:, p], outer_ids) for p in range(n_perm + 1)]
                      for l in range(L)])
    np.testing.assert_allclose(res["per_layer_r"], R_LxP[:, 0], rtol=0, atol=1e-8)
    m = R_LxP.max(0)
    assert res["best_layer"]["r"] == pytest.approx(m[0], abs=1e-8)
    assert res["best_layer"]["p_max"] == pytest.approx((1 + np.sum(m[1:] >= m[0])) / (1 + n_perm))
    json.loads(json.dumps(res))


# ---------------------------------------------------------------------------------------------------------
# what the selection recovers and what it does not


def test_signal_in_one_layer_is_recovered_and_matches_the_oracle_layer():
    rng = np.random.default_rng(0)
    n, d, L, planted = 80, 12, 6, 4
    Xs = noise_layers(n, d, L, rng)
    v = rng.normal(size=d)
    y = (Xs[planted] - Xs[planted].mean(0)) @ v
    y = y / y.std() + 0.7 * rng.normal(size=n)
    res = select_layer_cv(Xs, y, alphas=ALPHAS, n_perm=49, n_boot=200, standardize=False)
    oracle = nested_cv_ridge(Xs[planted], y, alphas=ALPHAS, n_perm=0, n_boot=200, standardize=False,
                             final_alpha=False)
    assert res["fold_layer"] == [planted] * 5 and res["layer_counts"] == {str(planted): 5}
    # the same layer in every fold, chosen with that layer's own alpha: exactly the oracle layer's r
    assert res["r"] == pytest.approx(oracle["r"], abs=1e-12) and res["r"] > 0.7
    assert res["fold_alpha"] == oracle["fold_alpha"]
    assert res["ci"][0] < res["r"] < res["ci"][1]
    assert res["null"]["p_value"] == pytest.approx(1 / 50)
    assert res["best_layer"]["layer"] == planted and res["best_layer"]["p_max"] == pytest.approx(1 / 50)


def test_pure_noise_selection_is_unbiased_and_the_naive_best_layer_is_not():
    """On noise layers the selection-in-CV r sits near 0 and its full-selection p is roughly uniform; the
    naive best-layer r is biased upward and its uncorrected p is not uniform (so the same checks fail for
    the naive numbers); the max-over-layers null repairs the naive p."""
    rng = np.random.default_rng(11)
    n, d, L, n_perm = 48, 12, 6, 39
    sel_r, naive_r, p_sel, p_naive, p_max = [], [], [], [], []
    for s in range(16):
        Xs = noise_layers(n, d, L, rng)
        res = select_layer_cv(Xs, rng.normal(size=n), alphas=(1.0, 100.0, 1e4), outer=3, inner=3, n_perm=n_perm,
                              n_boot=100, seed=s, standardize=False)
        sel_r.append(res["r"])
        naive_r.append(res["best_layer"]["r"])
        p_sel.append(res["null"]["p_value"])
        p_max.append(res["best_layer"]["p_max"])
        p_naive.append(res["per_layer_p"][res["layers"].index(res["best_layer"]["layer"])])
    sel_r, naive_r = np.asarray(sel_r), np.asarray(naive_r)
    p_sel, p_naive, p_max = map(np.asarray, (p_sel, p_naive, p_max))
    # the estimate: near 0
    assert abs(sel_r.mean()) < 0.1
    # the naive maximum over layers is biased upward, clearly above the selection's estimate
    assert naive_r.mean() > 0.15 and naive_r.mean() - sel_r.mean() > 0.1
    assert stats.ttest_rel(naive_r, sel_r).pvalue < 1e-3
    # the selection's p: roughly uniform; the naive uncorrected p at the best layer: not (the same checks fail)
    assert 0.3 < p_sel.mean() < 0.7 and np.mean(p_sel <= 0.05) <= 0.2
    assert stats.kstest(p_sel, "uniform").pvalue > 0.01
    assert np.mean(p_naive <= 0.05) >= 0.15 and stats.kstest(p_naive, "uniform").pvalue < 1e-3
    # the naive statistic against the max-over-layers null: roughly uniform again
    assert stats.kstest(p_max, "uniform").pvalue > 0.01 and np.mean(p_max <= 0.05) <= 0.2


# ---------------------------------------------------------------------------------------------------------
# the arithmetic: shared factors, one layer at a time, the same numbers as nested_cv_ridge


@pytest.mark.parametrize("standardize", [False, True])
def test_shares_the_probes_factor_sets_and_matches_nested_cv_per_layer(standardize):
    rng = np.random.default_rng(2)
    n, d, L = 40, 50, 3
    Xs = noise_layers(n, d, L, rng)
    y = Xs[0][:, 0] + rng.normal(size=n)
    sel = LayerSelection(y, alphas=ALPHAS, n_perm=20, n_boot=100, seed=1, standardize=standardize)
    nested = []
    for X in Xs:
        fs = FactorSet(X, standardize=standardize)
        nested.append(nested_cv_ridge(X, y, alphas=ALPHAS, n_perm=20, n_boot=100, seed=1, standardize=standardize,
                                      factors=fs, final_alpha=False))
        made = fs.decompositions
        sel.add(fs)
        assert fs.decompositions == made  # every factor the selection needs was already there
    res = sel.result()
    assert res["decompositions"] == 0
    np.testing.assert_allclose(res["per_layer_r"], [c["r"] for c in nested], rtol=0, atol=1e-12)
    assert res["per_layer_p"] == pytest.approx([c["null"]["p_value"] for c in nested])


def test_reads_each_layer_once_and_checks_its_input():
    rng = np.random.default_rng(4)
    Xs = noise_layers(30, 6, 4, rng)
    reads = []

    class Lazy:
        def __len__(self):
            return len(Xs)

        def __getitem__(self, i):
            reads.append(i)
            return Xs[i]

    y = rng.normal(size=30)
    res = select_layer_cv(Lazy(), y, alphas=ALPHAS, outer=3, inner=3, n_boot=100, standardize=False)
    assert reads == [0, 1, 2, 3] and res["decompositions"] == 4 and "null" not in res
    with pytest.raises(ValueError, match="names has 2"):
        select_layer_cv(Xs, y, alphas=ALPHAS, outer=3, inner=3, names=[0, 1])
    sel = LayerSelection(y, alphas=ALPHAS, outer=3, inner=3, n_boot=100, standardize=False)
    with pytest.raises(ValueError, match="standardize"):
        sel.add(FactorSet(Xs[0], standardize=True))
    with pytest.raises(ValueError, match="rows"):
        sel.add(FactorSet(Xs[0][:20], standardize=False))
    with pytest.raises(ValueError, match="no layer"):
        sel.result()
