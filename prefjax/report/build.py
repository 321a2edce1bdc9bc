"""Assemble a run's ``summary.json``, ``report.md`` and figures from the stage results."""

from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from prefjax.report.figures import (dose_response, inlp_trajectory, probe_r_by_layer, transfer_heatmap,
                                    utilities_by_topic)
from prefjax.report.summary import write_report


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


def distinguishability_text(probes: dict | None, transfer: dict | None, steering: dict | None) -> str:
    """The report's opening paragraph: in words, which numbers are and are not distinguishable from their
    nulls (label-shuffle for probes and transfer, random directions for steering) and the smallest
    steering effect the run could detect."""
    lines = []
    if probes:
        for p, ps in probes.get("persona", {}).items():
            best = next(d for d in ps["per_layer"] if d["layer"] == ps["best_layer"])
            nst = best.get("nested")
            if nst is None:
                continue
            pv = nst.get("p_value")
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
        head = (f"- **Steering** ({steering['n_pairs']} pairs; slopes from |c| ≤ {_fmt(dose.get('linear_max'), 2)}"
                + (f"; saturating coefficients {_alphas(sat)} shown, not used for slopes" if sat else "") + "): ")
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
    return (f"Slope of P(steered) per unit coef, fitted on the coefficients with |c| ≤ {dose['linear_max']:g} "
            f"({_alphas(dose['linear_coefs'])})" + (f"; saturating coefficients {_alphas(sat)} are shown above "
                                                     "but not fitted" if sat else "") +
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
    util_lines = ["| persona | comparisons (pairs) | ok | refusal | unparseable | split-half r |", "|---|---|---|---|---|---|"]
    for p in personas:
        u = utilities[p]
        c = u["counts"]
        util_lines.append(f"| {p} | {u['n_pairs']} | {c.get('ok', 0)} | {c.get('refusal', 0)} | "
                          f"{c.get('unparseable', 0) + c.get('both', 0)} | {_fmt(u['split_half_r'])} |")
        headline[f"utility split-half r [{p}]"] = u["split_half_r"]
    sections.append(("Utilities", "\n".join(util_lines) + "\n\nSplit-half r: utilities fitted on two random halves "
                     "of the comparisons, correlated. It bounds how well any probe can predict them."))
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
            headline[f"probe nested-CV r [{p}]"] = bn["r"]
            headline[f"probe nested-CV r 95% CI [{p}]"] = bn["ci"]
            headline[f"probe shuffle p [{p}]"] = bn["p_value"]
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
        sections.append(("Probes", "\n".join(lines) + f"\n\nNested-CV r: ridge probe, alpha chosen by "
                         f"{probes.get('cv_inner', '?')}-fold CV inside each of {probes.get('cv_outer', '?')} outer "
                         "training sets, Pearson r on each outer test fold averaged (95% bootstrap interval over "
                         "test tasks within folds; shuffle p: labels permuted and the whole nested procedure rerun, "
                         "alpha re-chosen). The best layer is the one with the largest nested-CV r, so its r is "
                         "mildly optimistic (a maximum over layers); the per-layer table shows them all. The saved "
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
                 "P(steered) random [95% CI] | on-label rate |", "|---|---|---|---|---|---|"]
        for a, b in zip(steering["probe"], steering["random"]):
            lines.append(f"| {a['coef']:+.2f} | {'yes' if a.get('linear', True) else 'no (saturating)'} | "
                         f"{_ci(a['p_steered_mean'], a.get('p_steered_ci'))} | {a['k']}/{a['n']} "
                         f"[{a['ci'][0]:.2f}, {a['ci'][1]:.2f}] | {_ci(b['p_steered_mean'], b.get('p_steered_ci'))} | "
                         f"{a['on_label_rate']:.2f} |")
        sections.append(("Steering", f"Layer {steering['layer']}, persona {steering['persona']}, {steering['mode']} "
                         f"mask, coefficient in units of the mean residual norm ({steering['scale']:.1f}); each of "
                         f"{steering['n_pairs']} pairs steered once towards Task A and once towards Task B, so label "
                         "position bias cancels at c = 0. On-label rate: how often the top next token is one of "
                         "the two labels (a coherence check: low means the steered model left the format). "
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
        lines = ["| base → shift | corr(Δprobe, Δutility) [95% CI] | p | utility corr |", "|---|---|---|---|"]
        for sp, r in extra["pref_shift"]["shifts"].items():
            t = r["all"]["tracking"]
            lines.append(f"| {extra['pref_shift']['base']} → {sp} | {_fmt(t['r'])} [{_fmt(t['ci'][0])}, "
                         f"{_fmt(t['ci'][1])}] | {_fmt(t['p_value'])} | {_fmt(r['all'].get('utility_corr'))} |")
            headline[f"preference-shift tracking r [{sp}]"] = t["r"]
        sections.append(("Preference shift", "Does the base persona's probe score move with the measured "
                         "utility change when the persona changes? (The content baseline cannot move: it sees "
                         "only the task text.)\n\n" + "\n".join(lines)))
    if extra.get("truefalse"):
        lines = ["| persona | probe AUC (true vs false) | ridge CV AUC | logistic CV AUC |", "|---|---|---|---|"]
        for p, r in extra["truefalse"]["persona"].items():
            if "probe_auc" not in r:
                continue
            pa = r["probe_auc"]["auc"] if isinstance(r["probe_auc"], dict) else r["probe_auc"]
            rc = r["ridge_cv"]["auc"] if isinstance(r["ridge_cv"], dict) else r["ridge_cv"]
            lc = r["logistic_cv"]["auc"] if isinstance(r["logistic_cv"], dict) else r["logistic_cv"]
            lines.append(f"| {p} | {_fmt(pa)} | {_fmt(rc)} | {_fmt(lc)} |")
        sections.append(("True/false statements", "AUC of the preference probe's score for true vs false "
                         "statements, next to classifiers trained on them directly (cross-validated).\n\n"
                         + "\n".join(lines)))
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
    summary = {"headline": headline, "extra": extra, "truth": truth, "utilities": utilities, "probes": probes, "transfer": transfer,
               "steering": steering, "inlp": inlp}
    table, summary["timing"] = _timing_table(stage_times(run, stage_order), load_seconds, time.time() - t0)
    return write_report(wd, summary, figures, sections, title="prefjax report", footer=[("Stage times", table)],
                        preamble=distinguishability_text(probes, transfer, steering))
