"""Small statistics used across prefjax: Wilson intervals, correlations, one-sample t tests and power.

* :func:`wilson_interval` -- binomial proportion interval, vectorised; ``n == 0`` gives ``(0, 1)``
  (no data: the whole unit interval), not NaN, so plots and tables need no special case.
* :func:`pearson`, :func:`spearman` -- correlation coefficients that raise a clear ValueError on
  mismatched lengths, fewer than two points, non-finite values or constant input (where the
  coefficient is undefined), instead of returning NaN with a warning.
* :func:`t_summary` -- mean of per-unit values (e.g. per-pair steering slopes) with a t interval and a
  two-sided p-value against 0.
* :func:`min_detectable_effect` / :func:`n_for_effect` -- the smallest mean a two-sided one-sample t test
  detects with the given power (exact, through the noncentral t), and the sample size a given effect needs.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize as _optimize
from scipy import stats as _stats


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


def _check_alpha_power(alpha: float, power: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power}")


def t_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided one-sample t test at level ``alpha`` (``n`` units of standard deviation
    ``sd``) when the true mean is ``effect``: P(|T| > t_crit) with T noncentral t, df ``n - 1``."""
    _check_alpha_power(alpha, 0.5)
    if int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n}")
    if not (np.isfinite(sd) and sd >= 0 and np.isfinite(effect)):
        raise ValueError(f"effect and sd must be finite and sd >= 0, got effect={effect}, sd={sd}")
    if sd == 0:
        return 1.0 if effect != 0 else float(alpha)
    df = int(n) - 1
    tc = float(_stats.t.ppf(1 - alpha / 2, df))
    nc = abs(float(effect)) * np.sqrt(n) / float(sd)
    pw = float(_stats.nct.sf(tc, df, nc) + _stats.nct.cdf(-tc, df, nc))
    if not np.isfinite(pw):  # far in the tail scipy's noncentral t can give NaN: the normal approximation
        pw = float(_stats.norm.sf(tc - nc) + _stats.norm.cdf(-tc - nc))
    return min(1.0, max(0.0, pw))


def min_detectable_effect(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest |mean| that a two-sided one-sample t test at level ``alpha`` detects with probability
    ``power``, for ``n`` units with standard deviation ``sd`` (exact: noncentral t; close to
    ``(t_{1-alpha/2} + t_{power}) * sd / sqrt(n)``). None when ``n < 2`` or ``sd`` is not finite; 0 when
    ``sd`` is 0. Shrinks like ``1 / sqrt(n)``."""
    _check_alpha_power(alpha, power)
    if n is None or n < 2 or sd is None or not np.isfinite(sd) or sd < 0:
        return None
    if sd == 0:
        return 0.0
    if power <= alpha:
        return 0.0
    df = int(n) - 1
    f = lambda d: t_power(d, 1.0, int(n), alpha) - power  # d in units of sd
    guess = (_stats.t.ppf(1 - alpha / 2, df) + _stats.t.ppf(power, df)) / np.sqrt(n)
    lo, hi = 0.5 * guess, 1.5 * guess
    while f(lo) > 0:
        lo *= 0.5
    while f(hi) < 0:
        hi *= 2.0
    return float(_optimize.brentq(f, lo, hi, xtol=1e-12)) * float(sd)


def n_for_effect(effect: float, sd: float, *, alpha: float = 0.05, power: float = 0.8,
                 n_max: int = 10 ** 7) -> int | None:
    """The smallest n (>= 2) at which the two-sided one-sample t test detects a mean of ``effect`` with
    probability ``power`` (units of standard deviation ``sd``); None when ``effect`` is 0 or non-finite,
    or more than ``n_max`` units would be needed."""
    _check_alpha_power(alpha, power)
    if effect is None or sd is None or not (np.isfinite(effect) and np.isfinite(sd)) or effect == 0 or sd < 0:
        return None
    if sd == 0:
        return 2
    ok = lambda n: t_power(effect, sd, n, alpha) >= power - 1e-9
    if ok(2):
        return 2
    hi = 4
    while not ok(hi):
        if hi >= n_max:
            return None
        hi = min(2 * hi, n_max)
    lo = hi // 2  # ok(lo) is False (or lo == 2, tested above)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return int(hi)


def t_summary(values, *, level: float = 0.95) -> dict:
    """Mean of per-unit ``values`` (e.g. one steering slope per pair) with its t interval and the
    two-sided one-sample t-test p-value against 0: ``{n, mean, sd, se, ci [lo, hi], level, p_value}``.
    With fewer than 2 values (or all equal) the interval and p-value are None."""
    v = np.asarray(values, np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise ValueError("t_summary: values contain NaN or inf")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = int(v.size)
    out = {"n": n, "mean": float(v.mean()) if n else None, "sd": None, "se": None, "ci": None, "level": level,
           "p_value": None}
    if n < 2:
        return out
    sd = float(v.std(ddof=1))
    out["sd"] = sd
    if sd == 0:
        return out
    se = sd / np.sqrt(n)
    tc = float(_stats.t.ppf((1 + level) / 2, n - 1))
    out.update(se=float(se), ci=[float(v.mean() - tc * se), float(v.mean() + tc * se)],
               p_value=float(2 * _stats.t.sf(abs(v.mean()) / se, n - 1)))
    return out
