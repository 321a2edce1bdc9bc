"""What the utilities are: diagnostics of one persona's stored comparisons and of its Thurstonian fit.

A Thurstonian fit returns utilities whatever the choices were; these numbers say what the utilities
rest on. Every function is pure (rows or arrays in, a JSON-ready dict out, ``None`` where a value is
undefined, never NaN). Rows are dicts as :meth:`prefjax.store.ComparisonsStore.rows` returns them
(``task_a``, ``task_b``, ``order``, ``choice``, ``chosen_task``, ``status``, ``refusal``, ``p_a``); as in
:meth:`~prefjax.store.ComparisonsStore.to_arrays`, only ``status == "ok"`` rows with a chosen task are
choices, and ``soft=True`` (logit mode) reads ``p_a`` = P(label "A") in place of the hard pick.

* :func:`position_bias` -- the share of parsed choices that picked the task shown first (label "A"),
  with a Wilson 95% interval (:func:`prefjax.stats_small.wilson_interval`) and a two-sided exact
  binomial test against 0.5; with ``p_a`` stored also the mean P(label "A").
* :func:`order_averaged_spread` -- for every pair shown in both orders, P(task chosen) averaged over
  the two orders (a pure position effect cancels), with its quantiles and the share of pairs within
  ``tol`` of 0.5. All of them near 0.5 means that, the position aside, the model is close to indifferent.
* :func:`heldout_accuracy` -- a k-fold split over the compared pairs: refit with
  :func:`prefjax.utility.thurstonian.fit_thurstonian` on the other folds and score each held-out pair
  with :meth:`~prefjax.utility.thurstonian.ThurstonianFit.heldout`, next to the constant model (a pair
  has no natural first side, so the training win rate of a side is 0.5: accuracy 0.5, log-loss log 2)
  and the floor (the log-loss of knowing each held-out pair's own win share).
* :func:`reply_counts` -- rows per status (unparsed and refused replies) and parsed rows flagged as
  refusals.
* :func:`utility_diagnostics` gathers all four for one persona from a store;
  :func:`diagnostic_warnings` says in words which of them undermine the utilities.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as _stats
from scipy.special import entr as _entr

from prefjax.stats_small import wilson_interval
from prefjax.utility.thurstonian import fit_thurstonian

__all__ = ["position_bias", "order_averaged", "order_averaged_spread", "heldout_accuracy", "reply_counts", "utility_diagnostics",
           "diagnostic_warnings", "BIAS_EXTREME", "NEAR_HALF"]

BIAS_EXTREME = 0.9  # a first-label share above this (or below 1 - this) is flagged
NEAR_HALF = 0.05    # order-averaged preferences within this of 0.5 count as "indifferent"


def _shown_first(r: Mapping) -> str:
    return r["task_a"] if r["order"] == "AB" else r["task_b"]


def _p_first(r: Mapping, soft: bool) -> float | None:
    """P(the task shown first was chosen) of one row, or None when the row is no choice."""
    if r.get("status") != "ok":
        return None
    if soft and r.get("p_a") is not None:
        return float(r["p_a"])
    chosen = r.get("chosen_task")
    if chosen is None:
        return None
    return 1.0 if chosen == _shown_first(r) else 0.0


# ------------------------------------------------------------------------------------------ position bias

def position_bias(rows: Sequence[Mapping]) -> dict:
    """How often the task shown first (label "A") was picked.

    Counts ``status == "ok"`` rows with a chosen task (hard picks, also in logit mode, where the pick is
    label "A" when P(A) >= 0.5). Returns ``n_parsed``, ``n_first``, ``rate`` (= n_first / n_parsed),
    ``ci`` (Wilson 95%), ``p_value`` (two-sided exact binomial test of rate = 0.5), and ``mean_p_first``
    / ``n_p`` (the mean of the stored P(label "A") and how many rows carry one; None / 0 without).
    With no parsed choice, ``rate`` and ``p_value`` are None and ``ci`` is ``[0, 1]``.
    """
    picks = [_p_first(r, soft=False) for r in rows]
    picks = [p for p in picks if p is not None]
    n, k = len(picks), int(sum(picks))
    lo, hi = wilson_interval(k, n)
    p_a = [float(r["p_a"]) for r in rows if r.get("status") == "ok" and r.get("p_a") is not None]
    return {"n_parsed": n, "n_first": k, "rate": k / n if n else None, "ci": [lo, hi],
            "p_value": float(_stats.binomtest(k, n, 0.5).pvalue) if n else None,
            "mean_p_first": float(np.mean(p_a)) if p_a else None, "n_p": len(p_a)}


# -------------------------------------------------------------------------------- order-averaged spread

def order_averaged(rows: Sequence[Mapping], *, soft: bool = False) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Per pair shown in both orders: ``(pairs, p)`` with ``pairs[m] = (lo, hi)`` (task ids sorted) and
    ``p[m]`` = the mean over the two orders of P(``lo`` chosen), each order's P the mean over its samples."""
    acc: dict[tuple[str, str], list[list[float]]] = {}
    for r in rows:
        pf = _p_first(r, soft)
        if pf is None:
            continue
        lo, hi = sorted((r["task_a"], r["task_b"]))
        lo_first = _shown_first(r) == lo
        cell = acc.setdefault((lo, hi), [[], []])  # [P(lo) with lo first, P(lo) with lo second]
        cell[0 if lo_first else 1].append(pf if lo_first else 1.0 - pf)
    pairs = sorted(k for k, (a, b) in acc.items() if a and b)
    p = np.array([0.5 * (np.mean(acc[k][0]) + np.mean(acc[k][1])) for k in pairs], np.float64)
    return pairs, p


