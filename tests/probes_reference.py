"""The probes arithmetic of commit c031b3c, every training set refitted, in float64: the reference that
:mod:`prefjax.probes.cvpath` (one decomposition, exact leave-fold-out identities) is tested against.

The function bodies are those of ``prefjax/probes/nulls.py`` and ``controls.py`` at c031b3c with two
changes: every ridge fit is a float64 solve (``_path_predictions``, ``_fit_at``, ``_fit_eval`` below, in
place of the float32 ``RidgePath``), and with ``standardize`` the inner folds use the scale of the
training set they split (``_scaled``), the one protocol change of the new arithmetic (documented in
prefjax/probes/cvpath.py). With raw features the protocol is c031b3c's exactly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from prefjax.probes.controls import _check_xy, default_splits, defined_r
from prefjax.probes.metrics import bootstrap_ci, evaluate_probe, pairwise_accuracy, pearson
from prefjax.probes.nulls import (ALPHA_RULES, DEFAULT_ALPHAS, _check_alphas, _check_count, _check_cv_args,
                                  _col_pearson, _fold_boot, _fold_list, _fold_mean_r, _last_pearson, _null_summary,
                                  _permuted, kfold_ids)
from prefjax.probes.ridge import check_finite


def _mean_scale(x, standardize):
    x = np.asarray(x, np.float64)
    m = x.mean(0)
    if not standardize:
        return m, np.ones(x.shape[1])
    s = x.std(0)
    return m, np.where(s > 1e-12 * max(1.0, float(np.abs(x).max())), s, 1.0)


def _scaled(x, standardize):
    """``x`` divided by its rows' scale (unchanged when not standardising)."""
    return np.asarray(x, np.float64) / _mean_scale(x, standardize)[1]


def _solve(z, Y, a):
    n, d = z.shape
    if d <= n:
        return np.linalg.solve(z.T @ z + a * np.eye(d), z.T @ Y)
    return z.T @ np.linalg.solve(z @ z.T + a * np.eye(n), Y)


def _path_predictions(x_train, Y_train, x_targets, alphas, standardize):
    m, s = _mean_scale(x_train, standardize)
    z = (np.asarray(x_train, np.float64) - m) / s
    ym = Y_train.mean(0)
    ws = [_solve(z, Y_train - ym, a) for a in alphas]
    return [np.stack([((np.asarray(x, np.float64) - m) / s) @ w + ym for w in ws]) for x in x_targets]


class _Probe:
    def __init__(self, m, s, w, b, alpha):
        self.mean_D, self.scale_D, self.w_std_D, self.intercept, self.alpha = m, s, w, b, float(alpha)

    def predict(self, x):
        return ((np.asarray(x, np.float64) - self.mean_D) / self.scale_D) @ self.w_std_D + self.intercept


def _fit_at(X, y, alpha, train_idx, standardize):
    x = np.asarray(X, np.float64)[train_idx]
    m, s = _mean_scale(x, standardize)
    ym = float(np.mean(y[train_idx]))
    return _Probe(m, s, _solve((x - m) / s, y[train_idx] - ym, alpha), ym, alpha)


def _fit_eval(X, y, alphas, eval_idx, train_idx, standardize):
    probes = [_fit_at(X, y, a, train_idx, standardize) for a in alphas]
    r = [float(_col_pearson(p.predict(np.asarray(X)[eval_idx])[:, None], np.asarray(y)[eval_idx, None])[0])
         for p in probes]
    return probes[int(np.argmax(r))]


