"""True/false discrimination: does a preference probe also separate true from false statements?

Short statements (half true, half false, a few topics; ``data/truefalse.jsonl``) are shown alone as
user turns, like tasks, and the residual stream is captured at the end-of-turn token. A saved
preference probe scores them; the AUC of that score for true vs false says how much truth the
preference direction carries (0.5: none; below 0.5: false statements score higher). For comparison,
a classifier trained directly on the statements (standardised ridge on +-1 labels, and L2 logistic
regression), cross-validated in stratified folds, says how linearly decodable truth is at all.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.optimize import minimize

from prefjax.activations import boundary_positions
from prefjax.elicit.prompts import task_messages
from prefjax.experiments.pref_shift import ShiftError, saved_probe_dir
from prefjax.hooks import CaptureSpec
from prefjax.model import common_prefix_len
from prefjax.probes import RidgeProbe
from prefjax.progress import progress
from prefjax.runconfig import TrueFalseConfig
from prefjax.stages import atomic_save_npz, to_jsonable
from prefjax.stats_small import rankdata
from prefjax.tokenize import left_pad


class TrueFalseError(ValueError):
    """A malformed statement file or inputs that do not line up."""


@dataclasses.dataclass(frozen=True)
class Statement:
    """One statement: ``id``, ``text``, ``label`` (True when the statement is true), ``topic``."""

    id: str
    text: str
    label: bool
    topic: str = "unknown"


def load_statements(path: str | os.PathLike | None = None) -> list[Statement]:
    """Statements from a JSONL file (``{"id", "text", "label"[, "topic"]}`` per line); the bundled set
    when ``path`` is None. Errors name the file and line of a bad record."""
    if path is None:
        ref = importlib.resources.files("prefjax.experiments") / "data" / "truefalse.jsonl"
        text, where = ref.read_text(encoding="utf-8"), "truefalse.jsonl"
    else:
        where = os.fspath(path)
        with open(where, encoding="utf-8") as f:
            text = f.read()
    out, seen = [], {}
    for ln, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrueFalseError(f"{where}:{ln}: malformed JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise TrueFalseError(f"{where}:{ln}: expected an object")
        extra = set(d) - {"id", "text", "label", "topic"}
        if extra:
            raise TrueFalseError(f"{where}:{ln}: unknown field(s) {sorted(extra)}")
        for k in ("id", "text"):
            if not isinstance(d.get(k), str) or not d[k].strip():
                raise TrueFalseError(f"{where}:{ln}: field {k!r} must be a non-empty string")
        if not isinstance(d.get("label"), bool):
            raise TrueFalseError(f"{where}:{ln}: field 'label' must be true or false, got {d.get('label')!r}")
        if d["id"] in seen:
            raise TrueFalseError(f"{where}:{ln}: duplicate id {d['id']!r} (first on line {seen[d['id']]})")
        seen[d["id"]] = ln
        out.append(Statement(d["id"], d["text"], d["label"], str(d.get("topic", "unknown"))))
    if not out:
        raise TrueFalseError(f"{where}: no statements")
    return out


# ---------------------------------------------------------------------------------------------
# Metrics and classifiers (numpy/scipy only: scikit-learn is a test dependency).

def _labels(labels, n: int | None = None) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or (n is not None and len(y) != n):
        raise TrueFalseError(f"labels must be 1-D with {n} entries; got shape {y.shape}")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise TrueFalseError("labels must be booleans or 0/1")
        y = y.astype(bool)
    return y


def auc(scores, labels) -> float:
    """ROC AUC of ``scores`` for ``labels`` (True = positive): P(score of a positive > score of a
    negative), ties counted half (Mann-Whitney U with average ranks)."""
    s = np.asarray(scores, np.float64)
    if s.ndim != 1 or not np.isfinite(s).all():
        raise TrueFalseError(f"scores must be 1-D and finite; got shape {s.shape}")
    y = _labels(labels, len(s))
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise TrueFalseError(f"AUC needs both classes; got {n_pos} positive and {n_neg} negative")
    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_bootstrap_ci(scores, labels, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> list[float]:
    """Percentile bootstrap CI of :func:`auc`, resampling within each class (stratified)."""
    s = np.asarray(scores, np.float64)
    y = _labels(labels, len(s))
    pos, neg = np.nonzero(y)[0], np.nonzero(~y)[0]
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        vals[b] = auc(s[idx], y[idx])
    a = (1 - level) / 2
    return [float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))]


def stratified_folds(labels, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold id per example, each class spread evenly over ``n_folds`` folds."""
    y = _labels(labels)
    if n_folds < 2 or min(y.sum(), (~y).sum()) < n_folds:
        raise TrueFalseError(f"{n_folds} folds need at least {n_folds} examples of each class "
                             f"(have {int(y.sum())} true, {int((~y).sum())} false)")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), np.int64)
    for cls in (True, False):
        idx = rng.permutation(np.nonzero(y == cls)[0])
        fold[idx] = np.arange(len(idx)) % n_folds
    return fold


