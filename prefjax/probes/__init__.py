"""Probes from activations to utilities: ridge (every fold, alpha and label column from one float64
decomposition: :mod:`prefjax.probes.cvpath`), Bradley-Terry,
metrics, controls (leave-one-topic-out, baselines, nulls, transfer, INLP, persona cosine) and inference
(nested cross-validation, shuffle nulls, transfer over the alpha grid, random-direction nulls, the layer
chosen inside the cross-validation: :mod:`prefjax.probes.layersel`)."""

from prefjax.probes.bt import fit_bt_probe
from prefjax.probes.cvpath import FactorSet, decomposition_count, fit_probe
from prefjax.probes.controls import (compare_with_baseline, default_splits, inlp, leave_one_topic_out,
                                     persona_direction_cosine, persona_identity_control, shuffle_null,
                                     transfer_matrix,
                                     utility_correlation)
from prefjax.probes.nulls import (choose_alpha_cv, kfold_ids, nested_cv_ridge, nested_transfer, random_direction_null,
                                  random_unit_directions)
from prefjax.probes.layersel import LayerSelection, select_layer_cv
from prefjax.probes.metrics import bootstrap_ci, choice_accuracy, evaluate_probe, pairwise_accuracy, pearson
from prefjax.probes.ridge import (DEFAULT_ALPHAS, RidgePath, RidgeProbe, check_finite, fit_ridge, fit_ridge_at,
                                   split_indices)

__all__ = ["FactorSet", "decomposition_count", "fit_probe", "fit_ridge", "fit_ridge_at", "RidgeProbe", "RidgePath", "DEFAULT_ALPHAS", "evaluate_probe", "pairwise_accuracy",
           "choice_accuracy", "pearson", "bootstrap_ci", "leave_one_topic_out", "fit_bt_probe",
           "transfer_matrix", "shuffle_null", "inlp", "persona_direction_cosine", "persona_identity_control", "compare_with_baseline",
           "utility_correlation", "default_splits", "split_indices", "check_finite", "kfold_ids", "choose_alpha_cv", "nested_cv_ridge",
           "nested_transfer", "random_direction_null", "random_unit_directions", "LayerSelection", "select_layer_cv"]
