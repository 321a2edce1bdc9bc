"""Report figures (non-empty PNGs), Wilson intervals and report.md / summary.json."""

import json
import os

import numpy as np
import pytest

from prefjax.report import (dose_response, inlp_trajectory, probe_r_by_layer, transfer_heatmap,
                            utilities_by_topic, wilson_interval, write_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == PNG_MAGIC and os.path.getsize(path) > 2000


def _png_size(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    return img.shape, float(np.std(img[..., :3]))


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(5, 10)
    np.testing.assert_allclose([lo, hi], [0.2365931, 0.7634069], atol=1e-6)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611251, abs=1e-6)
    lo, hi = wilson_interval(np.array([3, 0]), np.array([4, 0]))
    assert (lo[1], hi[1]) == (0.0, 1.0) and 0 < lo[0] < 0.75 < hi[0] <= 1  # no trials: no information
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_figures_make_pngs(tmp_path):
    rng = np.random.default_rng(0)
    topics = ["math", "code", "harm", "fiction"] * 6
    mu = {"base": rng.normal(size=24), "pirate": rng.normal(size=24)}
    paths = [
        utilities_by_topic(mu, topics, tmp_path / "u.png"),
        probe_r_by_layer([0, 3, 6, 9], {"heldout": [0.2, 0.6, 0.8, 0.7], "loto": [0.1, 0.5, 0.7, 0.6],
                                        "content_baseline": [0.3] * 4}, tmp_path / "r.png"),
        transfer_heatmap(rng.uniform(-1, 1, (3, 3)), ["a", "b", "c"], tmp_path / "t.png",
                         baseline=np.eye(3)),
        transfer_heatmap(np.array([[1.0, np.nan], [0.2, 0.9]]), ["a", "b"], tmp_path / "t1.png"),
        dose_response([-2, -1, 0, 1, 2], [2, 10, 25, 40, 48], 50, tmp_path / "d.png",
                      refusal=[5, 1, 0, 1, 6], control={"k": [24, 25, 26, 24, 25], "n": 50,
                                                       "label": "random dir"}),
        inlp_trajectory([0, 1, 2, 3], [0.8, 0.6, 0.3, 0.1], [0.7, 0.5, 0.2, 0.05], [0.0, 0.02, -0.01, 0.0],
                        tmp_path / "i.png"),
    ]
    for p in paths:
        assert os.path.dirname(os.path.abspath(p)) == str(tmp_path)
        assert _is_png(p), p
        shape, spread = _png_size(p)
        assert shape[0] > 100 and shape[1] > 100 and spread > 0.01  # not a blank canvas
    # the two-panel heatmap is wider than the one-panel one
    assert _png_size(paths[2])[0][1] > _png_size(paths[3])[0][1]
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]


def test_figure_input_errors(tmp_path):
    with pytest.raises(ValueError, match="pirate"):
        utilities_by_topic({"pirate": np.zeros(3)}, ["a", "b"], tmp_path / "u.png")
    with pytest.raises(ValueError, match="loto"):
        probe_r_by_layer([0, 1], {"loto": [0.1]}, tmp_path / "r.png")
    with pytest.raises(ValueError, match="expected"):
        transfer_heatmap(np.zeros((2, 3)), ["a", "b"], tmp_path / "t.png")
    with pytest.raises(ValueError, match="k <= n"):
        dose_response([0, 1], [3, 60], 50, tmp_path / "d.png")
    assert not os.path.exists(tmp_path / "u.png")


