"""Assemble a run's ``summary.json``, ``report.md`` and figures from the stage results."""

from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from prefjax.report.figures import (dose_response, inlp_trajectory, probe_r_by_layer, transfer_heatmap,
                                    utilities_by_topic)
from prefjax.multiplicity import benjamini_hochberg, holm, permutation_floor
from prefjax.report.summary import write_report
from prefjax.utility.diagnostics import diagnostic_warnings


def _fmt(x, nd=3):
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def _ci(x, ci, nd=3) -> str:
    """``x [lo, hi]`` (or just ``x`` without an interval)."""
    if ci is None or ci[0] is None:
        return _fmt(x, nd)
    return f"{_fmt(x, nd)} [{_fmt(ci[0], nd)}, {_fmt(ci[1], nd)}]"


def _alphas(vals) -> str:
    return ", ".join(f"{a:g}" for a in vals)


def _alpha_spread(vals) -> str:
    """'stable' when every fold chose the same alpha, else the span in decades."""
    v = np.log10(np.asarray(vals, float))
    span = float(v.max() - v.min()) if v.size else 0.0
    return "stable" if span == 0 else f"spans {span:g} decade{'s' if span != 1 else ''}"


def _verdict(p, level=0.05) -> str:
    return "n/a (no null run)" if p is None else ("distinguishable" if p < level else "not distinguishable")


def distinguishability_text(probes: dict | None, transfer: dict | None, steering: dict | None,
                            multiplicity: dict | None = None) -> str:
    """The report's opening paragraph: in words, which numbers are and are not distinguishable from their
    nulls (label-shuffle for probes and transfer, random directions for steering) and the smallest
    steering effect the run could detect. ``multiplicity`` (:func:`adjust_family`): the Holm-adjusted p of
    each test is stated too, and which tests survive the family-wise correction."""
    lines = []
    holm_of = {t["test"]: t["p_holm"] for t in (multiplicity or {}).get("tests", [])}
    if probes:
        n_layers = len(probes.get("layers", []))
        for p, ps in probes.get("persona", {}).items():
            best = next(d for d in ps["per_layer"] if d["layer"] == ps["best_layer"])
            nst = best.get("nested")
            if nst is None:
                continue
            ls = ps.get("layer_selected")
            if ls:
                nl = ls.get("null") or {}
                ph = holm_of.get(f"probe r, layer chosen inside CV [{p}]")
                lines.append(f"- **Probe [{p}]**, layer chosen inside the cross-validation (per outer fold: "
                             f"{', '.join(str(l) for l in ls['fold_layer'])}): held-out r = {_ci(ls['r'], ls['ci'], 2)}; "
                             f"permutation p = {_fmt(nl.get('p_value'), 3)} ({nl.get('n_perm', 0)} permutations, the "
                             f"layer and alpha re-chosen in each{_perm_floor(nl.get('n_perm', 0))}): "
                             f"**{_verdict(nl.get('p_value'))} from shuffled labels**"
                             + ("" if ph is None else f"; Holm-adjusted p = {_fmt(ph, 3)}: **{_verdict(ph)} after "
                                                      "the family-wise correction**") + ".")
            pv = nst.get("p_value")
            if ls:  # the best single layer: optimistic, tested against the maximum over layers
                bl = ls["best_layer"]
                lines.append(f"- **Probe [{p}]**, best single layer {ps['best_layer']} (optimistic: the largest "
                             f"nested-CV r of {n_layers} layers): r = {_ci(nst['r'], nst['ci'], 2)}; p = "
                             f"{_fmt(bl.get('p_max'), 3)} against the maximum over layers of the permuted per-layer "
                             f"r (its own shuffle p = {_fmt(pv, 3)} ignores the layer choice). Alpha per outer fold: "
                             f"{_alphas(nst['fold_alpha'])} ({_alpha_spread(nst['fold_alpha'])}).")
                continue
            lines.append(f"- **Probe [{p}]**, layer {ps['best_layer']}: nested-CV held-out r = {_ci(nst['r'], nst['ci'], 2)}"
                         f"; label-shuffle p = {_fmt(pv, 3)} ({nst.get('n_perm', 0)} permutations, alpha re-chosen "
                         f"in each{_perm_floor(nst.get('n_perm', 0))}): **{_verdict(pv)} from shuffled labels**. "
                         f"Alpha per outer fold: {_alphas(nst['fold_alpha'])} ({_alpha_spread(nst['fold_alpha'])}).")
    if transfer and transfer.get("persona_nested") and transfer["persona_nested"].get("p_value_two_sided") is not None:
        nt = transfer["persona_nested"]
        pv = np.asarray(nt["p_value_two_sided"], float)
        off = ~np.eye(len(pv), dtype=bool)
        k, m = int(np.sum(pv[off] < 0.05)), int(off.sum())
        hang = int(np.sum(np.asarray(nt["hangs_on_alpha"], bool)[off]))
        lines.append(f"- **Cross-persona transfer**: {k} of {m} cross-persona cells distinguishable from the "
                     f"label-shuffle null (two-sided p < 0.05{_perm_floor(nt.get('n_perm'))}); {hang} of {m} hang "
                     "on alpha.")
    if steering:
        pw = steering.get("power") or {}
        dose = steering.get("dose_slopes") or {}
        sat = pw.get("saturating_coefs") or []
        off = dose.get("off_format_coefs") or []
        head = (f"- **Steering** ({steering['n_pairs']} pairs; slopes from |c| ≤ {_fmt(dose.get('linear_max'), 2)}"
                + (f" on format, coefficients {_alphas(dose['used_coefs'])}" if dose.get("used_coefs") is not None else "")
                + (f"; saturating coefficients {_alphas(sat)} shown, not used for slopes" if sat else "")
                + (f"; off-format coefficients {_alphas(off)} (on-label rate < {_fmt(dose.get('min_on_label'), 2)}) "
                   "shown, not used" if off else "") + "): ")
        if dose.get("note"):
            lines.append(head + dose["note"] + ".")
        else:
            a, pow_ = pw.get("alpha", 0.05), pw.get("power", 0.8)
            pp, df = dose["per_pair"].get("probe", {}), dose.get("difference") or {}
            sent = (f"at α = {a:g} with {pow_:.0%} power the dose-response test could detect a probe slope of "
                    f"{_fmt(pw.get('mde_slope_probe_vs_zero'), 3)} per unit coef (against 0) and a probe − random "
                    f"difference of {_fmt(pw.get('mde_slope_probe_vs_random'), 3)}. Observed: probe slope "
                    f"{_ci(pp.get('mean'), pp.get('ci'), 3)} (p = {_fmt(pp.get('p_value'), 3)}, "
                    f"**{_verdict(pp.get('p_value'))} from 0**), probe − random {_ci(df.get('mean'), df.get('ci'), 3)} "
                    f"(p = {_fmt(df.get('p_value'), 3)}, **{_verdict(df.get('p_value'))} from the random direction**)")
            need = pw.get("n_pairs_for_observed_difference")
            if need is not None:
                sent += f"; a difference of the observed size would need about {need} pairs"
            if dose.get("note_power"):
                sent += f" ({dose['note_power']})"
            lines.append(head + sent + ".")
        ls = steering.get("local_slope")
        if ls and ls.get("detectable"):
            nl, det = ls["null"], ls["detectable"]
            lines.append(f"- **Steering, local slope at c = 0** ({nl['n_null']} random directions): a direction "
                         f"needs |slope| ≥ {det['abs_slope_p05']:.4g} (|cosine with the slope gradient| ≥ "
                         f"{_fmt(det['abs_cosine_p05'], 3)}) to be distinguishable at p < 0.05, ≥ "
                         f"{det['abs_slope_p01']:.4g} ({_fmt(det['abs_cosine_p01'], 3)}) at p < 0.01; the probe's "
                         f"{nl['effect']:+.4g} sits at percentile {nl['percentile']:.1f} (two-sided p = "
                         f"{nl['p_two_sided']:.3g}): **{_verdict(nl['p_two_sided'])} from random directions**.")
    if multiplicity and multiplicity.get("m"):
        surv = [t["test"] for t in multiplicity["tests"] if t["p_holm"] is not None and t["p_holm"] < 0.05]
        lines.append(f"- **Family-wise (Holm, level 0.05)**: {len(surv)} of the report's {multiplicity['m']} tests "
                     "survive" + (": " + "; ".join(surv) if surv else "") + " (the family and every raw and adjusted "
                     "p: section \"Tests and family-wise correction\").")
    if not lines:
        return ""
    return ("**What is and is not distinguishable from the nulls** (level 0.05; the probe and transfer numbers "
            "below carry intervals and shuffle-null p-values, the steering slopes pair-level tests):\n\n"
            + "\n".join(lines))


