"""Nested cross-validation, label-shuffle nulls, transfer over the alpha grid, random-direction nulls."""

import json

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from prefjax.probes import (RidgePath, kfold_ids, nested_cv_ridge, nested_transfer, random_direction_null,
                            random_unit_directions)

ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 7))


def planted(n=120, d=20, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, d) + rng.normal(0, 3, d)
    v = rng.normal(size=d)
    y = (X - X.mean(0)) @ v
    return X, y / y.std() + noise * rng.normal(size=n), v


def test_kfold_ids_balanced_and_grouped():
    ids = kfold_ids(23, 5, seed=1)
    assert sorted(np.bincount(ids)) == [4, 4, 5, 5, 5]
    groups = np.repeat(np.arange(10), 3)
    g_ids = kfold_ids(30, 4, seed=0, groups=groups)
    for g in range(10):
        assert len(set(g_ids[groups == g])) == 1  # a group is never split
    with pytest.raises(ValueError, match="groups has 2 distinct"):
        kfold_ids(6, 3, groups=[0, 0, 0, 1, 1, 1])


def test_planted_signal_is_significant_and_json_ready():
    X, y, _ = planted()
    res = nested_cv_ridge(X, y, alphas=ALPHAS, n_perm=199, n_boot=500)
    assert res["r"] > 0.8 and res["ci"][0] < res["r"] < res["ci"][1] and res["ci"][0] > 0.6
    assert res["null"]["p_value"] == pytest.approx(1 / 200)  # < 0.01
    assert abs(res["null"]["mean"]) < 0.1 and res["null"]["quantiles"]["0.99"] < 0.45
    assert len(res["fold_alpha"]) == len(res["fold_r"]) == 5 and sum(res["fold_n"]) == len(y)
    assert np.asarray(res["inner_r"]).shape == (5, len(ALPHAS)) and len(res["r_by_alpha"]) == len(ALPHAS)
    assert res["alpha"] in ALPHAS
    json.loads(json.dumps(res))


def test_pure_noise_gives_roughly_uniform_p():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(60, 8))
    ps = [nested_cv_ridge(X, rng.normal(size=60), alphas=ALPHAS[::2], outer=4, inner=3, n_perm=49, n_boot=100,
                          seed=s)["null"]["p_value"] for s in range(40)]
    ps = np.asarray(ps)
    assert 0.3 < ps.mean() < 0.7
    assert np.mean(ps <= 0.05) <= 0.15 and np.mean(ps <= 0.5) > 0.3
    assert stats.kstest(ps, "uniform").pvalue > 0.01


def brute_nested(X, y, alphas, outer_ids, inner_ids_by_fold, standardize=True):
    """Nested CV with a scikit-learn refit for every (fold, alpha): the reference implementation. With
    ``standardize`` the scaler is fitted on each outer training set and applied unchanged to its inner
    folds (which Ridge re-centres): the inner folds keep the outer training set's scale, as
    prefjax.probes.cvpath documents; without it every fit is on raw features."""
    pred = np.zeros_like(y)
    chosen = []
    for k in range(outer_ids.max() + 1):
        tr, te = np.flatnonzero(outer_ids != k), np.flatnonzero(outer_ids == k)
        inner_ids = inner_ids_by_fold[k]
        score = np.zeros(len(alphas))
        outer_sc = StandardScaler(with_std=standardize).fit(X[tr])
        for f in range(inner_ids.max() + 1):
            itr, iev = tr[inner_ids != f], tr[inner_ids == f]
            for i, a in enumerate(alphas):
                m = Ridge(alpha=a).fit(outer_sc.transform(X[itr]), y[itr])
                score[i] += np.corrcoef(m.predict(outer_sc.transform(X[iev])), y[iev])[0, 1]
        best = alphas[int(np.argmax(score))]
        chosen.append(best)
        pred[te] = Ridge(alpha=best).fit(outer_sc.transform(X[tr]), y[tr]).predict(outer_sc.transform(X[te]))
    return chosen, pred


