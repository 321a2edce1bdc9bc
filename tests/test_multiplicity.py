"""Holm and Benjamini–Hochberg adjusted p-values (prefjax.multiplicity): hand-computed cases and properties."""

import numpy as np
import pytest
from scipy import stats

from prefjax.multiplicity import adjust, benjamini_hochberg, holm, permutation_floor


def test_holm_by_hand():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06)
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02], rtol=0, atol=1e-15)
    # capped at 1, and the cap carries to larger raw p
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    np.testing.assert_allclose(holm([0.2]), [0.2])
    # ties get one value
    np.testing.assert_allclose(holm([0.01, 0.01, 0.2]), [0.03, 0.03, 0.2])
    assert holm([]).shape == (0,)


def test_bh_by_hand():
    # sorted: 4 x 0.005 / 1 = 0.02, 4 x 0.01 / 2 = 0.02, 4 x 0.03 / 3 = 0.04, 4 x 0.04 / 4 = 0.04
    np.testing.assert_allclose(benjamini_hochberg([0.01, 0.04, 0.03, 0.005]), [0.02, 0.04, 0.04, 0.02],
                               rtol=0, atol=1e-15)
    # the step-up minimum: 0.04 x 3 / 2 = 0.06 exceeds the largest's 0.045 x 3 / 3 = 0.045
    np.testing.assert_allclose(benjamini_hochberg([0.001, 0.04, 0.045]), [0.003, 0.045, 0.045])
    np.testing.assert_allclose(adjust([0.3, 0.9], "bh"), [0.6, 0.9])


def test_ordering_matters():
    """An implementation that multiplied p-values in input order (not sorted) would fail here."""
    np.testing.assert_allclose(holm([0.04, 0.01]), [0.04, 0.02])
    np.testing.assert_allclose(holm([0.01, 0.04]), [0.02, 0.04])
    np.testing.assert_allclose(benjamini_hochberg([0.04, 0.01]), [0.04, 0.02])
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.uniform(0, 0.2, rng.integers(1, 12))
        perm = rng.permutation(len(p))
        for f in (holm, benjamini_hochberg):
            np.testing.assert_allclose(f(p[perm]), f(p)[perm], rtol=0, atol=1e-15)


def test_properties_on_random_families():
    rng = np.random.default_rng(1)
    for _ in range(200):
        m = int(rng.integers(1, 30))
        p = rng.uniform(0, 1, m) ** rng.uniform(0.2, 4)
        p[rng.random(m) < 0.2] = p[0]  # some ties
        h, b = holm(p), benjamini_hochberg(p)
        order = np.argsort(p, kind="stable")
        for adj in (h, b):
            assert np.all(adj >= p - 1e-15) and np.all(adj <= 1.0)
            assert np.all(np.diff(adj[order]) >= -1e-15)  # monotone in the raw p's order
        assert np.all(h >= b - 1e-15)                      # Holm is the stricter
        assert np.all(h <= np.minimum(1.0, m * p) + 1e-15)  # and never worse than Bonferroni
        np.testing.assert_allclose(b, stats.false_discovery_control(p, method="bh"), rtol=1e-12, atol=1e-15)


def test_holm_controls_the_family_wise_error_under_the_global_null():
    rng = np.random.default_rng(2)
    p = rng.uniform(size=(20000, 10))
    fwer = np.mean([holm(row).min() < 0.05 for row in p])
    assert fwer <= 0.055
    assert np.mean(p.min(1) < 0.05) > 0.35  # what no correction gives


def test_bad_input_and_floor():
    with pytest.raises(ValueError, match="p-value 1"):
        holm([0.1, 1.5])
    with pytest.raises(ValueError, match="p-value 0"):
        benjamini_hochberg([np.nan])
    with pytest.raises(ValueError, match="1-D"):
        holm([[0.1]])
    with pytest.raises(ValueError, match="method"):
        adjust([0.1], "bonferroni")
    assert permutation_floor(999) == pytest.approx(1e-3) and permutation_floor(0) is None
    assert permutation_floor(None) is None