def _perm_floor(n_perm) -> str:
    """A warning when too few permutations were run for any p-value to fall below 0.05."""
    if not n_perm:
        return ""
    floor = 1.0 / (n_perm + 1)
    return f"; the smallest attainable p is {floor:.3g}, so p < 0.05 is impossible" if floor >= 0.05 else ""


# ---------------------------------------------------------------------------------------------------------
# selection and multiplicity (issue 28): the layer chosen inside the CV, and the family of tests

def _pfmt(p) -> str:
    """A p-value with two significant digits ("n/a" for None)."""
    return "n/a" if p is None else f"{p:.2g}"


ADJUST_METHOD = "holm"  # the correction the report's verdicts use; Benjamini–Hochberg is shown alongside

FAMILY_TEXT = (
    "The family is every p-value the report uses to call a result distinguishable from its null: per persona, "
    "the headline probe r (layer and alpha chosen inside the cross-validation, permutation null rerunning that "
    "selection) and the saved probe's test-split r at the best layer (label-shuffle null); each off-diagonal "
    "cross-persona transfer cell (two-sided label-shuffle null); the steering dose-response tests (probe slope "
    "against 0, random-direction slope against 0, probe − random, t tests over pairs) and the local slope "
    "against random directions (two-sided); the preference-shift tracking r per shifted persona on held-out "
    "tasks (two-sided permutation). Outside it, as descriptive: the per-layer p-values of the every-layer "
    "table and the best layer's own shuffle p (the layer-chosen-inside-CV test is the test of that claim), "
    "and checks against a planted truth. Holm's step-down procedure controls the family-wise error rate at "
    "0.05 under any dependence between the tests; Benjamini–Hochberg (false discovery rate, shown for "
    "reference) is not used for any verdict.")


def family_of_tests(probes: dict | None, transfer: dict | None, steering: dict | None, extra: dict | None,
                personas: Sequence[str]) -> list[dict]:
    """The report's family of tests (:data:`FAMILY_TEXT`): one row per test, ``{test, p, null, n_perm}``
    (``p`` None where the test was not run or is undefined; ``n_perm`` the permutations or random
    directions behind a resampling p, None for a t test or an unrecorded count)."""
    rows = []

    def add(name, p, null, n_perm=None):
        ok = p is not None and np.isfinite(float(p))
        rows.append({"test": name, "p": float(p) if ok else None, "null": null,
                     "n_perm": int(n_perm) if n_perm else None})
    if probes:
        for p in personas:
            ps = probes["persona"].get(p) or {}
            ls = ps.get("layer_selected")
            if ls:
                nl = ls.get("null") or {}
                add(f"probe r, layer chosen inside CV [{p}]", nl.get("p_value"),
                    "labels permuted, layer and alpha re-chosen (one-sided)", nl.get("n_perm"))
            best = next((d for d in ps.get("per_layer", []) if d["layer"] == ps.get("best_layer")), None)
            if best is not None and "heldout_p" in best:
                add(f"saved probe test-split r, layer {ps['best_layer']} [{p}]", best.get("heldout_p"),
                    "labels permuted, alpha re-chosen (one-sided); layer picked on all tasks", probes.get("n_perm"))
    nt = (transfer or {}).get("persona_nested") or {}
    if nt.get("p_value_two_sided") is not None:
        names = nt["names"]
        for a, src in enumerate(names):
            for b, dst in enumerate(names):
                if a != b:
                    add(f"cross-persona transfer {src} → {dst}", nt["p_value_two_sided"][a][b],
                        "source labels permuted, alpha re-chosen (two-sided)", nt.get("n_perm"))
    if steering:
        dose = steering.get("dose_slopes") or {}
        pp = dose.get("per_pair") or {}
        if not dose.get("note"):
            add("steering slope, probe vs 0", (pp.get("probe") or {}).get("p_value"), "t test over pairs")
            add("steering slope, random direction vs 0", (pp.get("random") or {}).get("p_value"), "t test over pairs")
            add("steering slope, probe − random", (dose.get("difference") or {}).get("p_value"),
                "paired t test over pairs")
        nl = (steering.get("local_slope") or {}).get("null")
        if nl:
            add("steering local slope vs random directions", nl.get("p_two_sided"),
                "random unit directions (two-sided)", nl.get("n_null"))
    psh = (extra or {}).get("pref_shift") or {}
    for sp, r in (psh.get("shifts") or {}).items():
        h = r.get("heldout") or r.get("test") or r.get("all") or {}
        add(f"preference-shift tracking [{sp}]", (h.get("tracking") or {}).get("p_value"),
            "utility shifts permuted (two-sided)" + ("" if (r.get("heldout") or r.get("test")) else "; in-sample"),
            psh.get("n_perm"))
    return rows


