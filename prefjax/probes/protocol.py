"""The probes stage's protocol for one matrix of activations (one layer and persona, or the content
baseline): nested cross-validation with its shuffle null, the fixed split and the probe saved from it,
and leave-one-topic-out, all from one :class:`~prefjax.probes.cvpath.FactorSet` (for raw features one
float64 decomposition; with ``standardize`` one per outer training set). The pipeline's probes stage
and ``bench/bench_probes.py`` both call :func:`probe_layer`, so the bench times the stage's own code.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from prefjax.probes.controls import leave_one_topic_out
from prefjax.probes.cvpath import FactorSet, fit_probe
from prefjax.probes.metrics import bootstrap_ci, evaluate_probe
from prefjax.probes.nulls import nested_cv_ridge
from prefjax.probes.ridge import RidgeProbe

__all__ = ["ProbeProtocol", "LayerProbes", "probe_layer", "run_decompositions"]


@dataclasses.dataclass(frozen=True)
class ProbeProtocol:
    """The settings :func:`probe_layer` applies (the ``probes`` config section plus the run's seed):
    ridge ``alphas``, ``cv_outer`` / ``cv_inner`` folds, ``n_perm`` shuffle permutations, ``standardize``,
    ``alpha_rule`` ("best" | "1se") and ``seed``."""
    alphas: tuple
    cv_outer: int
    cv_inner: int
    n_perm: int
    standardize: bool
    alpha_rule: str
    seed: int


@dataclasses.dataclass
class LayerProbes:
    """What :func:`probe_layer` gives for one matrix: ``nested`` (:func:`nested_cv_ridge` over all tasks,
    with its null), ``split`` (the same procedure with the fixed test split as the one outer fold),
    ``probe`` (fitted on the tasks outside the test split at the alpha ``split`` chose), ``heldout``
    (that probe on the test split: r, pairwise_acc, mse, n), ``loto_r`` / ``loto_ci`` / ``loto_alpha``
    (pooled leave-one-topic-out r, its bootstrap interval, the alpha per held-out topic),
    ``decompositions`` (float64 decompositions made) and ``seconds`` (wall time)."""
    nested: dict
    split: dict
    probe: RidgeProbe
    heldout: dict
    loto_r: float | None
    loto_ci: list
    loto_alpha: dict
    decompositions: int
    seconds: float


def probe_layer(X_NxD, y, topics, protocol: ProbeProtocol, test, factors: FactorSet | None = None) -> LayerProbes:
    """Run the probes protocol on one activation matrix ``X_NxD`` against utilities ``y`` [n]; ``topics``
    [n] for leave-one-topic-out; ``test`` the fixed test split (the saved probe is fitted on the rest).
    ``factors``: a :class:`~prefjax.probes.cvpath.FactorSet` of ``X_NxD`` (``protocol.standardize``) to fill
    and share with later calls on the same layer (the probes stage passes it on to
    :class:`prefjax.probes.layersel.LayerSelection`); made here when None."""
    t0 = time.time()
    p = protocol
    n = len(y)
    test = np.asarray(test, np.int64)
    fit_idx = np.setdiff1d(np.arange(n), test)
    if factors is not None and (factors.standardize != p.standardize or factors.X.shape != np.shape(X_NxD)):
        raise ValueError(f"factors (standardize={factors.standardize}, X {factors.X.shape}) do not match the "
                         f"protocol (standardize={p.standardize}) and X {np.shape(X_NxD)}")
    fs = FactorSet(X_NxD, standardize=p.standardize) if factors is None else factors
    made = fs.decompositions
    kw = dict(alphas=p.alphas, inner=p.cv_inner, seed=p.seed, standardize=p.standardize, alpha_rule=p.alpha_rule,
              n_perm=p.n_perm, factors=fs, final_alpha=False)
    nested = nested_cv_ridge(fs.X, y, outer=p.cv_outer, **kw)
    split = nested_cv_ridge(fs.X, y, outer=[test], **kw)
    probe = fit_probe(fs, y, split["fold_alpha"][0], fit_idx, alphas=p.alphas, cv_r=split["inner_r"][0])
    heldout = evaluate_probe(probe, fs.X, y, test)
    loto = leave_one_topic_out(fs.X, y, topics, alphas=p.alphas, inner=p.cv_inner, alpha_rule=p.alpha_rule,
                               seed=p.seed, standardize=p.standardize, factors=fs)
    alpha_by = {str(k): v for k, v in loto["alpha_by_topic"].items()}
    loto_r, loto_ci = loto["pooled_r"], [None, None]
    if loto_r is not None:  # None: every held-out prediction constant, r undefined, no interval
        try:
            ci = bootstrap_ci(loto["predictions"], y, seed=p.seed)
            loto_ci = [ci["lo"], ci["hi"]]
        except ValueError:  # too few resamples with a defined r (near-constant predictions)
            pass
    return LayerProbes(nested, split, probe, heldout, loto_r, loto_ci, alpha_by, fs.decompositions - made,
                       time.time() - t0)


def run_decompositions(*, n_layers: int, personas: int, standardize: bool, outer: int, n_topics: int,
                       inlp_iter: int) -> dict[str, int]:
    """Float64 decompositions the probes, transfer and INLP stages make (each ``d_model``-square, or
    ``n``-square when there are fewer tasks than dimensions), by stage:

    * probes: per (layer, persona) and once per persona for the content baseline, 1 for raw features (one
      factor of all tasks serves the nested CV, its null, the fixed split, the saved probe and
      leave-one-topic-out), else ``outer`` + 1 (the split) + ``n_topics`` (one per held-out topic);
    * transfer: one per persona at the best layer for raw features (else the training split's and each
      outer training set's), plus one per layer for the cross-layer matrix;
    * INLP: one per iteration for the real and the shuffled run, ``2 (inlp_iter + 1)`` (0 when off).
    """
    per = 1 if not standardize else outer + 1 + n_topics
    transfer = (personas if not standardize else personas * (1 + outer)) if personas > 1 else 0
    return {"probes": per * (n_layers + 1) * personas, "transfer": transfer + n_layers,
            "inlp": 2 * (inlp_iter + 1) if inlp_iter > 0 else 0}
