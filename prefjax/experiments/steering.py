"""The steering experiment: contrastive dose-response of the choice, probe direction vs a random one.

The intervention itself (a pure transform of the forward pass) is :mod:`prefjax.steering`; this
module is the experiment around it: the steered prompts (:func:`steering_prompts`), the batched sweep
over (direction, coefficient, prompt) (:func:`steering_sweep`), the dose-response and its sampled
completions, and the pipeline stage :func:`run_steering_stage`. Helpers for other designs:
:func:`dose_response` (choice rate and refusal rate per coefficient with Wilson 95% intervals),
:func:`format_table`, and :func:`completion_loglik` (coherence side effect: the *unsteered* model's
mean log-likelihood per token of a completion).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prefjax.elicit.parse import parse_choice
from prefjax.elicit.prompts import DEFAULT_TEMPLATE, choice_messages, render_choice, shift_spans
from prefjax.elicit.runner import forced_text, label_token_ids
from prefjax.engine import Engine, EngineError, Request, RowSteer, mesh_rows
from prefjax.generation import generate
from prefjax.model import common_prefix_len
from prefjax.probes import RidgeProbe
from prefjax.probes.nulls import random_direction_null, random_unit_directions
from prefjax.progress import log, progress
from prefjax.runconfig import SteeringConfig
from prefjax.stages import atomic_save_npz, atomic_write_json, resid_hook
from prefjax.stats_small import min_detectable_effect, n_for_effect, t_summary, wilson_interval
from prefjax.steering import SteerSpec, random_direction, readout_gradient, token_span_mask
from prefjax.tokenize import left_pad


def steering_persona(config: SteeringConfig, personas) -> str:
    """The persona the steering experiment uses: ``steering.persona``, or the run's first persona."""
    return config.persona or list(personas)[0]


def steering_prompts(tok, pairs, persona, mode: str, *, forced: bool):
    """Token ids, signed task-span masks and steered label for each pair shown twice (steered towards
    Task A, then towards Task B). ``forced`` appends logit mode's forced prefix to the prompt."""
    seqs, masks, toward = [], [], []
    for a, b in pairs:
        user, spans = render_choice(DEFAULT_TEMPLATE, a, b)
        full = tok.chat(choice_messages(DEFAULT_TEMPLATE, a, b, persona), add_generation_prompt=True)
        if forced:
            full += forced_text(DEFAULT_TEMPLATE)
        spans_full = shift_spans(full, user, spans)
        for steered, other in (("A", "B"), ("B", "A")):
            signs = {steered: 1.0, other: -1.0} if mode == "contrastive" else {steered: 1.0}
            ids, m = token_span_mask(tok, full, {k: spans_full[k] for k in signs}, signs=signs, add_bos=False)
            seqs.append(ids)
            masks.append(m)
            toward.append(steered)
    return seqs, masks, toward


POWER_ALPHA, POWER = 0.05, 0.8  # the test level and power of the minimum-detectable-effect statements


def linear_range(coefs: Sequence[float], linear_max: float) -> tuple[list[float], list[float]]:
    """(coefficients used for slopes, saturating ones shown but not used): |c| <= ``linear_max``."""
    if not (np.isfinite(linear_max) and linear_max > 0):
        raise ValueError(f"steering.linear_max must be positive and finite, got {linear_max}")
    lin = [float(c) for c in coefs if abs(c) <= linear_max + 1e-12]
    return lin, [float(c) for c in coefs if abs(c) > linear_max + 1e-12]


def on_format_coefs(coefs: Sequence[float], on_label: Mapping[str, Sequence[float]] | None,
                    min_on_label: float) -> tuple[list[float], list[float]]:
    """(coefficients on format, coefficients off format): a coefficient is on format when *every*
    direction's on-label rate (``on_label[name][c]``: how often the top next token is one of the two labels)
    is at least ``min_on_label``. ``on_label`` None: every coefficient is on format."""
    if not (np.isfinite(min_on_label) and 0.0 <= min_on_label <= 1.0):
        raise ValueError(f"steering.min_on_label must be in [0, 1], got {min_on_label}")
    if on_label is None:
        return [float(c) for c in coefs], []
    rates = {}
    for name, r in on_label.items():
        r = np.asarray(r, np.float64)
        if r.shape != (len(coefs),):
            raise ValueError(f"on_label[{name!r}] has shape {r.shape}; expected one rate per coefficient "
                             f"({len(coefs)})")
        rates[name] = r
    ok = np.ones(len(coefs), bool)
    for r in rates.values():
        ok &= r >= min_on_label - 1e-12
    return [float(c) for c, k in zip(coefs, ok) if k], [float(c) for c, k in zip(coefs, ok) if not k]


