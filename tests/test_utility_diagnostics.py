"""prefjax.utility.diagnostics on synthetic comparisons with known answers, each with a case that must fail."""

import itertools
import math

import numpy as np
import pytest
from scipy.special import ndtr

from prefjax.report.build import utilities_construct_text
from prefjax.store import Comparison, ComparisonsStore
from prefjax.utility.diagnostics import (diagnostic_warnings, heldout_accuracy, order_averaged,
                                         order_averaged_spread, position_bias, reply_counts, utility_diagnostics)


def _row(a, b, order, pick_first, *, sample=0, status="ok", p_a=None, refusal=False, persona="p"):
    """A stored-row dict (as ComparisonsStore.rows returns) where the model picked the first-shown task or not."""
    choice = None if status != "ok" else ("A" if pick_first else "B")
    return Comparison(task_a=a, task_b=b, order=order, persona=persona, sample=sample, choice=choice,
                      chosen_task=None, status=status, refusal=refusal, p_a=p_a).validated().to_dict()


def _pairs(n):
    return [(f"t{a:02d}", f"t{b:02d}") for a, b in itertools.combinations(range(n), 2)]


def _always_first(n=8):
    """Every pair in both orders; the model always picks the task shown first."""
    return [_row(a, b, o, True) for a, b in _pairs(n) for o in ("AB", "BA")]


def _prefers_lower(n=8):
    """Every pair in both orders; the model always picks the task with the lower id, wherever it is shown."""
    return [_row(a, b, o, o == "AB") for a, b in _pairs(n) for o in ("AB", "BA")]


# ------------------------------------------------------------------------------------------ position bias

def test_position_bias_all_first_is_one():
    rows = _always_first()
    pb = position_bias(rows)
    n = len(rows)
    assert pb["n_parsed"] == n and pb["n_first"] == n and pb["rate"] == 1.0
    assert pb["ci"][1] == 1.0 and 0.9 < pb["ci"][0] < 1.0
    assert pb["p_value"] == pytest.approx(2 * 0.5 ** n)  # exact two-sided binomial: both tails of the extreme
    assert pb["mean_p_first"] is None and pb["n_p"] == 0


def test_position_bias_inverted_and_balanced():
    inv = [_row(a, b, o, False) for a, b in _pairs(8) for o in ("AB", "BA")]
    pb = position_bias(inv)
    assert pb["rate"] == 0.0 and pb["ci"][0] == 0.0 and pb["p_value"] < 1e-10
    bal = position_bias(_prefers_lower())  # the position decides nothing: half the picks are first-shown
    assert bal["rate"] == 0.5 and bal["p_value"] == pytest.approx(1.0) and bal["ci"][0] < 0.5 < bal["ci"][1]


def test_position_bias_skips_non_choices_and_reads_p_a():
    rows = [_row("a", "b", "AB", True, p_a=0.9), _row("a", "b", "BA", False, p_a=0.3),
            _row("a", "c", "AB", None, status="refusal"), _row("a", "c", "BA", None, status="unparseable")]
    pb = position_bias(rows)
    assert pb["n_parsed"] == 2 and pb["n_first"] == 1 and pb["rate"] == 0.5
    assert pb["mean_p_first"] == pytest.approx(0.6) and pb["n_p"] == 2
    empty = position_bias([])
    assert empty["rate"] is None and empty["p_value"] is None and empty["ci"] == [0.0, 1.0]


# -------------------------------------------------------------------------------- order-averaged spread

def test_order_averaged_pure_position_bias_is_indifferent():
    oa = order_averaged_spread(_always_first())
    assert oa["n_pairs"] == 28 and oa["n_pairs_one_order"] == 0
    assert oa["min"] == oa["max"] == 0.5 and oa["max_abs_dev"] == 0.0 and oa["frac_within_tol"] == 1.0


def test_order_averaged_strong_preference_is_far_from_half():
    oa = order_averaged_spread(_prefers_lower())
    assert oa["min"] == oa["max"] == 1.0 and oa["max_abs_dev"] == 0.5 and oa["frac_within_tol"] == 0.0
    inv = order_averaged_spread([_row(a, b, o, o == "BA") for a, b in _pairs(8) for o in ("AB", "BA")])
    assert inv["min"] == inv["max"] == 0.0 and inv["max_abs_dev"] == 0.5  # the opposite side, same distance