def _inner_choice(x, Y_NxP, inner_ids, alphas, standardize, rule: str = "best") -> tuple[np.ndarray, np.ndarray]:
    if rule not in ALPHA_RULES:
        raise ValueError(f"alpha rule {rule!r} is not one of {ALPHA_RULES}")
    k = int(inner_ids.max()) + 1
    per_fold = []
    for f in range(k):
        ev, tr = inner_ids == f, inner_ids != f
        (pred_AxExP,) = _path_predictions(x[tr], Y_NxP[tr], [x[ev]], alphas, standardize)
        per_fold.append(np.stack([_col_pearson(pred_AxExP[a], Y_NxP[ev]) for a in range(len(alphas))]))
    folds_FxAxP = np.stack(per_fold)
    score = folds_FxAxP.mean(0)
    best = np.argmax(score, 0)
    if rule == "best":
        return score, best
    se_AxP = folds_FxAxP.std(0, ddof=1) / np.sqrt(k) if k > 1 else np.zeros_like(score)
    cols = np.arange(score.shape[1])
    ok_AxP = score >= (score[best, cols] - se_AxP[best, cols])[None, :]
    idx = np.array([max(np.flatnonzero(ok_AxP[:, p]), key=lambda a: alphas[a]) for p in cols])  # largest alpha
    return score, idx


def choose_alpha_cv(X, y, *, alphas: Sequence[float] = DEFAULT_ALPHAS, inner: int = 5, groups=None,
                    seed: int = 0, standardize: bool = True, alpha_rule: str = "best") -> dict:
    X = check_finite("X", np.asarray(X, np.float64))
    y = check_finite("y", np.asarray(y, np.float64))
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"X must be [n, d] and y [n] with the same n; got {X.shape} and {y.shape}")
    alphas = _check_alphas(alphas)
    inner = _check_count("inner", inner, 2)
    n = len(y)
    if n < 2 * inner:
        raise ValueError(f"{n} rows are too few for inner={inner} folds (need >= {2 * inner})")
    if groups is not None and np.asarray(groups).shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {np.asarray(groups).shape}")
    ids = kfold_ids(n, inner, seed, groups)
    curve, best = _inner_choice(_scaled(X, standardize), y[:, None], ids, alphas, False, alpha_rule)
    return {"alpha": float(alphas[best[0]]), "index": int(best[0]), "inner_r": curve[:, 0].tolist(),
            "inner": inner, "grouped": groups is not None, "n": int(n)}


