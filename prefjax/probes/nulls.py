"""Inference for probes: nested cross-validation, label-shuffle nulls, transfer matrices across the alpha
grid with bootstrap intervals, and a random-direction null for steering effects.

* :func:`nested_cv_ridge` -- outer folds give the held-out estimate; inner folds (inside each outer
  training set only) choose alpha. Reports per-outer-fold alphas and r, the fold-averaged held-out r
  with a bootstrap interval, the inner r curves, and (``n_perm > 0``) a label-shuffle null in which every
  permutation is refitted through the *same* nested procedure (alpha re-chosen per permutation).
* :func:`nested_transfer` -- a probe trained on each source (persona or layer), tested on every target,
  as an ``[alpha, source, target]`` array over the whole grid plus the nested-CV choice, with paired
  bootstrap intervals over test tasks and shuffle-null p-values per cell.
* :func:`choose_alpha_cv` -- the inner step alone: alpha by (optionally grouped) K-fold CV on the rows
  a caller passes (its own held-out rows left out), e.g. for leave-one-topic-out.
* :func:`random_direction_null` / :func:`random_unit_directions` -- compare one effect (e.g. a steering
  slope along the probe) with the effects of many random directions.

Cost: every fit comes from a :class:`~prefjax.probes.cvpath.FactorSet` of the activations (float64, on the
GPU where there is one): every alpha, every permuted label vector and every inner fold is a product with
one decomposition. For raw features one decomposition of all tasks serves the whole nested procedure
(outer and inner folds, the null); with ``standardize`` each outer training set is decomposed once (its
own scale) and its inner folds are removed from it exactly. Pass ``factors=`` to share them between calls
on the same activations (the probes stage does: the nested CV, the fixed split, the saved probe and
leave-one-topic-out of one layer use one set).

Every function returns a plain dict of floats, ints, strings and nested lists: ``json.dumps`` works on it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from prefjax.probes.metrics import pairwise_accuracy
from prefjax.probes.cvpath import FactorSet, fit_rows, fold_predictions, predict_rows
from prefjax.probes.ridge import DEFAULT_ALPHAS, check_finite

DEFAULT_QUANTILES = (0.005, 0.01, 0.025, 0.05, 0.25, 0.5, 0.75, 0.95, 0.975, 0.99, 0.995)


# ---------------------------------------------------------------------------------------------------------
# validation and small helpers


def _check_alphas(alphas) -> np.ndarray:
    a = np.asarray(alphas, np.float64)
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"alphas must be a non-empty 1-D sequence of positive finite values, got {alphas!r}")
    return a


def _check_level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(level)


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_cv_args(alphas, inner, n_perm, n_boot, level):
    """The arguments the nested procedures share, checked (errors name the argument)."""
    return (_check_alphas(alphas), _check_count("inner", inner, 2), _check_count("n_perm", n_perm, 0),
            _check_count("n_boot", n_boot, 100), _check_level(level))


def kfold_ids(n: int, k: int, seed: int = 0, groups=None) -> np.ndarray:
    """Fold id in ``0..k-1`` for each of ``n`` tasks: a balanced random assignment under ``seed``.

    With ``groups`` ([n] labels, e.g. topics) whole groups go to one fold (largest groups first, each to
    the currently smallest fold), so no group is split between training and test.
    """
    n = _check_count("n", n, 2)
    k = _check_count("k", k, 2)
    rng = np.random.default_rng(seed)
    if groups is None:
        if k > n:
            raise ValueError(f"k={k} folds need at least k tasks, got n={n}")
        ids = np.empty(n, np.int64)
        ids[rng.permutation(n)] = np.arange(n) % k
        return ids
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {groups.shape}")
    names, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if len(names) < k:
        raise ValueError(f"groups has {len(names)} distinct values, fewer than k={k} folds")
    order = rng.permutation(len(names))
    order = order[np.argsort(-counts[order], kind="stable")]
    sizes = np.zeros(k, np.int64)
    fold_of_group = np.empty(len(names), np.int64)
    for g in order:
        f = int(np.argmin(sizes))
        fold_of_group[g] = f
        sizes[f] += counts[g]
    return fold_of_group[inv.reshape(-1)]


def _col_pearson(p_NxK: np.ndarray, y_NxK: np.ndarray) -> np.ndarray:
    """Pearson r down axis 0 for each column (broadcasting); 0 where a column is constant."""
    p = p_NxK - p_NxK.mean(0)
    y = y_NxK - y_NxK.mean(0)
    num = (p * y).sum(0)
    den = np.sqrt((p * p).sum(0) * (y * y).sum(0))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _last_pearson(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r along the last axis (broadcasting); NaN where a side is constant."""
    p = p - p.mean(-1, keepdims=True)
    y = y - y.mean(-1, keepdims=True)
    den = np.sqrt((p * p).sum(-1) * (y * y).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (p * y).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def _fold_mean_r(pred, y, folds, boot=None):
    """Size-weighted mean over outer folds of the Pearson r along the last (task) axis.

    ``pred`` [..., n] and ``y`` [..., n] broadcast; ``boot`` (optional) holds, per fold, resample indices
    [B, n_k] into that fold's tasks, and the result gains a trailing [B] axis (a bootstrap stratified by
    fold). Each fold has its own fitted intercept and shrinkage, so r is computed within folds and
    averaged, never on predictions pooled across folds.
    """
    w = np.asarray([len(t) for t in folds], np.float64)
    w /= w.sum()
    total = 0.0
    for k, test in enumerate(folds):
        pk, yk = pred[..., test], y[..., test]
        if boot is not None:
            pk, yk = pk[..., boot[k]], yk[..., boot[k]]
        total = total + w[k] * _last_pearson(pk, yk)
    return total


def _fold_boot(folds, n_boot, rng):
    return [rng.integers(0, len(t), (n_boot, len(t))) for t in folds]


ALPHA_RULES = ("best", "1se")


def _inner_choice(fs: FactorSet, train_rows, Y_NxP, inner_ids, alphas, rule: str = "best"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Mean inner-fold Pearson r [A, P] and the chosen alpha index [P] for the fit on ``train_rows`` (rows
    of ``fs.X``; ``inner_ids`` [len(train_rows)] their inner fold ids; ``Y_NxP`` targets on all rows, only
    the training rows' values matter). The inner fits come from the training set's factorisation by the
    exact leave-fold-out identity (:mod:`prefjax.probes.cvpath`), never a refit.

    ``rule="best"``: the alpha of the largest mean r. ``"1se"`` (the one-standard-error rule): the largest
    alpha whose mean r is within one standard error (fold sd / sqrt(folds)) of the best, i.e. the most
    regularised probe the inner folds cannot tell from the best; its direction is far less noisy where
    the r curve is flat (on the planted organism it lifts the probe's cosine with the planted direction
    from ~0.7 to ~0.9)."""
    if rule not in ALPHA_RULES:
        raise ValueError(f"alpha rule {rule!r} is not one of {ALPHA_RULES}")
    train_rows = np.asarray(train_rows, np.int64)
    inner_ids = np.asarray(inner_ids)
    k = int(inner_ids.max()) + 1
    Y = np.asarray(Y_NxP, np.float64)
    preds = fold_predictions(fs, train_rows, Y, inner_ids, alphas)
    per_fold = []
    for f, pred_AxExP in enumerate(preds):
        yev = Y[train_rows[inner_ids == f]]
        per_fold.append(np.stack([_col_pearson(pred_AxExP[a], yev) for a in range(len(alphas))]))
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
                    seed: int = 0, standardize: bool = True, alpha_rule: str = "best", factors: FactorSet | None = None,
                    rows=None) -> dict:
    """Choose the ridge alpha by ``inner``-fold cross-validation on the rows given, and only those.

    The selection step of :func:`nested_cv_ridge`, for callers that hold out their own test set (e.g.
    leave-one-topic-out): pass the training rows only. Folds are drawn by :func:`kfold_ids` (with
    ``groups``, e.g. topics, each group stays whole inside one fold); alpha maximises the mean inner-fold
    Pearson r (``alpha_rule="best"``) or is the largest alpha within one standard error of it (``"1se"``).

    ``factors`` / ``rows``: a :class:`~prefjax.probes.cvpath.FactorSet` of a larger matrix and the rows of it
    that ``X`` and ``y`` are (``y`` then holds those rows' targets); the fits then come from the set's
    factorisations instead of new ones.

    Returns a dict: ``alpha``, ``index`` (into ``alphas``), ``inner_r`` [A] (mean inner-fold r per alpha),
    ``inner`` (folds used), ``grouped`` (whether folds kept groups whole) and ``n`` (rows used).
    """
    y = check_finite("y", np.asarray(y, np.float64))
    if factors is None:
        X = check_finite("X", np.asarray(X, np.float64))
        if X.ndim != 2 or y.shape != (X.shape[0],):
            raise ValueError(f"X must be [n, d] and y [n] with the same n; got {X.shape} and {y.shape}")
        factors, rows = FactorSet(X, standardize=standardize), np.arange(len(y))
    rows = np.asarray(rows, np.int64)
    if y.shape != rows.shape:
        raise ValueError(f"y has shape {y.shape} for {len(rows)} rows")
    alphas = _check_alphas(alphas)
    inner = _check_count("inner", inner, 2)
    n = len(y)
    if n < 2 * inner:
        raise ValueError(f"{n} rows are too few for inner={inner} folds (need >= {2 * inner})")
    if groups is not None and np.asarray(groups).shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {np.asarray(groups).shape}")
    ids = kfold_ids(n, inner, seed, groups)
    Y = np.zeros((factors.n, 1))
    Y[rows, 0] = y
    curve, best = _inner_choice(factors, rows, Y, ids, alphas, alpha_rule)
    return {"alpha": float(alphas[best[0]]), "index": int(best[0]), "inner_r": curve[:, 0].tolist(),
            "inner": inner, "grouped": groups is not None, "n": int(n)}


def _quantile_dict(values: np.ndarray, qs: Sequence[float]) -> dict[str, float]:
    return {f"{q:g}": float(v) for q, v in zip(qs, np.quantile(values, qs))}


def _null_summary(observed: float, null: np.ndarray, qs=DEFAULT_QUANTILES) -> dict:
    return {"n_perm": int(null.size), "p_value": float((1 + np.sum(null >= observed)) / (1 + null.size)),
            "p_value_two_sided": float((1 + np.sum(np.abs(null) >= abs(observed))) / (1 + null.size)),
            "mean": float(null.mean()), "sd": float(null.std()), "quantiles": _quantile_dict(null, qs),
            "values": null.tolist()}


def _permuted(y: np.ndarray, n_perm: int, rng) -> np.ndarray:
    """[n, 1 + n_perm]: column 0 is ``y``, the others are permutations of it."""
    return np.stack([y] + [y[rng.permutation(len(y))] for _ in range(n_perm)], 1)


def _factor_set(X, factors: FactorSet | None, standardize: bool) -> FactorSet:
    """The given factor set (checked against ``X``'s shape and ``standardize``) or a new one of ``X``."""
    if factors is None:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"X must be [n, d], got shape {X.shape}")
        return FactorSet(X, standardize=standardize)
    if factors.standardize != bool(standardize):
        raise ValueError(f"factors were made with standardize={factors.standardize}, the call asks {standardize}")
    if X is not None and np.shape(X) != factors.X.shape:
        raise ValueError(f"factors were made for X of shape {factors.X.shape}, the call passes {np.shape(X)}")
    return factors


def _fold_list(n: int, outer, seed: int, groups) -> list[np.ndarray]:
    """Outer test sets: ``outer`` folds (int) or an explicit list of disjoint test index arrays."""
    if isinstance(outer, (int, np.integer)) and not isinstance(outer, bool):
        ids = kfold_ids(n, _check_count("outer", outer, 2), seed, groups)
        return [np.flatnonzero(ids == f) for f in range(int(outer))]
    try:
        folds = [np.asarray(t, np.int64).reshape(-1) for t in outer]
    except (TypeError, ValueError):
        raise ValueError("outer must be an int >= 2 or a list of test index arrays") from None
    if not folds:
        raise ValueError("outer must name at least one test fold")
    cat = np.concatenate(folds)
    if cat.size != np.unique(cat).size or cat.min() < 0 or cat.max() >= n:
        raise ValueError(f"outer test folds must be disjoint indices in [0, {n})")
    return folds


# ---------------------------------------------------------------------------------------------------------
# nested cross-validation with a shuffle null


def nested_cv_ridge(X, y, *, alphas: Sequence[float] = DEFAULT_ALPHAS, outer=5, inner: int = 5, groups=None,
                    n_perm: int = 0, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                    standardize: bool = True, alpha_rule: str = "best", factors: FactorSet | None = None,
                    final_alpha: bool = True) -> dict:
    """Held-out r of a ridge probe with alpha chosen by nested cross-validation, and its shuffle null.

    Args:
      X: activations [n, d]; y: utilities [n].
      alphas: the ridge grid (scikit-learn's alpha on standardised features).
      outer: number of outer folds, or an explicit list of disjoint test index arrays (e.g. ``[test_idx]``
        for one fixed split; tasks in no test fold are then only ever used for training).
      inner: inner folds, drawn inside each outer training set; alpha maximises the mean inner-fold
        Pearson r (``alpha_rule="best"``) or is the largest alpha within one standard error of that
        maximum (``"1se"``). The outer test fold is never seen by the inner loop.
      groups: optional [n] labels (topics); outer and inner folds then keep each group whole.
      n_perm: label-shuffle permutations. ``y`` is permuted across all tasks (exchangeable under the null
        of no relation between activations and utilities) and each permuted ``y`` goes through the
        identical nested procedure (alpha re-chosen on the permuted labels, same folds); ``null.p_value`` is
        ``(1 + #{null r >= observed r}) / (1 + n_perm)`` (``null.p_value_two_sided`` uses |r|).
      n_boot, level: percentile bootstrap of ``r``, resampling held-out tasks within each outer fold. The
        interval is conditional on the fitted fold models (refit variability shows in ``fold_r`` and in the
        null).
      seed: folds, permutations and bootstrap draws.
      factors: a :class:`~prefjax.probes.cvpath.FactorSet` of ``X`` (same ``standardize``) to share
        decompositions with other calls on the same activations; made here when None.
      final_alpha: also choose ``alpha`` by inner CV on all tasks (None in the result when False).

    Returns a dict: ``r`` (the held-out estimate: Pearson r of predictions with ``y`` within each outer
    test fold, averaged with fold-size weights; r of predictions pooled across folds is not used, because
    each fold's model has its own intercept and shrinkage, which at large alpha dominate a pooled r),
    ``ci`` [lo, hi], ``level``, ``pairwise_acc`` (fold mean), ``fold_r``, ``fold_alpha``, ``fold_n`` (per
    outer fold), ``inner_r`` [outer, A] (mean inner r curve per outer fold), ``r_by_alpha`` [A] (the same
    held-out r at each fixed alpha: the alpha-sensitivity curve; its maximum is optimistic and is not the
    estimate), ``alpha``
    (alpha chosen by ``inner``-fold CV on all tasks: the one to fit a final probe with), ``alphas``,
    ``predictions`` [n] (None for tasks in no test fold) and, with ``n_perm > 0``, ``null``
    {n_perm, p_value, p_value_two_sided, mean, sd, quantiles, values}.
    """
    fs = _factor_set(X, factors, standardize)
    y = check_finite("y", np.asarray(y, np.float64))
    if y.shape != (fs.n,):
        raise ValueError(f"y must have shape ({fs.n},) to match X, got {y.shape}")
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
        curve, best_P = _inner_choice(fs, train, Y, inner_ids, alphas, alpha_rule)
        factor, fit = fit_rows(fs, train, Y, alphas)
        pred_AxTxP = predict_rows(fs, factor, fit, test)
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
    final = None
    if final_alpha:
        final_ids = kfold_ids(n, inner, seed + 1000, None if groups is None else np.asarray(groups))
        final = float(alphas[_inner_choice(fs, np.arange(n), y[:, None], final_ids, alphas, alpha_rule)[1][0]])
    out = {"r": obs, "ci": [float(lo), float(hi)], "level": level, "pairwise_acc": acc,
           "n_heldout": int(len(held)), "fold_r": fold_r, "fold_alpha": fold_alpha, "fold_n": fold_n,
           "inner_r": inner_curves,
           "r_by_alpha": _fold_mean_r(pred_all_AxN, y[None], folds).tolist(),
           "alpha": final, "alphas": alphas.tolist(),
           "predictions": [float(v) if np.isfinite(v) else None for v in pred_NxP[:, 0]]}
    if n_perm:
        out["null"] = _null_summary(obs, r_P[1:])
    return out


# ---------------------------------------------------------------------------------------------------------
# transfer matrices


def nested_transfer(X_SxNxD, y, *, alphas: Sequence[float] = DEFAULT_ALPHAS, outer=5, inner: int = 5,
                    n_perm: int = 0, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                    names: Sequence[str] | None = None, standardize: bool = True,
                    alpha_window_decades: float = 2.0, alpha_tolerance: float = 0.05,
                    alpha_rule: str = "best", factors: Sequence[FactorSet] | None = None) -> dict:
    """Transfer matrix (train on source ``a``, test on target ``b``) over the whole alpha grid, with
    bootstrap intervals, the nested-CV alpha choice and shuffle-null p-values per cell.

    Args:
      X_SxNxD: activations of S sources (personas or layers) for the same n tasks.
      y: [S, n] (each persona's own utilities: the probe trained on A's activations and utilities is
        scored on B's activations against B's utilities) or [n] (shared utilities, e.g. across layers).
      outer: outer folds (every task is a test task once; r is computed within each test fold and
        averaged with fold-size weights) or a list of test index arrays (e.g. ``[test_idx]``: one split,
        training on the rest).
      inner: inner folds inside each outer training set choosing alpha for the ``selected`` matrix.
      n_perm: shuffle null per cell: the source's labels are permuted, the probe refitted through the same
        nested procedure (alpha re-chosen), and scored on each target's true utilities.
      n_boot, level: percentile bootstrap over test tasks (resampled within each outer fold), the same
        resamples for every cell and alpha (so differences between cells are paired).
      factors: one :class:`~prefjax.probes.cvpath.FactorSet` per source (of ``X_SxNxD[s]``, same
        ``standardize``), e.g. the probes stage's, so no source is decomposed again; made here when None.

    Returns a dict with ``names``, ``alphas``, and
      * ``r_grid`` [A, S, S], ``r_grid_lo`` / ``r_grid_hi`` [A, S, S]: r at every fixed alpha;
      * ``r`` [S, S], ``ci_lo`` / ``ci_hi`` [S, S]: at the nested-CV alpha (chosen per outer fold and
        source: ``fold_alpha`` [S, outer]);
      * ``alpha_spread`` [S, S] (max - min of ``r_grid`` over the whole grid), ``alpha_window`` [S, 2]
        (the grid alphas within ``alpha_window_decades`` decades of the alphas the inner folds chose for
        that source: values a slightly different split could have picked) and ``hangs_on_alpha`` [S, S]:
        True where the r at some alpha in the window lies outside the selected cell's interval *and* more
        than ``alpha_tolerance`` from the selected r (a shift that is both real and large enough to matter);
      * ``p_value`` [S, S] (one-sided: is r larger than under the null?), ``p_value_two_sided`` (on |r|:
        an inverted persona's strongly negative transfer is an effect too), ``null_mean`` / ``null_q95``
        [S, S] when ``n_perm > 0``;
      * ``utility_corr`` [S, S] with ``utility_corr_lo`` / ``_hi`` (same resamples) when ``y`` is [S, n]:
        the value transfer should match if the probe reads each persona's utility.
    """
    X = np.asarray(X_SxNxD)
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
    if factors is not None and len(factors) != S:
        raise ValueError(f"factors has {len(factors)} entries for S={S} sources")
    fss = [_factor_set(X[s], None if factors is None else factors[s], standardize) for s in range(S)]
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
            _, best_P = _inner_choice(fss[a], train, Ya, kfold_ids(len(train), inner, seed + 1 + k), alphas,
                                      alpha_rule)
            fold_alpha[a, k] = alphas[best_P[0]]
            factor, fit = fit_rows(fss[a], train, Ya, alphas)
            preds = [predict_rows(fss[a], factor, fit, test) if b == a else factor.predict(fit, X[b][test])
                     for b in range(S)]
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


# ---------------------------------------------------------------------------------------------------------
# random-direction null


def random_unit_directions(n: int, d: int, seed: int = 0, norm: float = 1.0) -> np.ndarray:
    """``n`` isotropic random directions in ``d`` dimensions, each of Euclidean norm ``norm`` ([n, d] float32).

    Pass ``norm=np.linalg.norm(probe_direction)`` to match a probe direction's norm, so that a coefficient
    means the same displacement for the probe and for every random direction.
    """
    n = _check_count("n", n, 1)
    d = _check_count("d", d, 1)
    if not (np.isfinite(norm) and norm > 0):
        raise ValueError(f"norm must be positive and finite, got {norm}")
    v = np.random.default_rng(seed).normal(size=(n, d))
    nrm = np.linalg.norm(v, axis=1, keepdims=True)
    return (v / np.where(nrm > 0, nrm, 1.0) * norm).astype(np.float32)


def random_direction_null(effect: float, null_effects, *, center: float = 0.0, min_null: int = 100,
                          quantiles: Sequence[float] = DEFAULT_QUANTILES) -> dict:
    """Place one effect (e.g. the steering slope along the probe) in the distribution of the same effect
    measured along random directions (one value per direction, >= ``min_null`` of them).

    Returns a dict: ``effect``, ``n_null``, ``percentile`` (100 x share of null effects below ``effect``,
    ties counted half), ``p_greater`` = ``(1 + #{null >= effect}) / (1 + n)``, ``p_less`` likewise for
    ``<=``, ``p_two_sided`` = ``(1 + #{|null - center| >= |effect - center|}) / (1 + n)`` (``center`` 0:
    a random direction and its negative are equally likely, so the null is symmetric about 0),
    ``null_mean``, ``null_sd``, ``z`` ((effect - mean) / sd) and ``quantiles`` {q: value}.
    """
    e = float(effect)
    if not np.isfinite(e):
        raise ValueError(f"effect must be finite, got {effect}")
    null = np.asarray(null_effects, np.float64)
    if null.ndim != 1:
        raise ValueError(f"null_effects must be 1-D (one effect per random direction), got shape {null.shape}")
    check_finite("null_effects", null)
    if null.size < min_null:
        raise ValueError(f"null_effects has {null.size} values; need >= {min_null} random directions")
    qs = [float(q) for q in quantiles]
    if any(not 0 <= q <= 1 for q in qs):
        raise ValueError(f"quantiles must lie in [0, 1], got {quantiles!r}")
    m = null.size
    sd = float(null.std(ddof=1))
    return {"effect": e, "n_null": int(m),
            "percentile": float(100.0 * (np.sum(null < e) + 0.5 * np.sum(null == e)) / m),
            "p_greater": float((1 + np.sum(null >= e)) / (1 + m)),
            "p_less": float((1 + np.sum(null <= e)) / (1 + m)),
            "p_two_sided": float((1 + np.sum(np.abs(null - center) >= abs(e - center))) / (1 + m)),
            "center": float(center), "null_mean": float(null.mean()), "null_sd": sd,
            "z": float((e - null.mean()) / sd) if sd > 0 else None,
            "quantiles": _quantile_dict(null, qs)}


# ---------------------------------------------------------------------------------------------------------
# the pieces the nested procedures share, public for prefjax.probes.layersel (the layer chosen inside the
# cross-validation draws the same outer folds, inner folds and permutations, and averages r the same way,
# so its per-layer r equals nested_cv_ridge's and it reuses the same factor sets)

check_cv_args = _check_cv_args
outer_folds = _fold_list
inner_choice = _inner_choice
permuted_labels = _permuted
fold_mean_r = _fold_mean_r
fold_bootstrap = _fold_boot
null_summary = _null_summary
