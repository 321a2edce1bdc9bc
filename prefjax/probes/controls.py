"""Controls for probes: leave-one-topic-out, baselines, nulls, transfer matrices, INLP, persona cosine."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from prefjax.probes.metrics import bootstrap_ci, evaluate_probe, pairwise_accuracy, pearson
from prefjax.probes.cvpath import FactorSet, fit_rows, predict_rows
from prefjax.probes.nulls import choose_alpha_cv
from prefjax.probes.ridge import DEFAULT_ALPHAS, RidgePath, check_finite, fit_ridge, split_indices


def _check_xy(X, y, name_x="X", name_y="y"):
    X = check_finite(name_x, np.asarray(X))
    y = check_finite(name_y, np.asarray(y, np.float64))
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"{name_x} must be [n, d] and {name_y} [n] with the same n; got {X.shape} and {y.shape}")
    return X, y


def default_splits(n: int, seed: int = 0):
    """(train, eval, test) index sets, 60/20/20."""
    return split_indices(n, [0.6, 0.2, 0.2], seed)


def leave_one_topic_out(X, y, topics, *, alphas=DEFAULT_ALPHAS, min_topic_size: int = 3, inner: int = 5,
                        alpha_rule: str = "best", seed: int = 0, standardize: bool = True,
                        factors: FactorSet | None = None) -> dict:
    """Train on all topics but one, test on the held-out one; alpha chosen by nested CV on the others.

    For each held-out topic the ridge alpha is chosen by :func:`prefjax.probes.nulls.choose_alpha_cv`
    on the training topics' rows only (the held-out topic's rows never reach the selection), with the
    project's ``alpha_rule`` ("best" | "1se"): ``inner`` folds grouped by topic (each training topic
    whole in one fold, so alpha is chosen for generalising to unseen topics, as the test asks) when at
    least ``inner`` training topics remain, else plain random K-fold over the training tasks. ``inner``
    is lowered to ``n_train // 2`` (at least 2) when the training tasks are too few for it. The probe is
    then fitted on all training topics at that alpha. Every fit comes from ``factors`` (a
    :class:`~prefjax.probes.cvpath.FactorSet` of ``X``, made here when None): for raw features one
    decomposition of all tasks serves every topic; with ``standardize`` each topic's training rows are
    decomposed once (their own scale).

    Returns ``per_topic`` {topic: {r, pairwise_acc, n, alpha}}, ``skipped`` {topic: reason} for topics
    with fewer than ``min_topic_size`` tasks (or constant utilities), where r is undefined; their
    predictions still enter ``pooled_r`` / ``pooled_acc`` (all held-out predictions together), and
    ``mean_r`` averages the per-topic r. A topic whose predictions are numerically constant (r undefined,
    e.g. at the grid's largest alpha) is in ``skipped`` with that reason; ``pooled_r`` is None when all
    held-out predictions are. ``alpha_by_topic`` {topic: alpha} covers every held-out topic
    (skipped ones too) and ``alpha_selection`` {topic: {inner, grouped, n_train}} says how each was chosen.
    """
    X, y = _check_xy(X, y)
    fs = factors if factors is not None else FactorSet(X, standardize=standardize)
    if fs.X.shape != X.shape or fs.standardize != bool(standardize):
        raise ValueError(f"factors were made for X {fs.X.shape} (standardize={fs.standardize}); the call passes "
                         f"X {X.shape} (standardize={standardize})")
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
        choice = choose_alpha_cv(None, y[rest], alphas=alphas, inner=k, groups=topics[rest] if grouped else None,
                                 seed=seed, standardize=standardize, alpha_rule=alpha_rule, factors=fs, rows=rest)
        alpha = choice["alpha"]
        factor, fit = fit_rows(fs, rest, y[:, None], [alpha])
        pred[test] = predict_rows(fs, factor, fit, test)[0, :, 0]
        key = t.item() if hasattr(t, "item") else t
        alpha_by[key] = alpha
        how[key] = {"inner": k, "grouped": bool(grouped), "n_train": int(len(rest))}
        if len(test) < min_topic_size or np.ptp(y[test]) == 0:
            skipped[key] = f"{len(test)} task(s){' with constant utility' if len(test) >= min_topic_size else ''}"
            continue
        r = defined_r(pred[test], y[test])
        if r is None:  # e.g. the largest alpha of the grid shrinks the probe to its intercept
            skipped[key] = f"constant predictions at alpha {alpha:g} (r undefined)"
            continue
        per[key] = {"r": r, "pairwise_acc": pairwise_accuracy(pred[test], y[test]),
                    "n": int(len(test)), "alpha": alpha}
    rs = [v["r"] for v in per.values()]
    return {"per_topic": per, "skipped": skipped, "pooled_r": defined_r(pred, y),
            "pooled_acc": pairwise_accuracy(pred, y), "mean_r": float(np.mean(rs)) if rs else None,
            "predictions": pred, "alpha_by_topic": alpha_by, "alpha_selection": how, "alpha_rule": alpha_rule}


def defined_r(pred, y) -> float | None:
    """Pearson r of ``pred`` with ``y``, or None where it is undefined (numerically constant predictions)."""
    try:
        return pearson(pred, y)
    except ValueError:
        return None


def compare_with_baseline(X_act, X_emb, y, *, alphas=DEFAULT_ALPHAS, splits=None, seed: int = 0) -> dict:
    """The same probe on activations and on a content embedding of the same tasks, same splits, side by side."""
    n = len(np.asarray(y))
    train, ev, test = splits if splits is not None else default_splits(n, seed)
    out = {}
    for name, X in (("activations", X_act), ("embedding", X_emb)):
        X, yy = _check_xy(X, y, f"X_{name}")
        probe = fit_ridge(X, yy, alphas=alphas, eval_idx=ev, train_idx=train)
        out[name] = dict(evaluate_probe(probe, X, yy, test), alpha=probe.alpha)
    return out


def utility_correlation(mu_a, mu_b) -> dict[str, float]:
    """Baseline for transfer: how similar persona A's utilities are to B's (Pearson and Spearman)."""
    a, b = check_finite("mu_a", np.asarray(mu_a, np.float64)), check_finite("mu_b", np.asarray(mu_b, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"mu_a {a.shape} and mu_b {b.shape} differ in shape")
    rank = lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(np.float64)
    return {"pearson": pearson(a, b), "spearman": pearson(rank(a), rank(b))}


def shuffle_null(X, y, *, n_perm: int = 200, alphas=DEFAULT_ALPHAS, splits=None, seed: int = 0) -> dict:
    """Label-shuffle null for the held-out r of a ridge probe.

    The observed pipeline (fit on train, alpha by eval r, Pearson r on test) is rerun with ``y`` permuted
    across all tasks ``n_perm`` times; one decomposition serves every permutation. ``p_value`` is
    ``(1 + #{null >= observed}) / (1 + n_perm)``. Alpha is chosen on one eval split here; for alpha chosen
    by nested cross-validation (and the null refitted through it) use
    :func:`prefjax.probes.nulls.nested_cv_ridge` with ``n_perm``.
    """
    X, y = _check_xy(X, y)
    train, ev, test = splits if splits is not None else default_splits(len(y), seed)
    rng = np.random.default_rng(seed)
    Y_NxP = np.stack([y] + [y[rng.permutation(len(y))] for _ in range(n_perm)], 1)
    path = RidgePath.build(X[train])
    yt = Y_NxP[train]
    c_RxP = path.coefs(yt - yt.mean(0))
    e_ExR, t_TxR = path.eval_projection(X[ev]), path.eval_projection(X[test])
    alphas = jnp.asarray(alphas, jnp.float32)
    r_eval = jnp.stack([_pearson_cols_many(e_ExR @ (c_RxP / (path.lam_R[:, None] + a)), Y_NxP[ev])
                        for a in alphas])  # [A, P+1]
    best = jnp.argmax(r_eval, 0)
    r_test = jnp.stack([_pearson_cols_many(t_TxR @ (c_RxP / (path.lam_R[:, None] + a)), Y_NxP[test])
                        for a in alphas])
    r = np.asarray(jnp.take_along_axis(r_test, best[None], 0)[0], np.float64)
    obs, null = float(r[0]), r[1:]
    return {"observed_r": obs, "null_r": null, "null_mean": float(null.mean()), "null_sd": float(null.std()),
            "p_value": float((1 + np.sum(null >= obs)) / (1 + n_perm))}


def _pearson_cols_many(p_ExP, y_ExP):
    p = p_ExP - p_ExP.mean(0)
    y = jnp.asarray(y_ExP, jnp.float32)
    y = y - y.mean(0)
    den = jnp.sqrt((p * p).sum(0) * (y * y).sum(0))
    return jnp.where(den > 0, (p * y).sum(0) / jnp.where(den > 0, den, 1.0), 0.0)


def transfer_matrix(X_SxNxD, y, *, alphas=DEFAULT_ALPHAS, splits=None, names: Sequence[str] | None = None,
                    seed: int = 0, standardize: bool = True, n_boot: int = 1000, level: float = 0.95,
                    inner: int | None = None, alpha_rule: str = "best",
                    factors: Sequence[FactorSet] | None = None) -> dict:
    """Train a probe on each source ``a`` (persona or layer) and test it on every source ``b``.

    ``X_SxNxD`` stacks the activations of S sources for the same n tasks (an array, or any lazy sequence
    whose ``[s]`` gives source ``s``'s [n, d] rows, e.g. layers read from a store). ``y`` is [S, n] (each persona's
    own utilities: cross-persona transfer, evaluated against B's utilities on B's activations) or [n]
    (shared utilities: cross-layer transfer). Returns matrices ``r`` and ``pairwise_acc`` [S, S] (row =
    train source, column = test source, test split only), the chosen ``alpha`` per source, and for [S, n]
    utilities the ``utility_corr`` [S, S] baseline (Pearson of A's with B's utilities on the test split).

    Intervals (``n_boot > 0``): ``r_lo`` / ``r_hi`` [S, S], the ``level`` percentile bootstrap of each
    cell's r over the test tasks (:func:`prefjax.probes.metrics.bootstrap_ci`; every cell uses the same
    resamples, so differences between cells are paired). They are conditional on the fitted probes (the
    training split and alpha are held fixed) and NaN where fewer than 3 test tasks or too few resamples
    with a defined r make the bootstrap impossible. ``n_test`` is the number of test tasks: below ~30 a
    percentile interval for r is rough (it tends to be too narrow).

    Alpha per source: with ``inner`` (an int), chosen by ``inner``-fold CV on the tasks outside the test
    split (train + eval; :func:`prefjax.probes.nulls.choose_alpha_cv` with ``alpha_rule``) and the probe
    refitted on all of them; with ``inner=None``, fitted on the training split with the alpha that scores
    best on the eval split. ``alpha_choice`` says which. ``factors`` (one
    :class:`~prefjax.probes.cvpath.FactorSet` per source, e.g. the probes stage's) avoids decomposing a
    source again; each source's set is made (and dropped) in turn when None.

    One split, one alpha per source: :func:`prefjax.probes.nulls.nested_transfer`
    gives the matrix over the whole alpha grid with nested-CV alphas and shuffle p-values, at a memory cost
    of [alphas, S, S, n] that suits a few personas better than many layers.
    """
    lazy = not isinstance(X_SxNxD, (np.ndarray, list, tuple)) and hasattr(X_SxNxD, "__getitem__")
    X = X_SxNxD if lazy else np.asarray(X_SxNxD)
    if not lazy and X.ndim != 3:
        raise ValueError(f"X must be [S, n, d], got {X.shape}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or (n_boot != 0 and n_boot < 100):
        raise ValueError(f"n_boot must be 0 (no intervals) or an integer >= 100, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    S = len(X)
    y = np.asarray(y, np.float64)
    n = y.shape[-1]
    if factors is not None and len(factors) != S:
        raise ValueError(f"factors has {len(factors)} entries for S={S} sources")
    Y = np.broadcast_to(y, (S, n)) if y.ndim == 1 else y
    if Y.shape != (S, n):
        raise ValueError(f"y must be [n] or [S, n] = [{S}, {n}], got {y.shape}")
    train, ev, test = splits if splits is not None else default_splits(n, seed)
    alphas_A = np.asarray(alphas, np.float64)
    test = np.asarray(test, np.int64)
    targets = []  # every source's test rows, read once (a lazy X reads each source twice in all)
    for s in range(S):
        xs = np.asarray(X[s])
        if xs.ndim != 2 or xs.shape[0] != n:
            raise ValueError(f"X[{s}] has shape {xs.shape}; expected [n={n}, d]")
        check_finite(f"X[{s}]", xs), check_finite(f"y[{s}]" if y.ndim == 2 else "y", Y[s])
        targets.append(xs[test])
    fit_rows_all = np.concatenate([np.asarray(train), np.asarray(ev)]).astype(np.int64)
    k = max(2, min(int(inner), len(fit_rows_all) // 2)) if inner is not None else None
    alpha_choice = ("eval split" if inner is None else
                    f"{k}-fold CV on the {len(fit_rows_all)} tasks outside the test split ({alpha_rule!r} rule)")
    chosen = np.zeros(S)
    preds = np.zeros((S, S, len(test)))
    for a in range(S):
        fs = factors[a] if factors is not None else FactorSet(np.asarray(X[a]), standardize=standardize)
        ya = Y[a][:, None]
        if inner is None:
            factor, fit = fit_rows(fs, train, ya, alphas_A)
            r_A = np.array([_r_or_zero(p[:, 0], Y[a][ev]) for p in predict_rows(fs, factor, fit, ev)])
            best = int(np.argmax(r_A))
        else:
            choice = choose_alpha_cv(None, Y[a][fit_rows_all], alphas=alphas_A, inner=k, seed=seed,
                                     standardize=standardize, alpha_rule=alpha_rule, factors=fs, rows=fit_rows_all)
            best = int(choice["index"])
            factor, fit = fit_rows(fs, fit_rows_all, ya, alphas_A[best:best + 1])
            best_in_fit = 0
        chosen[a] = alphas_A[best]
        ai = best if inner is None else best_in_fit
        for b in range(S):
            p = predict_rows(fs, factor, fit, test) if b == a else factor.predict(fit, targets[b])
            preds[a, b] = p[ai, :, 0]
    r = np.zeros((S, S))
    acc = np.zeros((S, S))
    lo, hi = np.full((S, S), np.nan), np.full((S, S), np.nan)
    for a in range(S):
        for b in range(S):
            pred, yb = preds[a, b], Y[b][test]
            r[a, b], acc[a, b] = pearson(pred, yb), pairwise_accuracy(pred, yb)
            if n_boot > 0 and len(test) >= 3:
                try:  # the same seed in every cell: the same resamples of the test tasks (paired cells)
                    ci = bootstrap_ci(pred, yb, n_boot=n_boot, level=level, seed=seed)
                    lo[a, b], hi[a, b] = ci["lo"], ci["hi"]
                except ValueError:  # too few resamples with a defined r (tiny or near-constant test split)
                    pass
    out = {"r": r, "pairwise_acc": acc, "alpha": chosen,
           "names": list(names) if names is not None else [str(s) for s in range(S)], "n_test": int(len(test)),
           "alpha_choice": alpha_choice}
    if n_boot > 0:
        out.update(r_lo=lo, r_hi=hi, level=level, n_boot=int(n_boot))
    if y.ndim == 2:
        out["utility_corr"] = np.array([[pearson(Y[a][test], Y[b][test]) for b in range(S)] for a in range(S)])
    return out


def _r_or_zero(pred, y) -> float:
    """Pearson r, 0 where ``pred`` is constant (the eval-split alpha choice of :func:`fit_ridge`)."""
    p, t = pred - pred.mean(), y - y.mean()
    den = float(np.sqrt((p * p).sum() * (t * t).sum()))
    return float((p * t).sum() / den) if den > 0 else 0.0


def inlp(X, y, *, n_iter: int = 5, alphas=DEFAULT_ALPHAS, splits=None, topics=None, shuffle_baseline: bool = True,
         seed: int = 0, inner: int = 5, alpha_rule: str = "best") -> dict:
    """Iterative nullspace projection: fit a ridge probe, remove its direction, repeat ``n_iter`` times.

    Works in the standardised space of the training split (its mean and scale, computed once; later fits
    only centre). Each iteration re-sweeps alpha on the eval split, orthogonalises the new direction
    against those already removed (Gram-Schmidt) and projects it out of every task's activations.
    Reported per iteration k = 0..n_iter (k directions removed): ``test_r``, ``loto_r`` (pooled
    leave-one-topic-out r, if ``topics`` given; each held-out topic's alpha chosen by ``inner``-fold CV on
    the other topics with ``alpha_rule``, as in :func:`leave_one_topic_out`) and ``shuffled_test_r`` (the
    true-label test r after removing k directions learned from shuffled labels: how much removing *any* k
    directions costs). ``directions`` [n_iter, d] are orthonormal, in standardised space.

    Cost: one decomposition per iteration and run (a :class:`~prefjax.probes.cvpath.FactorSet` of the
    projected activations serves the eval-split fit, the test score and every leave-one-topic-out fit).
    """
    X, y = _check_xy(X, y)
    train, ev, test = splits if splits is not None else default_splits(len(y), seed)
    xt = np.asarray(X[np.asarray(train)], np.float64)
    sd = xt.std(0)
    scale = np.where(sd > 1e-12 * max(1.0, float(np.abs(xt).max())), sd, 1.0)
    Z0 = (np.asarray(X, np.float64) - xt.mean(0)) / scale
    alphas = np.asarray(alphas, np.float64)

    def run(labels):
        Z = Z0.copy()
        shuffled = labels is not y
        cols = np.stack([labels, y], 1) if shuffled else labels[:, None]
        dirs, test_r, loto_r = [], [], []
        for k in range(n_iter + 1):
            fs = FactorSet(Z, standardize=False)
            factor, fit = fit_rows(fs, train, cols, alphas)
            ev_pred = predict_rows(fs, factor, fit, ev)
            best = [int(np.argmax([_r_or_zero(p[:, c], cols[ev, c]) for p in ev_pred])) for c in range(cols.shape[1])]
            test_pred = predict_rows(fs, factor, fit, test)[best[-1], :, cols.shape[1] - 1]
            test_r.append(pearson(test_pred, y[np.asarray(test)]))
            if topics is not None and not shuffled:
                loto_r.append(leave_one_topic_out(Z, y, topics, alphas=alphas, standardize=False, seed=seed,
                                                  inner=inner, alpha_rule=alpha_rule, factors=fs)["pooled_r"])
            if k == n_iter:
                break
            u = factor.weights(fit, best[0], 0)
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


def persona_direction_cosine(direction_D, X, persona, *, target=None, alphas=DEFAULT_ALPHAS, splits=None,
                             seed: int = 0) -> dict:
    """Cosine between a preference direction and a persona-identity direction.

    The identity direction is a ridge classifier (labels +1 for ``target`` persona, -1 otherwise; default
    target = the first persona in sorted order) on activations ``X`` [n, d] labelled by ``persona`` [n],
    taken in raw activation space like the probe's ``direction``. Reports ``cosine``, ``abs_cosine``,
    the classifier's held-out ``accuracy`` and the ``persona_direction``.
    """
    X = check_finite("X", np.asarray(X))
    persona = np.asarray(persona)
    v = check_finite("direction", np.asarray(direction_D, np.float64))
    if persona.shape != (X.shape[0],) or v.shape != (X.shape[1],):
        raise ValueError(f"need persona [n] and direction [d] for X {X.shape}; got {persona.shape}, {v.shape}")
    names = np.unique(persona)
    if len(names) < 2:
        raise ValueError("persona_direction_cosine needs at least two personas")
    target = names[0] if target is None else target
    labels = np.where(persona == target, 1.0, -1.0)
    train, ev, test = splits if splits is not None else default_splits(len(labels), seed)
    clf = fit_ridge(X, labels, alphas=alphas, eval_idx=ev, train_idx=train, select="mse")
    acc = float(np.mean(np.sign(clf.predict(X[test])) == labels[test]))
    d = clf.direction.astype(np.float64)
    cos = float(v @ d / (np.linalg.norm(v) * np.linalg.norm(d)))
    return {"cosine": cos, "abs_cosine": abs(cos), "accuracy": acc, "persona_direction": d.astype(np.float32)}


def persona_identity_control(X_SxNxD, directions_SxD, names: Sequence[str], *, n_null: int = 1000,
                             alphas=DEFAULT_ALPHAS, splits=None, seed: int = 0) -> dict:
    """Is a persona's preference probe just the persona's identity? Per persona ``s``: the cosine of its probe
    direction ``directions_SxD[s]`` with the persona-identity direction (a ridge classifier of persona ``s``
    against the rest on every persona's activations of the same tasks, ``X_SxNxD``; its train / eval / test
    split is over tasks, so no task's activations are on both sides), with two nulls of ``n_null`` random
    directions: isotropic Gaussian, and matched to the activations' covariance (Gaussian combinations of
    the centred rows). ``p_isotropic`` / ``p_matched``: the share of random directions whose |cosine| with the
    identity direction is at least the probe's (add-one). Also the classifier's test accuracy."""
    X = np.asarray(X_SxNxD)
    V = np.asarray(directions_SxD, np.float64)
    S, n, d = X.shape
    if S < 2 or V.shape != (S, d) or len(names) != S:
        raise ValueError(f"need >= 2 personas with X [S, n, d] and directions [S, d]; got X {X.shape}, "
                         f"directions {V.shape}, {len(names)} names")
    check_finite("X", X)
    check_finite("directions", V)
    train, ev, test = splits if splits is not None else default_splits(n, seed)
    rows = lambda idx: (np.concatenate([np.asarray(idx) + s * n for s in range(S)]))
    Xf = X.reshape(S * n, d)
    who = np.repeat(np.arange(S), n)
    rng = np.random.default_rng(seed)
    centred = Xf - Xf.mean(0)
    iso = rng.normal(size=(n_null, d))
    matched = rng.normal(size=(n_null, S * n)) @ centred
    unit = lambda M: M / np.linalg.norm(M, axis=-1, keepdims=True)
    iso, matched = unit(iso), unit(matched)
    out = {"names": list(names), "n_null": int(n_null), "persona": {}}
    for s, name in enumerate(names):
        labels = np.where(who == s, 1.0, -1.0)
        clf = fit_ridge(Xf, labels, alphas=alphas, eval_idx=rows(ev), train_idx=rows(train), select="mse")
        t = rows(test)
        acc = float(np.mean(np.sign(clf.predict(Xf[t])) == labels[t]))
        ident = clf.direction.astype(np.float64)
        ident /= np.linalg.norm(ident)
        v = V[s] / np.linalg.norm(V[s])
        cos = float(v @ ident)
        p_iso = (1 + int(np.sum(np.abs(iso @ ident) >= abs(cos)))) / (n_null + 1)
        p_mat = (1 + int(np.sum(np.abs(matched @ ident) >= abs(cos)))) / (n_null + 1)
        out["persona"][str(name)] = {"cosine": cos, "abs_cosine": abs(cos), "identity_accuracy": acc,
                                     "p_isotropic": p_iso, "p_matched": p_mat,
                                     "null_matched_q95": float(np.quantile(np.abs(matched @ ident), 0.95)),
                                     "null_isotropic_q95": float(np.quantile(np.abs(iso @ ident), 0.95))}
    return out
