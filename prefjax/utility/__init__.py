"""Utilities from pairwise choices: Thurstonian fits and active learning."""

from prefjax.utility.thurstonian import ThurstonianConfig, ThurstonianFit, fit_thurstonian
from prefjax.utility.synthetic import SyntheticComparisons, make_comparisons, random_pairs

__all__ = ["ThurstonianConfig", "ThurstonianFit", "fit_thurstonian", "SyntheticComparisons",
           "make_comparisons", "random_pairs"]

from prefjax.utility.active import ActiveConfig, ActiveLearner, ActiveState, regular_graph, run_active

__all__ += ["ActiveConfig", "ActiveLearner", "ActiveState", "regular_graph", "run_active"]