def test_write_report_headline_and_summary(tmp_path, capfd):
    fig = probe_r_by_layer([0, 1], {"heldout": [0.1, 0.2]}, tmp_path / "figs" / "r.png")
    summary = {
        "headline": {"probe_r_heldout": np.float32(0.8123456), "n_tasks": np.int64(120),
                     "steer_slope": np.nan},
        "utility": {"mu": np.arange(3, dtype=np.float32), "fit_loss": 0.25},
        "model": "tiny",
    }
    path = write_report(tmp_path, summary, {"probe r by layer": fig},
                        [("Method", "Ridge on **resid_post**.")])
    text = open(path).read()
    assert path == os.path.join(str(tmp_path), "report.md")
    head_pos = text.index("## Headline")
    assert head_pos < text.index("## Figures") < text.index("## Method")
    assert "| probe_r_heldout | 0.8123 |" in text
    assert "| n_tasks | 120 |" in text
    assert "| steer_slope | — |" in text
    assert "![probe r by layer](figs/r.png)" in text
    assert "utility.fit_loss" in text
    data = json.load(open(tmp_path / "summary.json"))
    assert data["headline"]["steer_slope"] is None
    assert data["headline"]["n_tasks"] == 120
    assert data["utility"]["mu"] == [0.0, 1.0, 2.0]
    err = capfd.readouterr().err
    assert "non-finite" in err and "headline.steer_slope" in err


def test_write_report_top_level_scalars_as_headline(tmp_path):
    path = write_report(tmp_path, {"r": 0.5, "per_layer": [0.1, 0.2]}, {}, [])
    text = open(path).read()
    headline = text[text.index("## Headline"):text.index("## All summary values")]
    assert "| r | 0.5 |" in headline and "per_layer" not in headline


def _stats_fixture(n_pairs=24, p_probe=0.2, p_local=0.3):
    probes = {"layers": [0, 1], "persona": {"default": {"best_layer": 1, "per_layer": [
        {"layer": 0, "nested": {"r": 0.2, "ci": [0.0, 0.4], "p_value": 0.2, "n_perm": 100, "fold_alpha": [10.0] * 5}},
        {"layer": 1, "nested": {"r": 0.61, "ci": [0.42, 0.77], "p_value": 0.0099, "n_perm": 100,
                                "fold_alpha": [10.0, 10.0, 100.0, 10.0, 1000.0]}}]}}}
    transfer = {"persona_nested": {"p_value_two_sided": [[0.01, 0.02], [0.5, 0.01]], "n_perm": 200,
                                   "hangs_on_alpha": [[False, True], [False, False]]}}
    steering = {"n_pairs": n_pairs,
                "dose_slopes": {"linear_max": 0.1, "note": None, "alpha": 0.05, "power": 0.8,
                                "per_pair": {"probe": {"mean": 0.8, "ci": [-0.1, 1.7], "p_value": p_probe}},
                                "difference": {"mean": 0.5, "ci": [-0.4, 1.4], "p_value": 0.27}},
                "power": {"alpha": 0.05, "power": 0.8, "saturating_coefs": [-1.0, 1.0],
                          "mde_slope_probe_vs_zero": 1.234, "mde_slope_probe_vs_random": 1.5,
                          "n_pairs_for_observed_difference": 190},
                "local_slope": {"null": {"n_null": 1000, "effect": 0.004, "percentile": 80.0,
                                         "p_two_sided": p_local},
                                "detectable": {"abs_slope_p05": 0.0123, "abs_slope_p01": 0.0161,
                                               "abs_cosine_p05": 0.077, "abs_cosine_p01": 0.101}}}
    return probes, transfer, steering