@pytest.mark.parametrize("standardize", [True, False])
def test_matches_brute_force_sklearn_nested_cv(standardize):
    X, y, _ = planted(n=60, d=30, noise=1.0, seed=3)  # d close to n: alpha matters
    res = nested_cv_ridge(X, y, alphas=ALPHAS, outer=4, inner=3, seed=7, standardize=standardize)
    outer_ids = kfold_ids(60, 4, 7)
    inner = [kfold_ids(int(np.sum(outer_ids != k)), 3, 7 + 1 + k) for k in range(4)]
    chosen, pred = brute_nested(X, y, np.asarray(ALPHAS), outer_ids, inner, standardize)
    assert res["fold_alpha"] == pytest.approx(chosen)
    np.testing.assert_allclose(res["predictions"], pred, rtol=1e-6, atol=1e-6)
    fold_r = [np.corrcoef(pred[outer_ids == k], y[outer_ids == k])[0, 1] for k in range(4)]
    assert res["fold_r"] == pytest.approx(fold_r, abs=1e-4)
    assert res["r"] == pytest.approx(np.average(fold_r, weights=np.bincount(outer_ids)), abs=1e-4)


def leaky_fold_alphas(X, y, alphas, outer_ids):
    """A deliberately wrong procedure: alpha picked by r on the outer test fold itself."""
    out = []
    for k in range(outer_ids.max() + 1):
        tr, te = outer_ids != k, outer_ids == k
        path = RidgePath.build(X[tr])
        c = np.asarray(path.coefs(y[tr] - y[tr].mean()))
        e = np.asarray(path.eval_projection(X[te]))
        lam = np.asarray(path.lam_R)
        rs = [np.corrcoef(e @ (c / (lam + a)), y[te])[0, 1] for a in alphas]
        out.append(float(alphas[int(np.argmax(rs))]))
    return out


def alpha_sees_test_labels(fold_alphas_fn, X, y, outer_ids, fold=0):
    """Rewrite the labels of one outer test fold twice, each time to favour a different alpha (the
    predictions of the smallest-alpha and of the largest-alpha fit); True if the fold's alpha follows."""
    tr, te = outer_ids != fold, outer_ids == fold
    path = RidgePath.build(X[tr])
    c = np.asarray(path.coefs(y[tr] - y[tr].mean()))
    e = np.asarray(path.eval_projection(X[te]))
    lam = np.asarray(path.lam_R)
    picked = []
    for a in (ALPHAS[0], ALPHAS[-1]):
        y2 = y.copy()
        y2[te] = e @ (c / (lam + a))
        picked.append(fold_alphas_fn(y2)[fold])
    return picked[0] != picked[1], picked


def test_nested_cv_does_not_leak_test_fold_into_alpha():
    X, y, _ = planted(n=50, d=35, noise=1.0, seed=11)  # near-interpolating: alpha changes predictions
    alphas = np.asarray(ALPHAS)
    outer_ids = kfold_ids(50, 5, 0)
    folds = [np.flatnonzero(outer_ids == k) for k in range(5)]
    nested = lambda yy: nested_cv_ridge(X, yy, alphas=alphas, outer=folds, inner=4, seed=0)["fold_alpha"]
    leaky = lambda yy: leaky_fold_alphas(X, yy, alphas, outer_ids)
    # The check is sensitive: it catches the leaky procedure ...
    leaked, picked = alpha_sees_test_labels(leaky, X, y, outer_ids)
    assert leaked and picked == [alphas[0], alphas[-1]]
    # ... and the nested procedure passes it: fold 0's alpha and inner curve ignore fold 0's labels.
    assert not alpha_sees_test_labels(nested, X, y, outer_ids)[0]
    base = nested_cv_ridge(X, y, alphas=alphas, outer=folds, inner=4)
    y2 = y.copy()
    y2[folds[0]] = np.random.default_rng(1).normal(size=len(folds[0]))
    moved = nested_cv_ridge(X, y2, alphas=alphas, outer=folds, inner=4)
    assert moved["inner_r"][0] == base["inner_r"][0] and moved["fold_alpha"][0] == base["fold_alpha"][0]
    assert moved["fold_r"][0] != pytest.approx(base["fold_r"][0])  # the perturbation did reach the test score