def adjust_family(rows: list[dict]) -> dict:
    """Holm and Benjamini–Hochberg adjusted p-values over the rows with a p (the others stay None), and the
    permutation floor of each: what ``summary.json`` keeps under ``multiplicity``."""
    have = [k for k, r in enumerate(rows) if r["p"] is not None]
    raw = [rows[k]["p"] for k in have]
    h, b = holm(raw), benjamini_hochberg(raw)
    tests = []
    for k, r in enumerate(rows):
        t = dict(r, p_holm=None, p_bh=None, floor=permutation_floor(r["n_perm"]))
        if k in have:
            j = have.index(k)
            t.update(p_holm=float(h[j]), p_bh=float(b[j]))
        tests.append(t)
    return {"method": ADJUST_METHOD, "shown_also": "bh", "level": 0.05, "m": len(have), "family": FAMILY_TEXT,
            "n_significant_holm": int(np.sum(h < 0.05)), "n_significant_raw": int(np.sum(np.asarray(raw) < 0.05)),
            "tests": tests}


def family_text(mult: dict) -> str:
    """The "Tests and family-wise correction" section: the family in words and a table of every test."""
    lines = ["| test | null | raw p | Holm-adjusted p | BH-adjusted p | permutations (floor) |",
             "|---|---|---|---|---|---|"]
    for t in mult["tests"]:
        perm = "—" if not t["n_perm"] else f"{t['n_perm']} ({t['floor']:.2g})"
        holm_p = _pfmt(t["p_holm"])
        if t["p_holm"] is not None and t["p_holm"] < mult["level"]:
            holm_p = f"**{holm_p}**"
        lines.append(f"| {t['test']} | {t['null']} | {_pfmt(t['p'])} | {holm_p} | {_pfmt(t['p_bh'])} | {perm} |")
    return (FAMILY_TEXT + f"\n\n{mult['m']} tests with a p-value; {mult['n_significant_raw']} have raw p < 0.05, "
            f"{mult['n_significant_holm']} Holm-adjusted p < 0.05 (in bold). A permutation p can be no smaller than "
            "its floor 1/(permutations + 1), so with m tests no Holm-adjusted permutation p falls below m times its "
            "floor.\n\n" + "\n".join(lines))


def layer_selected_text(probes: dict, personas: Sequence[str]) -> str:
    """The headline probe table: held-out r with the layer chosen inside the cross-validation
    (:mod:`prefjax.probes.layersel`), next to the best single layer's r (optimistic) and its
    max-over-layers null. "" when the probes stage predates the selection."""
    rows = []
    for p in personas:
        ps = probes["persona"][p]
        ls = ps.get("layer_selected")
        if not ls:
            continue
        nl, bl = ls.get("null") or {}, ls["best_layer"]
        rows.append(f"| {p} | {_ci(ls['r'], ls['ci'])} | {_fmt(nl.get('p_value'))} ({nl.get('n_perm', 0)}) | "
                    f"{', '.join(str(l) for l in ls['fold_layer'])} | {_alphas(ls['fold_alpha'])} | "
                    f"{bl['layer']}: {_fmt(bl['r'])} | {_fmt(bl.get('p_max'))} |")
    if not rows:
        return ""
    n_layers = len(probes.get("layers", []))
    head = ["| persona | r, layer chosen inside CV [95% CI] | permutation p (permutations) | layer per outer fold | "
            "alpha per outer fold | best single layer: nested-CV r (optimistic) | best layer vs max-over-layers null p |",
            "|---|---|---|---|---|---|---|"]
    return ("**Headline probe r: the layer chosen inside the cross-validation.** In each outer fold, inner CV on the "
            f"outer-training tasks alone scores every (layer, alpha) of the {n_layers} layers; the layer with the "
            "largest inner r is taken (alpha within it by the configured rule), its probe fitted on the outer "
            "training set predicts the outer test fold, and r is computed within test folds and averaged (95% "
            "bootstrap interval over test tasks within folds). Permutation p: the labels permuted and the whole "
            "selection over layers and alphas rerun for each permutation, so the null includes the maximum over "
            "layers. The best single layer's nested-CV r is a maximum over layers of estimates from the same "
            "tasks, biased upward: shown only for comparison, with its p against the maximum over layers of the "
            "permuted per-layer r (the same permutation at every layer).\n\n" + "\n".join(head + rows))


def stage_times(run, order: Sequence[str]) -> list[tuple[str, float | None, str]]:
    """``(stage, seconds, finished)`` of every stage marked done in ``run``, sorted by ``order`` (the
    pipeline's stage names; a stage's per-persona parts ``<stage>-<persona>`` in the order they finished).

    The seconds are those recorded in the stage's ``.done`` marker when it ran, so a resumed run keeps
    the times of the stages an earlier attempt finished."""
    out = [(d["stage"], None if d.get("seconds") is None else float(d["seconds"]), str(d.get("finished") or ""))
           for d in run.done_records()]

    def rank(name):
        return next((k for k, st in enumerate(order) if name == st or name.startswith(st + "-")), len(order))
    return sorted(out, key=lambda r: (rank(r[0]), r[2], r[0]))


def _timing_table(rows, load_s, report_s) -> tuple[str, dict]:
    lines = ["| stage | wall seconds | finished |", "|---|---|---|"]
    timing = {}
    if load_s is not None:
        lines.append(f"| model load (this process) | {load_s:.1f} | |")
    for name, sec, fin in rows:
        lines.append(f"| {name} | {'n/a' if sec is None else f'{sec:.1f}'} | {fin} |")
        timing[name] = {"seconds": sec}
    lines.append(f"| report (figures, this process) | {report_s:.1f} | |")
    total = sum(sec for _, sec, _ in rows if sec is not None) + (load_s or 0.0) + report_s
    lines.append(f"| **total** | **{total:.1f}** | |")
    timing["report"] = {"seconds": report_s}
    if load_s is not None:
        timing["model load"] = {"seconds": load_s}
    timing["total"] = {"seconds": total}
    note = ("Wall seconds per stage as recorded while it ran (a stage finished by an earlier attempt keeps "
            "that attempt's time); the model load and the report are this process's.")
    return note + "\n\n" + "\n".join(lines), timing