def order_averaged_spread(rows: Sequence[Mapping], *, soft: bool = False, tol: float = NEAR_HALF) -> dict:
    """The spread of order-averaged preferences (:func:`order_averaged`).

    Returns ``n_pairs`` (pairs shown in both orders), ``n_pairs_one_order`` (pairs with choices in one
    order only, left out), ``min``, ``q05``, ``q25``, ``median``, ``q75``, ``q95``, ``max`` of P(``lo``
    chosen) (``lo`` = the pair's task id that sorts first, an arbitrary side), the orientation-free
    ``max_abs_dev`` and ``median_abs_dev`` of |P - 0.5|, ``tol`` and ``frac_within_tol`` (share of pairs
    with |P - 0.5| <= tol). Without a pair in both orders the statistics are None.
    """
    pairs, p = order_averaged(rows, soft=soft)
    every = {tuple(sorted((r["task_a"], r["task_b"]))) for r in rows if _p_first(r, soft) is not None}
    out = {"n_pairs": len(pairs), "n_pairs_one_order": len(every) - len(pairs), "tol": float(tol)}
    keys = ("min", "q05", "q25", "median", "q75", "q95", "max")
    if not len(p):
        return {**out, **{k: None for k in keys}, "max_abs_dev": None, "median_abs_dev": None,
                "frac_within_tol": None}
    qs = np.quantile(p, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    dev = np.abs(p - 0.5)
    return {**out, **{k: float(q) for k, q in zip(keys, qs)}, "max_abs_dev": float(dev.max()),
            "median_abs_dev": float(np.median(dev)), "frac_within_tol": float(np.mean(dev <= tol + 1e-12))}


# ---------------------------------------------------------------------------------------- held-out fit

def heldout_accuracy(i, j, wins_i, wins_j, n_tasks: int, *, k: int = 5, seed: int = 0, **fit_options) -> dict:
    """Held-out accuracy and log-loss of the Thurstonian fit, over a k-fold split of the compared pairs.

    ``i, j, wins_i, wins_j`` are one row per compared pair as
    :meth:`prefjax.store.ComparisonsStore.to_arrays` returns them (so a pair, both its orders and every
    sample, is in one fold: the held-out pairs were never seen by the fit). Each fold is scored by a fit
    on the other folds (``fit_thurstonian(..., n_tasks, **fit_options)``: pass the run's options), with
    each pair's target its win share ``c = wins_i / (wins_i + wins_j)``; every pair counts once.

    Returns, pooled over the folds:

    * ``accuracy``, ``log_loss`` -- :meth:`ThurstonianFit.heldout` on the win shares (accuracy: the expected
      share of the pair's comparisons predicted right); ``log_loss_floor`` -- the mean binary entropy of
      the held-out shares, the log-loss of a model that knew each pair's share;
    * ``majority_accuracy``, ``majority_log_loss`` -- the same on the pairs' majority labels (``c > 0.5``;
      ``n_majority`` pairs, ties left out): held-out pair accuracy;
    * ``constant`` -- the same four numbers for the constant model. A pair has no natural first side (the
      order of ``i, j`` is the pool's, and both showing orders are pooled), so the training win rate of
      a side is 0.5 (every comparison is one side's win and the other's loss): the constant model predicts
      0.5 for every pair, accuracy 0.5 and log-loss log 2. (An oriented constant, such as the win rate of
      the lower pool index, would score the pool's arbitrary order, not the tasks.)
    * ``k`` (folds used), ``n_pairs``, ``n_majority``, ``seed``.

    With fewer than 2 pairs every metric is None. ``k`` is lowered to the number of pairs if larger.
    """
    if k < 2:
        raise ValueError(f"heldout_accuracy: k must be >= 2, got {k}")
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    wi, wj = np.asarray(wins_i, np.float64), np.asarray(wins_j, np.float64)
    keep = (wi + wj) > 0
    i, j, wi, wj = i[keep], j[keep], wi[keep], wj[keep]
    n = len(i)
    metric_keys = ("accuracy", "log_loss", "majority_accuracy", "majority_log_loss")
    out = {"k": None, "n_pairs": n, "n_majority": 0, "seed": int(seed)}
    if n < 2:
        return {**out, **{m: None for m in metric_keys}, "log_loss_floor": None,
                "constant": {m: None for m in metric_keys}}
    k = min(int(k), n)
    c = wi / (wi + wj)
    fold = np.empty(n, np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % k
    tie = np.abs(c - 0.5) <= 1e-9
    acc = ll = m_acc = m_ll = 0.0
    for f in range(k):
        test, train = fold == f, fold != f
        fit = fit_thurstonian(i[train], j[train], wi[train], wj[train], n_tasks, **fit_options)
        h = fit.heldout(i[test], j[test], c[test])
        acc += h["accuracy"] * int(test.sum())
        ll += h["log_loss"] * int(test.sum())
        mt = test & ~tie
        if mt.any():
            hm = fit.heldout(i[mt], j[mt], (c[mt] > 0.5).astype(np.float64))
            m_acc += hm["accuracy"] * int(mt.sum())
            m_ll += hm["log_loss"] * int(mt.sum())
    nm = int((~tie).sum())
    ent = _entr(c) + _entr(1.0 - c)  # binary entropy of each pair's win share, nats
    coin = math.log(2.0)
    return {**out, "k": k, "n_majority": nm, "accuracy": acc / n, "log_loss": ll / n,
            "log_loss_floor": float(ent.mean()), "majority_accuracy": m_acc / nm if nm else None,
            "majority_log_loss": m_ll / nm if nm else None,
            "constant": {"accuracy": 0.5, "log_loss": coin, "majority_accuracy": 0.5 if nm else None,
                         "majority_log_loss": coin if nm else None}}


# ---------------------------------------------------------------------------------------------- replies

def reply_counts(rows: Sequence[Mapping]) -> dict:
    """Rows per status: ``n_rows``, ``ok``, ``refusal`` (refused, no choice read), ``unparseable``, ``both``
    (both labels named), ``unparsed`` (= unparseable + both), ``refusal_flagged`` (``ok`` rows that carry a
    refusal flag: a task picked, then declined), ``declined_other`` (``ok`` rows whose ``extra`` says the reply
    did one task and declined the other) and ``no_choice_share`` (rows that are no choice / n_rows; None
    without rows)."""
    out = {"n_rows": len(rows), "ok": 0, "refusal": 0, "unparseable": 0, "both": 0}
    flagged = declined = 0
    for r in rows:
        s = r.get("status")
        out[s] = out.get(s, 0) + 1
        flagged += int(s == "ok" and bool(r.get("refusal")))
        declined += int(s == "ok" and bool((r.get("extra") or {}).get("declined_other")))
    out["unparsed"] = out["unparseable"] + out["both"]
    out["refusal_flagged"] = flagged
    out["declined_other"] = declined
    out["no_choice_share"] = (len(rows) - out["ok"]) / len(rows) if rows else None
    return out


# ------------------------------------------------------------------------------------------ one persona

def utility_diagnostics(store, task_ids: Sequence[str], persona: str, *, soft: bool, k: int = 5, seed: int = 0,
                        tol: float = NEAR_HALF, **fit_options) -> dict:
    """:func:`position_bias`, :func:`order_averaged_spread`, :func:`heldout_accuracy` and
    :func:`reply_counts` of one persona's rows in ``store`` (a :class:`prefjax.store.ComparisonsStore`),
    restricted to pairs of ``task_ids`` as the fit is; ``soft`` as the utilities stage reads them (logit
    mode). Keys ``position_bias``, ``order_averaged``, ``heldout``, ``replies`` and ``warnings``
    (:func:`diagnostic_warnings`)."""
    known = set(task_ids)
    rows = [r for r in store.rows(persona) if r["task_a"] in known and r["task_b"] in known]
    i, j, wi, wj = store.to_arrays(task_ids, persona, soft=soft, strict=False)
    diag = {"position_bias": position_bias(rows), "order_averaged": order_averaged_spread(rows, soft=soft, tol=tol),
            "heldout": heldout_accuracy(i, j, wi, wj, len(task_ids), k=k, seed=seed, **fit_options),
            "replies": reply_counts(rows)}
    diag["warnings"] = diagnostic_warnings(diag)
    return diag


def diagnostic_warnings(diag: Mapping, *, bias_extreme: float = BIAS_EXTREME,
                        max_no_choice: float = 0.2) -> list[str]:
    """Sentences for the report, one per finding that undermines the utilities: a first-label share
    above ``bias_extreme`` (or below 1 - it); every order-averaged preference within ``tol`` of 0.5; a
    held-out fit no better than the constant model (log-loss not lower, or pair accuracy not higher);
    more than ``max_no_choice`` of the replies not a choice. An empty list when none applies."""
    out = []
    pb = diag.get("position_bias") or {}
    if pb.get("rate") is not None and max(pb["rate"], 1 - pb["rate"]) > bias_extreme:
        side = "first" if pb["rate"] > 0.5 else "second"
        out.append(f"position bias: the task shown {side} was picked in "
                   f"{pb['n_first'] if side == 'first' else pb['n_parsed'] - pb['n_first']} of {pb['n_parsed']} "
                   "parsed choices; the raw choices say more about the position than about the tasks.")
    oa = diag.get("order_averaged") or {}
    if oa.get("n_pairs") and oa.get("frac_within_tol") is not None and oa["frac_within_tol"] >= 1.0:
        out.append(f"every order-averaged preference ({oa['n_pairs']} pairs shown in both orders) lies within "
                   f"±{oa['tol']:g} of 0.5 (range {oa['min']:.3f}–{oa['max']:.3f}): with the position averaged "
                   "out, the model is close to indifferent between every pair.")
    h = diag.get("heldout") or {}
    const = h.get("constant") or {}
    if h.get("log_loss") is not None:
        worse = []
        if h["log_loss"] >= const["log_loss"]:
            worse.append(f"log-loss {h['log_loss']:.4f} vs constant {const['log_loss']:.4f}")
        if h.get("majority_accuracy") is not None and h["majority_accuracy"] <= const["majority_accuracy"]:
            worse.append(f"pair accuracy {h['majority_accuracy']:.3f} vs constant {const['majority_accuracy']:.3f}")
        if worse:
            out.append("held-out pairs: the utilities predict no better than a constant (" + "; ".join(worse) + ").")
    rc = diag.get("replies") or {}
    if rc.get("no_choice_share") is not None and rc["no_choice_share"] > max_no_choice:
        out.append(f"{rc['n_rows'] - rc['ok']} of {rc['n_rows']} replies were no choice (refused "
                   f"{rc['refusal']}, unparsed {rc['unparsed']}); the utilities rest on the rest.")
    return out