def test_order_averaged_soft_and_samples():
    rows = [_row("a", "b", "AB", True, p_a=0.8),             # P(a) = 0.8 with a first
            _row("a", "b", "BA", True, p_a=0.6),             # P(a) = 0.4 with a second
            _row("c", "d", "AB", True, sample=0), _row("c", "d", "AB", False, sample=1),  # P(c | c first) = 0.5
            _row("d", "c", "AB", False, sample=0),           # shown as (d, c): c picked with c second: P(c) = 1
            _row("e", "f", "AB", True)]                      # one order only: left out
    pairs, p = order_averaged(rows, soft=True)
    assert pairs == [("a", "b"), ("c", "d")]
    np.testing.assert_allclose(p, [0.6, 0.75])
    hard_pairs, hard = order_averaged(rows, soft=False)  # hard picks: a first picked, b first picked -> 0.5
    np.testing.assert_allclose(hard, [0.5, 0.75])
    oa = order_averaged_spread(rows, soft=True, tol=0.1)
    assert oa["n_pairs"] == 2 and oa["n_pairs_one_order"] == 1 and oa["frac_within_tol"] == 0.5
    assert order_averaged_spread(rows[-1:])["min"] is None


# ---------------------------------------------------------------------------------------- held-out fit

def _planted(n_tasks=40, samples=4, scale=2.0, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, scale, n_tasks)
    i, j = (np.array(x) for x in zip(*itertools.combinations(range(n_tasks), 2)))
    wi = rng.binomial(samples, ndtr((mu[i] - mu[j]) / math.sqrt(2)))
    return i, j, wi, samples - wi


def test_heldout_planted_utility_beats_constant():
    i, j, wi, wj = _planted()
    h = heldout_accuracy(i, j, wi, wj, 40, k=5, seed=0)
    c = h["constant"]
    assert h["k"] == 5 and h["n_pairs"] == len(i) and 0 < h["n_majority"] <= len(i)
    assert c == {"accuracy": 0.5, "log_loss": math.log(2), "majority_accuracy": 0.5, "majority_log_loss": math.log(2)}
    assert h["majority_accuracy"] > 0.85 and h["accuracy"] > 0.7
    assert h["log_loss"] < c["log_loss"] - 0.2 and h["majority_log_loss"] < h["log_loss"]
    assert h["log_loss_floor"] <= h["log_loss"]
    assert diagnostic_warnings({"heldout": h}) == []
    assert heldout_accuracy(i, j, wi, wj, 40, k=5, seed=0) == h  # deterministic


def test_heldout_random_choices_near_half():
    rng = np.random.default_rng(1)
    i, j, _, _ = _planted()
    wi = rng.binomial(4, 0.5, len(i))
    h = heldout_accuracy(i, j, wi, 4 - wi, 40, k=5, seed=0)
    assert abs(h["majority_accuracy"] - 0.5) < 0.08 and abs(h["accuracy"] - 0.5) < 0.06
    assert h["log_loss"] > h["constant"]["log_loss"] - 0.01  # no better than the constant
    assert any("no better than a constant" in w for w in diagnostic_warnings({"heldout": h}))


def test_heldout_intransitive_choices_fail():
    """A cyclic tournament (each task beats the next half of the circle) has no utility order: the fit must
    not predict held-out pairs, although every pair is decided."""
    n = 41
    i, j = (np.array(x) for x in zip(*itertools.combinations(range(n), 2)))
    i_wins = ((j - i) % n) <= n // 2
    wi = np.where(i_wins, 4, 0)
    h = heldout_accuracy(i, j, wi, 4 - wi, n, k=5, seed=0)
    assert h["n_majority"] == len(i) and h["majority_accuracy"] < 0.6
    planted = heldout_accuracy(*_planted(n_tasks=n), n, k=5, seed=0)
    assert planted["majority_accuracy"] > h["majority_accuracy"] + 0.25


