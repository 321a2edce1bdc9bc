"""Assemble a run's ``summary.json``, ``report.md`` and figures from the stage results."""

from __future__ import annotations

import os

import numpy as np

from prefjax.report.figures import (dose_response, inlp_trajectory, probe_r_by_layer, transfer_heatmap,
                                    utilities_by_topic)
from prefjax.report.summary import write_report


def _fmt(x, nd=3):
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def build_report(run, cfg, *, pool, personas, mu, utilities, probes, transfer, steering, inlp) -> str:
    """Write figures + ``summary.json`` + ``report.md`` into the run's workdir; return the report path."""
    wd = run.workdir
    fig_dir = os.path.join(wd, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    figures = {}
    topics = list(pool.topic_array())
    figures["utilities by topic"] = utilities_by_topic({p: mu[p] for p in personas}, topics,
                                                       os.path.join(fig_dir, "utilities_by_topic.png"))
    from prefjax.pipeline import _get
    headline = {"model": str(_get(cfg, "model.source", "")), "tasks": len(pool), "personas": ", ".join(personas)}
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
        lines = ["| persona | best layer | held-out r | LOTO r | content baseline r | content LOTO r | shuffle p |",
                 "|---|---|---|---|---|---|---|"]
        for p in personas:
            ps = probes["persona"][p]
            best = next(d for d in ps["per_layer"] if d["layer"] == ps["best_layer"])
            cb = ps["content_baseline"]
            lines.append(f"| {p} | {ps['best_layer']} | {_fmt(best['heldout_r'])} | {_fmt(best['loto_r'])} | "
                         f"{_fmt(cb['heldout_r'])} | {_fmt(cb['loto_r'])} | {_fmt(ps['shuffle_null'].get('p_value'))} |")
            headline[f"probe held-out r [{p}]"] = best["heldout_r"]
            headline[f"content-baseline r [{p}]"] = cb["heldout_r"]
            curves = {"held-out": np.array([d["heldout_r"] if d["heldout_r"] is not None else np.nan
                                            for d in ps["per_layer"]], float),
                      "leave-one-topic-out": np.array([d["loto_r"] if d["loto_r"] is not None else np.nan
                                                       for d in ps["per_layer"]], float),
                      "content baseline": np.full(len(layers), cb["heldout_r"] if cb["heldout_r"] is not None
                                                  else np.nan)}
            figures[f"probe r by layer [{p}]"] = probe_r_by_layer(layers, curves,
                                                                  os.path.join(fig_dir, f"probe_r_{p}.png"))
        sections.append(("Probes", "\n".join(lines) + "\n\nHeld-out r: ridge probe on a 20% test split (alpha "
                         "chosen on a separate 20% eval split). LOTO: each topic held out in turn, pooled."))
    if transfer and transfer.get("persona_r") is not None:
        figures["cross-persona transfer"] = transfer_heatmap(
            np.asarray(transfer["persona_r"], float), transfer["personas"], os.path.join(fig_dir, "transfer_persona.png"),
            baseline=np.asarray(transfer["utility_corr"], float))
    if transfer:
        figures["cross-layer transfer"] = transfer_heatmap(
            np.asarray(transfer["layer_r"], float), [str(l) for l in transfer["layers"]],
            os.path.join(fig_dir, "transfer_layer.png"), title="Cross-layer probe transfer (r)")
    if steering:
        coefs = steering["coefs"]
        figures["steering dose-response"] = dose_response(
            coefs, [r["k"] for r in steering["probe"]], [r["n"] for r in steering["probe"]],
            os.path.join(fig_dir, "steering.png"),
            control={"k": [r["k"] for r in steering["random"]], "n": [r["n"] for r in steering["random"]],
                     "label": "random direction"})
        lines = ["| coef | P(steered) probe | choice rate probe [95% CI] | P(steered) random | on-label rate |",
                 "|---|---|---|---|---|"]
        for a, b in zip(steering["probe"], steering["random"]):
            lines.append(f"| {a['coef']:+.2f} | {a['p_steered_mean']:.3f} | {a['k']}/{a['n']} "
                         f"[{a['ci'][0]:.2f}, {a['ci'][1]:.2f}] | {b['p_steered_mean']:.3f} | {a['on_label_rate']:.2f} |")
        sections.append(("Steering", f"Layer {steering['layer']}, persona {steering['persona']}, {steering['mode']} "
                         f"mask, coefficient in units of the mean residual norm ({steering['scale']:.1f}).\n\n"
                         + "\n".join(lines) + f"\n\nSlope of P(steered) per unit coef: probe "
                         f"{steering['slope_probe']:+.3f}, random {steering['slope_random']:+.3f}."))
        headline["steering slope (probe)"] = steering["slope_probe"]
        headline["steering slope (random)"] = steering["slope_random"]
    if inlp:
        k = list(range(len(inlp.get("test_r", []))))
        if k:
            figures["INLP"] = inlp_trajectory(k, inlp["test_r"], inlp.get("loto_r") or [np.nan] * len(k),
                                              inlp.get("shuffled_test_r") or [np.nan] * len(k),
                                              os.path.join(fig_dir, "inlp.png"))
    summary = {"headline": headline, "utilities": utilities, "probes": probes, "transfer": transfer,
               "steering": steering, "inlp": inlp}
    return write_report(wd, summary, figures, sections, title="prefjax report")
