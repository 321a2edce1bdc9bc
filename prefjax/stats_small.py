"""Small statistics used across prefjax: Wilson intervals and correlations (NumPy only).

* :func:`wilson_interval` -- binomial proportion interval, vectorised; ``n == 0`` gives ``(0, 1)``
  (no data: the whole unit interval), not NaN, so plots and tables need no special case.
* :func:`pearson`, :func:`spearman` -- correlation coefficients that raise a clear ValueError on
  mismatched lengths, fewer than two points, non-finite values or constant input (where the
  coefficient is undefined), instead of returning NaN with a warning.
"""

from __future__ import annotations

import numpy as np


def wilson_interval(k, n, z: float = 1.959963984540054):
    """Wilson score interval for ``k`` successes out of ``n`` trials (95% by default: z = Φ⁻¹(0.975)).

    The one implementation in prefjax: the report figures and the steering tables use it too.

    ``k`` and ``n`` may be scalars or arrays (broadcast together); returns ``(lo, hi)`` as floats for
    scalar input, else float64 arrays of the broadcast shape. Where ``n == 0`` the interval is
    ``(0.0, 1.0)``. ``k == 0`` gives ``lo == 0`` and ``k == n`` gives ``hi == 1`` exactly.
    Raises ValueError when any ``k`` or ``n`` is negative, non-integer, or ``k > n``, or ``z <= 0``.
    """
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    scalar = k_arr.ndim == 0 and n_arr.ndim == 0
    k_arr, n_arr = np.broadcast_arrays(k_arr, n_arr)
    if not z > 0:
        raise ValueError(f"z must be positive, got {z}")
    if not (np.all(np.isfinite(k_arr)) and np.all(np.isfinite(n_arr))):
        raise ValueError("k and n must be finite")
    if np.any(k_arr != np.round(k_arr)) or np.any(n_arr != np.round(n_arr)):
        raise ValueError("k and n must be whole numbers")
    if np.any(n_arr < 0) or np.any(k_arr < 0):
        raise ValueError(f"k and n must be non-negative (min k={k_arr.min()}, min n={n_arr.min()})")
    if np.any(k_arr > n_arr):
        bad = np.argwhere(k_arr > n_arr)[0]
        raise ValueError(f"k > n at index {tuple(bad.tolist())}: k={k_arr[tuple(bad)]}, n={n_arr[tuple(bad)]}")
    empty = n_arr == 0
    n_safe = np.where(empty, 1.0, n_arr)
    p = k_arr / n_safe
    z2 = z * z
    denom = 1.0 + z2 / n_safe
    centre = (p + z2 / (2.0 * n_safe)) / denom
    half = (z / denom) * np.sqrt(p * (1.0 - p) / n_safe + z2 / (4.0 * n_safe * n_safe))
    lo = np.clip(centre - half, 0.0, 1.0)
    hi = np.clip(centre + half, 0.0, 1.0)
    lo = np.where(k_arr == 0, 0.0, lo)
    hi = np.where(k_arr == n_arr, 1.0, hi)
    lo = np.where(empty, 0.0, lo)
    hi = np.where(empty, 1.0, hi)
    if scalar:
        return float(lo), float(hi)
    return lo, hi


def _check_pair(x, y, what: str) -> tuple[np.ndarray, np.ndarray]:
    x_N = np.asarray(x, dtype=np.float64)
    y_N = np.asarray(y, dtype=np.float64)
    if x_N.ndim != 1 or y_N.ndim != 1:
        raise ValueError(f"{what}: x and y must be 1-D, got shapes {x_N.shape} and {y_N.shape}")
    if x_N.shape != y_N.shape:
        raise ValueError(f"{what}: x and y have different lengths ({x_N.size} and {y_N.size})")
    if x_N.size < 2:
        raise ValueError(f"{what}: need at least 2 points, got {x_N.size}")
    for name, a in (("x", x_N), ("y", y_N)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{what}: {name} contains NaN or inf")
    return x_N, y_N


def _pearson_checked(x_N: np.ndarray, y_N: np.ndarray, what: str) -> float:
    xc = x_N - x_N.mean()
    yc = y_N - y_N.mean()
    sx = np.sqrt(np.dot(xc, xc))
    sy = np.sqrt(np.dot(yc, yc))
    for name, s, a in (("x", sx, x_N), ("y", sy, y_N)):
        if s == 0 or s <= 1e-12 * max(1.0, float(np.max(np.abs(a)))) * np.sqrt(a.size):
            raise ValueError(f"{what}: {name} is constant, so the correlation is undefined")
    r = float(np.dot(xc, yc) / (sx * sy))
    return max(-1.0, min(1.0, r))


def pearson(x, y) -> float:
    """Pearson correlation of two 1-D sequences; ValueError on constant or mismatched input."""
    x_N, y_N = _check_pair(x, y, "pearson")
    return _pearson_checked(x_N, y_N, "pearson")


def rankdata(a) -> np.ndarray:
    """Ranks 1..N of a 1-D array, ties given their average rank (as ``scipy.stats.rankdata``)."""
    a_N = np.asarray(a, dtype=np.float64)
    if a_N.ndim != 1:
        raise ValueError(f"rankdata needs a 1-D array, got shape {a_N.shape}")
    order = np.argsort(a_N, kind="mergesort")
    sorted_a = a_N[order]
    # Start index of each run of equal values.
    new_run = np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]])
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate([starts[1:], [a_N.size]])
    avg_rank = (starts + ends - 1) / 2.0 + 1.0
    ranks = np.empty(a_N.size, dtype=np.float64)
    ranks[order] = avg_rank[run_id]
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson on average ranks); ValueError on constant input."""
    x_N, y_N = _check_pair(x, y, "spearman")
    return _pearson_checked(rankdata(x_N), rankdata(y_N), "spearman")
