"""Preference-shift tracking: when a system prompt moves the utilities, does the probe score move too?

Base persona A has utilities ``mu_base`` and activations ``X_base``; under a shift (persona B, or a
context such as "You love math") the same tasks have utilities ``mu_shift`` and activations
``X_shift``. A probe trained on A alone scores both: ``s_base = probe(X_base)``,
``s_shift = probe(X_shift)``. Per task the utility change is ``d_mu = mu_shift - mu_base`` and the
score change ``d_s = s_shift - s_base``; the headline number is ``corr(d_s, d_mu)`` with a bootstrap
interval (tasks resampled) and a permutation p-value (``d_mu`` shuffled).

The probe was trained on most of the tasks, so the tracking r over every task is in-sample. The stage
reports it on the tasks the saved probe did *not* train on (:func:`heldout_tasks`: the ids its
``cfg.json`` records as ``heldout_tasks``, written by the probes stage; older probes without the record
fall back to the pipeline's ``default_splits(n, seed)`` test split, which is what the probes stage holds
out, and the result says so). The all-task number is kept only under ``all_in_sample``.

A content baseline computed from the task text alone (e.g. mean token embeddings) does not see the
system prompt, so its score change is 0 by construction. It is reported instead by how well its
(unchanged) score correlates with the shifted utilities, next to the probe's ``corr(s_shift,
mu_shift)``: a probe that only encodes content would do no better than the baseline there.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from prefjax.baselines import content_embeddings
from prefjax.probes import RidgeProbe, default_splits, fit_ridge
from prefjax.runconfig import PrefShiftConfig
from prefjax.stages import to_jsonable
from prefjax.stats_small import rankdata
from prefjax.store import open_existing


class ShiftError(ValueError):
    """Inputs of the shift analysis that do not line up (lengths, NaN, missing files)."""


def _vec(name: str, a, n: int | None = None) -> np.ndarray:
    v = np.asarray(a, np.float64)
    if v.ndim != 1:
        raise ShiftError(f"{name} must be 1-D; got shape {v.shape}")
    if n is not None and len(v) != n:
        raise ShiftError(f"{name} has {len(v)} entries; expected {n} (one per task)")
    if not np.isfinite(v).all():
        raise ShiftError(f"{name} has a non-finite value at index {int(np.argwhere(~np.isfinite(v))[0][0])}")
    return v


def _r(x, y) -> float:
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def _rows_r(x_BxN, y_BxN) -> np.ndarray:
    x = x_BxN - x_BxN.mean(1, keepdims=True)
    y = y_BxN - y_BxN.mean(1, keepdims=True)
    den = np.sqrt((x * x).sum(1) * (y * y).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (x * y).sum(1) / np.where(den > 0, den, 1), np.nan)


def correlation_test(x, y, *, n_boot: int = 1000, n_perm: int = 1000, level: float = 0.95,
                     seed: int = 0) -> dict:
    """Pearson r of ``x`` and ``y`` with a percentile bootstrap CI and a two-sided permutation p-value.

    Returns ``{"r", "spearman", "ci": [lo, hi], "p_value", "n", "slope"}``; ``slope`` is the least-
    squares slope of ``x`` on ``y`` (1 when ``x`` moves one-for-one with ``y``). The p-value is
    ``(1 + #{|r_perm| >= |r|}) / (1 + n_perm)``. A constant input gives ``r = nan`` (no error).
    """
    x = _vec("x", x)
    y = _vec("y", y, len(x))
    n = len(x)
    if n < 3:
        raise ShiftError(f"need at least 3 tasks for a correlation; got {n}")
    r = _r(x, y)
    rng = np.random.default_rng(seed)
    bi = rng.integers(0, n, (n_boot, n))
    boots = _rows_r(x[bi], y[bi])
    boots = boots[np.isfinite(boots)]
    a = (1 - level) / 2
    ci = [float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))] if boots.size else [np.nan, np.nan]
    perm = np.argsort(rng.random((n_perm, n)), axis=1)
    null = _rows_r(np.broadcast_to(x, (n_perm, n)), y[perm])
    p = float((1 + np.sum(np.abs(null) >= abs(r) - 1e-12)) / (1 + n_perm)) if np.isfinite(r) else float("nan")
    vy = float(((y - y.mean()) ** 2).sum())
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / vy) if vy > 0 else float("nan")
    return {"r": r, "spearman": _r(rankdata(x), rankdata(y)), "ci": ci, "p_value": p, "n": n,
            "slope": slope}


def preference_shift(mu_base, mu_shift, score_base, score_shift, *, baseline_score=None, idx=None,
                     n_boot: int = 1000, n_perm: int = 1000, seed: int = 0) -> dict:
    """Does the probe score follow the utility shift? All inputs are per task, aligned.

    ``score_*`` are the probe (trained on the base persona) applied to activations under the base
    and under the shift; ``baseline_score`` is a content-only score (the same under both). ``idx``
    restricts to a subset of tasks (e.g. those the probe was not trained on). Returns:

    * ``tracking``: :func:`correlation_test` of ``d_s`` against ``d_mu`` (the headline);
    * ``probe_base`` / ``probe_shift``: r of the score with the utilities under base / shift;
    * ``utility_corr``: r of ``mu_base`` with ``mu_shift`` (how big the shift is);
    * ``baseline`` (when given): r of the content score with ``mu_shift`` (CI, p) and with ``mu_base``
      -- its own change is 0 by construction, so it cannot track ``d_mu``;
    * ``d_mu`` / ``d_s`` summaries (mean, sd).
    """
    mb = _vec("mu_base", mu_base)
    n = len(mb)
    ms = _vec("mu_shift", mu_shift, n)
    sb = _vec("score_base", score_base, n)
    ss = _vec("score_shift", score_shift, n)
    bl = None if baseline_score is None else _vec("baseline_score", baseline_score, n)
    if idx is not None:
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.nonzero(idx)[0]
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ShiftError(f"idx holds task index {int(idx.max() if idx.max() >= n else idx.min())}; "
                             f"there are {n} tasks")
        mb, ms, sb, ss = mb[idx], ms[idx], sb[idx], ss[idx]
        bl = None if bl is None else bl[idx]
    d_mu, d_s = ms - mb, ss - sb
    kw = dict(n_boot=n_boot, n_perm=n_perm, seed=seed)
    out = {"n": int(len(mb)),
           "tracking": correlation_test(d_s, d_mu, **kw),
           "probe_base": correlation_test(sb, mb, **kw),
           "probe_shift": correlation_test(ss, ms, **kw),
           "utility_corr": _r(mb, ms),
           "d_mu": {"mean": float(d_mu.mean()), "sd": float(d_mu.std())},
           "d_s": {"mean": float(d_s.mean()), "sd": float(d_s.std())}}
    if bl is not None:
        out["baseline"] = {"vs_mu_shift": correlation_test(bl, ms, **kw), "vs_mu_base": _r(bl, mb),
                           "d_s": 0.0}
    return out


# ---------------------------------------------------------------------------------------------
# The pipeline stage.

def saved_probe_dir(run, persona: str, probe_summary=None) -> str:
    """The folder of a persona's saved probe in ``run`` (a :class:`prefjax.stages.RunLayout`): the best
    layer of ``probe_summary`` when given, else the one saved probe folder (ShiftError otherwise)."""
    base = run.probes_dir(persona)
    if probe_summary is not None:
        d = run.probe_dir(persona, probe_summary["persona"][persona]["best_layer"])
    else:
        subs = sorted(s for s in os.listdir(base) if os.path.isfile(os.path.join(base, s, "cfg.json"))) \
            if os.path.isdir(base) else []
        if len(subs) != 1:
            raise ShiftError(f"{base}: expected exactly one saved probe folder, found {subs}; "
                             f"pass probe_summary to pick the best layer")
        d = os.path.join(base, subs[0])
    if not os.path.isfile(os.path.join(d, "cfg.json")):
        raise ShiftError(f"no saved probe at {d} (run the probes stage first)")
    return d


def _acts(run, persona: str, hook: str, position: int) -> np.ndarray:
    path = run.activations_dir(persona)
    if not os.path.isfile(os.path.join(path, "store.json")):
        raise ShiftError(f"no activations for persona {persona!r} at {path} (run the activations stage)")
    st = open_existing(path)
    if hook not in st.hooks:
        raise ShiftError(f"{path} holds hooks {list(st.hooks)}, not the probe's {hook!r}")
    if not 0 <= position < st.positions_k:
        raise ShiftError(f"probe position {position} is outside the {st.positions_k} stored positions of {path}")
    return st.read(hook=hook)[:, position, :].astype(np.float32)


def _mu(run, persona: str) -> np.ndarray:
    p = run.utilities(persona)
    if not os.path.isfile(p):
        raise ShiftError(f"no utilities for persona {persona!r} at {p} (run the utilities stage)")
    return np.load(p)["mu"]


def heldout_tasks(probe, pool, seed: int) -> tuple[np.ndarray, str]:
    """Indices into ``pool`` of the tasks ``probe`` (a loaded :class:`RidgeProbe`) did not train on, and
    where that came from: the ``heldout_tasks`` ids recorded in its ``cfg.json`` (``"probe cfg.json"``), else
    the pipeline's test split ``default_splits(len(pool), seed)[2]`` (the probes stage fits the saved probe on
    every other task). ShiftError when a recorded id is not in the pool."""
    rec = getattr(probe, "cfg", {}).get("heldout_tasks")
    if rec is None:
        return np.sort(np.asarray(default_splits(len(pool), seed)[2], np.int64)), \
            "default_splits(n, seed) test split (the probe records no heldout_tasks)"
    where = {t: i for i, t in enumerate(pool.ids)}
    missing = [t for t in rec if t not in where]
    if missing:
        raise ShiftError(f"the probe's held-out task(s) {missing[:5]} are not in the task pool "
                         f"({len(missing)} missing): a probe of another pool?")
    return np.sort(np.asarray([where[t] for t in rec], np.int64)), "probe cfg.json heldout_tasks"


def _baseline_splits(n: int, held: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) for the content baseline, both outside ``held``: the pipeline's train/eval split when it
    is exactly the complement of ``held`` (the usual case), else a seeded 3:1 split of the complement (at
    least 3 for eval where the complement allows)."""
    train, ev, test = default_splits(n, seed)
    if np.array_equal(np.sort(test), held):
        return np.asarray(train), np.asarray(ev)
    rest = np.setdiff1d(np.arange(n), held)
    rest = rest[np.random.default_rng(seed).permutation(len(rest))]
    k = min(max(len(rest) // 4, 3), max(len(rest) - 2, 1))
    return np.sort(rest[k:]), np.sort(rest[:k])


def run_pref_shift_stage(config: PrefShiftConfig, run, model, pool, personas: Mapping[str, Any], *,
                         seed: int, alphas, probe_summary=None) -> dict:
    """Probe-score tracking of utility shifts, base persona vs every other persona of the run.

    Reads what the pipeline wrote (through ``run``'s layout): each persona's utilities and activations
    and the base persona's saved probe (the best layer of ``probe_summary`` when given). ``config`` is
    the ``pref_shift`` section: ``base`` ("" = the first persona), ``shifts`` (() = the other
    personas), ``n_boot``, ``n_perm``; ``alphas`` are the probes' ridge penalties (content baseline).
    A shift such as "You love math" is run as a persona of the pipeline (its own choices, utilities
    and activations).

    Per shift persona: ``heldout`` (the headline: :func:`preference_shift` on the tasks the probe did not
    train on, :func:`heldout_tasks`; tracking r with bootstrap interval and permutation p, and its ``n``)
    and ``all_in_sample`` (every task, most of which trained the probe: in-sample, not evidence). The top
    level carries ``n_heldout``, ``heldout_from`` and ``heldout_tasks`` (ids). The content baseline is fitted
    on tasks outside the held-out set.
    """
    names = list(personas)
    base = config.base or names[0]
    shifts = list(config.shifts or [p for p in names if p != base])
    for p in [base] + shifts:
        if p not in personas:
            raise ShiftError(f"pref_shift names persona {p!r}, which is not one of the run's personas {names}")
    if not shifts:
        return {"base": base, "skipped": "no shift persona (the run has one persona)"}
    n = len(pool)
    pdir = saved_probe_dir(run, base, probe_summary)
    probe = RidgeProbe.load(pdir)
    hook = probe.cfg.get("hook", os.path.basename(pdir))
    position = int(probe.cfg.get("position", 0))
    mu_b = _mu(run, base)
    s_b = probe.predict(_acts(run, base, hook, position))
    held, held_from = heldout_tasks(probe, pool, seed)
    train, ev = _baseline_splits(n, held, seed)
    if min(len(ev), len(held)) < 3:
        raise ShiftError(f"a pool of {n} tasks leaves {len(ev)} baseline-eval and {len(held)} held-out tasks; "
                         f"need >= 3 each (use at least 14 tasks)")
    alphas = tuple(float(a) for a in alphas)
    emb = content_embeddings(model, pool)
    bl = fit_ridge(emb, mu_b, alphas=alphas, eval_idx=ev, train_idx=train).predict(emb)
    kw = dict(n_boot=int(config.n_boot), n_perm=int(config.n_perm),
              seed=seed)
    ids = list(pool.ids)
    out = {"base": base, "probe": os.path.relpath(pdir, run.workdir), "hook": hook, "position": position,
           "n_heldout": int(len(held)), "heldout_from": held_from, "heldout_tasks": [ids[i] for i in held],
           "shifts": {}}
    for sp in shifts:
        mu_s = _mu(run, sp)
        s_s = probe.predict(_acts(run, sp, hook, position))
        out["shifts"][sp] = {
            "heldout": preference_shift(mu_b, mu_s, s_b, s_s, baseline_score=bl, idx=held, **kw),
            "all_in_sample": preference_shift(mu_b, mu_s, s_b, s_s, baseline_score=bl, **kw)}
    return to_jsonable(out, nan_to_none=True)