def test_fixed_split_and_groups():
    X, y, _ = planted(n=90, seed=2)
    test = np.arange(60, 90)
    res = nested_cv_ridge(X, y, alphas=ALPHAS, outer=[test], inner=3)
    assert res["n_heldout"] == 30 and all(p is None for p in res["predictions"][:60])
    topics = np.repeat(np.arange(18), 5)
    res_g = nested_cv_ridge(X, y, alphas=ALPHAS, outer=3, inner=3, groups=topics)
    assert res_g["r"] > 0.6 and sum(res_g["fold_n"]) == 90


def test_nested_cv_bad_inputs():
    X, y, _ = planted(n=40)
    with pytest.raises(ValueError, match="alphas"):
        nested_cv_ridge(X, y, alphas=[1.0, -1.0])
    with pytest.raises(ValueError, match="y must have shape"):
        nested_cv_ridge(X, y[:-1])
    with pytest.raises(ValueError, match="inner"):
        nested_cv_ridge(X, y, inner=1)
    with pytest.raises(ValueError, match="n_perm"):
        nested_cv_ridge(X, y, n_perm=-3)
    with pytest.raises(ValueError, match="level"):
        nested_cv_ridge(X, y, level=95)
    with pytest.raises(ValueError, match="outer"):
        nested_cv_ridge(X, y, outer=[[0, 1, 2], [2, 3, 4]])
    with pytest.raises(ValueError, match="X has a non-finite"):
        nested_cv_ridge(np.where(np.eye(40, 20) > 0, np.nan, X), y)
    with pytest.raises(ValueError, match="outer fold 0"):
        nested_cv_ridge(X[:12], y[:12], outer=2, inner=5)