def _nested_transfer_text(transfer: dict) -> str:
    """Cross-persona transfer at the nested-CV alpha with intervals, null p-values and its alpha spread."""
    nt = transfer["persona_nested"]
    names = nt["names"]
    lines = ["| train → test | r [95% CI] | utility corr [95% CI] | p (two-sided, shuffle) | r over the alpha grid | "
             "hangs on alpha |", "|---|---|---|---|---|---|"]
    grid = np.asarray(nt["r_grid"], float)
    for a, src in enumerate(names):
        for b, dst in enumerate(names):
            uc = nt.get("utility_corr")
            ucs = (f"{uc[a][b]:+.2f} [{nt['utility_corr_lo'][a][b]:+.2f}, {nt['utility_corr_hi'][a][b]:+.2f}]"
                   if uc is not None else "")
            p = nt.get("p_value_two_sided")
            lines.append(f"| {src} → {dst} | {nt['r'][a][b]:+.2f} [{nt['ci_lo'][a][b]:+.2f}, {nt['ci_hi'][a][b]:+.2f}] | "
                         f"{ucs} | {_fmt(p[a][b], 3) if p is not None else ''} | "
                         f"{np.nanmin(grid[:, a, b]):+.2f} to {np.nanmax(grid[:, a, b]):+.2f} | "
                         f"{'**yes**' if nt['hangs_on_alpha'][a][b] else 'no'} |")
    return ("Probe trained on one persona's activations and utilities, scored on another's, at the alpha chosen "
            "by nested cross-validation (outer folds estimate, inner folds choose alpha), with bootstrap "
            "intervals over test tasks and a label-shuffle null. If the probe reads each persona's utility, r "
            "should match the utility correlation. 'Hangs on alpha': within two decades of the chosen alphas r "
            "leaves its interval and moves by more than 0.05.\n\n" + "\n".join(lines))


SMALL_TEST = 30  # below this many held-out tasks a percentile bootstrap interval for r is called rough


def _is_below(v, chance: float = 0.5) -> bool:
    return v is not None and np.isfinite(float(v)) and float(v) < chance


def below_chance_mark(v, chance: float = 0.5) -> str:
    """A value formatted with a ▼ mark when it is below chance."""
    return _fmt(v) + (" ▼" if _is_below(v, chance) else "")


def persona_identity_text(transfer: dict) -> str:
    """The persona-identity control (:func:`prefjax.probes.controls.persona_identity_control`) as a table."""
    pi = transfer["persona_identity"]
    lines = ["| persona | cosine(probe, identity direction) | identity classifier test accuracy | "
             "p (isotropic null) | p (covariance-matched null) | matched null 95th pct of abs(cos) |",
             "|---|---|---|---|---|---|"]
    for name, r in pi["persona"].items():
        lines.append(f"| {name} | {_fmt(r['cosine'])} | {_fmt(r['identity_accuracy'])} | {_fmt(r['p_isotropic'])} | "
                     f"{_fmt(r['p_matched'])} | {_fmt(r['null_matched_q95'])} |")
    return (f"Each persona's probe at layer {transfer.get('layer')} against the direction that tells that persona's "
            f"activations from the others' (a ridge classifier on the same tasks under every persona, split by "
            f"task). A probe whose |cosine| stands out from {pi['n_null']} random directions (isotropic, and "
            "matched to the activations' covariance) shares its direction with persona identity: its utility "
            "read-out could be the persona signal. Descriptive, outside the family of tests.\n\n" + "\n".join(lines))


def _rci(r, lo, hi) -> str:
    """Signed ``r [lo, hi]`` with two decimals; ``—`` for an undefined bound."""
    f = lambda v: "—" if v is None or not np.isfinite(v) else f"{v:+.2f}"
    return f"{f(r)} [{f(lo)}, {f(hi)}]"


def layer_transfer_text(transfer: dict) -> str:
    """Cross-layer transfer r with its bootstrap interval per (train layer, test layer) cell, and a warning
    when the test split is small. Up to 16 layers the whole matrix is a table; beyond, each training
    layer's same-layer and next-layer cells (the full matrix is in ``summary.json``)."""
    layers = [str(l) for l in transfer["layers"]]
    r = np.asarray(transfer["layer_r"], float)
    if transfer.get("layer_r_lo") is None:
        return ("Probe trained at each layer, scored on every layer's test-split activations. No intervals: this "
                "transfer stage ran before they were computed (rerun it for them).")
    as_arr = lambda m: np.array([[np.nan if v is None else v for v in row] for row in m], float)
    lo, hi = as_arr(transfer["layer_r_lo"]), as_arr(transfer["layer_r_hi"])
    n_test, level = transfer.get("layer_n_test"), transfer.get("layer_level", 0.95)
    how = transfer.get("layer_alpha_choice", "training split, alpha chosen on the eval split")
    text = (f"Probe trained at each layer (alpha: {how}) and scored on every "
            f"layer's activations of the {n_test} test tasks: r with a {level:.0%} percentile bootstrap interval "
            "over the test tasks (the same resamples in every cell, so cells compare pairwise). The interval is "
            "conditional on the fitted probes: it shows test-task sampling, not refitting.")
    if n_test is not None and n_test < SMALL_TEST:
        text += (f"\n\n**Small held-out split:** only {n_test} test tasks. A percentile bootstrap of r is "
                 "unreliable at this size (it tends to undercover, and with a handful of tasks its bounds collapse "
                 "to ±1 or onto the estimate); read these intervals as rough.")
    L = len(layers)
    if L <= 16:
        rows = ["| train ↓ / test → | " + " | ".join(layers) + " |", "|---|" + "---|" * L]
        for a in range(L):
            rows.append(f"| {layers[a]} | " + " | ".join(_rci(r[a, b], lo[a, b], hi[a, b]) for b in range(L)) + " |")
    else:
        rows = ["| train layer | same layer r [CI] | next layer r [CI] |", "|---|---|---|"]
        for a in range(L):
            nxt = _rci(r[a, a + 1], lo[a, a + 1], hi[a, a + 1]) if a + 1 < L else ""
            rows.append(f"| {layers[a]} | {_rci(r[a, a], lo[a, a], hi[a, a])} | {nxt} |")
        text += f" {L} layers: the table shows the same-layer and next-layer cells; summary.json has all."
    return text + "\n\n" + "\n".join(rows)


