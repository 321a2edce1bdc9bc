"""The layer chosen inside the cross-validation: an honest held-out r for "the probe at the best layer".

The probes stage reports a nested-CV r per layer and calls the layer with the largest one the best layer.
That maximum over layers is optimistic: on pure-noise activations the best of 18 layers' held-out r is
well above 0, and its per-layer shuffle p ignores that the layer was picked. This module estimates the
whole procedure instead, *layer choice included*:

* Outer folds (the same ``kfold_ids(n, outer, seed)`` folds :func:`~prefjax.probes.nulls.nested_cv_ridge`
  uses). Inside each outer training set, inner ``inner``-fold CV (the same inner folds) scores every
  (layer, alpha) on the outer-training rows only. The **layer** is the one with the largest mean inner r
  (its best alpha); the **alpha** is then chosen within that layer by the configured rule (``"best"``:
  the same argmax, so the pair maximises the inner r jointly; ``"1se"``: the largest alpha within one
  standard error of that layer's best). The outer test rows are predicted by that layer's probe fitted on
  the whole outer training set at that alpha; they never reach the choice.
* ``r``: Pearson r of those predictions within each outer test fold, averaged with fold-size weights (as
  the per-layer nested r is), with a percentile bootstrap over test tasks within folds.
* ``null`` (``n_perm > 0``): **the full selection null**. Every permutation of the labels goes through the
  whole procedure again (inner scores of every layer and alpha on the permuted labels, layer and alpha
  re-chosen per outer fold), so the null includes the maximum over layers; ``p_value`` =
  ``(1 + #{null r >= r}) / (1 + n_perm)``.
* ``best_layer`` (the naive number, kept and labelled optimistic): the layer of the largest per-layer
  nested r, that r, and its **max-over-layers null**: per permutation the maximum over layers of the
  per-layer nested r (the statistic computed identically on the permuted labels, every layer seeing the
  same permutation), ``p_max`` against it. ``per_layer_r`` / ``per_layer_p`` are the per-layer nested
  r (equal to :func:`nested_cv_ridge`'s, same folds and permutations) and their uncorrected p-values.

Cost: nothing is refitted. Every fit is the exact leave-rows-out downdate of a
:class:`~prefjax.probes.cvpath.FactorSet` (one factor set per layer; the probes stage passes the set it
already made for :func:`~prefjax.probes.protocol.probe_layer`, so with shared factors this module makes
**no** decomposition: raw features have one factor per layer, standardised features one per outer training
set, both cached in the set). The permuted labels are extra columns of one product. Layers are consumed
one at a time (:meth:`LayerSelection.add`): the running state is the best inner score so far and its
out-of-fold predictions per (outer fold, permutation), ``O(n (1 + n_perm))`` floats, never all layers'
activations or factors at once.

Every result is a plain dict of floats, ints and lists (``json.dumps`` works on it).
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import numpy as np

from prefjax.probes.cvpath import FactorSet, fit_rows, predict_rows
from prefjax.probes.nulls import (check_cv_args, fold_bootstrap, fold_mean_r, inner_choice, kfold_ids, null_summary,
                                  outer_folds, permuted_labels)
from prefjax.probes.ridge import DEFAULT_ALPHAS, check_finite

__all__ = ["LayerSelection", "select_layer_cv"]


class LayerSelection:
    """The layer-inside-CV estimate built one layer at a time: ``add(factors, name)`` per layer (a
    :class:`~prefjax.probes.cvpath.FactorSet` of that layer's [n, d] activations), then ``result()``.

    Arguments as :func:`select_layer_cv`. The outer folds, inner folds and permuted labels are drawn here
    exactly as :func:`~prefjax.probes.nulls.nested_cv_ridge` draws them for the same ``seed``, ``outer``
    and ``inner`` (so ``per_layer_r`` equals its ``r`` layer by layer, and a factor set that served it
    serves this with no new decomposition)."""

    def __init__(self, y, *, alphas: Sequence[float] = DEFAULT_ALPHAS, outer: int = 5, inner: int = 5,
                 n_perm: int = 0, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                 standardize: bool = True, alpha_rule: str = "best"):
        self.y = check_finite("y", np.asarray(y, np.float64))
        if self.y.ndim != 1:
            raise ValueError(f"y must be 1-D, got shape {self.y.shape}")
        self.alphas, self.inner, self.n_perm, self.n_boot, self.level = check_cv_args(alphas, inner, n_perm,
                                                                                       n_boot, level)
        self.n, self.seed, self.standardize, self.alpha_rule = len(self.y), int(seed), bool(standardize), alpha_rule
        self.folds = outer_folds(self.n, outer, self.seed, None)
        self.trains, self.inner_ids = [], []
        for k, test in enumerate(self.folds):
            train = np.setdiff1d(np.arange(self.n), test)
            if len(train) < 2 * self.inner or len(test) < 3:
                raise ValueError(f"outer fold {k}: {len(train)} training / {len(test)} test tasks; need >= "
                                 f"{2 * self.inner} training (inner={self.inner}) and >= 3 test tasks")
            self.trains.append(train)
            self.inner_ids.append(kfold_ids(len(train), self.inner, self.seed + 1 + k, None))
        self.Y = permuted_labels(self.y, self.n_perm, np.random.default_rng([self.seed, 1]))   # [n, 1 + n_perm]
        P, K = self.Y.shape[1], len(self.folds)
        self.best_score_KxP = np.full((K, P), -np.inf)
        self.best_pred_NxP = np.full((self.n, P), np.nan)
        self.best_layer_KxP = np.full((K, P), -1, np.int64)
        self.best_alpha_KxP = np.full((K, P), -1, np.int64)
        self.layer_r: list[np.ndarray] = []        # per layer: nested r [P] (column 0 = the real labels)
        self.names: list = []
        self.decompositions = 0
        self.seconds = 0.0

    def add(self, factors: FactorSet, name=None) -> None:
        """Score one layer (its factor set) in every outer fold and fold it into the running selection."""
        t0 = time.time()
        if factors.n != self.n:
            raise ValueError(f"the factor set has {factors.n} rows; y has {self.n}")
        if factors.standardize != self.standardize:
            raise ValueError(f"factors were made with standardize={factors.standardize}, the selection asks "
                             f"{self.standardize}")
        li = len(self.names)
        before = factors.decompositions
        pred_NxP = np.full(self.Y.shape, np.nan)
        cols = np.arange(self.Y.shape[1])
        for k, (train, test) in enumerate(zip(self.trains, self.folds)):
            score_AxP, idx_P = inner_choice(factors, train, self.Y, self.inner_ids[k], self.alphas, self.alpha_rule)
            factor, fit = fit_rows(factors, train, self.Y, self.alphas)
            pred_AxTxP = predict_rows(factors, factor, fit, test)
            chosen_TxP = np.take_along_axis(pred_AxTxP, idx_P[None, None, :], 0)[0]
            pred_NxP[test] = chosen_TxP
            layer_score_P = score_AxP.max(0)   # the layer's inner r: its best alpha's mean inner r
            better = layer_score_P > self.best_score_KxP[k]   # strict: ties keep the earlier layer
            self.best_score_KxP[k, better] = layer_score_P[better]
            self.best_layer_KxP[k, better] = li
            self.best_alpha_KxP[k, better] = idx_P[better]
            self.best_pred_NxP[np.ix_(test, cols[better])] = chosen_TxP[:, better]
        self.layer_r.append(np.asarray(fold_mean_r(pred_NxP.T, self.Y.T, self.folds), np.float64))
        self.names.append(li if name is None else name)
        self.decompositions += factors.decompositions - before
        self.seconds += time.time() - t0

    def result(self) -> dict:
        """The estimate, its interval and nulls, the per-fold choices and the naive best-layer number."""
        if not self.names:
            raise ValueError("no layer was added")
        names = [int(n) if isinstance(n, (int, np.integer)) else str(n) for n in self.names]
        r_P = fold_mean_r(self.best_pred_NxP.T, self.Y.T, self.folds)
        obs = float(r_P[0])
        pred = self.best_pred_NxP[:, 0]
        rb = fold_mean_r(pred, self.y, self.folds, fold_bootstrap(self.folds, self.n_boot,
                                                               np.random.default_rng([self.seed, 2])))
        lo, hi = np.nanquantile(rb, [(1 - self.level) / 2, (1 + self.level) / 2])
        fold_layer = [names[int(i)] for i in self.best_layer_KxP[:, 0]]
        fold_r = [float(fold_mean_r(pred[t], self.y[t], [np.arange(len(t))])) for t in self.folds]
        counts: dict = {}
        for l in fold_layer:
            counts[str(l)] = counts.get(str(l), 0) + 1
        R_LxP = np.stack(self.layer_r)
        r_L = R_LxP[:, 0]
        best = int(np.nanargmax(np.where(np.isfinite(r_L), r_L, -2.0)))
        out = {"r": obs, "ci": [float(lo), float(hi)], "level": self.level,
               "fold_layer": fold_layer, "fold_alpha": [float(self.alphas[i]) for i in self.best_alpha_KxP[:, 0]],
               "fold_r": fold_r, "fold_n": [int(len(t)) for t in self.folds], "layer_counts": counts,
               "layers": names, "per_layer_r": r_L.tolist(), "alphas": self.alphas.tolist(),
               "alpha_rule": self.alpha_rule, "n_perm": self.n_perm, "outer": len(self.folds), "inner": self.inner,
               "best_layer": {"layer": names[best], "r": float(r_L[best])},
               "predictions": [float(v) for v in pred],
               "decompositions": int(self.decompositions), "seconds": float(self.seconds),
               "selection": "layer = largest mean inner-CV r (its best alpha) on the outer-training rows; "
                            f"alpha within that layer by the '{self.alpha_rule}' rule",
               "null_kind": "full selection null: labels permuted, layer and alpha re-chosen per outer fold"}
        if self.n_perm:
            out["null"] = null_summary(obs, r_P[1:])
            m_P = R_LxP.max(0)                      # max over layers, per label column
            out["best_layer"].update(
                p_max=float((1 + np.sum(m_P[1:] >= m_P[0])) / (1 + self.n_perm)),
                null_max_mean=float(m_P[1:].mean()),
                null_max_q95=float(np.quantile(m_P[1:], 0.95)),
                null="max over layers of the per-layer nested-CV r, the same permutation at every layer")
            out["per_layer_p"] = ((1 + np.sum(R_LxP[:, 1:] >= R_LxP[:, :1], 1)) / (1 + self.n_perm)).tolist()
        return out


def select_layer_cv(layers_X: Iterable, y, *, alphas: Sequence[float] = DEFAULT_ALPHAS, outer: int = 5,
                    inner: int = 5, n_perm: int = 0, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                    standardize: bool = True, alpha_rule: str = "best", names: Sequence | None = None,
                    factors: Sequence[FactorSet] | None = None) -> dict:
    """Held-out r of "ridge probe at the layer and alpha chosen by inner CV", layer choice inside the
    cross-validation (see the module docstring), with a bootstrap interval and a permutation null that
    re-runs the whole selection.

    Args:
      layers_X: the layers' activations, each [n, d] (a list, or a lazy sequence such as the pipeline's
        :class:`~prefjax.pipeline.LayerStack`: each is read once, one at a time); ignored where ``factors``
        are given.
      y: utilities [n].
      alphas, outer, inner, alpha_rule, standardize, seed: as :func:`~prefjax.probes.nulls.nested_cv_ridge`
        (``outer`` an int: K-fold).
      n_perm: permutations of the full selection null (and of the max-over-layers null of the naive number).
      n_boot, level: percentile bootstrap over test tasks within outer folds.
      names: the layers' names (default 0..L-1).
      factors: one :class:`~prefjax.probes.cvpath.FactorSet` per layer (shared with other calls; no new
        decomposition is made when they already served the same folds).

    Returns the dict of :meth:`LayerSelection.result`: ``r``, ``ci``, ``fold_layer``, ``fold_alpha``,
    ``fold_r``, ``layer_counts``, ``per_layer_r``, ``best_layer`` {layer, r[, p_max, null_max_mean,
    null_max_q95]}, ``null`` {n_perm, p_value, p_value_two_sided, mean, sd, quantiles, values} with ``n_perm > 0``,
    ``per_layer_p``, ``predictions``, ``decompositions`` and ``seconds``.
    """
    sel = LayerSelection(y, alphas=alphas, outer=outer, inner=inner, n_perm=n_perm, n_boot=n_boot, level=level,
                         seed=seed, standardize=standardize, alpha_rule=alpha_rule)
    sets = None if factors is None else list(factors)
    count = len(sets) if sets is not None else len(layers_X)
    if names is not None and len(names) != count:
        raise ValueError(f"names has {len(names)} entries for {count} layers")
    for li in range(count):  # a factor set is lazy: add() makes (and counts) its decompositions
        fs = sets[li] if sets is not None else FactorSet(layers_X[li], standardize=standardize)
        sel.add(fs, None if names is None else names[li])
    return sel.result()
