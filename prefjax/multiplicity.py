"""Family-wise correction of a report's p-values: Holm's step-down (the one the report uses) and
Benjamini–Hochberg (shown alongside).

* :func:`holm` -- controls the family-wise error rate (the chance of *any* false rejection) at level
  ``a`` when every adjusted p below ``a`` is called significant, under any dependence between the tests.
  With the raw p sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted value is
  ``max_{j <= i} min(1, (m - j + 1) p_(j))``: the smallest p is multiplied by ``m`` (Bonferroni), the next
  by ``m - 1``, and so on, made monotone so that a larger raw p never gets a smaller adjusted one.
* :func:`benjamini_hochberg` -- controls the false discovery rate (the expected share of false
  rejections among the rejections) for independent or positively dependent tests:
  ``min_{j >= i} min(1, m p_(j) / j)``. Weaker than Holm; shown for readers who want it, never the basis
  of a claim in the report.
* :func:`adjust` -- either, by name (``"holm"`` | ``"bh"``).

Both take the whole family at once (a 1-D sequence of p-values in [0, 1], any order; ties allowed) and
return the adjusted values in the input order, as float64. A permutation p-value is at least
``1 / (n_perm + 1)``, so with ``m`` tests the smallest Holm-adjusted value is ``m / (n_perm + 1)``:
:func:`permutation_floor` gives the raw floor, which the report shows next to each permutation p.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["holm", "benjamini_hochberg", "adjust", "permutation_floor", "METHODS"]

METHODS = ("holm", "bh")


def _check(p) -> np.ndarray:
    p_M = np.asarray(p, np.float64)
    if p_M.ndim != 1:
        raise ValueError(f"p-values must be 1-D (one per test of the family), got shape {p_M.shape}")
    if not np.all(np.isfinite(p_M)) or np.any((p_M < 0) | (p_M > 1)):
        bad = int(np.flatnonzero(~(np.isfinite(p_M) & (p_M >= 0) & (p_M <= 1)))[0])
        raise ValueError(f"p-value {bad} is {p_M[bad]!r}; every p-value must lie in [0, 1]")
    return p_M


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error rate), in the input order."""
    p_M = _check(p)
    m = p_M.size
    if m == 0:
        return p_M.copy()
    order = np.argsort(p_M, kind="stable")
    stepped = np.minimum(1.0, (m - np.arange(m)) * p_M[order])   # (m - j + 1) p_(j), j = 1..m
    out = np.empty(m)
    out[order] = np.maximum.accumulate(stepped)
    return out


def benjamini_hochberg(p: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (false discovery rate), in the input order."""
    p_M = _check(p)
    m = p_M.size
    if m == 0:
        return p_M.copy()
    order = np.argsort(p_M, kind="stable")
    stepped = np.minimum(1.0, m * p_M[order] / np.arange(1, m + 1))
    out = np.empty(m)
    out[order] = np.minimum.accumulate(stepped[::-1])[::-1]
    return out


def adjust(p: Sequence[float], method: str = "holm") -> np.ndarray:
    """Adjusted p-values by ``method`` ("holm": family-wise error; "bh": false discovery rate)."""
    if method == "holm":
        return holm(p)
    if method == "bh":
        return benjamini_hochberg(p)
    raise ValueError(f"method {method!r} is not one of {METHODS}")


def permutation_floor(n_perm: int | None) -> float | None:
    """The smallest p-value ``(1 + #) / (1 + n_perm)`` can take: ``1 / (n_perm + 1)`` (None without permutations)."""
    if not n_perm:
        return None
    if int(n_perm) < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    return 1.0 / (int(n_perm) + 1)