def _slope_text(steering: dict) -> str:
    """Dose-response slopes (linear range only) with their pair-level tests and the smallest detectable slope."""
    dose = steering.get("dose_slopes")
    if not dose:
        return ""
    if dose.get("note"):
        return f"Slopes: {dose['note']}."
    sat = dose.get("saturating_coefs") or []
    pp, pr, df = dose["per_pair"]["probe"], dose["per_pair"]["random"], dose.get("difference") or {}
    mde = dose.get("mde") or {}
    off = dose.get("off_format_coefs") or []
    used = dose.get("used_coefs", dose["linear_coefs"])
    return (f"Slope of P(steered) per unit coef, fitted on the coefficients with |c| ≤ {dose['linear_max']:g}"
            + (f" where both directions' on-label rate ≥ {dose.get('min_on_label', 0):g}" if "used_coefs" in dose else "")
            + f" ({_alphas(used)})" + (f"; saturating coefficients {_alphas(sat)} are shown above "
                                       "but not fitted" if sat else "")
            + (f"; off-format coefficients {_alphas(off)} (on-label rate below {dose.get('min_on_label', 0):g}) "
               "are shown above but not fitted" if off else "") +
            f". One slope per pair (both showings averaged), t-tested over the {dose['n_pairs']} pairs: probe "
            f"{_ci(pp['mean'], pp['ci'], 4)} (p = {_fmt(pp['p_value'], 3)}), random {_ci(pr['mean'], pr['ci'], 4)} "
            f"(p = {_fmt(pr['p_value'], 3)}), probe − random {_ci(df.get('mean'), df.get('ci'), 4)} "
            f"(paired, p = {_fmt(df.get('p_value'), 3)}). Smallest slope these tests detect at α = "
            f"{dose['alpha']:g} with {dose['power']:.0%} power, given the observed spread of pair slopes: "
            f"{_fmt(mde.get('probe_vs_zero'), 4)} (probe vs 0), {_fmt(mde.get('probe_vs_random'), 4)} "
            f"(probe − random).")


def _local_slope_text(steering: dict) -> str:
    """The random-direction null of the steering slope, in words."""
    ls = steering.get("local_slope")
    if not ls:
        return ""
    nl = ls["null"]
    q = nl["quantiles"]
    lo, hi = q.get("0.025", q.get("0.05")), q.get("0.975", q.get("0.95"))
    verdict = ("distinguishable from" if nl["p_two_sided"] < 0.05 else "not distinguishable from")
    band = f" (central null range {lo:+.4f} to {hi:+.4f})" if lo is not None and hi is not None else ""
    return (f"\n\nRandom-direction null (local slope at c = 0, one backward pass, {nl['n_null']} random unit "
            f"directions at layer {steering['layer']}; direction from the layer-{steering.get('direction_layer', '?')} "
            f"probe): the probe's slope {nl['effect']:+.4f} per unit coef sits at percentile "
            f"{nl['percentile']:.1f} of the null{band}, two-sided p = {nl['p_two_sided']:.3g}: "
            f"**{verdict} random directions**. Cosine of the probe with the slope gradient: "
            f"{_fmt(ls['probe_cosine_with_gradient'], 3)}.")


def _pval(p) -> str:
    return "n/a" if p is None else f"{p:.2g}"


def utilities_construct_text(utilities: dict, personas: Sequence[str]) -> str:
    """"What the utilities are": a table of each persona's utility diagnostics (position bias, order-averaged
    spread, held-out fit against the constant model; :mod:`prefjax.utility.diagnostics`) and, in words, the
    warnings (:func:`prefjax.utility.diagnostics.diagnostic_warnings`). "" when no persona has diagnostics."""
    rows, warn, tol, k = [], [], 0.05, None
    for p in personas:
        d = (utilities.get(p) or {}).get("diagnostics")
        if not d:
            continue
        pb, oa, h = d["position_bias"], d["order_averaged"], d["heldout"]
        tol, k = oa["tol"], h["k"] if h["k"] is not None else k
        c = h.get("constant") or {}
        spread = ("n/a" if not oa["n_pairs"] else f"{oa['min']:.3f}–{oa['max']:.3f} (5–95%: {oa['q05']:.3f}–"
                  f"{oa['q95']:.3f}); {oa['n_pairs']} pairs")
        within = "n/a" if oa["frac_within_tol"] is None else f"{oa['frac_within_tol']:.0%}"
        rows.append(f"| {p} | {pb['n_first']}/{pb['n_parsed']} = {_ci(pb['rate'], pb['ci'])} | {_pval(pb['p_value'])} | "
                    f"{spread} | {within} | {_fmt(h['majority_accuracy'])} / {_fmt(c.get('majority_accuracy'))} | "
                    f"{_fmt(h['log_loss'], 4)} / {_fmt(c.get('log_loss'), 4)} / {_fmt(h['log_loss_floor'], 4)} |")
        warn += [f"- **Warning [{p}]**: {w}" for w in diagnostic_warnings(d)]
    if not rows:
        return ""
    head = ["| persona | first-shown label picked [95% CI] | binomial p (vs 0.5) | order-averaged P: range | "
            f"within ±{tol:g} of 0.5 | held-out pair accuracy: fit / constant | held-out log-loss: fit / constant "
            "/ floor |", "|---|---|---|---|---|---|---|"]
    text = ("\n".join(head + rows) + "\n\nFirst-shown label: the share of parsed choices that picked the task shown "
            "first (\"Task A\"), Wilson interval, exact binomial test against 0.5. Order-averaged P: for pairs shown "
            "in both orders, P(one task chosen) averaged over the two orders, so a pure position effect cancels; "
            "values near 0.5 mean near-indifference. Held-out: a "
            f"{k if k is not None else '?'}-fold split over the compared pairs, each fold scored by a Thurstonian refit "
            "on the others (pair accuracy on each pair's majority choice; log-loss on its win share, in nats), "
            "against the constant model (a pair has no natural first side, so a side's training win rate is 0.5: "
            "accuracy 0.5, log-loss 0.693); the floor is the log-loss of knowing each held-out pair's own win "
            "share, so fit − floor is what the utilities leave unexplained.")
    return text + ("\n\n" + "\n".join(warn) if warn else "")


