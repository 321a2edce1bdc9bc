"""Ridge and Bradley-Terry probes on synthetic activations with a planted direction."""

import json
import os

import numpy as np
import pytest
from scipy.special import ndtr
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from prefjax.probes import (RidgeProbe, choice_accuracy, evaluate_probe, fit_bt_probe, fit_ridge,
                            pairwise_accuracy, split_indices)


def planted(n=600, d=40, noise=0.3, seed=0):
    """Raw activations with uneven feature scales and offsets; y = x @ v + noise."""
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(n, d)) * rng.uniform(0.3, 3.0, d) + rng.normal(0, 5, d)).astype(np.float32)
    v = rng.normal(size=d)
    v /= np.linalg.norm(v)
    y = (X - X.mean(0)) @ v
    y = y / y.std() + noise * rng.normal(size=n)
    return X, y, v


@pytest.mark.parametrize("n,d", [(300, 40), (60, 200)])  # primal (d <= n) and dual (n < d) decompositions
def test_alpha_grid_matches_sklearn_refits(n, d):
    X, y, _ = planted(n, d, seed=1)
    ev = split_indices(n, [0.2, 0.8], 0)[0]
    tr = np.setdiff1d(np.arange(n), ev)
    alphas = [0.3, 30.0, 3000.0]
    sc = StandardScaler().fit(X[tr])
    for k, a in enumerate(alphas):
        p = fit_ridge(X, y, alphas=[a], eval_idx=ev)
        sk = Ridge(alpha=a).fit(sc.transform(X[tr]), y[tr])
        np.testing.assert_allclose(p.w_std_D, sk.coef_, atol=2e-4 * np.abs(sk.coef_).max() + 1e-6)
        np.testing.assert_allclose(p.predict(X), sk.predict(sc.transform(X)), atol=1e-3)
    best = fit_ridge(X, y, alphas=alphas, eval_idx=ev)
    assert best.alpha == alphas[int(np.argmax(best.eval_r))] and best.eval_r.shape == (3,)


def test_recovers_planted_direction_and_heldout_metrics():
    X, y, v = planted(1500, 40, noise=0.3)
    train, ev, test = split_indices(1500, [0.6, 0.2, 0.2], 0)
    p = fit_ridge(X, y, eval_idx=ev, train_idx=train)
    assert abs(np.linalg.norm(p.direction) - 1) < 1e-5
    assert p.direction @ v > 0.98
    m = evaluate_probe(p, X, y, test)
    assert m["r"] > 0.9 and m["pairwise_acc"] > 0.85 and m["n"] == len(test)


def test_many_layers_at_once_equal_single_fits():
    X, y, _ = planted(200, 30)
    rng = np.random.default_rng(3)
    layers = np.stack([X, X * 2 + 1, rng.normal(size=X.shape).astype(np.float32)])
    probes = fit_ridge(layers, y, alphas=[1.0, 100.0])
    assert len(probes) == 3
    for layer, p in zip(layers, probes):
        q = fit_ridge(layer, y, alphas=[1.0, 100.0])
        np.testing.assert_allclose(p.w_std_D, q.w_std_D, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probes[0].direction, probes[1].direction, atol=1e-5)  # affine-invariant


def test_pairwise_accuracy_brute_force():
    rng = np.random.default_rng(0)
    y, pred = rng.normal(size=50), rng.normal(size=50)
    want = np.mean([np.sign(pred[a] - pred[b]) == np.sign(y[a] - y[b]) for a in range(50) for b in range(a)])
    assert pairwise_accuracy(pred, y) == pytest.approx(want)
    assert pairwise_accuracy(y, y) == 1.0 and pairwise_accuracy(-y, y) == 0.0
    big = rng.normal(size=5000)
    assert abs(pairwise_accuracy(big + rng.normal(size=5000), big, max_pairs=100_000) - 0.75) < 0.02


def test_save_load_round_trip(tmp_path):
    X, y, _ = planted(200, 30)
    p = fit_ridge(X, y, alphas=[1.0, 10.0])
    folder = os.path.join(tmp_path, "blocks.3.hook_resid_post")
    p.save(folder, hook_name="blocks.3.hook_resid_post", layer=3, position="eot", mean_resid_norm=np.float32(12.5),
           persona="default", metrics={"r": 0.9})
    cfg = json.load(open(os.path.join(folder, "cfg.json")))
    assert cfg["hook_name"] == "blocks.3.hook_resid_post" and cfg["alpha"] == p.alpha
    assert cfg["mean_resid_norm"] == 12.5 and cfg["metrics"]["r"] == 0.9
    q = RidgeProbe.load(folder)
    np.testing.assert_array_equal(q.predict(X), p.predict(X))
    np.testing.assert_array_equal(q.direction, p.direction)
    assert q.cfg["layer"] == 3


def test_bad_inputs():
    X, y, _ = planted(100, 10)
    bad = X.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match=r"X has a non-finite value at index \(7, 3\)"):
        fit_ridge(bad, y)
    with pytest.raises(ValueError, match="y has shape"):
        fit_ridge(X, y[:-1])
    yb = y.copy()
    yb[2] = np.inf
    with pytest.raises(ValueError, match="y has a non-finite"):
        fit_ridge(X, yb)
    with pytest.raises(ValueError, match="overlap"):
        fit_ridge(X, y, eval_idx=np.arange(10), train_idx=np.arange(5, 50))
    with pytest.raises(ValueError, match="constant"):
        evaluate_probe(fit_ridge(X, y), X, np.ones(100))


def test_bt_probe_learns_direction_from_choices():
    X, _, v = planted(800, 20, noise=0.0)
    u = (X - X.mean(0)) @ v
    u /= u.std()
    rng = np.random.default_rng(4)
    i = rng.integers(0, 800, 8000)
    j = (i + rng.integers(1, 800, 8000)) % 800
    p = ndtr(u[i] - u[j])
    wi = rng.binomial(3, p)
    probe = fit_bt_probe(X, i[:6000], j[:6000], wi[:6000], 3 - wi[:6000])
    assert probe.info["converged"] and probe.kind == "bt"
    assert probe.direction @ v > 0.97
    ti, tj, chose = i[6000:], j[6000:], (rng.random(2000) < p[6000:]).astype(float)
    acc = choice_accuracy(probe.predict(X), ti, tj, chose)
    oracle = choice_accuracy(u, ti, tj, chose)
    assert acc > oracle - 0.02
    with pytest.raises(ValueError, match="mismatched"):
        fit_bt_probe(X, i, j[:5], wi, wi)