def dose_slopes(coefs: Sequence[float], p_steered: Mapping[str, np.ndarray], *, linear_max: float,
                on_label: Mapping[str, Sequence[float]] | None = None, min_on_label: float = 0.0,
                alpha: float = POWER_ALPHA, power: float = POWER) -> dict:
    """Dose-response slopes within the linear range and on format, tested over pairs, with the smallest
    detectable slope.

    ``p_steered[name]`` is [C, P] (coefficient, prompt): P(choose the steered task) with prompts ``2k``
    and ``2k + 1`` the two showings (steered towards A, towards B) of pair ``k``. Only coefficients with
    ``|c| <= linear_max`` and on format (:func:`on_format_coefs`: every direction's on-label rate in
    ``on_label`` [C] at least ``min_on_label``) enter a slope: off the answer format P(steered) is read from
    label tokens the model no longer means to emit, and a slope through such points is not a preference
    shift. ``used_coefs`` lists the coefficients the slopes use, ``off_format_coefs`` the linear-range ones
    dropped for format, ``on_label`` the rates. Per pair, the two showings are averaged (label bias cancels) and
    regressed on c; the pair slopes are the units of a one-sample t test (``per_pair[name]``: mean = the
    slope of the mean curve, t interval, p against 0) and, for the probe minus the random direction, a
    paired test (``difference``). ``mde`` gives the smallest mean slope (per unit coef) each test detects
    at level ``alpha`` with probability ``power`` given the number of pairs and the observed spread of
    pair slopes, and ``n_pairs_for_observed`` how many pairs the observed effect would need.
    With fewer than two distinct coefficients used every slope is None (and ``note`` says why).
    """
    lin, sat = linear_range(coefs, linear_max)
    on, off = on_format_coefs(coefs, on_label, min_on_label)
    on_set = set(on)
    used = [c for c in lin if c in on_set]
    out = {"linear_max": float(linear_max), "linear_coefs": lin, "saturating_coefs": sat,
           "min_on_label": float(min_on_label), "used_coefs": used,
           "off_format_coefs": [c for c in lin if c not in on_set],
           "on_label": None if on_label is None else {k: [float(v) for v in r] for k, r in on_label.items()},
           "alpha": alpha, "power": power, "slope": {}, "per_pair": {}, "difference": None, "mde": None,
           "n_pairs_for_observed": None, "note": None, "note_power": None}
    names = list(p_steered)
    if len(set(used)) < 2:
        why = (f"within |c| <= {linear_max:g}" if on_label is None else
               f"within |c| <= {linear_max:g} with every direction's on-label rate >= {min_on_label:g} "
               f"(off format: {out['off_format_coefs']})")
        out["note"] = (f"fewer than two distinct coefficients {why} (coefs {list(coefs)}): no dose-response "
                       "slope is computed")
        out["slope"] = {n: None for n in names}
        return out
    sel = [i for i, c in enumerate(coefs) if abs(c) <= linear_max + 1e-12 and float(c) in on_set]
    c = np.asarray([coefs[i] for i in sel], np.float64)
    cc = c - c.mean()
    per = {}
    for name in names:
        p = np.asarray(p_steered[name], np.float64)[sel]              # [C_lin, P]
        if p.shape[1] % 2:
            raise ValueError(f"p_steered[{name!r}] has {p.shape[1]} prompts; expected two per pair")
        pair = p.reshape(len(sel), -1, 2).mean(-1)                      # [C_lin, n_pairs]
        per[name] = cc @ (pair - pair.mean(0)) / (cc @ cc)              # [n_pairs]
        out["per_pair"][name] = t_summary(per[name])
        out["slope"][name] = float(per[name].mean())
    n = len(next(iter(per.values())))
    mde = {}
    # an observed spread of 0 (every pair the same slope: saturated or degenerate responses) gives no
    # usable variance estimate, so no detectable-effect statement (None), rather than "0"
    mde_of = lambda sd: min_detectable_effect(sd, n, alpha=alpha, power=power) if sd else None
    if "probe" in per:
        mde["probe_vs_zero"] = mde_of(out["per_pair"]["probe"]["sd"])
    if "probe" in per and "random" in per:
        diff = per["probe"] - per["random"]
        out["difference"] = t_summary(diff)
        sd = out["difference"]["sd"]
        mde["probe_vs_random"] = mde_of(sd)
        if sd:
            out["n_pairs_for_observed"] = n_for_effect(float(diff.mean()), sd, alpha=alpha, power=power)
    if any(v is None for v in mde.values()):
        out["note_power"] = ("the pair slopes have no spread (every pair the same slope: no response at all, "
                             "or saturated responses), so the smallest detectable slope is undefined")
    out["mde"] = mde
    out["n_pairs"] = n
    return out


def null_detectable(null_slopes: np.ndarray, gradient_norm: float) -> dict:
    """How large a local slope (and its cosine with the slope gradient) must be to land beyond the
    random-direction null: the 95th and 99th percentiles of |random slope| (two-sided p < 0.05 / 0.01)."""
    a = np.abs(np.asarray(null_slopes, np.float64))
    q95, q99 = (float(v) for v in np.quantile(a, [0.95, 0.99]))
    cos = (lambda v: v / gradient_norm if gradient_norm > 0 else None)
    return {"abs_slope_p05": q95, "abs_slope_p01": q99, "abs_cosine_p05": cos(q95), "abs_cosine_p01": cos(q99)}


def pad_prompts(seqs, masks):
    """Token-id rows and their steering masks, left-padded (with id 0) to the longest: (ids, attention, mask)
    [P, T]."""
    ids, valid = left_pad(seqs, 0)
    msk = np.zeros(ids.shape, np.float32)
    msk[valid] = np.concatenate([np.asarray(m, np.float32) for m in masks])
    return ids, valid.astype(np.int32), msk