def _standardize(x_tr, x_te):
    m = x_tr.mean(0)
    sd = x_tr.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return (x_tr - m) / sd, (x_te - m) / sd


def _ridge_scores(x_tr, y_tr, x_te, alpha: float):
    xs, xt = _standardize(x_tr, x_te)
    t = np.where(y_tr, 1.0, -1.0)
    c = t.mean()
    # dual form: w = X^T (X X^T + alpha I)^-1 (t - c); fine for n << d and n > d alike at this size
    k = xs @ xs.T
    a = np.linalg.solve(k + alpha * np.eye(len(k)), t - c)
    return xt @ (xs.T @ a) + c


def _logistic_scores(x_tr, y_tr, x_te, l2: float):
    xs, xt = _standardize(x_tr, x_te)
    t = y_tr.astype(np.float64)
    d = xs.shape[1]

    def f(wb):
        w, b = wb[:d], wb[d]
        z = xs @ w + b
        loss = np.logaddexp(0, z).sum() - t @ z + 0.5 * l2 * w @ w
        g = 1 / (1 + np.exp(-z)) - t
        return loss, np.concatenate([xs.T @ g + l2 * w, [g.sum()]])

    res = minimize(f, np.zeros(d + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return xt @ res.x[:d] + res.x[d]


def cv_classifier_auc(X, labels, *, kind: str = "ridge", n_folds: int = 5, reg: float = 1.0,
                      seed: int = 0) -> dict:
    """Cross-validated AUC of a linear classifier trained on ``X`` [n, d] to predict ``labels``.

    ``kind="ridge"``: standardised ridge regression on +-1 targets with penalty ``reg`` (scikit-learn's
    ``RidgeClassifier(alpha=reg)`` on standardised features); ``kind="logistic"``: L2 logistic
    regression with penalty ``reg/2 * ||w||^2`` (scikit-learn's ``C = 1/reg``). Held-out scores of all
    folds are pooled into one AUC (``auc``); ``fold_auc`` lists each fold's and ``accuracy`` is the
    pooled accuracy at the classifier's own threshold.
    """
    x = np.asarray(X, np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise TrueFalseError(f"X must be a finite [n, d] array; got shape {x.shape}")
    y = _labels(labels, len(x))
    fit = {"ridge": _ridge_scores, "logistic": _logistic_scores}.get(kind)
    if fit is None:
        raise TrueFalseError(f"unknown classifier kind {kind!r}; known: ridge, logistic")
    fold = stratified_folds(y, n_folds, seed)
    s = np.zeros(len(y))
    for k in range(n_folds):
        te = fold == k
        s[te] = fit(x[~te], y[~te], x[te], reg)
    thr = 0.0
    return {"kind": kind, "reg": reg, "auc": auc(s, y),
            "fold_auc": [auc(s[fold == k], y[fold == k]) for k in range(n_folds)],
            "accuracy": float(np.mean((s > thr) == y)), "n_folds": n_folds}


# ---------------------------------------------------------------------------------------------
# Activations.

def statement_activations(model, statements: Sequence[Statement | str], hooks: Sequence[str], *, persona=None,
                          n_after: int = 0, batch_size: int = 32, pad_multiple: int = 32) -> np.ndarray:
    """Residuals at the end-of-turn token (and ``n_after`` tokens after it) of each statement shown
    alone as a user turn (under ``persona``'s system prompt, if any): ``[hooks, n, n_after + 1, d]``.

    Every batch is padded to one length (the longest, rounded up to ``pad_multiple``) and one batch
    size, so the whole set runs through a single compiled program. Where the model keeps prefix caches
    the start all statements share (chat header, system prompt) runs once."""
    CaptureSpec.from_names(hooks, model.n_layers)
    if model.tokenizer is None:
        raise TrueFalseError("statement activations need a model with a tokenizer")
    if persona is not None and persona.adapter:
        model = model.with_adapter(persona.adapter)
    texts = [s.text if isinstance(s, Statement) else s for s in statements]
    tok = model.tokenizer
    seqs = [tok.encode_chat(task_messages(t, persona), add_generation_prompt=True) for t in texts]
    pos = [boundary_positions(model, s, n_after, task_id=str(i)) for i, s in enumerate(seqs)]
    out = np.zeros((len(hooks), len(seqs), n_after + 1, model.d_model), np.float32)
    pad = tok.pad_id or 0
    bsz = min(batch_size, len(seqs))
    # The start every prompt shares (the persona's system prompt) runs once, as a prefix cache; each
    # batch then runs the rest, right-padded (its tokens follow the prefix directly).
    skip = common_prefix_len(seqs, limit=min(p[0] for p in pos)) if model.prefix_ok() else 0
    prefix = model.prefill(np.asarray([seqs[0][:skip]], np.int32)) if skip else None
    t = -(-max(len(s) - skip for s in seqs) // pad_multiple) * pad_multiple
    for start in range(0, len(seqs), bsz):
        chunk = seqs[start:start + bsz]
        # one shape for every batch (padded rows repeat row 0 and are dropped): one compiled program
        rows = [b if b < len(chunk) else 0 for b in range(bsz)]
        parts = [chunk[k][skip:] for k in rows]
        ids, valid = left_pad(parts, pad, width=t, right=prefix is not None)
        mask = valid.astype(np.int32)
        p = np.zeros((bsz, n_after + 1), np.int32)
        for b, (k, s) in enumerate(zip(rows, parts)):
            at = 0 if prefix is not None else t - len(s)
            p[b] = np.asarray(pos[start + k]) - skip + at
        _, cache = model.run(ids, attention_mask=mask, capture=list(hooks), positions=p, prefix=prefix)
        for h, name in enumerate(hooks):
            out[h, start:start + len(chunk)] = np.asarray(cache[name], np.float32)[:len(chunk)]
    return out


def probe_truth_auc(probe, X_NxD, labels, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """AUC (true vs false) of a preference probe's score on statement activations, with a bootstrap CI
    and the mean score of each class."""
    s = np.asarray(probe.predict(np.asarray(X_NxD, np.float32)), np.float64)
    y = _labels(labels, len(s))
    return {"auc": auc(s, y), "ci": auc_bootstrap_ci(s, y, n_boot=n_boot, seed=seed),
            "mean_score_true": float(s[y].mean()), "mean_score_false": float(s[~y].mean())}


# ---------------------------------------------------------------------------------------------
# The pipeline stage.

def run_truefalse_stage(config: TrueFalseConfig, run, model, pool, personas: Mapping[str, Any], *, seed: int,
                        probe_summary=None) -> dict:
    """Score the statements with each persona's saved probe; cross-validated classifiers for comparison.

    For every persona with a saved probe (the best layer of ``probe_summary`` when given), statements
    are shown under that persona and captured at the probe's hook and turn-boundary position. Per
    persona: the probe AUC (CI), and ridge and logistic CV AUCs at the probe's layer. ``config`` is the
    ``truefalse`` section: ``path`` ("" = the bundled statements), ``n_folds``, ``reg``, ``n_boot``,
    ``batch_size``. ``pool`` is unused (kept for the common stage signature). Scores go to
    ``stages/truefalse/<persona>.npz``.
    """
    stm = load_statements(config.path or None)
    y = np.asarray([s.label for s in stm])
    n_folds = int(config.n_folds)
    reg = float(config.reg)
    out = {"n_statements": len(stm), "n_true": int(y.sum()), "persona": {}}
    for pname, persona in progress(list(personas.items()), desc="truefalse", unit="persona"):
        try:
            pdir = saved_probe_dir(run, pname, probe_summary)
        except (ShiftError, KeyError) as e:
            out["persona"][pname] = {"skipped": str(e)}
            continue
        probe = RidgeProbe.load(pdir)
        hook = probe.cfg.get("hook", os.path.basename(pdir))
        position = int(probe.cfg.get("position", 0))
        X = statement_activations(model, stm, [hook], persona=persona, n_after=position,
                                  batch_size=int(config.batch_size))[0, :, position]
        res = probe_truth_auc(probe, X, y, n_boot=int(config.n_boot), seed=seed)
        s = probe.predict(X)
        topics = sorted({st.topic for st in stm})
        per_topic = {}
        for t in topics:
            m = np.asarray([st.topic == t for st in stm])
            if y[m].all() or not y[m].any():
                continue
            per_topic[t] = auc(s[m], y[m])
        atomic_save_npz(run.stage_file("truefalse", f"{pname}.npz"), score=s, label=y)
        out["persona"][pname] = to_jsonable({
            "probe": os.path.relpath(pdir, run.workdir), "hook": hook, "position": position, "probe_auc": res, "probe_auc_per_topic": per_topic,
            "ridge_cv": cv_classifier_auc(X, y, kind="ridge", n_folds=n_folds, reg=reg, seed=seed),
            "logistic_cv": cv_classifier_auc(X, y, kind="logistic", n_folds=n_folds, reg=reg, seed=seed)},
            nan_to_none=True)
    return out