def build_report(run, *, model_source: str, pool, personas, mu, utilities, probes, transfer, steering, inlp, extra=None,
                 truth=None, load_seconds: float | None = None, stage_order: Sequence[str] = ()) -> str:
    """Write figures + ``summary.json`` + ``report.md`` into the run's workdir; return the report path.

    ``run`` is a :class:`prefjax.stages.RunLayout` (figure paths come from it); ``model_source`` is
    the config's ``model.source`` (shown in the headline); the rest are the stages' summaries.

    The report ends with the table of stage times (:func:`stage_times`; ``load_seconds``: how long this
    process took to load the model); ``summary.json`` keeps them under ``timing``."""
    t0 = time.time()
    wd = run.workdir
    os.makedirs(run.figures_dir(), exist_ok=True)
    figures = {}
    topics = list(pool.topic_array())
    figures["utilities by topic"] = utilities_by_topic({p: mu[p] for p in personas}, topics,
                                                       run.figure("utilities_by_topic.png"))
    headline = {"model": str(model_source), "tasks": len(pool), "personas": ", ".join(personas)}
    sections = []
    util_lines = ["| persona | comparisons (pairs) | ok | of which declined the other | refusal | unparseable | "
                  "split-half r |", "|---|---|---|---|---|---|---|"]
    for p in personas:
        u = utilities[p]
        c = u["counts"]
        dec = "n/a" if u.get("declined_other") is None else u["declined_other"]
        util_lines.append(f"| {p} | {u['n_pairs']} | {c.get('ok', 0)} | {dec} | "
                          f"{c.get('refusal', 0)} | {c.get('unparseable', 0) + c.get('both', 0)} | "
                          f"{_fmt(u['split_half_r'])} |")
        headline[f"utility split-half r [{p}]"] = u["split_half_r"]
    sections.append(("Utilities", "\n".join(util_lines) + "\n\nSplit-half r: utilities fitted on two random halves "
                     "of the comparisons, correlated. It bounds how well any probe can predict them. \"Declined the other\": "
                     "replies that did one task and declined the other, counted as a choice of the task done."))
    construct = utilities_construct_text(utilities, personas)
    if construct:
        sections.append(("What the utilities are", construct))
        for p in personas:
            d = (utilities.get(p) or {}).get("diagnostics")
            if d:
                headline[f"first-shown label share [{p}]"] = d["position_bias"]["rate"]
                headline[f"held-out pair accuracy [{p}]"] = d["heldout"]["majority_accuracy"]
    if probes:
        layers = probes["layers"]
        lines = ["| persona | best layer | nested-CV r [95% CI] | shuffle p | alpha per outer fold | saved probe: alpha, "
                 "test r [95% CI], shuffle p | LOTO r [95% CI] | content baseline nested-CV r [95% CI] | "
                 "content LOTO r [95% CI] |", "|---|---|---|---|---|---|---|---|---|"]
        layer_lines = ["| persona | layer | nested-CV r [95% CI] | shuffle p | alpha per outer fold | test r [95% CI] |",
                       "|---|---|---|---|---|---|"]
        for p in personas:
            ps = probes["persona"][p]
            best = next(d for d in ps["per_layer"] if d["layer"] == ps["best_layer"])
            cb = ps["content_baseline"]
            bn, cn = best["nested"], cb["nested"]
            lines.append(f"| {p} | {ps['best_layer']} | {_ci(bn['r'], bn['ci'])} | {_fmt(bn['p_value'])} | "
                         f"{_alphas(bn['fold_alpha'])} | {best['alpha']:g}, {_ci(best['heldout_r'], best['heldout_ci'])}, "
                         f"{_fmt(best['heldout_p'])} | {_ci(best['loto_r'], best['loto_ci'])} | "
                         f"{_ci(cn['r'], cn['ci'])} | {_ci(cb['loto_r'], cb['loto_ci'])} |")
            for d in ps["per_layer"]:
                nd = d["nested"]
                layer_lines.append(f"| {p} | {d['layer']} | {_ci(nd['r'], nd['ci'])} | {_fmt(nd['p_value'])} | "
                                   f"{_alphas(nd['fold_alpha'])} ({_alpha_spread(nd['fold_alpha'])}) | "
                                   f"{_ci(d['heldout_r'], d['heldout_ci'])} |")
            ls = ps.get("layer_selected")
            if ls:  # the headline probe r: the layer chosen inside the CV (the best layer's r is optimistic)
                headline[f"probe r, layer chosen inside CV [{p}]"] = ls["r"]
                headline[f"probe r, layer chosen inside CV 95% CI [{p}]"] = ls["ci"]
                headline[f"probe r, layer chosen inside CV: permutation p [{p}]"] = (ls.get("null") or {}).get("p_value")
            headline[f"probe nested-CV r at the best layer (optimistic: max over layers) [{p}]"] = bn["r"]
            headline[f"probe nested-CV r at the best layer 95% CI [{p}]"] = bn["ci"]
            headline[f"probe shuffle p at the best layer (ignores the layer choice) [{p}]"] = bn["p_value"]
            if ls and ls["best_layer"].get("p_max") is not None:
                headline[f"best layer vs max-over-layers null: p [{p}]"] = ls["best_layer"]["p_max"]
            headline[f"content-baseline nested-CV r [{p}]"] = cn["r"]
            per = ps["per_layer"]
            arr = lambda key, sub=None: np.array([(d[key] if sub is None else d[key][sub])
                                                  if (d[key] if sub is None else d[key][sub]) is not None else np.nan
                                                  for d in per], float)
            curves = {"nested CV": np.array([d["nested"]["r"] for d in per], float),
                      "test split (saved probe)": arr("heldout_r"),
                      "leave-one-topic-out": arr("loto_r"),
                      "content baseline (nested CV)": np.full(len(layers), cn["r"] if cn["r"] is not None else np.nan)}
            bands = {"nested CV": (np.array([d["nested"]["ci"][0] for d in per], float),
                                   np.array([d["nested"]["ci"][1] for d in per], float))}
            figures[f"probe r by layer [{p}]"] = probe_r_by_layer(layers, curves, run.figure(f"probe_r_{p}.png"),
                                                                  bands=bands)
        sel_text = layer_selected_text(probes, personas)
        sections.append(("Probes", (sel_text + "\n\n**Per layer:**\n\n" if sel_text else "")
                         + "\n".join(lines) + f"\n\nNested-CV r: ridge probe, alpha chosen by "
                         f"{probes.get('cv_inner', '?')}-fold CV inside each of {probes.get('cv_outer', '?')} outer "
                         "training sets, Pearson r on each outer test fold averaged (95% bootstrap interval over "
                         "test tasks within folds; shuffle p: labels permuted and the whole nested procedure rerun, "
                         "alpha re-chosen). The best layer is the one with the largest nested-CV r, so its r is "
                         "optimistic (a maximum over layers; the headline r above chooses the layer inside the "
                         "CV instead); the per-layer table shows them all. The saved "
                         f"probe (steering direction, later stages) is fitted once on the {probes.get('n_fit', '?')} "
                         "tasks outside the test split at the alpha inner CV on those tasks chooses; its test r is "
                         f"on the {probes.get('n_test', '?')} test tasks. LOTO: each topic held out in turn, its alpha "
                         "chosen by inner CV (folds grouped by topic when enough topics remain) on the other topics "
                         "only, predictions pooled (bootstrap interval over tasks).\n\n### Every layer\n\n" + "\n".join(layer_lines)))
    if transfer and transfer.get("persona_r") is not None:
        # the nested-CV matrix (the one the table gives intervals and p-values for), else the single split
        nt = transfer.get("persona_nested") or {}
        figures["cross-persona transfer"] = transfer_heatmap(
            np.asarray(nt.get("r", transfer["persona_r"]), float), transfer["personas"],
            run.figure("transfer_persona.png"),
            baseline=np.asarray(nt.get("utility_corr", transfer["utility_corr"]), float))
    if transfer and transfer.get("persona_nested"):
        sections.append(("Cross-persona transfer", _nested_transfer_text(transfer)))
    if transfer and transfer.get("persona_identity"):
        sections.append(("Persona identity control", persona_identity_text(transfer)))
    if transfer:
        has_ci = transfer.get("layer_r_lo") is not None
        figures["cross-layer transfer"] = transfer_heatmap(
            np.asarray(transfer["layer_r"], float), [str(l) for l in transfer["layers"]],
            run.figure("transfer_layer.png"),
            title="Cross-layer probe transfer (r" + (f" [{transfer.get('layer_level', 0.95):.0%} CI]" if has_ci else "")
                  + (f", {transfer['layer_n_test']} test tasks)" if transfer.get("layer_n_test") else ")"),
            ci_lo=transfer.get("layer_r_lo"), ci_hi=transfer.get("layer_r_hi"))
        sections.append(("Cross-layer transfer", layer_transfer_text(transfer)))
    if steering:
        coefs = steering["coefs"]
        figures["steering dose-response"] = dose_response(
            coefs, [r["k"] for r in steering["probe"]], [r["n"] for r in steering["probe"]],
            run.figure("steering.png"),
            control={"k": [r["k"] for r in steering["random"]], "n": [r["n"] for r in steering["random"]],
                     "label": "random direction"})
        lines = ["| coef | used for slope | P(steered) probe [95% CI] | choice rate probe [95% CI] | "
                 "P(steered) random [95% CI] | on-label rate probe | on-label rate random |",
                 "|---|---|---|---|---|---|---|"]
        for a, b in zip(steering["probe"], steering["random"]):
            use = ("no (saturating)" if not a.get("linear", True) else
                   "no (off format)" if not a.get("on_format", True) else "yes")
            lines.append(f"| {a['coef']:+.2f} | {use} | "
                         f"{_ci(a['p_steered_mean'], a.get('p_steered_ci'))} | {a['k']}/{a['n']} "
                         f"[{a['ci'][0]:.2f}, {a['ci'][1]:.2f}] | {_ci(b['p_steered_mean'], b.get('p_steered_ci'))} | "
                         f"{a['on_label_rate']:.2f} | {b['on_label_rate']:.2f} |")
        sections.append(("Steering", f"Layer {steering['layer']}, persona {steering['persona']}, {steering['mode']} "
                         f"mask, coefficient in units of the mean residual norm ({steering['scale']:.1f}); each of "
                         f"{steering['n_pairs']} pairs steered once towards Task A and once towards Task B, so label "
                         "position bias cancels at c = 0. On-label rate: how often the top next token is one of "
                         "the two labels (a coherence check: low means the steered model left the format); slopes "
                         "use only coefficients where both directions' on-label rate is at least "
                         f"{_fmt(steering.get('min_on_label', 0.0), 2)}. "
                         "P(steered) intervals: t intervals over pairs.\n\n"
                         + "\n".join(lines) + "\n\n" + _slope_text(steering)
                         + (f"\n\n**Note:** {steering['note']}." if steering.get("note") else "")
                         + _local_slope_text(steering)))
        if steering.get("sampled"):
            sm = steering["sampled"]
            lines = ["| coef | chose steered (probe) [95% CI] | refusal | unparseable | coherence (loglik/token) | "
                     "chose steered (random) | coherence (random) |", "|---|---|---|---|---|---|---|"]
            for a, b in zip(sm["probe"], sm["random"]):
                lines.append(f"| {a['coef']:+.2f} | {a['k']}/{a['n']} [{a['ci'][0]:.2f}, {a['ci'][1]:.2f}] | "
                             f"{a['refusal_rate']:.2f} | {a['unparseable_rate']:.2f} | {_fmt(a['coherence_loglik'], 2)} | "
                             f"{b['k']}/{b['n']} | {_fmt(b['coherence_loglik'], 2)} |")
            sections.append(("Steering: sampled completions", f"The same sweep with {sm['new_tokens']} greedy "
                             f"tokens per prompt ({sm['n_prompts']} prompts), parsed like elicitation replies. "
                             "Refusal and unparseable rates are over all prompts; the choice rate over parsed "
                             "replies. Coherence: mean log-likelihood per token of the steered completion under "
                             "the unsteered model (lower = less coherent).\n\n" + "\n".join(lines)))
            figures["steering (sampled)"] = dose_response(
                coefs, [r["k"] for r in sm["probe"]], [r["n"] for r in sm["probe"]],
                run.figure("steering_sampled.png"),
                refusal={"k": [round(r["refusal_rate"] * sm["n_prompts"]) for r in sm["probe"]],
                         "n": [sm["n_prompts"]] * len(coefs), "label": "refusal"},
                control={"k": [r["k"] for r in sm["random"]], "n": [r["n"] for r in sm["random"]],
                         "label": "random direction"}, title="Steering dose-response (sampled completions)")
        dose = steering.get("dose_slopes") or {}
        headline["steering slope (probe)"] = steering["slope_probe"]
        headline["steering slope (random)"] = steering["slope_random"]
        if dose.get("per_pair", {}).get("probe"):
            headline["steering slope (probe) 95% CI"] = dose["per_pair"]["probe"]["ci"]
            headline["steering slope (probe) p"] = dose["per_pair"]["probe"]["p_value"]
        if dose.get("difference"):
            headline["steering slope probe − random 95% CI"] = dose["difference"]["ci"]
            headline["steering slope probe − random p"] = dose["difference"]["p_value"]
        pw = steering.get("power") or {}
        headline["steering: smallest detectable slope (probe vs 0, α 0.05, power 0.8)"] = pw.get("mde_slope_probe_vs_zero")
        headline["steering: smallest detectable slope (probe − random)"] = pw.get("mde_slope_probe_vs_random")
        if steering.get("local_slope"):
            nl = steering["local_slope"]["null"]
            headline["steering local slope: probe percentile among random directions"] = nl["percentile"]
            headline["steering local slope: two-sided p"] = nl["p_two_sided"]
    if inlp:
        k = list(range(len(inlp.get("test_r", []))))
        if k:
            figures["INLP"] = inlp_trajectory(k, inlp["test_r"], inlp.get("loto_r") or [np.nan] * len(k),
                                              inlp.get("shuffled_test_r") or [np.nan] * len(k),
                                              run.figure("inlp.png"))
    extra = extra or {}
    if extra.get("patching"):
        pt = extra["patching"]
        lines = ["| source | mode | " + " | ".join(f"L{l}" for l in pt["layers"]) + " |",
                 "|---|---|" + "---|" * len(pt["layers"])]
        for kind, res in pt["sources"].items():
            if "recovered" not in res:
                continue
            for mode, curves in res["recovered"].items():
                lines.append(f"| {kind} | {mode} | " + " | ".join(_fmt(v, 2) for v in curves["pooled"]) + " |")
        sections.append(("End-of-turn activation patching", "Fraction of the source prompt's P(A) recovered by "
                         "patching the residual at the end-of-turn token (eot) or the whole turn boundary (span) "
                         "into the target prompt, per layer (pooled least squares).\n\n" + "\n".join(lines)))
    if extra.get("pref_shift") and extra["pref_shift"].get("shifts"):
        ps_ = extra["pref_shift"]
        lines = ["| base → shift | held-out tasks | corr(Δprobe, Δutility) on held-out tasks [95% CI] | p | "
                 "utility corr (held-out) | in-sample r, all tasks (not evidence) |", "|---|---|---|---|---|---|"]
        for sp, r in ps_["shifts"].items():
            h = r.get("heldout") or r.get("test")  # ("test": summaries written before the held-out-only change)
            t = h["tracking"]
            ins = (r.get("all_in_sample") or r.get("all") or {}).get("tracking", {}).get("r")
            lines.append(f"| {ps_['base']} → {sp} | {h.get('n')} | {_fmt(t['r'])} [{_fmt(t['ci'][0])}, "
                         f"{_fmt(t['ci'][1])}] | {_fmt(t['p_value'])} | {_fmt(h.get('utility_corr'))} | {_fmt(ins)} |")
            headline[f"preference-shift tracking r, held-out tasks [{sp}]"] = t["r"]
        sections.append(("Preference shift", "Does the base persona's probe score move with the measured "
                         "utility change when the persona changes? Scored only on the tasks the saved probe did "
                         f"not train on ({ps_.get('heldout_from', 'test split')}); the all-task r is in-sample "
                         "(most tasks trained the probe) and shown only for comparison. (The content baseline "
                         "cannot move: it sees only the task text.)\n\n" + "\n".join(lines)))
    if extra.get("truefalse"):
        lines = ["| persona | probe AUC (true vs false) | ridge CV AUC | logistic CV AUC |", "|---|---|---|---|"]
        below = []
        for p, r in extra["truefalse"]["persona"].items():
            if "probe_auc" not in r:
                continue
            pa = r["probe_auc"]["auc"] if isinstance(r["probe_auc"], dict) else r["probe_auc"]
            rc = r["ridge_cv"]["auc"] if isinstance(r["ridge_cv"], dict) else r["ridge_cv"]
            lc = r["logistic_cv"]["auc"] if isinstance(r["logistic_cv"], dict) else r["logistic_cv"]
            lines.append(f"| {p} | {below_chance_mark(pa)} | {below_chance_mark(rc)} | {below_chance_mark(lc)} |")
            below += [f"{name} [{p}]" for name, v in (("probe AUC", pa), ("ridge CV AUC", rc), ("logistic CV AUC", lc))
                      if _is_below(v)]
        flag = ("" if not below else f"\n\n**Below chance (AUC < 0.5)**: {', '.join(below)}. A cross-validated "
                "classifier below 0.5 learned nothing that transfers across folds (or the folds are too small); the "
                "probe's AUC below 0.5 means its score runs opposite to truth.")
        sections.append(("True/false statements", "AUC of the preference probe's score for true vs false "
                         "statements, next to classifiers trained on them directly (cross-validated). Chance is "
                         "0.5; cells below it are marked ▼.\n\n" + "\n".join(lines) + flag))
    if truth and "checks" in truth:  # a planted organism (prefjax.organism_planted.score_run)
        lines = ["| check | value | target | met |", "|---|---|---|---|"]
        for name, value, thr, ok in truth["checks"]:
            lines.append(f"| {name} | {_fmt(value)} | {thr} | {'yes' if ok else '**no**'} |")
        headline["planted-organism targets met"] = bool(truth["passed"])
        sections.insert(0, ("Recovery of the planted truth", "This model is the real Gemma-3-270M with a planted "
                            "preference circuit (prefjax.models.planted); every estimate is compared with the planted "
                            f"utilities and directions at layer {truth['layer']}.\n\n" + "\n".join(lines)))
    elif truth:
        lines = ["| persona | utilities vs hidden r | probe vs hidden r | content baseline r |", "|---|---|---|---|"]
        for p, r in truth.get("persona", truth).items():
            if isinstance(r, dict) and "utility_r" in r:
                lines.append(f"| {p} | {_fmt(r['utility_r'])} | {_fmt(r.get('probe_r_hidden'))} | "
                             f"{_fmt(r.get('content_baseline_r'))} |")
                headline[f"recovered vs planted utility r [{p}]"] = r["utility_r"]
        sections.insert(0, ("Recovery of the planted preferences", "This model is an organism with planted "
                            "utilities; the pipeline's estimates are compared with them.\n\n" + "\n".join(lines)))
    mult = adjust_family(family_of_tests(probes, transfer, steering, extra, personas))
    if mult["tests"]:
        sections.append(("Tests and family-wise correction", family_text(mult)))
        for t in mult["tests"]:
            if t["test"].startswith("probe r, layer chosen inside CV"):
                headline[t["test"].replace("inside CV", "inside CV: Holm-adjusted p")] = t["p_holm"]
        headline["tests in the family (Holm) / Holm-adjusted p < 0.05"] = f"{mult['m']} / {mult['n_significant_holm']}"
    summary = {"headline": headline, "extra": extra, "truth": truth, "utilities": utilities, "probes": probes, "transfer": transfer,
               "multiplicity": mult,
               "steering": steering, "inlp": inlp}
    table, summary["timing"] = _timing_table(stage_times(run, stage_order), load_seconds, time.time() - t0)
    return write_report(wd, summary, figures, sections, title="prefjax report", footer=[("Stage times", table)],
                        preamble=distinguishability_text(probes, transfer, steering, mult))