def run_steering_stage(config: SteeringConfig, run, model, pool, personas, *, probe_summary, mean_norms,
                       seed: int) -> dict:
    """Dose-response of P(choose the steered task) over coefficients, probe direction vs random.

    Every sampled pair is shown twice, once steering towards Task A and once towards Task B, so the
    model's label-position bias cancels at c = 0. ``contrastive`` adds +c on the steered task's tokens
    and -c on the other's; ``single`` adds +c on the steered task only. The coefficient is in units of
    the mean residual norm at the steering layer (``mean_norms``: hook -> norm, from the activation stage).

    Logit mode reads P(A) after the forced prefix; with ``config.generate_tokens`` > 0 the same sweep
    also writes greedy completions (see :func:`steered_completions`; through the continuous-batching
    engine where the model allows it and ``config.engine`` is on). Every (direction, coefficient,
    prompt) is one row of a batched sweep (:func:`steering_sweep`). Writes
    ``stages/steering/p_a.npz`` (and ``completions.json``) of ``run``.

    Slopes use only the coefficients with ``|c| <= config.linear_max`` where both the probe's and the random
    direction's on-label rate (top next token after the forced prefix is a label) is at least
    ``config.min_on_label`` (every coefficient is still run and shown; rows carry ``linear``,
    ``on_format`` and ``used``; ``used_coefs`` lists them); :func:`dose_slopes` tests them over pairs and
    states the smallest detectable slope, and ``power`` collects the minimum detectable effects of both
    steering tests. The probe − random test compares the probe with one random direction over pairs: a
    pair-level test, not a direction-level one. The direction-level null here is the local slope at c = 0
    (:func:`local_slope_null`, one backward pass for any number of directions). A finite-coefficient null
    (the sweep repeated along >= 100 random directions) is not run: each direction costs one steered prefill
    per prompt and nonzero coefficient (halved by the contrastive symmetry), measured at about 20 s per
    direction for the main job's 24 prompts and four on-format coefficients on the real Gemma-3-270M on a
    shared 2-core CPU (2026-12, issue 28), so 100 isotropic plus 100 covariance-matched directions would
    take about an hour, far past the main job's 10-minute budget.
    """
    if config.n_null < 100:
        raise ValueError(f"steering.n_null is {config.n_null}: the random-direction null needs at least 100 directions")
    linear_range(config.coefs, config.linear_max)  # a bad steering.linear_max fails before any compute
    on_format_coefs(config.coefs, None, config.min_on_label)  # and a bad steering.min_on_label
    pname = steering_persona(config, personas)
    ps = probe_summary["persona"][pname]
    layer = ps["best_layer"] if config.layer in ("", "best") else int(config.layer)
    if not 0 <= layer < model.n_layers:
        raise ValueError(f"steering.layer {layer} is outside the model's layers 0..{model.n_layers - 1}")
    note = None
    if layer == model.n_layers - 1:
        note = ("steering at the last layer adds to the task tokens after every attention layer has read them: "
                "the answer position cannot see it, so no effect is possible")
        log("warning: " + note)
    hook = resid_hook(layer)
    dir_layer = layer if config.direction_layer in ("", None) else int(config.direction_layer)
    if dir_layer != layer:
        log(f"steering: direction from the layer-{dir_layer} probe added at layer {layer} "
            f"(steering.direction_layer={config.direction_layer!r})")
    probe_layers = [d["layer"] for d in ps.get("per_layer", [])]
    if probe_layers and dir_layer not in probe_layers:
        raise ValueError(f"steering: no probe at layer {dir_layer} for persona {pname!r} (probes exist at layers "
                         f"{probe_layers}, the captured activations.layers); steer at one of them or set "
                         f"steering.direction_layer to one")
    direction = RidgeProbe.load(run.probe_dir(pname, dir_layer)).direction
    scale = float(mean_norms.get(hook, ps["mean_resid_norm"]))
    coefs = [float(c) for c in config.coefs]
    n_pairs = config.n_pairs
    mode = config.mode
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(pool))
    pairs = [(pool[int(idx[2 * k])], pool[int(idx[2 * k + 1])]) for k in range(min(n_pairs, len(pool) // 2))]
    tok = model.tokenizer
    ida, idb = label_token_ids(tok, DEFAULT_TEMPLATE)
    persona = personas[pname]
    n_new = int(config.generate_tokens or 0)
    directions = {"probe": direction, "random": random_direction(model.d_model, 1234)}
    sweep = steering_sweep(model, pairs, persona, mode, layer, scale, coefs, directions, n_new,
                           engine=config.engine)
    toward_a = np.asarray([t == "A" for t in sweep["toward"]])
    P = len(toward_a)
    lin, _ = linear_range(coefs, config.linear_max)
    results, p_a_all, p_st_all = {}, {}, {}
    for name in directions:
        rows, p_a_all[name], p_st_all[name] = [], [], []
        for ci, c in enumerate(coefs):
            lg = sweep["logits"][name][ci]
            pa = np.exp(lg[:, ida] - np.logaddexp(lg[:, ida], lg[:, idb]))
            p_steered = np.where(toward_a, pa, 1.0 - pa)
            p_a_all[name].append(pa)
            p_st_all[name].append(p_steered)
            k = int((p_steered >= 0.5).sum())
            lo, hi = wilson_interval(k, P)
            on_label = float(np.isin(lg.argmax(-1), [ida, idb]).mean())
            pair_mean = t_summary(p_steered.reshape(-1, 2).mean(1))  # interval over pairs
            rows.append({"coef": c, "p_steered_mean": float(p_steered.mean()), "p_steered_ci": pair_mean["ci"],
                         "k": k, "n": P, "ci": [float(lo), float(hi)], "on_label_rate": on_label, "linear": c in lin})
        results[name] = rows
    atomic_save_npz(run.stage_file("steering", "p_a.npz"), coefs=np.asarray(coefs),
                    toward_a=toward_a, probe=np.asarray(p_a_all["probe"]), random=np.asarray(p_a_all["random"]))
    sampled = None
    if n_new > 0:
        sampled = steered_completions(run, model, sweep, coefs, n_new)
    # slopes from the linear range, on format, only (saturating and off-format coefficients are shown, not
    # fitted), tested over pairs
    on_label = {name: [r["on_label_rate"] for r in rows] for name, rows in results.items()}
    dose = dose_slopes(coefs, {k: np.asarray(v) for k, v in p_st_all.items()}, linear_max=config.linear_max,
                       on_label=on_label, min_on_label=config.min_on_label)
    used, on_set = set(dose["used_coefs"]), set(on_format_coefs(coefs, on_label, config.min_on_label)[0])
    for rows in results.values():
        for r in rows:
            r["on_format"], r["used"] = r["coef"] in on_set, r["coef"] in used
    if dose["off_format_coefs"]:
        log(f"steering: coefficients {dose['off_format_coefs']} left out of the slopes: on-label rate below "
            f"{config.min_on_label:g} (probe {[round(v, 3) for v in on_label['probe']]}, random "
            f"{[round(v, 3) for v in on_label['random']]})")
    if dose["note"]:
        log("steering: " + dose["note"])
    local = local_slope_null(model, pairs, persona, mode, layer, scale, directions, n_null=config.n_null, seed=seed)
    return {"persona": pname, "layer": layer, "direction_layer": dir_layer, "scale": scale, "mode": mode,
            "n_pairs": len(pairs), "n_prompts": P, "coefs": coefs, "min_on_label": float(config.min_on_label),
            "used_coefs": dose["used_coefs"], "off_format_coefs": dose["off_format_coefs"],
            "on_label": on_label, "probe": results["probe"],
            "random": results["random"], "slope_probe": dose["slope"]["probe"],
            "slope_random": dose["slope"]["random"], "dose_slopes": dose, "power": _power_summary(dose, local),
            "local_slope": local, "note": note, "sampled": sampled}


def _power_summary(dose: dict, local: dict) -> dict:
    """The smallest effects the steering tests could detect, in one place (the report's top sentence)."""
    mde = dose.get("mde") or {}
    det = local.get("detectable") or {}
    return {"alpha": dose["alpha"], "power": dose["power"], "n_pairs": dose.get("n_pairs"),
            "linear_coefs": dose["linear_coefs"], "saturating_coefs": dose["saturating_coefs"],
            "used_coefs": dose.get("used_coefs"), "off_format_coefs": dose.get("off_format_coefs"),
            "min_on_label": dose.get("min_on_label"),
            "mde_slope_probe_vs_zero": mde.get("probe_vs_zero"),
            "mde_slope_probe_vs_random": mde.get("probe_vs_random"),
            "n_pairs_for_observed_difference": dose.get("n_pairs_for_observed"),
            "local_abs_slope_p05": det.get("abs_slope_p05"), "local_abs_slope_p01": det.get("abs_slope_p01"),
            "local_abs_cosine_p05": det.get("abs_cosine_p05"), "local_abs_cosine_p01": det.get("abs_cosine_p01")}


def local_slope_null(model, pairs, persona, mode, layer, scale, directions, *, n_null: int, seed: int) -> dict:
    """The probe's local steering slope placed among ``n_null`` random directions.

    The slope of mean P(choose the steered task) in the coefficient at c = 0 along a unit direction u
    is ``<g, u>`` for one vector g (``prefjax.steering.readout_gradient`` of the label-logit gap, each
    prompt weighted by p(1 - p) at c = 0 and the sign of its steered label, times ``scale`` over the
    number of prompts). So a null over many random directions costs one backward pass. Returns the
    local slopes of the sweep's directions, the probe's cosine with g,
    :func:`prefjax.probes.nulls.random_direction_null` of the probe's slope among the random ones, and
    ``detectable`` (:func:`null_detectable`: the |slope| and |cosine with g| a direction needs to land
    beyond the null's 95th / 99th percentile of |slope|). The null is conditional on the sampled pairs:
    it asks whether the probe is special among directions for these prompts, not across prompt draws.
    """
    tok = model.tokenizer
    ida, idb = label_token_ids(tok, DEFAULT_TEMPLATE)
    seqs, masks, toward = steering_prompts(tok, pairs, persona, mode, forced=True)
    ids, att, msk = pad_prompts(seqs, masks)
    P, t = ids.shape
    logits, _ = model.run(ids, attention_mask=att, positions=np.full((P, 1), t - 1, np.int32))
    lg = np.asarray(logits[:, 0, :], np.float64)
    sign = np.where(np.asarray(toward) == "A", 1.0, -1.0)
    p_steered = 1.0 / (1.0 + np.exp(-sign * (lg[:, ida] - lg[:, idb])))
    readout = np.zeros((P, lg.shape[1]), np.float32)
    w = scale * p_steered * (1.0 - p_steered) * sign / P
    readout[:, ida], readout[:, idb] = w, -w
    g = readout_gradient(model, ids, att, np.full(P, t - 1), msk, layer, readout)
    units = {name: np.asarray(v, np.float64) / np.linalg.norm(v) for name, v in directions.items()}
    slopes = {name: float(g @ u) for name, u in units.items()}
    null = random_unit_directions(n_null, g.shape[0], seed=seed + 7919).astype(np.float64) @ g
    gn = float(np.linalg.norm(g))
    return {"slopes": slopes, "probe_cosine_with_gradient": float(units["probe"] @ g / gn) if gn > 0 else None,
            "gradient_norm": gn, "null": random_direction_null(slopes["probe"], null),
            "detectable": null_detectable(null, gn)}


def steering_sweep(model, pairs, persona, mode, layer, scale, coefs, directions, n_new, *, chunk: int = 112,
                   engine: bool = True) -> dict:
    """Run every (direction, coefficient, prompt) of the steering sweep.

    Returns ``toward`` (the steered label of each prompt), ``logits[name][ci]`` [P, V] float64 (the
    label position after the forced prefix) and, with ``n_new`` > 0, ``prompts`` (the unforced prompt
    ids), ``tokens[name][ci]`` / ``texts[name][ci]`` (greedy completions of the unforced prompts,
    stop token excluded; the model's default stop ids, :func:`prefjax.generation.default_stop_ids`).

    Cells that add the same vector to the same tokens are the same computation and run once: at c = 0
    every direction and mask, and in contrastive mode "towards B at c" is "towards A at -c" (same
    prompt, mask negated), so a symmetric sweep runs about half its cells. A cell's steering is
    ``coef * scale`` times its signed task-span mask over the prompt's tokens, added at ``layer``;
    generated tokens are not steered.

    Forced-prefix logits. Where the model keeps prefix caches, the cells run batched in chunks of
    ``chunk`` rows: the prompts' shared start once, then each cell's steered prompt (all but its last
    token) once as a cache (directions and coefficients are per-row steering leaves of one compiled
    program), and the last token plus the forced prefix on top. Otherwise each coefficient runs as its
    own forward pass over every prompt.

    Completions (``n_new`` > 0). With ``engine`` (default) every distinct cell is one request of one
    :class:`prefjax.engine.Engine` run (greedy, ``min(chunk, cells)`` rows, per-row
    :class:`prefjax.engine.RowSteer` with the cell's mask); see :func:`engine_completions`. Where the
    engine refuses the model or the requests (a log line), and with ``engine=False``, they come from
    ``generate`` as before: in the batched case from each chunk's cache (the last token, then
    decoding), otherwise one ``generate`` call per (direction, coefficient) over every prompt.
    """
    tok = model.tokenizer
    plain, masks, toward = steering_prompts(tok, pairs, persona, mode, forced=False)
    forced, fmasks, _ = steering_prompts(tok, pairs, persona, mode, forced=True)
    P, names = len(plain), list(directions)
    extra = [f[len(p):] for p, f in zip(plain, forced)]
    batched = (model.prefix_ok() and all(f[:len(p)] == p for p, f in zip(plain, forced))
               and len({tuple(e) for e in extra}) == 1 and len(extra[0]) > 0
               and all(not np.any(m[len(p) - 1:]) for p, m in zip(plain, masks))
               and all(not np.any(m[len(p):]) for p, m in zip(plain, fmasks)))
    out = {"toward": toward, "logits": {n: [None] * len(coefs) for n in names}, "prompts": plain,
           "tokens": {n: [None] * len(coefs) for n in names}, "texts": {n: [None] * len(coefs) for n in names}}
    # Cells that add the same vector to the same tokens are the same computation and run once (docstring).
    def key(name, ci, r):
        if coefs[ci] == 0:
            return ("c=0", tuple(plain[r]))
        return (name, tuple(plain[r]), tuple((coefs[ci] * np.asarray(masks[r], np.float64)).tolist()))
    every = [(name, ci, r) for name in names for ci in range(len(coefs)) for r in range(P)]
    cells = list({key(*cell): cell for cell in every}.values())  # one cell per key (all equal within a key)
    completions = None  # key -> (token ids, text) from the engine; None: generate in the branches below
    if n_new > 0 and engine:
        got = engine_completions(model, plain, masks, cells, layer=layer, scale=scale, coefs=coefs,
                                 directions=directions, n_new=n_new, rows=min(chunk, len(cells)))
        if got is not None:
            completions = {key(*cell): g for cell, g in zip(cells, got)}
    with_generate = n_new > 0 and completions is None

    def with_completions(out):  # the engine's completions, where it ran, into every cell
        if completions is not None:
            for name, ci, r in every:
                if out["tokens"][name][ci] is None:
                    out["tokens"][name][ci], out["texts"][name][ci] = [None] * P, [None] * P
                out["tokens"][name][ci][r], out["texts"][name][ci][r] = completions[key(name, ci, r)]
        return out

    bar = progress(total=len(names) * len(coefs) * P, desc="steering", unit="prompt")
    if not batched:  # one coefficient at a time: a forced-prefix forward (and generate)
        ids, att, msk = pad_prompts(forced, fmasks)
        t = ids.shape[1]
        width = max(len(p) for p in plain)
        gmask = np.zeros((P, width), np.float32)
        for r, m in enumerate(masks):
            gmask[r, :len(m)] = m
        for name, vec in directions.items():
            for ci, c in enumerate(coefs):
                spec = SteerSpec(layer=layer, direction=vec, coef=np.full((P,), c, np.float32), scale=scale, tokens=msk)
                logits, _ = model.run(ids, attention_mask=att, positions=np.full((P, 1), t - 1, np.int32), steer=spec)
                out["logits"][name][ci] = np.asarray(logits[:, 0, :], np.float64)
                if with_generate:
                    gen = generate(model, plain, max_new_tokens=n_new, temperature=0.0,
                                   steer=spec.replace(tokens=gmask))
                    out["tokens"][name][ci], out["texts"][name][ci] = gen.token_ids, gen.texts
                bar.update(P)
        bar.close()
        return with_completions(out)
    # Batched: row (direction d, coefficient ci, prompt r); every prompt but its last token is steered
    # and cached once per cell (the masks cover task spans only), on top of the prompts' common start.
    # The window check keeps room for n_new tokens wherever the completions come from, so the logits
    # do not depend on it.
    bodies = [p[:-1] for p in plain]
    hit = [int(np.flatnonzero(m)[0]) for m in masks if np.any(m)]
    skip = common_prefix_len(bodies, limit=min(hit) if hit else None)
    width = max(len(b) for b in bodies) - skip
    if skip and not model.fits_window(skip + width + 1 + max(len(extra[0]), n_new)):
        skip, width = 0, max(len(b) for b in bodies)  # left padding after the shared start: past the window
    shared = model.prefill(np.asarray([bodies[0][:skip]], np.int32)) if skip else None
    chunk = -(-len(cells) // -(-len(cells) // chunk))  # equal chunks of at most `chunk` rows
    pad = int(model.config.pad_id)
    done = {}
    for lo in range(0, len(cells), chunk):
        part = cells[lo:lo + chunk]
        part = part + [part[0]] * (chunk - len(part))  # one shape for every chunk
        toks, valid = left_pad([bodies[r][skip:] for _, _, r in part], pad, width=width)
        msk = np.zeros((chunk, width), np.float32)
        msk[valid] = np.concatenate([np.asarray(masks[r][skip:len(bodies[r])], np.float32) for _, _, r in part])
        coef = {name: np.zeros(chunk, np.float32) for name in names}
        for j, (name, ci, r) in enumerate(part):
            coef[name][j] = coefs[ci]
        specs = tuple(SteerSpec(layer=layer, direction=directions[name], coef=coef[name], scale=scale, tokens=msk)
                      for name in names)
        cache = model.prefill(toks, attention_mask=valid, prefix=shared, steer=specs)
        last = np.asarray([[plain[r][-1]] + list(extra[r]) for _, _, r in part], np.int32)
        logits, _ = model.run(last, positions=np.full((chunk, 1), last.shape[1] - 1, np.int32), prefix=cache)
        logits = np.asarray(logits[:, 0, :], np.float64)
        gen = None
        if with_generate:
            gen = generate(model, [[plain[r][-1]] for _, _, r in part], max_new_tokens=n_new, temperature=0.0,
                           prefix=cache, pad_multiple=1)
        n_real = min(chunk, len(cells) - lo)
        for j, cell in enumerate(part[:n_real]):
            done[key(*cell)] = (logits[j],) + ((gen.token_ids[j], gen.texts[j]) if gen is not None else (None, None))
        bar.update(sum(key(*cell) in done for cell in every) - bar.n)
    bar.close()
    for name, ci, r in every:
        lg, ids, text = done[key(name, ci, r)]
        if out["logits"][name][ci] is None:
            out["logits"][name][ci] = np.zeros((P, lg.shape[0]))
            out["tokens"][name][ci], out["texts"][name][ci] = [None] * P, [None] * P
        out["logits"][name][ci][r], out["tokens"][name][ci][r], out["texts"][name][ci][r] = lg, ids, text
    return with_completions(out)


def engine_completions(model, prompts, masks, cells, *, layer, scale, coefs, directions, n_new, rows
                       ) -> list[tuple[list[int], str]] | None:
    """Greedy completions of the sweep's ``cells`` ((direction name, coefficient index, prompt index)
    triples) from one :class:`prefjax.engine.Engine` run of ``rows`` cache rows (under a mesh rounded up to
    split over its batch axes, :func:`prefjax.engine.mesh_rows`): (token ids, text) per cell, stop token
    excluded.

    Cell ``(name, ci, r)`` is ``Request(prompts[r], n_new, steer=RowSteer(layer, directions[name],
    coefs[ci], scale, masks[r]))``: the float mask steers the prompt's tokens only, as the generate
    path's per-prompt mask does, and generated tokens are not steered. Temperature 0 and the model's
    default stop ids (those ``generate`` uses); the engine's default cache (the longest prompt's bucket
    plus four times ``n_new``) holds every request and lets finished rows refill. Returns None, having
    computed nothing, where the engine refuses the model or the requests (a log line says why).
    """
    try:
        eng = Engine(model, rows=mesh_rows(model, rows), temperature=0.0)
    except EngineError as e:
        log(f"steering: the engine does not serve this model ({e}); completions with generate instead")
        return None
    requests = [Request(prompts[r], n_new, steer=RowSteer(layer, directions[name], coef=float(coefs[ci]),
                                                          scale=float(scale), tokens=np.asarray(masks[r], np.float32)))
                for name, ci, r in cells]
    bar = progress(total=len(requests), desc="steering completions", unit="completion")
    try:
        res = eng.run(requests, on_done=lambda i, samples: bar.update(1))
    except EngineError as e:  # raised by the request checks, before any compute
        bar.close()
        log(f"steering: the engine refused the requests ({e}); completions with generate instead")
        return None
    bar.close()
    s = eng.stats
    log(f"steering: engine: {len(requests)} completions, {s.generated_tokens} tokens, {s.decode_steps} decode "
        f"steps, {s.prefills} prefills, {s.waves} wave(s)")
    tok = model.tokenizer
    return [(list(r[0].token_ids), tok.decode(r[0].token_ids)) for r in res]


def steered_completions(run, model, sweep, coefs, n_new) -> dict:
    """The steering sweep with sampled completions: choice, refusal and coherence per coefficient.

    Each pair is shown twice (steered towards A, then towards B) without the forced prefix; the model
    writes ``n_new`` tokens (greedy), which are parsed like elicitation replies. Coherence is the mean
    per-token log-likelihood of the steered completion under the unsteered model.
    """

    prompts, toward = sweep["prompts"], sweep["toward"]
    names = list(sweep["tokens"])
    # every completion of the sweep scored in one call (each distinct prompt runs once)
    all_tokens = [t for name in names for per_coef in sweep["tokens"][name] for t in per_coef]
    ll_all = completion_loglik(model, [p for _ in names for _ in coefs for p in prompts], all_tokens)
    out, raw = {}, {}
    for d, name in enumerate(names):
        rows = []
        for ci, c in enumerate(coefs):
            texts = sweep["texts"][name][ci]
            parsed = [parse_choice(t, DEFAULT_TEMPLATE) for t in texts]
            chose = [p.choice for p in parsed]
            k = sum(ch == st for ch, st in zip(chose, toward))
            n = sum(ch in ("A", "B") for ch in chose)
            lo, hi = wilson_interval(k, n)
            at = (d * len(coefs) + ci) * len(prompts)
            ll = ll_all[at:at + len(prompts)]
            rows.append({"coef": c, "k": int(k), "n": int(n), "ci": [float(lo), float(hi)],
                         "refusal_rate": float(np.mean([p.refusal for p in parsed])),
                         "unparseable_rate": float(np.mean([p.status in ("unparseable", "both") for p in parsed])),
                         "coherence_loglik": float(np.nanmean(ll)) if np.isfinite(ll).any() else None})
            raw[f"{name}_{c:+g}"] = list(texts)
        out[name] = rows
    atomic_write_json(run.stage_file("steering", "completions.json"),
                      {"toward": toward, "texts": raw})
    return {"n_prompts": len(prompts), "new_tokens": n_new, **out}


# ---------------------------------------------------------------------------------------------
# Dose-response helpers and the coherence side effect.

def _classify(rec) -> str:
    """'A', 'B', 'refusal' or 'unparsed' for one record."""
    if isinstance(rec, Mapping):
        if rec.get("refusal"):
            return "refusal"
        rec = rec.get("choice")
    if rec is None:
        return "unparsed"
    if rec in ("A", "B", "refusal"):
        return rec
    raise ValueError(f"dose_response: choice {rec!r} is not 'A', 'B', 'refusal' or None")


def dose_response(choices_by_coef: Mapping[float, Iterable]) -> list[dict[str, float]]:
    """Choice rate and refusal rate per steering coefficient, with Wilson 95% intervals.

    ``choices_by_coef`` maps a coefficient to its records: ``"A"``, ``"B"``, ``"refusal"``, ``None``
    (unparsed) or dicts with ``choice`` and ``refusal`` keys (rows of the choices table). Returns one
    row per coefficient (sorted): ``coef, n, n_a, n_b, n_refusal, n_unparsed, p_a, p_a_lo, p_a_hi``
    (P(A) among A/B answers) and ``refusal_rate, refusal_lo, refusal_hi`` (over all records).
    """
    rows = []
    for c in sorted(choices_by_coef, key=float):
        counts = {"A": 0, "B": 0, "refusal": 0, "unparsed": 0}
        for rec in choices_by_coef[c]:
            counts[_classify(rec)] += 1
        n = sum(counts.values())
        nab = counts["A"] + counts["B"]
        lo, hi = wilson_interval(counts["A"], nab)
        rlo, rhi = wilson_interval(counts["refusal"], n)
        rows.append({"coef": float(c), "n": n, "n_a": counts["A"], "n_b": counts["B"],
                     "n_refusal": counts["refusal"], "n_unparsed": counts["unparsed"],
                     "p_a": counts["A"] / nab if nab else float("nan"), "p_a_lo": lo, "p_a_hi": hi,
                     "refusal_rate": counts["refusal"] / n if n else float("nan"),
                     "refusal_lo": rlo, "refusal_hi": rhi})
    return rows


def format_table(rows: Sequence[Mapping[str, float]]) -> str:
    """A fixed-width text rendering of :func:`dose_response` rows."""
    head = f"{'coef':>8} {'n':>5} {'P(A)':>6} {'95% CI':>15} {'refusal':>8} {'95% CI':>15}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['coef']:>8.3g} {r['n']:>5d} {r['p_a']:>6.3f} [{r['p_a_lo']:.3f}, {r['p_a_hi']:.3f}] "
                     f"{r['refusal_rate']:>8.3f} [{r['refusal_lo']:.3f}, {r['refusal_hi']:.3f}]")
    return "\n".join(lines)


@jax.jit
def _token_logp(logits_BxKxV, targets_BxK):
    lp = jax.nn.log_softmax(logits_BxKxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp, targets_BxK[..., None], axis=-1)[..., 0]


def completion_loglik(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                      *, batch_size: int | None = None) -> np.ndarray:
    """Mean log-likelihood per token of each completion under the (unsteered) ``model``.

    The result [batch] float64 is ``mean_j log p(completion[j] | prompt, completion[:j])`` (NaN for an
    empty completion). Used as the coherence side-effect measure of steering: score steered completions
    with the model run without steering.

    Only the logits that score a completion token are computed. Where the model keeps prefix caches
    (:meth:`prefjax.model.Model.prefix_ok`), each distinct prompt runs once (a steering sweep scores many
    completions of the same prompts), its common start once for all of them, and the completions run
    on top; otherwise each ``prompt + completion`` runs left-padded in ``batch_size`` rows.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"completion_loglik: {len(prompt_ids)} prompts but {len(completion_ids)} completions")
    n = len(prompt_ids)
    out = np.full(n, np.nan)
    prompts = [[int(t) for t in p] for p in prompt_ids]
    comps = [[int(t) for t in c] for c in completion_ids]
    for i in range(n):
        if comps[i] and not prompts[i]:
            raise ValueError(f"completion_loglik: prompt {i} is empty")
    first = {}  # each distinct (prompt, completion) is scored once
    for i in range(n):
        if comps[i]:
            first.setdefault((tuple(prompts[i]), tuple(comps[i])), i)
    idx = sorted(first.values())
    if not idx:
        return out
    k = max(len(comps[i]) for i in idx)
    bs = min(batch_size or 32, len(idx))
    if model.prefix_ok() and all(len(prompts[i]) > 1 for i in idx):
        # Rows: [last prompt token] + completion[:-1], right-padded, on top of the prompt's other tokens.
        bodies = list(dict.fromkeys(tuple(prompts[i][:-1]) for i in idx))
        where = {b: r for r, b in enumerate(bodies)}
        cache = model.prefill_rows(bodies, n_after=k)
        seqs = [[prompts[i][-1]] + comps[i][:-1] for i in idx]
        rows = [where[tuple(prompts[i][:-1])] for i in idx]
        cols = [list(range(len(comps[i]))) for i in idx]
        run = lambda toks, valid, pos, r: model.run(toks, attention_mask=valid, positions=pos, prefix=cache,
                                                    prefix_rows=r)
        width, right = k, True
    else:
        seqs = [prompts[i] + comps[i] for i in idx]
        width = max(len(x) for x in seqs)
        rows = [0] * len(idx)
        # the logits at column c score the token at column c + 1 (left padding: the sequence ends at width)
        cols = [list(range(width - len(comps[i]) - 1, width - 1)) for i in idx]
        run = lambda toks, valid, pos, r: model.run(toks, attention_mask=valid, positions=pos)
        right = False
    pad = int(model.config.pad_id)
    for lo in range(0, len(idx), bs):
        part = list(range(lo, min(len(idx), lo + bs)))
        part += [part[0]] * (bs - len(part))  # one shape for every chunk
        toks, valid = left_pad([seqs[q] for q in part], pad, width=width, right=right)
        pos = np.zeros((bs, k), np.int32)
        tgt = np.zeros((bs, k), np.int32)
        for r, q in enumerate(part):
            m = len(comps[idx[q]])
            pos[r, :m], pos[r, m:] = cols[q], cols[q][-1]
            tgt[r, :m] = comps[idx[q]]
        logits, _ = run(toks, valid, pos, np.asarray([rows[q] for q in part], np.int32))
        lp = np.asarray(_token_logp(logits, jnp.asarray(tgt)), np.float64)
        for r, q in enumerate(part[:min(bs, len(idx) - lo)]):
            m = len(comps[idx[q]])
            out[idx[q]] = float(np.mean(lp[r, :m]))
    for i in range(n):
        if comps[i]:
            out[i] = out[first[(tuple(prompts[i]), tuple(comps[i]))]]
    return out
