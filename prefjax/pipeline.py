"""The whole analysis as resumable stages: tasks -> choices -> utilities -> activations -> probes ->
transfer -> steering -> report.

Each stage reads what earlier stages wrote, skips itself when ``stages/<name>.done`` exists, writes
its outputs atomically and then marks itself done (:mod:`prefjax.stages`). The two long stages
resume mid-way: choices through the append-only comparisons store, activations through the zarr3
store's committed-row counter. Killing the process at any moment and rerunning the same command
gives the same results as an uninterrupted run.

Several processes (``jax.distributed``, one per host) share the model-heavy stages by jobs: each
process elicits every ``process_count``-th comparison into its own store segment and captures every
``process_count``-th task into its own ``activations/<persona>/host_<i>`` store, on its local
devices; after a barrier, process 0 runs the statistics, steering and report while the others wait.
The results equal a single-process run (tested with 2 CPU processes).

``run_pipeline(config, workdir)`` is what ``launch/main.py`` calls; ``config`` is a (locked)
ml_collections ConfigDict or any nested mapping with the fields of ``configs/default.py``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from prefjax.progress import log
from prefjax.runconfig import lookup as _get
from prefjax.stages import Run, atomic_save_npz, atomic_write_json

STAGES = ("tasks", "choices", "utilities", "activations", "probes", "transfer", "steering", "inlp", "patching",
          "pref_shift", "truefalse", "report")
# What each stage reads: a config's ``stages`` must list a stage's prerequisites too.
STAGE_DEPS = {"tasks": (), "choices": ("tasks",), "utilities": ("choices",), "activations": ("tasks",),
              "probes": ("utilities", "activations"), "transfer": ("probes",), "steering": ("probes",),
              "inlp": ("probes",), "patching": ("tasks",), "pref_shift": ("probes",), "truefalse": ("probes",),
              "report": ("utilities",)}


def check_stages(stages) -> tuple[str, ...]:
    """Validate a config's ``stages`` (known names, prerequisites present); returns them in run order."""
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.split(",") if s.strip()]
    stages = list(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"config field 'stages' names unknown stage(s) {unknown}; known: {list(STAGES)}")
    missing = sorted({f"{d} (needed by {s})" for s in stages for d in STAGE_DEPS[s] if d not in stages})
    if missing:
        raise ValueError(f"config field 'stages' lacks prerequisite stage(s): {', '.join(missing)}")
    return tuple(s for s in STAGES if s in stages)


def persona_spec(cfg) -> list[str]:
    """The config's ``personas`` with relative ``adapter:NAME`` entries resolved under ``adapters_dir``."""
    spec = list(_get(cfg, "personas", ["default"]))
    root = _get(cfg, "adapters_dir", None)
    out = []
    for item in spec:
        if isinstance(item, str) and item.startswith("adapter:") and root and not os.path.isabs(item[8:]):
            item = "adapter:" + os.path.join(str(root), item[8:])
        out.append(item)
    return out


def config_mesh(cfg):
    """The device mesh named by ``cfg.mesh`` ({data, fsdp, tensor, expert}) over this process's devices;
    None for a single device. (Processes split the work by jobs, so each mesh is host-local.)"""
    import jax
    from prefjax.sharding import MESH_AXES, make_mesh
    shape = {a: int(_get(cfg, f"mesh.{a}", 1) or 1) for a in MESH_AXES}
    if int(np.prod(list(shape.values()))) <= 1:
        return None
    return make_mesh(shape, jax.local_devices())