def test_distinguishability_text_states_the_nulls_and_the_smallest_detectable_effect(tmp_path):
    from prefjax.report.build import distinguishability_text
    text = distinguishability_text(*_stats_fixture())
    assert text.startswith("**What is and is not distinguishable from the nulls**")
    assert "nested-CV held-out r = 0.61 [0.42, 0.77]" in text and "**distinguishable from shuffled labels**" in text
    assert "Alpha per outer fold: 10, 10, 100, 10, 1000 (spans 2 decades)" in text
    assert "1 of 2 cross-persona cells distinguishable" in text and "1 of 2 hang on alpha" in text
    assert ("at α = 0.05 with 80% power the dose-response test could detect a probe slope of 1.234 per unit coef"
            in text)
    assert "probe − random difference of 1.500" in text and "about 190 pairs" in text
    assert "saturating coefficients -1, 1 shown, not used for slopes" in text
    assert "**not distinguishable from 0**" in text and "**not distinguishable from the random direction**" in text
    assert "needs |slope| ≥ 0.0123 (|cosine with the slope gradient| ≥ 0.077)" in text
    assert "**not distinguishable from random directions**" in text
    # a significant local slope flips the verdict; without any stats there is nothing to say
    assert "**distinguishable from random directions**" in distinguishability_text(*_stats_fixture(p_local=0.001))
    assert distinguishability_text(None, None, None) == ""
    assert "p < 0.05 is impossible" not in text
    probes, transfer, steering = _stats_fixture()
    probes["persona"]["default"]["per_layer"][1]["nested"]["n_perm"] = 10
    assert "the smallest attainable p is 0.0909, so p < 0.05 is impossible" in distinguishability_text(probes, None, None)
    # write_report puts it first: under the title, before the headline
    path = write_report(tmp_path, {"headline": {"x": 1.0}}, {}, [("S", "body")], preamble=text)
    md = open(path).read()
    assert md.index("What is and is not distinguishable") < md.index("## Headline") < md.index("## S")


def test_layer_transfer_text_shows_intervals_and_flags_a_small_test_split(tmp_path):
    from prefjax.report.build import layer_transfer_text
    t = {"layers": [0, 2], "layer_r": [[0.9, 0.5], [0.4, 0.8]], "layer_r_lo": [[0.85, 0.3], [None, 0.7]],
         "layer_r_hi": [[0.95, 0.7], [None, 0.9]], "layer_level": 0.95, "layer_n_test": 12}
    text = layer_transfer_text(t)
    assert "| 0 | +0.90 [+0.85, +0.95] | +0.50 [+0.30, +0.70] |" in text
    assert "| 2 | +0.40 [—, —] | +0.80 [+0.70, +0.90] |" in text
    assert "**Small held-out split:** only 12 test tasks" in text and "12 test tasks" in text
    assert "Small held-out split" not in layer_transfer_text(dict(t, layer_n_test=200))
    # a transfer stage from before the intervals existed still reports, saying so
    assert "No intervals" in layer_transfer_text({"layers": [0, 2], "layer_r": t["layer_r"]})
    # many layers: same-layer and next-layer cells only
    L = 20
    big = {"layers": list(range(L)), "layer_r": np.eye(L).tolist(), "layer_r_lo": (np.eye(L) - 0.1).tolist(),
           "layer_r_hi": (np.eye(L) + 0.1).tolist(), "layer_n_test": 100}
    bt = layer_transfer_text(big)
    assert "| 0 | +1.00 [+0.90, +1.10] | +0.00 [-0.10, +0.10] |" in bt and "summary.json has all" in bt
    # the heatmap writes each cell's interval (None = undefined) and refuses half an interval
    p = transfer_heatmap(np.asarray(t["layer_r"]), ["0", "2"], tmp_path / "tl.png", ci_lo=t["layer_r_lo"],
                         ci_hi=t["layer_r_hi"])
    assert _is_png(p)
    with pytest.raises(ValueError, match="both"):
        transfer_heatmap(np.asarray(t["layer_r"]), ["0", "2"], tmp_path / "x.png", ci_lo=t["layer_r_lo"])
    with pytest.raises(ValueError, match="ci_lo"):
        transfer_heatmap(np.asarray(t["layer_r"]), ["0", "2"], tmp_path / "x.png", ci_lo=[[0.0]], ci_hi=[[0.0]])