def nested_cv_ridge(X, y, *, alphas: Sequence[float] = DEFAULT_ALPHAS, outer=5, inner: int = 5, groups=None,
                    n_perm: int = 0, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                    standardize: bool = True, alpha_rule: str = "best") -> dict:
    X = check_finite("X", np.asarray(X, np.float64))
    y = check_finite("y", np.asarray(y, np.float64))
    if X.ndim != 2:
        raise ValueError(f"X must be [n, d], got shape {X.shape}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"y must have shape ({X.shape[0]},) to match X, got {y.shape}")
    alphas, inner, n_perm, n_boot, level = _check_cv_args(alphas, inner, n_perm, n_boot, level)
    n = len(y)
    if groups is not None and np.asarray(groups).shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {np.asarray(groups).shape}")
    folds = _fold_list(n, outer, seed, groups)
    rng = np.random.default_rng([seed, 1])
    Y = _permuted(y, n_perm, rng)
    pred_NxP = np.full((n, 1 + n_perm), np.nan)
    pred_all_AxN = np.full((len(alphas), n), np.nan)
    fold_r, fold_alpha, fold_n, inner_curves = [], [], [], []
    for k, test in enumerate(folds):
        train = np.setdiff1d(np.arange(n), test)
        if len(train) < 2 * inner or len(test) < 3:
            raise ValueError(f"outer fold {k}: {len(train)} training / {len(test)} test tasks; need >= "
                             f"{2 * inner} training (inner={inner}) and >= 3 test tasks")
        g = None if groups is None else np.asarray(groups)[train]
        inner_ids = kfold_ids(len(train), inner, seed + 1 + k, g)
        curve, best_P = _inner_choice(_scaled(X[train], standardize), Y[train], inner_ids, alphas, False, alpha_rule)
        (pred_AxTxP,) = _path_predictions(X[train], Y[train], [X[test]], alphas, standardize)
        pred_NxP[test] = np.take_along_axis(pred_AxTxP, best_P[None, None, :], 0)[0]
        pred_all_AxN[:, test] = pred_AxTxP[:, :, 0]
        fold_r.append(float(_col_pearson(pred_NxP[test, :1], y[test, None])[0]))
        fold_alpha.append(float(alphas[best_P[0]]))
        fold_n.append(int(len(test)))
        inner_curves.append(curve[:, 0].tolist())
    held = np.flatnonzero(np.isfinite(pred_NxP[:, 0]))
    r_P = _fold_mean_r(pred_NxP.T, Y.T, folds)
    obs = float(r_P[0])
    rb = _fold_mean_r(pred_NxP[:, 0], y, folds, _fold_boot(folds, n_boot, np.random.default_rng([seed, 2])))
    lo, hi = np.nanquantile(rb, [(1 - level) / 2, (1 + level) / 2])
    acc = float(np.mean([pairwise_accuracy(pred_NxP[t, 0], y[t]) for t in folds]))
    final_ids = kfold_ids(n, inner, seed + 1000, None if groups is None else np.asarray(groups))
    final_curve, final_best = _inner_choice(_scaled(X, standardize), y[:, None], final_ids, alphas, False, alpha_rule)
    out = {"r": obs, "ci": [float(lo), float(hi)], "level": level, "pairwise_acc": acc,
           "n_heldout": int(len(held)), "fold_r": fold_r, "fold_alpha": fold_alpha, "fold_n": fold_n,
           "inner_r": inner_curves,
           "r_by_alpha": _fold_mean_r(pred_all_AxN, y[None], folds).tolist(),
           "alpha": float(alphas[final_best[0]]), "alphas": alphas.tolist(),
           "predictions": [float(v) if np.isfinite(v) else None for v in pred_NxP[:, 0]]}
    if n_perm:
        out["null"] = _null_summary(obs, r_P[1:])
    return out


def nested_transfer(X_SxNxD, y, *, alphas: Sequence[float] = DEFAULT_ALPHAS, outer=5, inner: int = 5,
                    n_perm: int = 0, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                    names: Sequence[str] | None = None, standardize: bool = True,
                    alpha_window_decades: float = 2.0, alpha_tolerance: float = 0.05,
                    alpha_rule: str = "best") -> dict:
    X = np.asarray(X_SxNxD, np.float64)
    if X.ndim != 3:
        raise ValueError(f"X_SxNxD must be [S, n, d], got shape {X.shape}")
    S, n, _ = X.shape
    y = np.asarray(y, np.float64)
    if y.shape not in ((n,), (S, n)):
        raise ValueError(f"y must be [n] = [{n}] or [S, n] = [{S}, {n}], got {y.shape}")
    Y = np.broadcast_to(y, (S, n))
    for s in range(S):
        check_finite(f"X_SxNxD[{s}]", X[s])
        check_finite(f"y[{s}]" if y.ndim == 2 else "y", Y[s])
    if names is not None and len(names) != S:
        raise ValueError(f"names has {len(names)} entries for S={S} sources")
    alphas, inner, n_perm, n_boot, level = _check_cv_args(alphas, inner, n_perm, n_boot, level)
    if not alpha_window_decades >= 0:
        raise ValueError(f"alpha_window_decades must be >= 0, got {alpha_window_decades}")
    if not alpha_tolerance >= 0:
        raise ValueError(f"alpha_tolerance must be >= 0, got {alpha_tolerance}")
    folds = _fold_list(n, outer, seed, None)
    A = len(alphas)
    grid = np.full((A, S, S, n), np.nan)
    sel = np.full((S, S, n), np.nan)
    null = np.full((S, S, n, n_perm), np.nan)
    fold_alpha = np.zeros((S, len(folds)))
    for a in range(S):
        Ya = _permuted(Y[a], n_perm, np.random.default_rng([seed, 3, a]))
        for k, test in enumerate(folds):
            train = np.setdiff1d(np.arange(n), test)
            if len(train) < 2 * inner or len(test) < 3:
                raise ValueError(f"outer fold {k}: {len(train)} training / {len(test)} test tasks; need >= "
                                 f"{2 * inner} training (inner={inner}) and >= 3 test tasks")
            _, best_P = _inner_choice(_scaled(X[a][train], standardize), Ya[train],
                                      kfold_ids(len(train), inner, seed + 1 + k), alphas, False, alpha_rule)
            fold_alpha[a, k] = alphas[best_P[0]]
            preds = _path_predictions(X[a][train], Ya[train], [X[b][test] for b in range(S)], alphas,
                                      standardize)
            for b, p_AxTxP in enumerate(preds):
                chosen = np.take_along_axis(p_AxTxP, best_P[None, None, :], 0)[0]  # [T, P]
                grid[:, a, b, test] = p_AxTxP[:, :, 0]
                sel[a, b, test] = chosen[:, 0]
                null[a, b, test] = chosen[:, 1:]
    held = np.flatnonzero(np.isfinite(sel[0, 0]))
    Yh = Y[:, held]                                        # [S, m]
    r_grid = _fold_mean_r(grid, Y[None, None], folds)     # [A, S, S]
    r_sel = _fold_mean_r(sel, Y[None], folds)              # [S, S]
    boot = _fold_boot(folds, n_boot, np.random.default_rng([seed, 4]))
    q = [(1 - level) / 2, (1 + level) / 2]
    sel_lo, sel_hi = np.nanquantile(_fold_mean_r(sel, Y[None], folds, boot), q, axis=-1)
    g_lo, g_hi = np.empty_like(r_grid), np.empty_like(r_grid)
    for i in range(A):
        g_lo[i], g_hi[i] = np.nanquantile(_fold_mean_r(grid[i], Y[None], folds, boot), q, axis=-1)
    out = {"names": list(names) if names is not None else [str(s) for s in range(S)], "alphas": alphas.tolist(),
           "level": level, "n_heldout": int(len(held)),
           "r": r_sel.tolist(), "ci_lo": sel_lo.tolist(), "ci_hi": sel_hi.tolist(),
           "fold_alpha": fold_alpha.tolist(),
           "r_grid": r_grid.tolist(), "r_grid_lo": g_lo.tolist(), "r_grid_hi": g_hi.tolist(),
           "alpha_spread": (np.nanmax(r_grid, 0) - np.nanmin(r_grid, 0)).tolist()}
    log_a, w = np.log10(alphas), float(alpha_window_decades)
    in_win = ((log_a[:, None] >= np.log10(fold_alpha.min(1))[None] - w - 1e-9)
              & (log_a[:, None] <= np.log10(fold_alpha.max(1))[None] + w + 1e-9))  # [A, S]
    outside = (((r_grid < sel_lo[None]) | (r_grid > sel_hi[None]))
               & (np.abs(r_grid - r_sel[None]) > alpha_tolerance))       # [A, S, S]
    out["hangs_on_alpha"] = np.any(outside & in_win[:, :, None], 0).tolist()
    out["alpha_window"] = [[float(alphas[in_win[:, s]].min()), float(alphas[in_win[:, s]].max())]
                           for s in range(S)]
    if n_perm:
        r_null = _fold_mean_r(np.moveaxis(null, 3, 2), Y[None, :, None], folds)  # [S, S, P]
        out["p_value"] = ((1 + np.sum(r_null >= r_sel[..., None], -1)) / (1 + n_perm)).tolist()
        out["p_value_two_sided"] = ((1 + np.sum(np.abs(r_null) >= np.abs(r_sel)[..., None], -1))
                                    / (1 + n_perm)).tolist()
        out["null_mean"] = np.nanmean(r_null, -1).tolist()
        out["null_q95"] = np.nanquantile(r_null, 0.95, axis=-1).tolist()
        out["n_perm"] = n_perm
    if y.ndim == 2:
        uc = _last_pearson(Yh[:, None], Yh[None])
        yb = Yh[:, np.random.default_rng([seed, 5]).integers(0, len(held), (n_boot, len(held)))]  # [S, B, m]
        ub = _last_pearson(yb[:, None], yb[None])
        ulo, uhi = np.nanquantile(ub, q, axis=-1)
        out.update(utility_corr=uc.tolist(), utility_corr_lo=ulo.tolist(), utility_corr_hi=uhi.tolist())
    return out


def leave_one_topic_out(X, y, topics, *, alphas=DEFAULT_ALPHAS, min_topic_size: int = 3, inner: int = 5,
                        alpha_rule: str = "best", seed: int = 0, standardize: bool = True) -> dict:
    X, y = _check_xy(X, y)
    topics = np.asarray(topics)
    if topics.shape != y.shape:
        raise ValueError(f"topics has shape {topics.shape}, y has {y.shape}")
    names = np.unique(topics)
    if len(names) < 2:
        raise ValueError("leave_one_topic_out needs at least 2 topics")
    pred = np.zeros_like(y)
    per, skipped, alpha_by, how = {}, {}, {}, {}
    for t in names:
        test = np.flatnonzero(topics == t)
        rest = np.flatnonzero(topics != t)
        if len(rest) < 4:
            raise ValueError(f"holding out topic {t!r} leaves {len(rest)} training tasks; need >= 4 to choose alpha")
        k = max(2, min(inner, len(rest) // 2))
        grouped = len(np.unique(topics[rest])) >= k
        choice = choose_alpha_cv(X[rest], y[rest], alphas=alphas, inner=k, groups=topics[rest] if grouped else None,
                                 seed=seed, standardize=standardize, alpha_rule=alpha_rule)
        probe = _fit_at(X, y, choice["alpha"], rest, standardize)
        pred[test] = probe.predict(X[test])
        key = t.item() if hasattr(t, "item") else t
        alpha_by[key] = probe.alpha
        how[key] = {"inner": k, "grouped": bool(grouped), "n_train": int(len(rest))}
        if len(test) < min_topic_size or np.ptp(y[test]) == 0:
            skipped[key] = f"{len(test)} task(s){' with constant utility' if len(test) >= min_topic_size else ''}"
            continue
        r = defined_r(pred[test], y[test])
        if r is None:  # e.g. the largest alpha of the grid shrinks the probe to its intercept
            skipped[key] = f"constant predictions at alpha {probe.alpha:g} (r undefined)"
            continue
        per[key] = {"r": r, "pairwise_acc": pairwise_accuracy(pred[test], y[test]),
                    "n": int(len(test)), "alpha": probe.alpha}
    rs = [v["r"] for v in per.values()]
    return {"per_topic": per, "skipped": skipped, "pooled_r": defined_r(pred, y),
            "pooled_acc": pairwise_accuracy(pred, y), "mean_r": float(np.mean(rs)) if rs else None,
            "predictions": pred, "alpha_by_topic": alpha_by, "alpha_selection": how, "alpha_rule": alpha_rule}


def transfer_matrix(X_SxNxD, y, *, alphas=DEFAULT_ALPHAS, splits=None, names: Sequence[str] | None = None,
                    seed: int = 0, standardize: bool = True, n_boot: int = 1000, level: float = 0.95,
                    inner: int | None = None, alpha_rule: str = "best") -> dict:
    X = np.asarray(X_SxNxD)
    if X.ndim != 3:
        raise ValueError(f"X must be [S, n, d], got {X.shape}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or (n_boot != 0 and n_boot < 100):
        raise ValueError(f"n_boot must be 0 (no intervals) or an integer >= 100, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    S, n, _ = X.shape
    y = np.asarray(y, np.float64)
    Y = np.broadcast_to(y, (S, n)) if y.ndim == 1 else y
    if Y.shape != (S, n):
        raise ValueError(f"y must be [n] or [S, n] = [{S}, {n}], got {y.shape}")
    for s in range(S):
        check_finite(f"X[{s}]", X[s]), check_finite(f"y[{s}]" if y.ndim == 2 else "y", Y[s])
    train, ev, test = splits if splits is not None else default_splits(n, seed)
    if inner is None:
        probes = [_fit_eval(X[s], Y[s], alphas, ev, train, standardize) for s in range(S)]
        alpha_choice = "eval split"
    else:
        fit_rows = np.concatenate([np.asarray(train), np.asarray(ev)])
        k = max(2, min(int(inner), len(fit_rows) // 2))
        probes = []
        for s in range(S):
            choice = choose_alpha_cv(X[s][fit_rows], Y[s][fit_rows], alphas=alphas, inner=k, seed=seed,
                                     standardize=standardize, alpha_rule=alpha_rule)
            probes.append(_fit_at(X[s], Y[s], choice["alpha"], fit_rows, standardize))
        alpha_choice = f"{k}-fold CV on the {len(fit_rows)} tasks outside the test split ({alpha_rule!r} rule)"
    r = np.zeros((S, S))
    acc = np.zeros((S, S))
    lo, hi = np.full((S, S), np.nan), np.full((S, S), np.nan)
    for a, p in enumerate(probes):
        for b in range(S):
            pred, yb = p.predict(X[b][test]), Y[b][test]
            r[a, b], acc[a, b] = pearson(pred, yb), pairwise_accuracy(pred, yb)
            if n_boot > 0 and len(test) >= 3:
                try:  # the same seed in every cell: the same resamples of the test tasks (paired cells)
                    ci = bootstrap_ci(pred, yb, n_boot=n_boot, level=level, seed=seed)
                    lo[a, b], hi[a, b] = ci["lo"], ci["hi"]
                except ValueError:  # too few resamples with a defined r (tiny or near-constant test split)
                    pass
    out = {"r": r, "pairwise_acc": acc, "alpha": np.array([p.alpha for p in probes]),
           "names": list(names) if names is not None else [str(s) for s in range(S)], "n_test": int(len(test)),
           "alpha_choice": alpha_choice}
    if n_boot > 0:
        out.update(r_lo=lo, r_hi=hi, level=level, n_boot=int(n_boot))
    if y.ndim == 2:
        out["utility_corr"] = np.array([[pearson(Y[a][test], Y[b][test]) for b in range(S)] for a in range(S)])
    return out


def inlp(X, y, *, n_iter: int = 5, alphas=DEFAULT_ALPHAS, splits=None, topics=None, shuffle_baseline: bool = True,
         seed: int = 0, inner: int = 5, alpha_rule: str = "best") -> dict:
    X, y = _check_xy(X, y)
    train, ev, test = splits if splits is not None else default_splits(len(y), seed)
    m, s = _mean_scale(X[train], True)
    Z0 = (np.asarray(X, np.float64) - m) / s

    def run(labels):
        Z = Z0.copy()
        dirs, test_r, loto_r = [], [], []
        for k in range(n_iter + 1):
            fit = lambda t: _fit_eval(Z, t, alphas, ev, train, False)
            probe = fit(labels)
            test_r.append(evaluate_probe(probe if labels is y else fit(y), Z, y, test)["r"])
            if topics is not None and labels is y:
                loto_r.append(leave_one_topic_out(Z, y, topics, alphas=alphas, standardize=False, seed=seed,
                                                  inner=inner, alpha_rule=alpha_rule)["pooled_r"])
            if k == n_iter:
                break
            u = probe.w_std_D.astype(np.float64)
            for v in dirs:
                u -= (u @ v) * v
            nrm = np.linalg.norm(u)
            if nrm == 0:
                raise ValueError(f"INLP iteration {k}: the probe direction lies in the removed subspace")
            u /= nrm
            dirs.append(u)
            Z -= np.outer(Z @ u, u)
        return np.array(test_r), np.array(loto_r), np.array(dirs)

    test_r, loto_r, dirs = run(y)
    out = {"test_r": test_r, "directions": dirs}
    if topics is not None:
        out["loto_r"] = loto_r
    if shuffle_baseline:
        shuffled = y[np.random.default_rng(seed + 1).permutation(len(y))]
        out["shuffled_test_r"] = run(shuffled)[0]
    return out