def _to_dict(cfg) -> dict:
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return json.loads(json.dumps(cfg, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# ---------------------------------------------------------------------------------------------
# Building blocks shared by the stages.

def load_task_pool(cfg):
    """The configured task pool (bundled default, or a file), subset to ``tasks.n``."""
    from prefjax.tasks import load_default_pool, load_tasks
    src = _get(cfg, "tasks.source", "default")
    pool = load_default_pool() if src == "default" else load_tasks(src)
    n = int(_get(cfg, "tasks.n", 0) or 0)
    if n and n < len(pool):
        pool = pool.subset(n, seed=int(_get(cfg, "tasks.seed", 0)), stratified=True)
    if len(pool) < 4:
        raise ValueError(f"the task pool has {len(pool)} tasks; need at least 4")
    return pool


def resolve_layers(spec, n_layers: int) -> list[int]:
    if spec in (None, "all"):
        return list(range(n_layers))
    if isinstance(spec, str):
        if spec.startswith("every"):
            k = int(spec[5:])
            return list(range(0, n_layers, k)) + ([n_layers - 1] if (n_layers - 1) % k else [])
        spec = [int(x) for x in spec.split(",")]
    layers = [int(l) for l in spec]
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"activations.layers names layer(s) {bad}; the model has layers 0..{n_layers - 1}")
    return layers


def split_half_reliability(store, task_ids, persona: str, n_tasks: int, seed: int = 0) -> float | None:
    """Correlation of utilities fitted on two random halves of the comparisons (per unordered pair)."""
    from prefjax.stats_small import pearson
    from prefjax.utility import fit_thurstonian
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


def content_embeddings(model, pool) -> np.ndarray:
    """Content-only baseline features: mean input-embedding vector of each task's prompt tokens."""
    emb = np.asarray(model.params["embed"], np.float32)
    out = np.zeros((len(pool), emb.shape[1]), np.float32)
    for r, t in enumerate(pool):
        ids = model.tokenizer.encode(t.prompt, add_bos=False)
        out[r] = emb[np.asarray(ids)].mean(0)
    return out


# ---------------------------------------------------------------------------------------------

def run_pipeline(cfg, workdir: str, *, model=None) -> str | None:
    """Run (or resume) the configured stages; returns the path of ``report.md`` (None without a report stage).

    The stage list, task pool and personas are checked before the workdir is touched or a model loaded.
    """
    from prefjax.elicit import personas_from_spec
    from prefjax.store import ComparisonsStore

    stages = set(check_stages(_get(cfg, "stages", STAGES) or STAGES))
    for field, allowed in (("choices.mode", ("logit", "sample")), ("steering.mode", ("contrastive", "single"))):
        val = _get(cfg, field, allowed[0])
        if val not in allowed:
            raise ValueError(f"config field {field!r} is {val!r}; expected one of {list(allowed)}")
    pool = load_task_pool(cfg)
    personas = {p.name: p for p in personas_from_spec(persona_spec(cfg))}
    from prefjax.launching import barrier, process_info
    pidx, pcount = process_info()
    multi = pcount > 1
    host = f"-h{pidx}" if multi else ""  # per-process stage names for the work-sharing stages
    run = Run(workdir, _to_dict(cfg))  # after the cheap input checks: bad input leaves no workdir behind
    load_s = None
    if model is None:
        import time

        import prefjax
        t0 = time.time()
        log(f"loading model {_get(cfg, 'model.source')}")
        model = prefjax.load(_get(cfg, "model.source"), dtype=_get(cfg, "model.dtype", None), mesh=config_mesh(cfg))
        load_s = time.time() - t0
        log(f"model loaded in {load_s:.1f}s")
    if model.tokenizer is None:
        raise ValueError(f"model {_get(cfg, 'model.source')!r} has no tokenizer; the pipeline renders chat prompts")
    n = len(pool)
    ids = list(pool.ids)

    # 1. tasks ------------------------------------------------------------------------------
    @run.stage("tasks")
    def tasks_stage():
        from prefjax.tasks import save_jsonl
        save_jsonl(pool, os.path.join(run.stage_dir("tasks"), "tasks.jsonl"))
        return {"n_tasks": n, "topics": {t: len(p) for t, p in pool.by_topic().items()}}
    tasks_stage()

    # 2. choices ------------------------------------------------------------------------------
    store = ComparisonsStore(os.path.join(run.workdir, "comparisons"))
    if "choices" in stages:
        for pname in personas:
            run.stage(f"choices-{pname}{host}")(
                lambda p=pname: _choices(cfg, model, pool, personas, p, store, share=(pidx, pcount)))()
        barrier("prefjax-choices")
        store.reload()

    # 3. utilities ----------------------------------------------------------------------------
    @run.stage("utilities")
    def utilities_stage():
        from prefjax.utility import fit_thurstonian
        out = {}
        for pname in personas:
            i, j, wi, wj = store.to_arrays(ids, pname, soft=_get(cfg, "choices.mode") == "logit", strict=False)
            if len(i) == 0:
                raise ValueError(f"persona {pname!r} has no usable comparisons (counts: {store.counts(pname)})")
            fit = fit_thurstonian(i, j, wi, wj, n)
            atomic_save_npz(os.path.join(run.stage_dir("utilities"), f"{pname}.npz"), mu=fit.mu, sigma=fit.sigma)
            out[pname] = {"nll": fit.nll, "converged": bool(fit.converged), "iterations": int(fit.iterations),
                          "n_pairs": int(len(i)), "uncompared": int(len(fit.uncompared)),
                          "split_half_r": split_half_reliability(store, ids, pname, n),
                          "counts": store.counts(pname)}
        return out
    util_summary, mu = None, {}
    if "utilities" in stages:
        util_summary = utilities_stage()
        mu = {p: np.load(os.path.join(run.stage_dir("utilities"), f"{p}.npz"))["mu"] for p in personas}

    # 4. activations --------------------------------------------------------------------------
    from prefjax.activations import extract
    from prefjax.store import mean_norms_all_hosts, open_existing, read_all_hosts
    from prefjax.tasks.pool import TaskPool
    layers = resolve_layers(_get(cfg, "activations.layers", "all"), model.n_layers)
    hooks = [f"blocks.{l}.hook_resid_post" for l in layers]
    n_after = int(_get(cfg, "activations.n_after", 0))
    acts_dir = os.path.join(run.workdir, "activations")

    mine = pool if not multi else TaskPool([pool[i] for i in range(pidx, n, pcount)])

    def acts_for(pname):
        return run.stage(f"activations-{pname}{host}")(lambda: _acts_summary(extract(
            model, mine, os.path.join(acts_dir, pname), hooks=hooks, persona=personas[pname], n_after=n_after,
            batch_size=int(_get(cfg, "activations.batch_size", 8)), per_host=multi,
            dtype=_get(cfg, "activations.dtype", "float32"), desc=f"activations[{pname}]")))()
    act_summ = {p: acts_for(p) for p in personas} if "activations" in stages else {}
    pos_index = int(_get(cfg, "probes.position_index", 0))
    if multi:
        barrier("prefjax-activations")
        if "activations" in stages:
            act_summ = {p: {"rows": n, "mean_norms": mean_norms_all_hosts(os.path.join(acts_dir, p))}
                        for p in personas}
        if pidx != 0:  # the rest is statistics, a little steering and the report: process 0 alone
            barrier("prefjax-done")
            return None

    def X_of(pname):  # [L, n, d] at the configured turn-boundary position, rows in pool order
        path = os.path.join(acts_dir, pname)
        if not multi:
            st = open_existing(path)
            return np.stack([st.read(hook=h)[:, pos_index, :] for h in hooks]).astype(np.float32)
        out = []
        for h in hooks:
            acts, row_ids = read_all_hosts(path, hook=h)
            where = {r: k for k, r in enumerate(row_ids)}
            missing = [t for t in ids if t not in where]
            if missing:
                raise ValueError(f"activations for persona {pname!r} lack tasks {missing[:5]} (host stores "
                                 f"under {path})")
            out.append(acts[[where[t] for t in ids], pos_index, :])
        return np.stack(out).astype(np.float32)

    # 5. probes -------------------------------------------------------------------------------
    alphas = tuple(float(a) for a in _get(cfg, "probes.alphas", (0.1, 1, 10, 100, 1e3, 1e4, 1e5)))
    seed = int(_get(cfg, "seed", 0))

    @run.stage("probes")
    def probes_stage():
        from prefjax.probes import (default_splits, evaluate_probe, fit_ridge, leave_one_topic_out,
                                    shuffle_null)
        train, ev, test = default_splits(n, seed)
        topics = np.asarray(pool.topic_array())
        emb = content_embeddings(model, pool)
        out = {"layers": layers, "persona": {}}
        from prefjax.progress import progress
        bar = progress(total=len(personas) * (len(layers) + 1), desc="probes", unit="fit")
        for pname in personas:
            X = X_of(pname)
            y = mu[pname]
            probes = fit_ridge(X, y, alphas=alphas, eval_idx=ev, train_idx=train)
            per_layer = []
            for li, (l, pr) in enumerate(zip(layers, probes)):
                m = evaluate_probe(pr, X[li], y, test)
                loto = leave_one_topic_out(X[li], y, topics, alphas=alphas, seed=seed)
                per_layer.append({"layer": l, "alpha": pr.alpha, "heldout_r": m["r"],
                                  "heldout_acc": m["pairwise_acc"], "loto_r": loto["pooled_r"]})
                bar.update(1)
            best = int(np.nanargmax([d["heldout_r"] if d["heldout_r"] is not None else -2 for d in per_layer]))
            best_layer = layers[best]
            base_probe = fit_ridge(emb, y, alphas=alphas, eval_idx=ev, train_idx=train)
            base = evaluate_probe(base_probe, emb, y, test)
            base_loto = leave_one_topic_out(emb, y, topics, alphas=alphas, seed=seed)
            null = shuffle_null(X[best], y, n_perm=int(_get(cfg, "probes.n_perm", 100)), alphas=alphas,
                                splits=(train, ev, test), seed=seed)
            mean_norm = act_summ[pname]["mean_norms"][hooks[best]]
            probes[best].save(os.path.join(run.workdir, "probes", pname, hooks[best]), hook=hooks[best],
                              layer=best_layer, position=pos_index, mean_resid_norm=mean_norm, persona=pname,
                              alpha=probes[best].alpha)
            out["persona"][pname] = {"per_layer": per_layer, "best_layer": best_layer,
                                     "content_baseline": {"heldout_r": base["r"], "loto_r": base_loto["pooled_r"]},
                                     "shuffle_null": {k: null[k] for k in ("p_value", "observed_r", "null_mean")
                                                      if k in null},
                                     "mean_resid_norm": mean_norm}
            bar.update(1)
        bar.close()
        return out
    probe_summary = probes_stage() if "probes" in stages else None

    # 6. transfer -----------------------------------------------------------------------------
    @run.stage("transfer")
    def transfer_stage():
        from prefjax.probes import default_splits, transfer_matrix
        splits = default_splits(n, seed)
        names = list(personas)
        first = names[0]
        best = probe_summary["persona"][first]["best_layer"]
        li = layers.index(best)
        Xs = np.stack([X_of(p)[li] for p in names])
        Y = np.stack([mu[p] for p in names])
        tp = transfer_matrix(Xs, Y, alphas=alphas, splits=splits, names=names) if len(names) > 1 else None
        Xl = X_of(first)
        tl = transfer_matrix(Xl, mu[first], alphas=alphas, splits=splits, names=[str(l) for l in layers])
        atomic_save_npz(os.path.join(run.stage_dir("transfer"), "matrices.npz"),
                        persona_r=np.asarray(tp["r"]) if tp else np.zeros((1, 1)),
                        persona_utility_corr=np.asarray(tp["utility_corr"]) if tp else np.zeros((1, 1)),
                        layer_r=np.asarray(tl["r"]))
        return {"personas": names, "layer": best,
                "persona_r": None if tp is None else np.asarray(tp["r"]).tolist(),
                "utility_corr": None if tp is None else np.asarray(tp["utility_corr"]).tolist(),
                "layers": layers, "layer_r": np.asarray(tl["r"]).tolist()}
    transfer_summary = transfer_stage() if "transfer" in stages and probe_summary else None

    # 7. steering ------------------------------------------------------------------------------
    steer_summary = None
    if "steering" in stages and probe_summary:
        sp_name = _get(cfg, "steering.persona", None) or list(personas)[0]
        steer_summary = run.stage("steering")(lambda: _steering(cfg, run, model, pool, personas, probe_summary,
                                                                 hooks, layers, act_summ[sp_name]["mean_norms"]))()

    # 8. INLP ---------------------------------------------------------------------------------
    inlp_summary = None
    if "inlp" in stages and probe_summary and int(_get(cfg, "inlp.n_iter", 0)) > 0:
        @run.stage("inlp")
        def inlp_stage():
            from prefjax.probes import default_splits, inlp
            first = list(personas)[0]
            li = layers.index(probe_summary["persona"][first]["best_layer"])
            res = inlp(X_of(first)[li], mu[first], n_iter=int(_get(cfg, "inlp.n_iter")), alphas=alphas,
                       splits=default_splits(n, seed), topics=np.asarray(pool.topic_array()), seed=seed)
            return {k: np.asarray(v).tolist() for k, v in res.items() if k != "directions"}
        inlp_summary = inlp_stage()

    # 9. the seed paper's further experiments -------------------------------------------------
    extra = {}
    if "patching" in stages:
        from prefjax.experiments.patching import run_patching_stage
        extra["patching"] = run.stage("patching")(
            lambda: run_patching_stage(cfg, run, model, pool, personas))()  # layers: patching.layers
    if "pref_shift" in stages and probe_summary:
        from prefjax.experiments.pref_shift import run_pref_shift_stage
        extra["pref_shift"] = run.stage("pref_shift")(
            lambda: run_pref_shift_stage(cfg, run, model, pool, personas, probe_summary=probe_summary))()
    if "truefalse" in stages and probe_summary:
        from prefjax.experiments.truefalse import run_truefalse_stage
        extra["truefalse"] = run.stage("truefalse")(
            lambda: run_truefalse_stage(cfg, run, model, pool, personas, probe_summary=probe_summary))()

    # 10. report ------------------------------------------------------------------------------
    if "report" not in stages:
        if multi:
            barrier("prefjax-done")
        return None
    truth = None
    if _get(cfg, "truth", None):  # a model organism's folder: compare everything with the planted utilities
        from prefjax.organism import evaluate_recovery
        truth = evaluate_recovery(run.workdir, _get(cfg, "truth"))
    from prefjax.report.build import build_report
    report = build_report(run, cfg, pool=pool, personas=list(personas), mu=mu, utilities=util_summary,
                          probes=probe_summary, transfer=transfer_summary, steering=steer_summary,
                          inlp=inlp_summary, extra=extra, truth=truth, load_seconds=load_s,
                          stage_order=STAGES)
    if multi:
        barrier("prefjax-done")
    return report


def _acts_summary(store) -> dict:
    return {"rows": int(store.committed), "mean_norms": {k: float(v) for k, v in store.mean_norms().items()}}


# ---------------------------------------------------------------------------------------------
# Choices: an initial regular comparison graph, then optional active-learning rounds.

def _choices(cfg, model, pool, personas, pname, store, share=(0, 1)) -> dict:
    from prefjax.elicit.prompts import template_from_dict
    from prefjax.elicit.runner import ElicitConfig, make_jobs, run_choices
    from prefjax.utility import ActiveConfig, ActiveLearner

    n = len(pool)
    ids = list(pool.ids)
    ecfg = ElicitConfig(mode=_get(cfg, "choices.mode", "sample"),
                        max_new_tokens=int(_get(cfg, "choices.max_new_tokens", 24)),
                        temperature=float(_get(cfg, "choices.temperature", 1.0)),
                        top_p=float(_get(cfg, "choices.top_p", 1.0)),
                        seed=int(_get(cfg, "choices.seed", 0)),
                        batch_size=int(_get(cfg, "choices.batch_size", 16)))
    tmpl = _get(cfg, "choices.template", None)
    if tmpl:
        import dataclasses as _dc
        ecfg = _dc.replace(ecfg, template=template_from_dict(dict(tmpl)))
    samples = 1 if ecfg.mode == "logit" else int(_get(cfg, "choices.samples", 1))
    orders = _get(cfg, "choices.orders", "both")
    acfg = ActiveConfig(seed=int(_get(cfg, "choices.seed", 0)), degree=int(_get(cfg, "choices.degree", 6)))
    learner = ActiveLearner(n, acfg)
    rounds = int(_get(cfg, "choices.active_rounds", 0))
    per_round = int(_get(cfg, "choices.pairs_per_round", max(n // 2, 1)))
    soft = ecfg.mode == "logit"
    for r in range(rounds + 1):
        pi, pj = learner.propose(per_round)
        if len(pi) == 0:
            break
        pairs = [(ids[a], ids[b]) for a, b in zip(pi, pj)]
        jobs = make_jobs(pairs, [pname], samples=samples, orders=orders, seed=ecfg.seed)
        pidx, pcount = share
        run_choices(model, pool, jobs[pidx::pcount], personas, store, ecfg, desc=f"choices[{pname}] round {r}")
        if pcount > 1:  # every process refits on everyone's rows, so all propose the same next round
            from prefjax.launching import barrier
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
# Steering: contrastive dose-response in logit mode, probe direction vs a random direction.

def steering_prompts(tok, pairs, persona, mode: str, *, forced: bool):
    """Token ids, signed task-span masks and steered label for each pair shown twice (steered towards
    Task A, then towards Task B). ``forced`` appends logit mode's forced prefix to the prompt."""
    from prefjax.elicit.prompts import DEFAULT_TEMPLATE, choice_messages, render_choice, shift_spans
    from prefjax.elicit.runner import forced_text
    from prefjax.steering import token_span_mask
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


def _steering(cfg, run, model, pool, personas, probe_summary, hooks, layers, mean_norms) -> dict:
    """Dose-response of P(choose the steered task) over coefficients, probe direction vs random.

    Every sampled pair is shown twice, once steering towards Task A and once towards Task B, so the
    model's label-position bias cancels at c = 0. ``contrastive`` adds +c on the steered task's tokens
    and -c on the other's; ``single`` adds +c on the steered task only. The coefficient is in units of
    the mean residual norm at the steering layer (from the activation stage).

    Logit mode reads P(A) after the forced prefix; with ``steering.generate_tokens`` > 0 the same sweep
    also writes greedy completions (see :func:`_steered_completions`). Every (direction, coefficient,
    prompt) is one row of a batched sweep (:func:`_steering_sweep`).
    """
    from prefjax.elicit.prompts import DEFAULT_TEMPLATE
    from prefjax.elicit.runner import label_token_ids
    from prefjax.probes import RidgeProbe
    from prefjax.steering import random_direction
    from prefjax.stats_small import wilson_interval

    pname = _get(cfg, "steering.persona", None) or list(personas)[0]
    ps = probe_summary["persona"][pname]
    layer = _get(cfg, "steering.layer", "best")
    layer = ps["best_layer"] if layer in (None, "best") else int(layer)
    if not 0 <= layer < model.n_layers:
        raise ValueError(f"steering.layer {layer} is outside the model's layers 0..{model.n_layers - 1}")
    note = None
    if layer == model.n_layers - 1:
        note = ("steering at the last layer adds to the task tokens after every attention layer has read them: "
                "the answer position cannot see it, so no effect is possible")
        log("warning: " + note)
    hook = f"blocks.{layer}.hook_resid_post"
    probe_dir = os.path.join(run.workdir, "probes", pname, f"blocks.{ps['best_layer']}.hook_resid_post")
    direction = RidgeProbe.load(probe_dir).direction
    scale = float(mean_norms.get(hook, ps["mean_resid_norm"]))
    coefs = [float(c) for c in _get(cfg, "steering.coefs", (-0.1, -0.05, 0.0, 0.05, 0.1))]
    n_pairs = int(_get(cfg, "steering.n_pairs", 8))
    mode = _get(cfg, "steering.mode", "contrastive")
    rng = np.random.default_rng(int(_get(cfg, "seed", 0)))
    idx = rng.permutation(len(pool))
    pairs = [(pool[int(idx[2 * k])], pool[int(idx[2 * k + 1])]) for k in range(min(n_pairs, len(pool) // 2))]
    tok = model.tokenizer
    ida, idb = label_token_ids(tok, DEFAULT_TEMPLATE)
    persona = personas[pname]
    n_new = int(_get(cfg, "steering.generate_tokens", 0) or 0)
    directions = {"probe": direction, "random": random_direction(model.d_model, 1234)}
    sweep = _steering_sweep(model, pairs, persona, mode, layer, scale, coefs, directions, n_new)
    toward_a = np.asarray([t == "A" for t in sweep["toward"]])
    P = len(toward_a)
    results, p_a_all = {}, {}
    for name in directions:
        rows, p_a_all[name] = [], []
        for ci, c in enumerate(coefs):
            lg = sweep["logits"][name][ci]
            pa = np.exp(lg[:, ida] - np.logaddexp(lg[:, ida], lg[:, idb]))
            p_steered = np.where(toward_a, pa, 1.0 - pa)
            p_a_all[name].append(pa)
            k = int((p_steered >= 0.5).sum())
            lo, hi = wilson_interval(k, P)
            on_label = float(np.isin(lg.argmax(-1), [ida, idb]).mean())
            rows.append({"coef": c, "p_steered_mean": float(p_steered.mean()), "k": k, "n": P,
                         "ci": [float(lo), float(hi)], "on_label_rate": on_label})
        results[name] = rows
    atomic_save_npz(os.path.join(run.stage_dir("steering"), "p_a.npz"), coefs=np.asarray(coefs),
                    toward_a=toward_a, probe=np.asarray(p_a_all["probe"]), random=np.asarray(p_a_all["random"]))
    sampled = None
    if n_new > 0:
        sampled = _steered_completions(run, model, sweep, coefs, n_new)
    slope = float(np.polyfit(coefs, [r["p_steered_mean"] for r in results["probe"]], 1)[0])
    slope_rand = float(np.polyfit(coefs, [r["p_steered_mean"] for r in results["random"]], 1)[0])
    return {"persona": pname, "layer": layer, "scale": scale, "mode": mode, "n_pairs": len(pairs), "n_prompts": P,
            "coefs": coefs, "probe": results["probe"], "random": results["random"],
            "slope_probe": slope, "slope_random": slope_rand, "note": note, "sampled": sampled}


def _steering_sweep(model, pairs, persona, mode, layer, scale, coefs, directions, n_new, *, chunk: int = 112) -> dict:
    """Run every (direction, coefficient, prompt) of the steering sweep.

    Returns ``toward`` (the steered label of each prompt), ``logits[name][ci]`` [P, V] float64 (the
    label position after the forced prefix) and, with ``n_new`` > 0, ``prompts`` (the unforced prompt
    ids), ``tokens[name][ci]`` / ``texts[name][ci]`` (greedy completions of the unforced prompts,
    stop token excluded).

    Where the model keeps prefix caches, the rows run batched: the prompts' shared start once, then each
    row's steered prompt (all but its last token) once as a cache (directions and coefficients are
    per-row steering leaves of one compiled program), from which both the forced-prefix logits (the
    last token plus the forced prefix on top) and the greedy completion (the last token, then decoding)
    are read. Otherwise each coefficient runs as its own forward pass and ``generate`` call.
    """
    from prefjax.generation import generate
    from prefjax.model import common_prefix_len
    from prefjax.progress import progress
    from prefjax.steering import SteerSpec
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
    bar = progress(total=len(names) * len(coefs) * P, desc="steering", unit="prompt")
    if not batched:  # one coefficient at a time: a forced-prefix forward, then generate
        t = max(len(s) for s in forced)
        ids, att, msk = (np.zeros((P, t), np.int32), np.zeros((P, t), np.int32), np.zeros((P, t), np.float32))
        for r, (s, m) in enumerate(zip(forced, fmasks)):
            ids[r, t - len(s):], att[r, t - len(s):], msk[r, t - len(s):] = s, 1, m
        width = max(len(p) for p in plain)
        gmask = np.zeros((P, width), np.float32)
        for r, m in enumerate(masks):
            gmask[r, :len(m)] = m
        for name, vec in directions.items():
            for ci, c in enumerate(coefs):
                spec = SteerSpec(layer=layer, direction=vec, coef=np.full((P,), c, np.float32), scale=scale, tokens=msk)
                logits, _ = model.run(ids, attention_mask=att, positions=np.full((P, 1), t - 1, np.int32), steer=spec)
                out["logits"][name][ci] = np.asarray(logits[:, 0, :], np.float64)
                if n_new > 0:
                    gen = generate(model, plain, max_new_tokens=n_new, temperature=0.0,
                                   steer=spec.replace(tokens=gmask))
                    out["tokens"][name][ci], out["texts"][name][ci] = gen.token_ids, gen.texts
                bar.update(P)
        bar.close()
        return out
    # Batched: row (direction d, coefficient ci, prompt r); every prompt but its last token is steered
    # and cached once (the masks cover task spans only), on top of the prompts' common start. Rows that
    # add the same vector to the same tokens are the same computation and run once: at c = 0 every
    # direction and mask, and in contrastive mode "towards B at c" is "towards A at -c" (same prompt,
    # mask negated), so a symmetric sweep runs about half its rows.
    def key(name, ci, r):
        if coefs[ci] == 0:
            return ("c=0", tuple(plain[r]))
        return (name, tuple(plain[r]), tuple((coefs[ci] * np.asarray(masks[r], np.float64)).tolist()))
    every = [(name, ci, r) for name in names for ci in range(len(coefs)) for r in range(P)]
    cells = list({key(*cell): cell for cell in every}.values())  # one cell per key (all equal within a key)
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
        toks = np.full((chunk, width), pad, np.int32)
        valid = np.zeros((chunk, width), bool)
        msk = np.zeros((chunk, width), np.float32)
        coef = {name: np.zeros(chunk, np.float32) for name in names}
        for j, (name, ci, r) in enumerate(part):
            b = bodies[r][skip:]
            toks[j, width - len(b):], valid[j, width - len(b):] = b, True
            msk[j, width - len(b):] = masks[r][skip:len(bodies[r])]
            coef[name][j] = coefs[ci]
        specs = tuple(SteerSpec(layer=layer, direction=directions[name], coef=coef[name], scale=scale, tokens=msk)
                      for name in names)
        cache = model.prefill(toks, attention_mask=valid, prefix=shared, steer=specs)
        last = np.asarray([[plain[r][-1]] + list(extra[r]) for _, _, r in part], np.int32)
        logits, _ = model.run(last, positions=np.full((chunk, 1), last.shape[1] - 1, np.int32), prefix=cache)
        logits = np.asarray(logits[:, 0, :], np.float64)
        gen = None
        if n_new > 0:
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
    return out


def _steered_completions(run, model, sweep, coefs, n_new) -> dict:
    """The steering sweep with sampled completions: choice, refusal and coherence per coefficient.

    Each pair is shown twice (steered towards A, then towards B) without the forced prefix; the model
    writes ``n_new`` tokens (greedy), which are parsed like elicitation replies. Coherence is the mean
    per-token log-likelihood of the steered completion under the unsteered model.
    """
    from prefjax.elicit.parse import parse_choice
    from prefjax.elicit.prompts import DEFAULT_TEMPLATE
    from prefjax.steering import completion_loglik
    from prefjax.stats_small import wilson_interval

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
    atomic_write_json(os.path.join(run.stage_dir("steering"), "completions.json"),
                      {"toward": toward, "texts": raw})
    return {"n_prompts": len(prompts), "new_tokens": n_new, **out}
