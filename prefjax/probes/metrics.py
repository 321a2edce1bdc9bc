"""Probe metrics: Pearson r, pairwise accuracy, bootstrap confidence intervals."""

from __future__ import annotations

from typing import Callable

import numpy as np

from prefjax.probes.ridge import check_finite


def pearson(a, b) -> float:
    """Pearson r; raises ValueError when either side is constant (r undefined) rather than returning NaN.

    Constant means numerically constant: a spread of at most 1e-12 of the array's magnitude (float64
    rounding, e.g. a ridge probe at an alpha so large it is its intercept) counts as none."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"pearson: need two 1-D arrays of equal length, got {a.shape} and {b.shape}")
    flat = any(v.size and np.ptp(v) <= 1e-12 * np.abs(v).max() for v in (a, b))
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    if flat or not den > 0:
        raise ValueError("pearson: r is undefined for a constant array (or fewer than 2 values)")
    return float((a * b).sum() / den)


def pairwise_accuracy(pred, y, *, max_pairs: int = 2_000_000, seed: int = 0) -> float:
    """Share of task pairs ordered the same way by ``pred`` as by ``y``.

    Pairs tied in ``y`` are skipped; a tie in ``pred`` counts as half right. All pairs are used when there
    are at most ``max_pairs`` of them, else ``max_pairs`` random pairs (under ``seed``).
    """
    pred = check_finite("pred", np.asarray(pred, np.float64))
    y = check_finite("y", np.asarray(y, np.float64))
    if pred.shape != y.shape or pred.ndim != 1:
        raise ValueError(f"pairwise_accuracy: pred {pred.shape} and y {y.shape} must be 1-D of equal length")
    n = len(y)
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, 1)
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, max_pairs)
        j = (i + rng.integers(1, n, max_pairs)) % n
    dy, dp = np.sign(y[i] - y[j]), np.sign(pred[i] - pred[j])
    keep = dy != 0
    if not keep.any():
        raise ValueError("pairwise_accuracy: every pair is tied in y")
    return float(np.mean(np.where(dp[keep] == 0, 0.5, dp[keep] == dy[keep])))


def choice_accuracy(score, i, j, chose_i) -> float:
    """Accuracy of ``score[i] > score[j]`` at predicting observed choices (``chose_i`` in {0, 1} or a share)."""
    score = np.asarray(score, np.float64)
    c = np.asarray(chose_i, np.float64)
    d = score[np.asarray(i)] - score[np.asarray(j)]
    return float(np.mean(np.where(d > 0, c, np.where(d < 0, 1 - c, 0.5))))


def evaluate_probe(probe, X, y, idx=None) -> dict[str, float]:
    """Pearson r, pairwise accuracy and MSE of ``probe.predict(X[idx])`` against ``y[idx]``."""
    X, y = np.asarray(X), check_finite("y", np.asarray(y, np.float64))
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]}")
    if idx is not None:
        X, y = X[np.asarray(idx)], y[np.asarray(idx)]
    pred = probe.predict(X)
    return {"r": pearson(pred, y), "pairwise_acc": pairwise_accuracy(pred, y),
            "mse": float(np.mean((pred - y) ** 2)), "n": int(len(y))}


def _rows_pearson(a_BxN, b_BxN):
    a = a_BxN - a_BxN.mean(1, keepdims=True)
    b = b_BxN - b_BxN.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), np.nan)


def bootstrap_ci(pred, y, *, metric: str | Callable = "r", n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> dict[str, float]:
    """Percentile bootstrap over tasks of ``metric`` ("r", "pairwise_acc" or a callable(pred, y) -> float).

    Resamples where ``metric`` is undefined (e.g. a constant resample for r) are dropped and counted in
    ``n_dropped``.
    """
    pred, y = check_finite("pred", np.asarray(pred, np.float64)), check_finite("y", np.asarray(y, np.float64))
    if pred.shape != y.shape or pred.ndim != 1 or len(y) < 3:
        raise ValueError(f"bootstrap_ci: pred {pred.shape} and y {y.shape} must be 1-D, equal, >= 3 long")
    idx = np.random.default_rng(seed).integers(0, len(y), (n_boot, len(y)))
    if metric == "r":
        point, stats = pearson(pred, y), _rows_pearson(pred[idx], y[idx])
    else:
        fn = pairwise_accuracy if metric == "pairwise_acc" else metric
        if not callable(fn):
            raise ValueError(f"unknown metric {metric!r}")
        point = float(fn(pred, y))
        stats = []
        for b in idx:
            try:
                stats.append(float(fn(pred[b], y[b])))
            except ValueError:
                stats.append(np.nan)
        stats = np.asarray(stats)
    ok = np.isfinite(stats)
    if ok.sum() < 10:
        raise ValueError("bootstrap_ci: fewer than 10 resamples gave a defined metric")
    lo, hi = np.quantile(stats[ok], [(1 - level) / 2, (1 + level) / 2])
    return {"estimate": point, "lo": float(lo), "hi": float(hi), "level": level,
            "n_dropped": int((~ok).sum())}
