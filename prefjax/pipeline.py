"""The whole analysis as a table of resumable stages: tasks -> choices -> utilities -> activations ->
probes -> transfer -> steering -> inlp -> patching -> pref_shift -> truefalse -> report.

:data:`STAGE_FNS` maps each stage name to ``fn(ctx) -> summary``; :func:`run_pipeline` builds the
:class:`Context` (typed config, workdir layout, model, task pool, personas) and calls the configured
stages in order. Each stage reads what earlier stages wrote, skips itself when ``stages/<name>.done``
exists, writes its outputs atomically (paths from :class:`prefjax.stages.RunLayout`) and then marks
itself done. The two long stages resume mid-way: choices through the append-only comparisons store,
activations through the zarr3 store's committed-row counter. Killing the process at any moment and
rerunning the same command gives the same results as an uninterrupted run.

Several processes (``jax.distributed``, one per host) share the model-heavy stages by jobs: each
process elicits every ``process_count``-th comparison into its own store segment and captures every
``process_count``-th task into its own ``activations/<persona>/host_<i>`` store, on its local
devices; after a barrier, process 0 runs the statistics, steering and report while the others wait.
The results equal a single-process run (tested with 2 CPU processes).

``run_pipeline(config, workdir)`` is what ``launch/main.py`` calls; ``config`` is a (locked)
ml_collections ConfigDict of ``configs/common.py``'s keys, a nested mapping of them, or a
:class:`prefjax.runconfig.RunConfig`. The experiments the stages call live in
:mod:`prefjax.experiments`; this module is the only one that imports them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import numpy as np

import prefjax
from prefjax.activations import extract
from prefjax.baselines import content_embeddings
from prefjax.elicit import personas_from_spec
from prefjax.elicit.prompts import template_from_dict
from prefjax.elicit.runner import ChoiceEngines, ElicitConfig, make_jobs, run_choices
from prefjax.experiments.patching import run_patching_stage
from prefjax.experiments.pref_shift import run_pref_shift_stage
from prefjax.experiments.steering import run_steering_stage, steering_persona
from prefjax.experiments.truefalse import run_truefalse_stage
from prefjax.launching import barrier, process_info
from prefjax.model import apply_layer_split
from prefjax.models.stack import is_split
from prefjax.organism import evaluate_recovery
from prefjax.organism_planted import is_planted, score_run
from prefjax.preflight import (check_model_source, check_task_count, check_tasks_source, describe_mesh,
                               resolve_mesh_shape)
from prefjax.probes import (FactorSet, default_splits, inlp, nested_transfer, persona_identity_control,
                            transfer_matrix)
from prefjax.probes.layersel import LayerSelection
from prefjax.probes.protocol import ProbeProtocol, probe_layer
from prefjax.probes.ridge import RidgeProbe
from prefjax.progress import log, progress
from prefjax.report.build import build_report
from prefjax.runconfig import (STAGE_DEPS, STAGES, ChoicesConfig, RunConfig, TasksConfig, check_stages,
                               resolve_layers)
from prefjax.sharding import make_mesh
from prefjax.stages import Run, atomic_save_npz, resid_hook
from prefjax.stats_small import pearson
from prefjax.store import ComparisonsStore, mean_norms_all_hosts, read_rows
from prefjax.tasks import load_default_pool, load_tasks, save_jsonl
from prefjax.tasks.pool import TaskPool
from prefjax.utility import ActiveConfig, ActiveLearner, fit_thurstonian
from prefjax.utility.diagnostics import utility_diagnostics

__all__ = ["STAGES", "STAGE_DEPS", "STAGE_FNS", "Context", "run_pipeline", "check_stages", "resolve_layers",
           "load_task_pool", "config_mesh", "check_cv_folds", "split_half_reliability", "elicit_persona"]


def config_mesh(cfg: RunConfig, devices=None):
    """The device mesh of ``cfg.mesh`` over this process's devices (or ``devices``); None for one device.

    Every axis 0 (auto) derives it from the devices present (all on ``fsdp``, or ``fsdp`` x ``expert``
    for a mixture of experts); a named mesh whose size is not the device count is a
    :class:`prefjax.preflight.PreflightError` naming both (:func:`prefjax.preflight.resolve_mesh_shape`).
    (Processes split the work by jobs, so each mesh is host-local.)"""
    devices = list(jax.local_devices() if devices is None else devices)
    shape = resolve_mesh_shape(cfg, len(devices), platform=devices[0].platform if devices else "")
    return None if shape is None else make_mesh(shape, devices)


def load_task_pool(tasks: TasksConfig) -> TaskPool:
    """The configured task pool (bundled default, or a JSONL/CSV file), subset to ``tasks.n`` (0 = all).

    An unset ``tasks.source`` and a ``tasks.n`` above the pool's size are errors naming the field
    (:func:`prefjax.preflight.check_tasks_source`, :func:`prefjax.preflight.check_task_count`)."""
    check_tasks_source(tasks)
    pool = load_default_pool() if tasks.source == "default" else load_tasks(tasks.source)
    check_task_count(tasks, len(pool))
    n = int(tasks.n or 0)
    if n and n < len(pool):
        pool = pool.subset(n, seed=int(tasks.seed), stratified=True)
    if len(pool) < 4:
        raise ValueError(f"the task pool has {len(pool)} tasks; need at least 4")
    return pool


def split_half_reliability(store, task_ids, persona: str, n_tasks: int, seed: int = 0) -> float | None:
    """Correlation of utilities fitted on two random halves of the comparisons (per unordered pair)."""
    i, j, wi, wj = store.to_arrays(task_ids, persona, soft=True, strict=False)
    if len(i) < 8:
        return None
    rng = np.random.default_rng(seed)
    half = rng.permutation(len(i)) < len(i) // 2
    mus = []
    for sel in (half, ~half):
        fit = fit_thurstonian(i[sel], j[sel], wi[sel], wj[sel], n_tasks)
        mus.append(fit.mu)
    try:
        return float(pearson(mus[0], mus[1]))
    except ValueError:
        return None



def elicit_persona(config: ChoicesConfig, model, pool, personas, pname, store, share=(0, 1),
                   engines: ChoiceEngines | None = None) -> dict:
    """Choices of one persona: an initial regular comparison graph, then ``config.active_rounds``
    active-learning rounds; process ``share[0]`` of ``share[1]`` elicits its share of each round.
    ``engines``: the run's sample-mode engines (one :class:`prefjax.elicit.runner.ChoiceEngines` for every
    round and persona, so the engine is built and compiled once; default: one for this persona's rounds)."""
    n = len(pool)
    ids = list(pool.ids)
    ecfg = ElicitConfig(mode=config.mode, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                        top_p=config.top_p, seed=config.seed, batch_size=config.batch_size,
                        engine=config.engine)
    if config.template:
        with open(config.template, encoding="utf-8") as f:
            ecfg = dataclasses.replace(ecfg, template=template_from_dict(json.load(f)))
    samples = 1 if ecfg.mode == "logit" else config.samples
    learner = ActiveLearner(n, ActiveConfig(seed=config.seed, degree=config.degree))
    soft = ecfg.mode == "logit"
    pidx, pcount = share
    engines = ChoiceEngines() if engines is None else engines
    for r in range(config.active_rounds + 1):
        pi, pj = learner.propose(config.pairs_per_round)
        if len(pi) == 0:
            break
        pairs = [(ids[a], ids[b]) for a, b in zip(pi, pj)]
        jobs = make_jobs(pairs, [pname], samples=samples, orders=config.orders, seed=ecfg.seed)
        run_choices(model, pool, jobs[pidx::pcount], personas, store, ecfg, desc=f"choices[{pname}] round {r}",
                    engines=engines)
        if pcount > 1:  # every process refits on everyone's rows, so all propose the same next round
            barrier(f"prefjax-choices-{pname}-{r}")
            store.reload()
        sub = {(ids[a], ids[b]) for a, b in zip(pi, pj)}
        i, j, wi, wj = store.to_arrays(ids, pname, soft=soft, strict=False)
        keep = np.array([(ids[a], ids[b]) in sub or (ids[b], ids[a]) in sub for a, b in zip(i, j)], bool)
        if keep.any():
            learner.update(i[keep], j[keep], wi[keep], wj[keep])
        if learner.done:
            break
    return {"counts": store.counts(pname), "rounds": r + 1}