def test_heldout_swapped_sides_same_result():
    i, j, wi, wj = _planted(seed=3)
    a = heldout_accuracy(i, j, wi, wj, 40, k=4, seed=2)
    b = heldout_accuracy(j, i, wj, wi, 40, k=4, seed=2)
    assert a["majority_accuracy"] == pytest.approx(b["majority_accuracy"], abs=1e-6)
    assert a["log_loss"] == pytest.approx(b["log_loss"], abs=1e-4)


def test_heldout_small_and_bad_input():
    h = heldout_accuracy([0], [1], [1], [0], 2)
    assert h["accuracy"] is None and h["constant"]["log_loss"] is None and h["n_pairs"] == 1
    assert heldout_accuracy([0, 0, 1], [1, 2, 2], [1, 1, 0], [0, 0, 1], 3, k=10)["k"] == 3
    with pytest.raises(ValueError, match="k must be >= 2"):
        heldout_accuracy([0, 1], [1, 2], [1, 1], [0, 0], 3, k=1)


# ---------------------------------------------------------------------------------------------- replies

def test_reply_counts():
    rows = [_row("a", "b", "AB", True), _row("a", "b", "BA", True, refusal=True),
            _row("a", "c", "AB", None, status="refusal"), _row("a", "c", "BA", None, status="unparseable"),
            _row("b", "c", "AB", None, status="both")]
    rc = reply_counts(rows)
    assert rc == {"n_rows": 5, "ok": 2, "refusal": 1, "unparseable": 1, "both": 1, "unparsed": 2,
                  "refusal_flagged": 1, "declined_other": 0, "no_choice_share": 0.6}
    assert any("were no choice" in w for w in diagnostic_warnings({"replies": rc}))
    assert reply_counts([])["no_choice_share"] is None


# ------------------------------------------------------------------------------------- store end to end

def _store(tmp_path, rows):
    s = ComparisonsStore(str(tmp_path / "cmp"))
    s.append(rows)
    return s


def test_utility_diagnostics_position_only_model_is_flagged(tmp_path):
    ids = [f"t{k:02d}" for k in range(8)]
    s = _store(tmp_path, _always_first() + [_row("t00", "t01", "AB", True, persona="other")])
    d = utility_diagnostics(s, ids, "p", soft=False, k=4)
    assert set(d) == {"position_bias", "order_averaged", "heldout", "replies", "warnings"}
    assert d["position_bias"]["rate"] == 1.0 and d["replies"]["n_rows"] == 56
    assert d["order_averaged"]["frac_within_tol"] == 1.0
    # every pair ties (one win each way): no majority, and the fit predicts 0.5 -> no better than constant
    assert d["heldout"]["n_majority"] == 0 and d["heldout"]["majority_accuracy"] is None
    w = " ".join(d["warnings"])
    assert "position bias" in w and "56 of 56" in w and "within ±0.05 of 0.5" in w


def test_utility_diagnostics_real_preference_not_flagged(tmp_path):
    ids = [f"t{k:02d}" for k in range(8)]
    s = _store(tmp_path, _prefers_lower())
    d = utility_diagnostics(s, ids, "p", soft=False, k=4)
    assert d["position_bias"]["rate"] == 0.5 and d["order_averaged"]["frac_within_tol"] == 0.0
    assert d["heldout"]["majority_accuracy"] > 0.75 and d["heldout"]["log_loss"] < math.log(2)
    assert d["warnings"] == []


def test_report_section(tmp_path):
    ids = [f"t{k:02d}" for k in range(8)]
    bad = utility_diagnostics(_store(tmp_path / "a", _always_first()), ids, "p", soft=False, k=4)
    good = utility_diagnostics(_store(tmp_path / "b", _prefers_lower()), ids, "p", soft=False, k=4)
    text = utilities_construct_text({"bad": {"diagnostics": bad}, "good": {"diagnostics": good},
                                     "old": {"n_pairs": 3}}, ["bad", "good", "old"])
    assert "| bad | 56/56 = 1.000 [" in text and "| good | 28/56 = 0.500 [" in text and "| old |" not in text
    assert "**Warning [bad]**: position bias" in text and "Warning [good]" not in text
    assert utilities_construct_text({"old": {"n_pairs": 3}}, ["old"]) == ""