def personas(n=150, d=24, seed=0):
    """Three personas sharing activations up to a shift: default, inverted, and one sharing part of the ranking."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, d))
    v = rng.normal(size=d)
    u = rng.normal(size=d)
    u -= (u @ v) / (v @ v) * v
    u *= np.linalg.norm(v) / np.linalg.norm(u)
    X = np.stack([base + rng.normal(0, 2, d) for _ in range(3)])
    util = [base @ v, -(base @ v), base @ (0.5 * v + np.sqrt(0.75) * u)]  # partial: corr 0.5 with default
    Y = np.stack([(t - t.mean()) / t.std() + 0.2 * rng.normal(size=n) for t in util])
    return X, Y


def test_transfer_grid_intervals_and_nulls():
    X, Y = personas()
    res = nested_transfer(X, Y, alphas=ALPHAS, outer=4, inner=3, n_perm=99, n_boot=300,
                          names=["default", "inverted", "partial"])
    json.loads(json.dumps(res))
    r, lo, hi = (np.asarray(res[k]) for k in ("r", "ci_lo", "ci_hi"))
    grid = np.asarray(res["r_grid"])
    assert grid.shape == (len(ALPHAS), 3, 3) and np.asarray(res["r_grid_lo"]).shape == grid.shape
    assert np.all(lo <= r) and np.all(r <= hi)
    uc = np.asarray(res["utility_corr"])
    assert np.all(np.abs(r - uc) < 0.12)  # transfer reads each persona's utility
    assert r[0, 1] < -0.8 and 0.3 < r[0, 2] < 0.7
    p = np.asarray(res["p_value"])
    assert p[0, 0] == pytest.approx(0.01) and p[0, 2] == pytest.approx(0.01)
    assert p[0, 1] == 1.0  # a strongly negative transfer is not evidence of positive transfer ...
    assert np.asarray(res["p_value_two_sided"])[0, 1] == pytest.approx(0.01)  # ... but it is an effect
    np.testing.assert_allclose(res["alpha_spread"], grid.max(0) - grid.min(0))
    # with 150 tasks and 24 dims the answer does not hang on alpha for the self cells at small alphas
    assert np.all(np.abs(grid[:3, 0, 0] - r[0, 0]) < 0.05)


def test_transfer_flags_a_number_that_hangs_on_alpha():
    # 110 tasks, 64 dims (near-interpolating training folds, as in the 2026-11-29 organism): r moves by
    # ~0.2 within two decades of the chosen alpha, and the report says so.
    X, Y = personas(n=110, d=64, seed=4)
    res = nested_transfer(X, Y, outer=5, inner=5, n_boot=200)
    hangs, grid = np.asarray(res["hangs_on_alpha"]), np.asarray(res["r_grid"])
    assert hangs[0, 0] and hangs[0, 1] and np.asarray(res["alpha_spread"])[0, 0] > 0.1
    lo_a, hi_a = res["alpha_window"][0]
    win = (np.asarray(res["alphas"]) >= lo_a) & (np.asarray(res["alphas"]) <= hi_a)
    r = np.asarray(res["r"])
    assert np.max(np.abs(grid[win, 0, 0] - r[0, 0])) > 0.05
    # 400 tasks, 10 dims: the same matrix does not depend on alpha, and nothing is flagged.
    X, Y = personas(n=400, d=10, seed=4)
    res = nested_transfer(X, Y, outer=5, inner=5, n_boot=200)
    assert not np.asarray(res["hangs_on_alpha"]).any() and np.max(res["alpha_spread"]) < 0.05


def test_transfer_shared_utilities_and_bad_inputs():
    X, Y = personas(n=80)
    res = nested_transfer(X, Y[0], alphas=ALPHAS, outer=[np.arange(50, 80)], inner=3, n_boot=100)
    assert "utility_corr" not in res and res["n_heldout"] == 30
    with pytest.raises(ValueError, match="X_SxNxD"):
        nested_transfer(X[0], Y[0])
    with pytest.raises(ValueError, match=r"y must be \[n\]"):
        nested_transfer(X, Y[:2])
    with pytest.raises(ValueError, match="names"):
        nested_transfer(X, Y, names=["a"])


def test_random_direction_null():
    rng = np.random.default_rng(0)
    null = rng.normal(0, 1, 500)
    hi = random_direction_null(10.0, null)
    assert hi["percentile"] == 100.0 and hi["p_greater"] == pytest.approx(1 / 501)
    assert hi["p_two_sided"] == pytest.approx(1 / 501) and hi["p_less"] == 1.0
    neg = random_direction_null(-10.0, null)
    assert neg["p_two_sided"] == pytest.approx(1 / 501) and neg["p_greater"] == 1.0
    mid = random_direction_null(float(np.median(null)), null)
    assert 45 < mid["percentile"] < 55 and mid["p_two_sided"] > 0.9
    q = random_direction_null(0.0, null)["quantiles"]
    assert q["0.5"] == pytest.approx(np.median(null)) and q["0.99"] > q["0.95"] > q["0.5"]
    json.dumps(hi)
    # a calibrated p: an effect drawn from the null itself is rejected about 5% of the time
    ps = np.array([random_direction_null(rng.normal(), rng.normal(size=199))["p_two_sided"] for _ in range(400)])
    assert 0.02 < np.mean(ps <= 0.05) < 0.09
    with pytest.raises(ValueError, match="need >= 100"):
        random_direction_null(1.0, null[:50])
    with pytest.raises(ValueError, match="null_effects must be 1-D"):
        random_direction_null(1.0, null.reshape(100, 5))
    with pytest.raises(ValueError, match="effect must be finite"):
        random_direction_null(float("nan"), null)


def test_random_unit_directions():
    v = random_unit_directions(300, 64, seed=3, norm=2.5)
    assert v.shape == (300, 64) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 2.5, rtol=1e-5)
    np.testing.assert_array_equal(v, random_unit_directions(300, 64, seed=3, norm=2.5))
    probe = np.zeros(64)
    probe[0] = 1.0
    cos = v @ probe / 2.5
    assert abs(cos.mean()) < 0.03 and cos.std() == pytest.approx(1 / np.sqrt(64), rel=0.15)
    with pytest.raises(ValueError, match="norm"):
        random_unit_directions(3, 4, norm=0.0)
    with pytest.raises(ValueError, match="n must be"):
        random_unit_directions(0, 4)


def test_transfer_null_is_calibrated_for_an_unrelated_target():
    """A source whose probe is real, a target whose utilities are unrelated noise: p roughly uniform."""
    ps = []
    for s in range(30):
        rng = np.random.default_rng(100 + s)
        X = rng.normal(size=(2, 48, 6))
        y0 = X[0] @ rng.normal(size=6) + 0.3 * rng.normal(size=48)
        res = nested_transfer(X, np.stack([y0, rng.normal(size=48)]), alphas=ALPHAS[::2], outer=3, inner=3,
                              n_perm=39, n_boot=100, seed=s)
        ps.append(res["p_value"][0][1])
        assert res["p_value"][0][0] == pytest.approx(1 / 40)
    ps = np.asarray(ps)
    assert 0.3 < ps.mean() < 0.7 and np.mean(ps <= 0.1) <= 0.25


# ---------------------------------------------------------------------------------------------------------
# nested CV chooses the right alpha; the saved probe is the one the fixed-split CV scores; power


def _bayes_world(tau2, seed, d=40):
    """y = X w + N(0, 1) with w ~ N(0, tau2 I) and two strong shared factors in X: ridge (unstandardised)
    at alpha = 1 / tau2 is the posterior mean, the best linear predictor on average over worlds."""
    rng = np.random.default_rng(seed)
    L, w = 3 * rng.normal(size=(2, d)), rng.normal(size=d) * np.sqrt(tau2)

    def sample(n, s):
        r = np.random.default_rng(s)
        X = r.normal(size=(n, 2)) @ L + r.normal(size=(n, d))
        return X, X @ w + r.normal(size=n)
    return sample


@pytest.mark.parametrize("tau2", [1.0, 1e-2])
def test_nested_cv_chooses_the_known_alpha(tau2):
    """The right alpha is 1 / tau2 (1 and 100 here, two decades apart): nested CV's final alpha and the
    median of its per-fold alphas land within one decade of it, for every world drawn."""
    grid = tuple(float(a) for a in np.logspace(-2, 6, 17))
    right = np.log10(1.0 / tau2)
    for seed in range(4):
        X, y = _bayes_world(tau2, seed)(150, 1)
        cv = nested_cv_ridge(X, y, alphas=grid, seed=seed, n_boot=200, standardize=False)
        assert abs(np.log10(cv["alpha"]) - right) <= 1.0, (seed, cv["alpha"], cv["fold_alpha"])
        assert abs(np.median(np.log10(cv["fold_alpha"])) - right) <= 1.0, (seed, cv["fold_alpha"])
        assert len(cv["fold_alpha"]) == 5 and set(cv["fold_alpha"]) <= set(grid)


def test_fit_ridge_at_is_the_probe_the_fixed_split_cv_scores():
    """The pipeline saves fit_ridge_at(alpha = the fixed split's inner-CV alpha) on the tasks outside the
    test split: its test predictions are nested_cv_ridge(outer=[test])'s, and its r is that fold's r."""
    from prefjax.probes import fit_ridge_at
    from prefjax.stats_small import pearson
    X, y, _ = planted(n=80, d=30, noise=1.0, seed=3)
    test = np.arange(0, 80, 5)
    fit = np.setdiff1d(np.arange(80), test)
    split = nested_cv_ridge(X, y, alphas=ALPHAS, outer=[test], n_boot=200)
    pr = fit_ridge_at(X, y, split["fold_alpha"][0], fit, alphas=ALPHAS, cv_r=split["inner_r"][0])
    np.testing.assert_allclose(pr.predict(X[test]), np.asarray([split["predictions"][i] for i in test], float),
                               rtol=1e-4, atol=1e-4)
    assert pearson(pr.predict(X[test]), y[test]) == pytest.approx(split["fold_r"][0], abs=1e-4)
    assert all(v is None for i, v in enumerate(split["predictions"]) if i not in set(test))
    assert pr.alpha == split["fold_alpha"][0] and list(pr.alphas) == list(ALPHAS)
    with pytest.raises(ValueError, match="alpha must be positive"):
        fit_ridge_at(X, y, 0.0, fit)


def test_min_detectable_effect_has_the_stated_power_and_shrinks_with_n():
    from prefjax.stats_small import min_detectable_effect, n_for_effect, t_power, t_summary
    mdes = [min_detectable_effect(2.0, n) for n in (6, 12, 24, 48, 96, 384)]
    assert all(a > b for a, b in zip(mdes, mdes[1:]))
    assert mdes[-1] == pytest.approx(2.0 * (1.959964 + 0.841621) / np.sqrt(384), rel=0.01)  # the z approximation
    # Monte Carlo: at the stated effect a two-sided t test at 0.05 rejects 80% of the time
    rng = np.random.default_rng(0)
    for n in (8, 30):
        d = min_detectable_effect(2.0, n)
        x = rng.normal(d, 2.0, (8000, n))
        rate = float(np.mean(stats.ttest_1samp(x, 0, axis=1).pvalue < 0.05))
        assert abs(rate - 0.8) < 0.02, (n, rate)
        assert t_power(d, 2.0, n) == pytest.approx(0.8, abs=1e-6)
        assert n_for_effect(d, 2.0) == n and n_for_effect(d * 1.01, 2.0) <= n
    assert min_detectable_effect(0.0, 10) == 0.0 and min_detectable_effect(1.0, 1) is None
    s = t_summary([0.1, 0.3, 0.2, 0.4])
    ref = stats.ttest_1samp([0.1, 0.3, 0.2, 0.4], 0)
    assert s["p_value"] == pytest.approx(ref.pvalue) and s["ci"][0] < s["mean"] < s["ci"][1]


def _pair_curves(n_pairs, slope, sd, coefs, seed, saturate=None):
    """[C, 2 * n_pairs] P(steered): per pair a linear slope ~ N(slope, sd) around 0.5 (the two showings of
    a pair share it, with opposite label bias that cancels), and ``saturate`` at |c| > 0.1."""
    rng = np.random.default_rng(seed)
    b = rng.normal(slope, sd, n_pairs)
    bias = rng.normal(0, 0.05, n_pairs)
    c = np.asarray(coefs)[:, None]
    p = np.empty((len(coefs), 2 * n_pairs))
    p[:, 0::2] = 0.5 + bias + b * c
    p[:, 1::2] = 0.5 - bias + b * c
    if saturate is not None:
        p[np.abs(np.asarray(coefs)) > 0.1] = saturate
    return p


def test_dose_slopes_power_shrinks_with_pairs_and_ignores_saturating_coefs():
    from prefjax.experiments.steering import dose_slopes, linear_range
    coefs = [-1.0, -0.1, -0.05, 0.0, 0.05, 0.1, 1.0]
    assert linear_range(coefs, 0.1) == ([-0.1, -0.05, 0.0, 0.05, 0.1], [-1.0, 1.0])
    mdes = []
    for n in (12, 48, 192):
        p = {"probe": _pair_curves(n, 1.0, 1.5, coefs, n, saturate=0.5),
             "random": _pair_curves(n, 0.0, 1.5, coefs, n + 1, saturate=0.5)}
        d = dose_slopes(coefs, p, linear_max=0.1)
        assert d["linear_coefs"] == [-0.1, -0.05, 0.0, 0.05, 0.1] and d["saturating_coefs"] == [-1.0, 1.0]
        # the slope is the linear part's (the saturated ends would flatten a fit over every coef)
        lin = [i for i, c in enumerate(coefs) if abs(c) <= 0.1]
        ref = np.polyfit(np.asarray(coefs)[lin], p["probe"][lin].mean(1), 1)[0]
        assert d["slope"]["probe"] == pytest.approx(ref)
        assert abs(np.polyfit(coefs, p["probe"].mean(1), 1)[0]) < 0.2 * abs(ref)
        assert d["per_pair"]["probe"]["n"] == n and d["n_pairs"] == n
        mdes.append(d["mde"]["probe_vs_zero"])
        assert d["mde"]["probe_vs_random"] > 0
    assert mdes[0] > mdes[1] > mdes[2]
    assert mdes[1] == pytest.approx(mdes[0] / 2, rel=0.25)  # ~ 1 / sqrt(n)
    none = dose_slopes([-1.0, 0.0, 1.0], {"probe": _pair_curves(4, 1, 1, [-1, 0, 1], 0)}, linear_max=0.1)
    assert none["slope"] == {"probe": None} and "fewer than two" in none["note"]
    with pytest.raises(ValueError, match="linear_max"):
        linear_range(coefs, 0.0)


def test_one_standard_error_rule_never_picks_a_smaller_alpha():
    """The 1se rule takes the largest alpha within one standard error of the best inner-CV r: never a
    smaller alpha than the best-r rule, strictly larger where the r curve is flat; unknown rules fail."""
    rng = np.random.default_rng(0)
    n, d = 80, 40
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=d) + 2.0 * rng.normal(size=n)
    alphas = tuple(float(a) for a in 10.0 ** np.arange(-2, 4.01, 0.5))
    best = nested_cv_ridge(X, y, alphas=alphas, outer=4, inner=5, alpha_rule="best")
    one = nested_cv_ridge(X, y, alphas=alphas, outer=4, inner=5, alpha_rule="1se")
    assert all(o >= b for b, o in zip(best["fold_alpha"], one["fold_alpha"]))
    assert one["alpha"] >= best["alpha"] and any(o > b for b, o in zip(best["fold_alpha"], one["fold_alpha"]))
    with pytest.raises(ValueError, match="alpha rule 'median'"):
        nested_cv_ridge(X, y, alphas=alphas, outer=4, alpha_rule="median")


@pytest.mark.parametrize("rule", ["best", "1se"])
def test_choose_alpha_cv_is_the_inner_step_of_nested_cv(rule):
    """choose_alpha_cv on an outer training set picks the alpha (and inner r curve) nested_cv_ridge's inner
    loop picks for that fold, grouped or not; it sees only the rows it is given."""
    from prefjax.probes import choose_alpha_cv
    X, y, _ = planted(n=90, d=30, noise=1.0, seed=4)
    groups = np.repeat(np.arange(9), 10)
    test = np.flatnonzero(groups == 0)
    train = np.setdiff1d(np.arange(90), test)
    for g in (None, groups):
        split = nested_cv_ridge(X, y, alphas=ALPHAS, outer=[test], groups=g, n_boot=100, seed=7, alpha_rule=rule)
        ch = choose_alpha_cv(X[train], y[train], alphas=ALPHAS, seed=8, alpha_rule=rule,
                             groups=None if g is None else g[train])
        assert ch["alpha"] == split["fold_alpha"][0] and ch["alpha"] == ALPHAS[ch["index"]]
        np.testing.assert_allclose(ch["inner_r"], split["inner_r"][0])
        assert ch["grouped"] == (g is not None) and ch["n"] == len(train) and ch["inner"] == 5
    with pytest.raises(ValueError, match="too few"):
        choose_alpha_cv(X[:8], y[:8], inner=5)