# ---------------------------------------------------------------------------------------------
# The context every stage receives.

@dataclasses.dataclass
class Context:
    """What the stages share: the typed config, the run (workdir layout + stage markers), the model,
    the task pool and personas, the comparisons store, the captured layers, this process's share of
    the work, and the summaries of the stages run so far (``results``, by stage name)."""
    cfg: RunConfig
    run: Run
    model: Any
    pool: TaskPool
    personas: dict
    store: ComparisonsStore
    layers: list
    share: tuple = (0, 1)
    load_seconds: float | None = None
    results: dict = dataclasses.field(default_factory=dict)
    mu: dict = dataclasses.field(default_factory=dict)
    act_summ: dict = dataclasses.field(default_factory=dict)

    @property
    def hooks(self) -> list[str]:
        """The captured hooks, one per layer of ``layers``."""
        return [resid_hook(l) for l in self.layers]

    @property
    def multi(self) -> bool:
        """Whether several processes share the work."""
        return self.share[1] > 1

    @property
    def host(self) -> str:
        """Suffix of the per-process stage names of the work-sharing stages ("" for one process)."""
        return f"-h{self.share[0]}" if self.multi else ""

    def once(self, name: str, fn: Callable[["Context"], Any]):
        """``fn(self)`` as the resumable stage ``name`` (skipped, its result reloaded, when done)."""
        return self.run.stage(name)(lambda: fn(self))()

    def layer_X(self, pname: str, li: int) -> np.ndarray:
        """``[n, d]`` float32 activations of a persona at ``layers[li]`` and the configured turn-boundary
        position, pool order: one hook read from the store (single or per-host, by task id), a layer at a
        time, never the whole stack."""
        return read_rows(self.run.activations_dir(pname), self.hooks[li], list(self.pool.ids),
                         self.cfg.probes.position_index)