def test_family_of_tests_holm_table_and_the_layer_chosen_inside_cv():
    from prefjax.report.build import (adjust_family, distinguishability_text, family_of_tests, family_text,
                                      layer_selected_text)
    probes, transfer, steering = _stats_fixture()
    ps = probes["persona"]["default"]
    ps["per_layer"][1]["heldout_p"] = 0.03
    probes["n_perm"] = 100
    ps["layer_selected"] = {"r": 0.55, "ci": [0.3, 0.7], "fold_layer": [1, 1, 0, 1, 1], "fold_alpha": [10.0] * 5,
                            "null": {"p_value": 0.001, "n_perm": 999},
                            "best_layer": {"layer": 1, "r": 0.61, "p_max": 0.002}}
    transfer["persona_nested"]["names"] = ["default", "evil"]
    extra = {"pref_shift": {"shifts": {"evil": {"heldout": {"tracking": {"p_value": 0.04}}}}}}
    rows = family_of_tests(probes, transfer, steering, extra, ["default"])
    by = {r["test"]: r for r in rows}
    assert by["probe r, layer chosen inside CV [default]"]["p"] == 0.001
    assert by["probe r, layer chosen inside CV [default]"]["n_perm"] == 999
    assert by["saved probe test-split r, layer 1 [default]"]["p"] == 0.03
    assert by["cross-persona transfer default → evil"]["p"] == 0.02  # off-diagonal cells only
    assert "cross-persona transfer default → default" not in by
    assert by["steering slope, random direction vs 0"]["p"] is None  # not in the fixture: listed, not counted
    mult = adjust_family(rows)
    assert mult["method"] == "holm" and mult["m"] == 8
    t = {r["test"]: r for r in mult["tests"]}
    # Holm by hand over the 8 raw p: 0.001 x 8 = 0.008; 0.02 x 7 = 0.14; 0.03 x 6 = 0.18; 0.04 x 5 = 0.2; ...
    assert t["probe r, layer chosen inside CV [default]"]["p_holm"] == pytest.approx(0.008)
    assert t["cross-persona transfer default → evil"]["p_holm"] == pytest.approx(0.14)
    assert t["saved probe test-split r, layer 1 [default]"]["p_holm"] == pytest.approx(0.18)
    assert t["preference-shift tracking [evil]"]["p_holm"] == pytest.approx(0.2)
    assert t["cross-persona transfer evil → default"]["p_holm"] == pytest.approx(0.81)  # 0.5 x 1, capped below
    assert t["probe r, layer chosen inside CV [default]"]["floor"] == pytest.approx(1e-3)
    assert mult["n_significant_raw"] == 4 and mult["n_significant_holm"] == 1
    json.loads(json.dumps(mult))
    text = family_text(mult)
    assert "| probe r, layer chosen inside CV [default] |" in text and "| 0.001 | **0.008** |" in text
    assert "999 (0.001)" in text and "Holm's step-down procedure" in text and "1 Holm-adjusted p < 0.05" in text
    pre = distinguishability_text(probes, transfer, steering, mult)
    assert ("layer chosen inside the cross-validation (per outer fold: 1, 1, 0, 1, 1): held-out r = 0.55 "
            "[0.30, 0.70]") in pre
    assert "Holm-adjusted p = 0.008: **distinguishable after the family-wise correction**" in pre
    assert "best single layer 1 (optimistic: the largest nested-CV r of 2 layers)" in pre
    assert "p = 0.002 against the maximum over layers of the permuted per-layer r" in pre
    assert "1 of the report's 8 tests survive: probe r, layer chosen inside CV [default]" in pre
    tab = layer_selected_text(probes, ["default"])
    assert "| default | 0.550 [0.300, 0.700] | 0.001 (999) | 1, 1, 0, 1, 1 | 10, 10, 10, 10, 10 | 1: 0.610 | 0.002 |" in tab
    # a probes stage from before the selection: no table, and the opening keeps its old probe line
    del ps["layer_selected"]
    assert layer_selected_text(probes, ["default"]) == ""
    assert "nested-CV held-out r = 0.61 [0.42, 0.77]" in distinguishability_text(probes, None, None)


def test_below_chance_values_are_marked():
    """An AUC under 0.5 gets the ▼ mark, one at or above chance does not; undefined values are not flagged."""
    from prefjax.report.build import below_chance_mark
    assert below_chance_mark(0.44).endswith("▼") and below_chance_mark(0.3).endswith("▼")
    assert "▼" not in below_chance_mark(0.5) and "▼" not in below_chance_mark(0.81)
    assert "▼" not in below_chance_mark(None) and "▼" not in below_chance_mark(float("nan"))