class LayerStack:
    """A persona's activations over the captured layers as a lazy ``[L, n, d]`` sequence: ``stack[li]``
    reads one layer from the store (:meth:`Context.layer_X`), so cross-layer transfer holds one layer's
    rows (plus the test rows of every layer) rather than all of them."""

    def __init__(self, ctx: "Context", pname: str):
        self.ctx, self.pname = ctx, pname

    def __len__(self) -> int:
        return len(self.ctx.layers)

    def __getitem__(self, li: int) -> np.ndarray:
        return self.ctx.layer_X(self.pname, int(li))


# ---------------------------------------------------------------------------------------------
# The stages: fn(ctx) -> summary.

def tasks_stage(ctx: Context) -> dict:
    """Write the run's task pool."""
    def body(c):
        save_jsonl(c.pool, c.run.stage_file("tasks", "tasks.jsonl"))  # = run.tasks_file()
        return {"n_tasks": len(c.pool), "topics": {t: len(p) for t, p in c.pool.by_topic().items()}}
    return ctx.once("tasks", body)


def choices_stage(ctx: Context) -> dict:
    """Revealed pairwise choices of every persona (one resumable stage per persona and process), through
    one set of sample-mode engines for the whole stage (built and compiled once, reused by every round and
    persona; :class:`prefjax.elicit.runner.ChoiceEngines`)."""
    out = {}
    engines = ChoiceEngines()
    for pname in ctx.personas:
        out[pname] = ctx.once(f"choices-{pname}{ctx.host}", lambda c, p=pname: elicit_persona(
            c.cfg.choices, c.model, c.pool, c.personas, p, c.store, share=c.share, engines=engines))
    barrier("prefjax-choices")
    ctx.store.reload()
    return out


def _declined_other_count(rows) -> int | None:
    """How many comparison rows did one task and declined the other (``extra["declined_other"]``, sample
    mode); None when no row carries the flag (logit mode reads no reply; stores written before it)."""
    flags = [(r.get("extra") or {}).get("declined_other") for r in rows]
    return sum(bool(f) for f in flags) if any(f is not None for f in flags) else None


def utilities_stage(ctx: Context) -> dict:
    """Thurstonian utilities per persona (``stages/utilities/<persona>.npz``); loads ``ctx.mu``. Each persona's
    summary carries ``diagnostics`` (:func:`utilities_diagnostics_body`, stage ``utilities-diagnostics``)."""
    def body(c):
        ids, n = list(c.pool.ids), len(c.pool)
        out = {}
        for pname in c.personas:
            i, j, wi, wj = c.store.to_arrays(ids, pname, soft=c.cfg.choices.mode == "logit", strict=False)
            if len(i) == 0:
                raise ValueError(f"persona {pname!r} has no usable comparisons (counts: {c.store.counts(pname)})")
            fit = fit_thurstonian(i, j, wi, wj, n)
            atomic_save_npz(c.run.utilities(pname), mu=fit.mu, sigma=fit.sigma)
            out[pname] = {"nll": fit.nll, "converged": bool(fit.converged), "iterations": int(fit.iterations),
                          "n_pairs": int(len(i)), "uncompared": int(len(fit.uncompared)),
                          "split_half_r": split_half_reliability(c.store, ids, pname, n),
                          "counts": c.store.counts(pname),
                          # replies that did one task and declined the other: counted as choices (status ok);
                          # None where no row was parsed for it (logit mode, older stores)
                          "declined_other": _declined_other_count(c.store.rows(pname))}
        return out
    summary = ctx.once("utilities", body)
    ctx.mu = {p: np.load(ctx.run.utilities(p))["mu"] for p in ctx.personas}
    diag = ctx.once("utilities-diagnostics", utilities_diagnostics_body)
    return {p: dict(u, diagnostics=diag.get(p)) for p, u in summary.items()}


def utilities_diagnostics_body(ctx: Context) -> dict:
    """What the utilities are, per persona (:func:`prefjax.utility.diagnostics.utility_diagnostics`): position
    bias, order-averaged spread, held-out pair accuracy / log-loss of a 5-fold refit (the utilities stage's fit
    options) against the constant model, reply counts. Its own resumable stage, run right after utilities."""
    ids = list(ctx.pool.ids)
    return {p: utility_diagnostics(ctx.store, ids, p, soft=ctx.cfg.choices.mode == "logit", k=5,
                                   seed=int(ctx.cfg.choices.seed)) for p in ctx.personas}


def activations_stage(ctx: Context) -> dict:
    """Residuals at the turn boundary of every task, per persona (this process's share of the tasks)."""
    pidx, pcount = ctx.share
    n = len(ctx.pool)
    mine = ctx.pool if not ctx.multi else TaskPool([ctx.pool[i] for i in range(pidx, n, pcount)])
    acts = ctx.cfg.activations

    def body(c, pname):
        st = extract(c.model, mine, c.run.activations_dir(pname), hooks=c.hooks, persona=c.personas[pname],
                     n_after=acts.n_after, batch_size=acts.batch_size, per_host=c.multi, dtype=acts.dtype,
                     desc=f"activations[{pname}]")
        return {"rows": int(st.committed), "mean_norms": {k: float(v) for k, v in st.mean_norms().items()}}
    ctx.act_summ = {p: ctx.once(f"activations-{p}{ctx.host}", lambda c, p=p: body(c, p)) for p in ctx.personas}
    return ctx.act_summ


def probes_stage(ctx: Context) -> dict:
    """Ridge probes per layer and persona. The headline held-out r of each layer comes from nested
    cross-validation (``probes.cv_outer`` outer folds estimate; ``probes.cv_inner`` inner folds inside
    each outer training set choose alpha), with a bootstrap interval, the per-fold alphas and a
    label-shuffle null refitted through the same procedure. The probe saved for the later stages
    (``run.probe_dir(persona, layer)``, every layer) is fitted once on the tasks outside the test split,
    at the alpha that inner-fold cross-validation on those tasks chooses; its test-split r is
    ``heldout_r`` (with interval and its own shuffle null). Leave-one-topic-out and content-baseline
    controls carry bootstrap intervals.

    The headline probe r of each persona is ``layer_selected`` (:mod:`prefjax.probes.layersel`): layer and
    alpha chosen by inner CV inside each outer training set, so the maximum over layers is inside the
    estimate; its null (``probes.layer_select_n_perm`` permutations) reruns the whole selection. It reuses
    each layer's factor set (no extra decomposition). ``best_layer`` (the largest per-layer nested r, the
    layer later stages use) is kept; its r is optimistic, and ``layer_selected.best_layer.p_max`` tests it
    against the maximum over layers of the permuted per-layer r."""
    return ctx.once("probes", _fit_probes)


def check_cv_folds(n: int, outer: int, inner: int) -> None:
    """Refuse a task count too small for the nested cross-validation (before any compute): every outer
    test fold needs >= 3 tasks and every outer training set >= 2 * inner."""
    if outer < 2 or inner < 2:
        raise ValueError(f"probes.cv_outer and probes.cv_inner must be >= 2, got {outer} and {inner}")
    if n // outer < 3 or n - -(-n // outer) < 2 * inner:
        raise ValueError(f"{n} tasks are too few for probes.cv_outer={outer}, probes.cv_inner={inner}: each outer "
                         f"test fold needs >= 3 tasks and each outer training set >= {2 * inner}")


def _nested_summary(cv: dict) -> dict:
    out = {k: cv.get(k) for k in ("r", "ci", "level", "fold_r", "fold_alpha", "fold_n", "alpha", "alphas", "r_by_alpha")}
    nl = cv.get("null")
    out.update(p_value=nl["p_value"] if nl else None, null_mean=nl["mean"] if nl else None,
               n_perm=nl["n_perm"] if nl else 0)
    return out


def _layer_selected_summary(res: dict) -> dict:
    """:func:`prefjax.probes.layersel.LayerSelection.result` without the per-task predictions and null values."""
    out = {k: v for k, v in res.items() if k != "predictions"}
    if "null" in out:
        out["null"] = {k: v for k, v in out["null"].items() if k != "values"}
    return out


def _fit_probes(ctx: Context) -> dict:
    cfg, layers, hooks, n = ctx.cfg, ctx.layers, ctx.hooks, len(ctx.pool)
    pc = cfg.probes
    alphas, seed, pos_index, n_perm = pc.alphas, cfg.seed, pc.position_index, pc.n_perm
    check_cv_folds(n, pc.cv_outer, pc.cv_inner)
    _, _, test = default_splits(n, seed)
    fit_idx = np.setdiff1d(np.arange(n), test)  # train + eval: alpha is chosen by inner CV, no eval split
    topics = np.asarray(ctx.pool.topic_array())
    emb = content_embeddings(ctx.model, ctx.pool)
    protocol = ProbeProtocol(alphas=tuple(alphas), cv_outer=pc.cv_outer, cv_inner=pc.cv_inner, n_perm=n_perm,
                             standardize=pc.standardize, alpha_rule=pc.alpha_rule, seed=seed)
    out = {"layers": layers, "persona": {}, "cv_outer": pc.cv_outer, "cv_inner": pc.cv_inner, "n_perm": n_perm,
           "layer_select_n_perm": pc.layer_select_n_perm, "n_test": int(len(test)), "n_fit": int(len(fit_idx))}
    bar = progress(total=len(ctx.personas) * (len(layers) + 1), desc="probes", unit="fit")
    for pname in ctx.personas:
        y = ctx.mu[pname]
        per_layer, probes, decomps = [], [], []
        # the headline r: layer (and alpha) chosen inside the CV, its null rerunning the whole selection
        sel = LayerSelection(y, alphas=alphas, outer=pc.cv_outer, inner=pc.cv_inner, n_perm=pc.layer_select_n_perm,
                             seed=seed, standardize=pc.standardize, alpha_rule=pc.alpha_rule)
        for li, l in enumerate(layers):
            X = ctx.layer_X(pname, li)  # each layer read once; its factor set serves both
            fs = FactorSet(X, standardize=pc.standardize)
            lp = probe_layer(X, y, topics, protocol, test, factors=fs)
            sel.add(fs, l)
            del X, fs
            decomps.append(lp.decompositions)
            sn = lp.split.get("null")
            per_layer.append({"layer": l, "nested": _nested_summary(lp.nested), "alpha": lp.probe.alpha,
                              "heldout_r": lp.heldout["r"], "heldout_ci": lp.split["ci"],
                              "heldout_p": sn["p_value"] if sn else None, "heldout_acc": lp.heldout["pairwise_acc"],
                              "loto_r": lp.loto_r, "loto_ci": lp.loto_ci, "loto_alpha": lp.loto_alpha})
            probes.append(lp.probe)
            bar.update(1)
        # best layer by the nested-CV r (the maximum over layers is mildly optimistic: said in the report)
        best = int(np.nanargmax([d["nested"]["r"] if np.isfinite(d["nested"]["r"]) else -2 for d in per_layer]))
        best_layer = layers[best]
        bl = probe_layer(emb, y, topics, protocol, test)
        mean_norm = ctx.act_summ[pname]["mean_norms"][hooks[best]]
        # every layer's probe is kept: steering takes its direction from the layer it steers at
        for li, (l, pr) in enumerate(zip(layers, probes)):
            pr.save(ctx.run.probe_dir(pname, l), hook=hooks[li], layer=l, position=pos_index,
                    mean_resid_norm=ctx.act_summ[pname]["mean_norms"][hooks[li]], persona=pname, alpha=pr.alpha,
                    alpha_from=f"inner {pc.cv_inner}-fold CV on the {len(fit_idx)} tasks outside the test split",
                    # the tasks this probe never saw (later stages score held-out claims on these)
                    heldout_tasks=[ctx.pool.ids[i] for i in test])
        bn = per_layer[best]["nested"]
        out["persona"][pname] = {"per_layer": per_layer, "best_layer": best_layer,
                                 "layer_selected": _layer_selected_summary(sel.result()),
                                 "content_baseline": {"heldout_r": bl.heldout["r"], "nested": _nested_summary(bl.nested),
                                                      "loto_r": bl.loto_r, "loto_ci": bl.loto_ci,
                                                      "loto_alpha": bl.loto_alpha},
                                 # the label-shuffle null of the best layer's headline (nested-CV) r: every
                                 # permutation re-runs the nested procedure, alpha re-chosen
                                 "shuffle_null": {"p_value": bn["p_value"], "observed_r": bn["r"],
                                                  "null_mean": bn["null_mean"], "n_perm": bn["n_perm"],
                                                  "procedure": "nested CV"},
                                 "mean_resid_norm": mean_norm,
                                 # float64 decompositions made (each serves every fold, alpha and null label)
                                 "decompositions": {"per_layer": decomps, "content_baseline": bl.decompositions}}
        bar.update(1)
    bar.close()
    return out


def transfer_stage(ctx: Context) -> dict:
    """Cross-persona (at the first persona's best layer) and cross-layer probe transfer.

    Cross-layer: the first persona's probe trained at each layer (train split, alpha on the eval split)
    scored on every layer's activations of the test tasks; ``layer_r`` [L, L] with ``layer_r_lo`` /
    ``layer_r_hi`` (95% percentile bootstrap over the ``layer_n_test`` test tasks, the same resamples in
    every cell; None where undefined) and ``layer_alpha`` per training layer."""
    def body(c):
        alphas, layers = c.cfg.probes.alphas, c.layers
        splits = default_splits(len(c.pool), c.cfg.seed)
        names = list(c.personas)
        first = names[0]
        best = c.results["probes"]["persona"][first]["best_layer"]
        li = layers.index(best)
        Xs = np.stack([c.layer_X(p, li) for p in names])
        Y = np.stack([c.mu[p] for p in names])
        std = c.cfg.probes.standardize
        fss = [FactorSet(x, standardize=std) for x in Xs]  # one per persona: the matrix and nested transfer
        tp = (transfer_matrix(Xs, Y, alphas=alphas, splits=splits, names=names, standardize=std, n_boot=0,
                              factors=fss)
              if len(names) > 1 else None)
        tl = transfer_matrix(LayerStack(c, first), c.mu[first], alphas=alphas, splits=splits,
                             names=[str(l) for l in layers], standardize=std, seed=c.cfg.seed,
                             inner=c.cfg.probes.cv_inner, alpha_rule=c.cfg.probes.alpha_rule)
        nested = None
        if len(names) > 1:  # alpha by nested CV, bootstrap intervals, shuffle nulls, the whole alpha grid
            nt = nested_transfer(Xs, Y, alphas=alphas, outer=c.cfg.probes.cv_outer, inner=c.cfg.probes.cv_inner,
                                 factors=fss,
                                 n_perm=c.cfg.probes.n_perm, seed=c.cfg.seed, names=names, standardize=std,
                                 alpha_rule=c.cfg.probes.alpha_rule)
            nested = {k: (np.asarray(nt[k]).tolist() if isinstance(nt[k], np.ndarray) else nt[k])
                      for k in ("names", "alphas", "r", "ci_lo", "ci_hi", "p_value", "p_value_two_sided", "r_grid",
                                "alpha_spread", "hangs_on_alpha", "fold_alpha", "utility_corr", "utility_corr_lo",
                                "utility_corr_hi", "n_perm") if k in nt}
        identity = None
        if len(names) > 1:  # is each persona's probe (at this layer) just its persona's identity direction?
            dirs = np.stack([RidgeProbe.load(c.run.probe_dir(p, best)).direction for p in names])
            identity = persona_identity_control(Xs, dirs, names, alphas=alphas, splits=splits, seed=c.cfg.seed)
        atomic_save_npz(c.run.stage_file("transfer", "matrices.npz"),
                        persona_r=np.asarray(tp["r"]) if tp else np.zeros((1, 1)),
                        persona_utility_corr=np.asarray(tp["utility_corr"]) if tp else np.zeros((1, 1)),
                        layer_r=np.asarray(tl["r"]), layer_r_lo=tl["r_lo"], layer_r_hi=tl["r_hi"])
        finite_or_none = lambda m: [[float(v) if np.isfinite(v) else None for v in row] for row in np.asarray(m)]
        return {"personas": names, "layer": best,
                "persona_r": None if tp is None else np.asarray(tp["r"]).tolist(),
                "utility_corr": None if tp is None else np.asarray(tp["utility_corr"]).tolist(),
                "layers": layers, "layer_r": np.asarray(tl["r"]).tolist(),
                "layer_r_lo": finite_or_none(tl["r_lo"]), "layer_r_hi": finite_or_none(tl["r_hi"]),
                "layer_level": tl["level"], "layer_n_test": tl["n_test"],
                "layer_alpha": np.asarray(tl["alpha"]).tolist(), "layer_alpha_choice": tl["alpha_choice"],
                "persona_nested": nested, "persona_identity": identity}
    return ctx.once("transfer", body)


def steering_stage(ctx: Context) -> dict:
    """The steering dose-response experiment (:mod:`prefjax.experiments.steering`)."""
    sp = steering_persona(ctx.cfg.steering, ctx.personas)
    return ctx.once("steering", lambda c: run_steering_stage(
        c.cfg.steering, c.run, c.model, c.pool, c.personas, probe_summary=c.results["probes"],
        mean_norms=c.act_summ[sp]["mean_norms"], seed=c.cfg.seed))


def inlp_stage(ctx: Context) -> dict | None:
    """Iterative nullspace projection at the first persona's best layer (None when ``inlp.n_iter`` is 0)."""
    if ctx.cfg.inlp.n_iter <= 0:
        return None

    def body(c):
        first = list(c.personas)[0]
        li = c.layers.index(c.results["probes"]["persona"][first]["best_layer"])
        res = inlp(c.layer_X(first, li), c.mu[first], n_iter=c.cfg.inlp.n_iter, alphas=c.cfg.probes.alphas,
                   splits=default_splits(len(c.pool), c.cfg.seed), topics=np.asarray(c.pool.topic_array()),
                   seed=c.cfg.seed, inner=c.cfg.probes.cv_inner, alpha_rule=c.cfg.probes.alpha_rule)
        return {k: np.asarray(v).tolist() for k, v in res.items() if k != "directions"}
    return ctx.once("inlp", body)


def patching_stage(ctx: Context) -> dict:
    """End-of-turn activation patching (:mod:`prefjax.experiments.patching`)."""
    return ctx.once("patching", lambda c: run_patching_stage(
        c.cfg.patching, c.run, c.model, c.pool, c.personas, activation_layers=c.cfg.activations.layers,
        seed=c.cfg.seed))


def pref_shift_stage(ctx: Context) -> dict:
    """Preference-shift tracking (:mod:`prefjax.experiments.pref_shift`)."""
    return ctx.once("pref_shift", lambda c: run_pref_shift_stage(
        c.cfg.pref_shift, c.run, c.model, c.pool, c.personas, seed=c.cfg.seed, alphas=c.cfg.probes.alphas,
        probe_summary=c.results["probes"]))


def truefalse_stage(ctx: Context) -> dict:
    """True/false statements under the preference probe (:mod:`prefjax.experiments.truefalse`)."""
    return ctx.once("truefalse", lambda c: run_truefalse_stage(
        c.cfg.truefalse, c.run, c.model, c.pool, c.personas, seed=c.cfg.seed, probe_summary=c.results["probes"]))


def report_stage(ctx: Context) -> str:
    """Figures, ``summary.json`` and ``report.md`` (run every time; not marked done). With ``truth``
    set, every estimate is compared with a model organism's planted utilities."""
    truth = None
    if ctx.cfg.truth:
        truth = (score_run if is_planted(ctx.cfg.truth) else evaluate_recovery)(ctx.run.workdir, ctx.cfg.truth)
    r = ctx.results
    return build_report(ctx.run, model_source=ctx.cfg.model.source, pool=ctx.pool, personas=list(ctx.personas),
                        mu=ctx.mu, utilities=r.get("utilities"), probes=r.get("probes"),
                        transfer=r.get("transfer"), steering=r.get("steering"), inlp=r.get("inlp"),
                        extra={k: r[k] for k in ("patching", "pref_shift", "truefalse") if k in r},
                        truth=truth, load_seconds=ctx.load_seconds, stage_order=STAGES)


STAGE_FNS: dict[str, Callable[[Context], Any]] = {
    "tasks": tasks_stage, "choices": choices_stage, "utilities": utilities_stage,
    "activations": activations_stage, "probes": probes_stage, "transfer": transfer_stage,
    "steering": steering_stage, "inlp": inlp_stage, "patching": patching_stage, "pref_shift": pref_shift_stage,
    "truefalse": truefalse_stage, "report": report_stage,
}
assert tuple(STAGE_FNS) == STAGES, "STAGE_FNS must list every stage of prefjax.runconfig.STAGES, in order"


# ---------------------------------------------------------------------------------------------

def run_pipeline(config, workdir: str, *, model=None) -> str | None:
    """Run (or resume) the configured stages; returns the path of ``report.md`` (None without a report stage).

    The config, stage list, task pool (``tasks.source`` set, ``tasks.n`` within the pool), personas and,
    when the model is loaded here, its source (exists; an HF folder's config.json has ``model.preset``'s
    shape) and mesh (auto, or named with the device count's size) are checked before the workdir is
    touched or a weight loaded: bad input leaves no workdir behind.
    """
    cfg = RunConfig.from_config(config)
    pool = load_task_pool(cfg.tasks)
    if "probes" in cfg.stages:
        check_cv_folds(len(pool), cfg.probes.cv_outer, cfg.probes.cv_inner)
    personas = {p.name: p for p in personas_from_spec(cfg.persona_spec())}
    share = process_info()
    mesh = None
    if model is None:
        check_model_source(cfg.model)
        mesh = config_mesh(cfg)
    run = Run(workdir, cfg.to_dict())  # after the cheap input checks: bad input leaves no workdir behind
    load_s = None
    if model is None:
        t0 = time.time()
        log(f"loading model {cfg.model.source} on {describe_mesh(None if mesh is None else dict(mesh.shape))}")
        model = apply_layer_split(prefjax.load(cfg.model.source, dtype=cfg.model.dtype or None, mesh=mesh),
                                  cfg.model.split_layers)
        load_s = time.time() - t0
        log(f"model loaded in {load_s:.1f}s" + (" (block weights one buffer per layer)" if is_split(model.params) else ""))
    if model.tokenizer is None:
        raise ValueError(f"model {cfg.model.source!r} has no tokenizer; the pipeline renders chat prompts")
    ctx = Context(cfg=cfg, run=run, model=model, pool=pool, personas=personas,
                  store=ComparisonsStore(run.comparisons_dir()),
                  layers=resolve_layers(cfg.activations.layers, model.n_layers), share=share, load_seconds=load_s)
    for name in STAGES:
        if name == "tasks" or name in cfg.stages:
            ctx.results[name] = STAGE_FNS[name](ctx)
        if name == "activations" and ctx.multi:
            barrier("prefjax-activations")
            if "activations" in cfg.stages:
                ctx.act_summ = {p: {"rows": len(pool), "mean_norms": mean_norms_all_hosts(run.activations_dir(p))}
                                for p in personas}
            if share[0] != 0:  # the rest is statistics, a little steering and the report: process 0 alone
                barrier("prefjax-done")
                return None
    if ctx.multi:
        barrier("prefjax-done")
    return ctx.results.get("report")
