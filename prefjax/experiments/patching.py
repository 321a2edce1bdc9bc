"""End-of-turn activation patching: is the preference carried at the turn boundary?

For a revealed-choice prompt *Y* (target: a pair of tasks under some persona) and a prompt *X*
(source: the same pair in the other order, or under another persona), the residual stream of *X* at
``blocks.L.hook_resid_post`` is copied into *Y* at the same turn-boundary token(s), and P(A) is read
in logit mode (label token after the forced prefix ``"Task"``). Per layer the share of the effect
recovered is ``(P_patched - P_target) / (P_source - P_target)``: 1 means the patched tokens carry
everything that makes *X* answer differently from *Y*, 0 means nothing.

Two position sets are patched, one layer at a time:

* ``"eot"``  -- the end-of-turn token that closes the user turn;
* ``"span"`` -- every token from that end-of-turn token to the end of the generation prompt (for
  Gemma ``<end_of_turn>``, ``\\n``, ``<start_of_turn>``, ``model``, ``\\n``). The span's tokens are
  the same in source and target, so token ``k`` of the span is patched into token ``k``.

The edit is an intervention pytree (:func:`patch_intervention`): layer indices, positions and values
are array leaves, so every layer reuses one compiled program. Positions are columns of the (left
padded) token array of the call. Patching a prompt with its own activations is bit-exact.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prefjax import hooks as H
from prefjax.elicit.prompts import DEFAULT_TEMPLATE, choice_messages
from prefjax.elicit.runner import forced_text, label_token_ids
from prefjax.progress import progress
from prefjax.runconfig import PatchingConfig, resolve_layers
from prefjax.stages import atomic_save_npz, to_jsonable
from prefjax.tokenize import left_pad

PATCH_MODES = ("eot", "span")


class PatchError(ValueError):
    """Patch layers, positions or values that do not fit the model or the prompts."""


# ---------------------------------------------------------------------------------------------
# The intervention (module-level functions, so the Partial's static part never changes).

def _patch_apply(point_name, layers_L, pos_BxK, values_LxBxKxD, keep_BxK, point, layer, x_BxTxD, ctx):
    if point != point_name:
        return x_BxTxD
    b = x_BxTxD.shape[0]
    sel_L = jnp.asarray(layer) == layers_L
    hit = jnp.any(sel_L)
    rows_BxK = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], pos_BxK.shape)
    v_BxKxD = values_LxBxKxD[jnp.argmax(sel_L)].astype(x_BxTxD.dtype)
    if keep_BxK is not None:  # slots with keep=False write back what is there (exact no-op)
        v_BxKxD = jnp.where(keep_BxK[:, :, None], v_BxKxD, x_BxTxD[rows_BxK, pos_BxK])
    patched = x_BxTxD.at[rows_BxK, pos_BxK].set(v_BxKxD)
    return jnp.where(hit, patched, x_BxTxD)


_PATCH_FNS = {p: functools.partial(_patch_apply, p) for p in H.BLOCK_POINTS}


def patch_intervention(layers, positions_BxK, values_LxBxKxD, *, point: str = "hook_resid_post", keep_BxK=None,
                       n_layers: int | None = None, seq_len: int | None = None) -> jax.tree_util.Partial:
    """An intervention that overwrites ``point`` of each layer in ``layers`` at ``positions_BxK``.

    ``values_LxBxKxD[l, b, k]`` replaces the activation of example ``b`` at token column
    ``positions_BxK[b, k]`` at layer ``layers[l]``. Pass ``n_layers``/``seq_len`` (the model's layer
    count and the token array's length) to have layers and positions checked here; everything is
    checked on the host and PatchError names the bad entry. ``keep_BxK`` (optional bool) switches
    single slots off (a slot with False is left as it is, bit for bit), so patch sets of different
    sizes can share one shape and one compiled program. Pass the result as ``intervene=`` to
    :meth:`prefjax.model.Model.run`.
    """
    if point not in _PATCH_FNS:
        raise PatchError(f"unknown patch point {point!r}; known: {H.BLOCK_POINTS}")
    lay = np.asarray(layers)
    if lay.ndim == 0:
        lay = lay[None]
    if lay.ndim != 1 or lay.size == 0 or not np.issubdtype(lay.dtype, np.integer):
        raise PatchError(f"layers must be a non-empty 1-D list of ints; got {layers!r}")
    if len(set(lay.tolist())) != lay.size:
        raise PatchError(f"layers {lay.tolist()} name a layer twice")
    if n_layers is not None:
        bad = [int(l) for l in lay if not 0 <= l < n_layers]
        if bad:
            raise PatchError(f"patch layer(s) {bad} outside the model's layers 0..{n_layers - 1}")
    pos = np.asarray(positions_BxK)
    if pos.ndim != 2 or not np.issubdtype(pos.dtype, np.integer):
        raise PatchError(f"positions must be an int array [batch, k]; got shape {pos.shape}, dtype {pos.dtype}")
    if (pos < 0).any() or (seq_len is not None and (pos >= seq_len).any()):
        b, k = np.argwhere((pos < 0) | (pos >= (seq_len if seq_len is not None else np.inf)))[0]
        raise PatchError(f"patch position {int(pos[b, k])} (example {int(b)}, slot {int(k)}) is outside the "
                         f"sequence of length {seq_len}")
    for b in range(pos.shape[0]):
        if len(set(pos[b].tolist())) != pos.shape[1]:
            raise PatchError(f"example {b}: patch positions {pos[b].tolist()} repeat a token")
    vals = np.asarray(values_LxBxKxD)
    if vals.shape[:3] != (lay.size,) + pos.shape or vals.ndim != 4:
        raise PatchError(f"values must be [layers={lay.size}, batch={pos.shape[0]}, k={pos.shape[1]}, d]; "
                         f"got shape {vals.shape}")
    if not np.isfinite(vals).all():
        raise PatchError("patch values contain NaN or inf")
    if keep_BxK is not None:
        keep_BxK = np.asarray(keep_BxK)
        if keep_BxK.shape != pos.shape or keep_BxK.dtype != bool:
            raise PatchError(f"keep must be a bool array shaped like positions {pos.shape}; "
                             f"got {keep_BxK.dtype} {keep_BxK.shape}")
        keep_BxK = jnp.asarray(keep_BxK)
    return jax.tree_util.Partial(_PATCH_FNS[point], jnp.asarray(lay, jnp.int32), jnp.asarray(pos, jnp.int32),
                                 jnp.asarray(vals), keep_BxK)


# ---------------------------------------------------------------------------------------------
# Prompts.

@dataclasses.dataclass(frozen=True)
class ChoicePrompt:
    """A tokenised revealed-choice prompt in logit mode.

    ``ids``: the chat (generation prompt included) followed by the forced prefix; ``eot``: index of
    the end-of-turn token closing the user turn; ``span_end``: index one past the generation prompt
    (the turn-boundary span is ``ids[eot:span_end]``); ``shown``: (task shown as A, task shown as B).
    """

    ids: tuple[int, ...]
    eot: int
    span_end: int
    persona: str
    shown: tuple[str, str]

    @property
    def span(self) -> tuple[int, ...]:
        return tuple(range(self.eot, self.span_end))


def choice_prompt(model, task_a, task_b, persona=None, template=None) -> ChoicePrompt:
    """Render and tokenise the logit-mode prompt showing ``task_a`` as Task A and ``task_b`` as Task B."""
    template = template or DEFAULT_TEMPLATE
    tok = model.tokenizer
    if tok is None:
        raise PatchError("patching needs a model with a tokenizer (rendered chat prompts)")
    text = tok.chat(choice_messages(template, task_a, task_b, persona), add_generation_prompt=True)
    chat_ids = tok.encode(text, add_bos=False)
    ids = tok.encode(text + forced_text(template), add_bos=False)
    name = lambda t: getattr(t, "id", str(t)[:30])
    if ids[:len(chat_ids)] != chat_ids or len(ids) == len(chat_ids):
        raise PatchError(f"pair ({name(task_a)!r}, {name(task_b)!r}): the forced prefix merges with the "
                         f"generation prompt's last token; the turn-boundary span is not well defined")
    eot = tok.end_of_turn_index(chat_ids)
    return ChoicePrompt(tuple(ids), int(eot), len(chat_ids), getattr(persona, "name", "none"),
                        (name(task_a), name(task_b)))


def _check_pair(k: int, tgt: ChoicePrompt, src: ChoicePrompt) -> None:
    ts, ss = tgt.span, src.span
    if len(ts) != len(ss):
        raise PatchError(f"pair {k} (target {tgt.shown}/{tgt.persona}, source {src.shown}/{src.persona}): "
                         f"turn-boundary spans differ in length ({len(ts)} vs {len(ss)})")
    if [tgt.ids[i] for i in ts] != [src.ids[i] for i in ss]:
        raise PatchError(f"pair {k}: the turn-boundary tokens differ between target and source "
                         f"({[tgt.ids[i] for i in ts]} vs {[src.ids[i] for i in ss]})")
    if len(tgt.ids) - tgt.span_end != len(src.ids) - src.span_end:
        raise PatchError(f"pair {k}: the forced prefixes differ in length")


def _layout(prompts: Sequence[ChoicePrompt], pad_id: int, t: int, whole: int | None):
    """Token ids [b, t], attention mask, and the columns of each turn-boundary span plus the last token
    [b, span + 1]: with ``whole`` the whole prompts left-padded to ``t``; without it only the part from
    the end-of-turn token on, right-padded (it continues a prefix cache of the part before)."""
    xs = [p.ids if whole else p.ids[p.eot:] for p in prompts]
    ids, valid = left_pad(xs, pad_id, width=t, right=not whole)
    pos = []
    for p, x in zip(prompts, xs):
        first = t - len(x) if whole else -p.eot
        at = max(first, 0)
        pos.append([i + first for i in p.span] + [at + len(x) - 1])
    return ids, valid.astype(np.int32), np.asarray(pos, np.int32)


def _p_a(logits_BxV, ida: int, idb: int):
    lg = np.asarray(logits_BxV, np.float64)
    diff = lg[:, ida] - lg[:, idb]
    return 1.0 / (1.0 + np.exp(-diff)), diff


def _recovered(pp_LxN, pt_N, ps_N, min_effect: float) -> dict:
    """Per-layer share of the source-target effect recovered by the patch."""
    eff_N = ps_N - pt_N
    moved_LxN = pp_LxN - pt_N[None]
    keep = np.abs(eff_N) >= min_effect
    den = float((eff_N ** 2).sum())
    pooled = (moved_LxN @ eff_N) / den if den > 0 else np.full(len(pp_LxN), np.nan)
    if keep.any():
        frac = moved_LxN[:, keep] / eff_N[keep][None]
        mean, median = frac.mean(1), np.median(frac, 1)
    else:
        mean = median = np.full(len(pp_LxN), np.nan)
    return {"pooled": pooled, "mean": mean, "median": median, "n_used": int(keep.sum())}


def patching_curves(model, prompt_pairs: Sequence[tuple[ChoicePrompt, ChoicePrompt]], layers: Sequence[int], *,
                    modes: Sequence[str] = PATCH_MODES, point: str = "hook_resid_post", template=None,
                    source_model=None, target_model=None, batch_size: int = 16, min_effect: float = 0.02,
                    pad_multiple: int = 8, desc: str | None = None) -> dict:
    """Patch source activations into targets, one layer at a time, and measure P(A).

    ``prompt_pairs``: ``(target, source)`` :class:`ChoicePrompt` pairs (their turn-boundary spans must
    hold the same tokens). ``source_model``/``target_model`` default to ``model`` (pass a persona's
    adapter model to patch across LoRA personas). Returns numpy arrays: ``p_target``/``p_source``
    [N], ``p_patched[mode]`` [L, N] (and ``ld_*`` for the A-minus-B logit difference), and per mode
    the curves ``recovered[mode]`` = {pooled, mean, median} [L]: ``pooled`` is the least-squares
    share sum((Pp-Pt)(Ps-Pt)) / sum((Ps-Pt)^2); ``mean``/``median`` average the per-pair share over
    pairs with ``|Ps - Pt| >= min_effect``; ``recovered_logit`` the same on the logit difference.
    Each batch is padded to a multiple of ``pad_multiple`` tokens so batches of similar length
    reuse compiled programs (two per shape: the clean runs and the patched runs). Where the model keeps
    prefix caches (:meth:`prefjax.model.Model.prefix_ok`), each prompt's tokens before its end-of-turn
    token run once as a cache and every run is only the turn boundary and the forced prefix.
    ``desc``: show a progress bar with this label (process 0; see :mod:`prefjax.progress`).
    """
    template = template or DEFAULT_TEMPLATE
    src_model = source_model or model
    tgt_model = target_model or model
    bad = [m for m in modes if m not in PATCH_MODES]
    if bad:
        raise PatchError(f"unknown patch mode(s) {bad}; known: {PATCH_MODES}")
    layers = [int(l) for l in layers]
    if not layers:
        raise PatchError("patching_curves needs at least one layer")
    hooks = [H.hook_name(l, point) for l in layers]
    H.CaptureSpec.from_names(hooks, model.n_layers)  # validates layers and point now
    if not prompt_pairs:
        raise PatchError("patching_curves needs at least one (target, source) pair")
    for k, (tgt, src) in enumerate(prompt_pairs):
        _check_pair(k, tgt, src)
    ida, idb = label_token_ids(model.tokenizer, template)
    pad = model.tokenizer.pad_id or 0
    n, nl = len(prompt_pairs), len(layers)
    p_t, p_s, ld_t, ld_s = (np.zeros(n) for _ in range(4))
    p_p = {m: np.zeros((nl, n)) for m in modes}
    ld_p = {m: np.zeros((nl, n)) for m in modes}
    bar = progress(total=n * (2 + len(modes) * nl), desc=desc, unit="run") if desc else None
    use_cache = src_model.prefix_ok() and tgt_model.prefix_ok()
    for start in range(0, n, batch_size):
        batch = prompt_pairs[start:start + batch_size]
        sl = slice(start, start + len(batch))
        b = len(batch)
        if use_cache:
            # Everything before the end-of-turn token is the same in the clean and every patched run of
            # a prompt: it runs once, as a prefix cache (rows per prompt, their shared start once), and
            # each run is only the turn boundary and the forced prefix (a few tokens, right-padded).
            tail = max(len(p.ids) - p.eot for pair in batch for p in pair)
            s_pre = src_model.prefill_rows([s.ids[:s.eot] for _, s in batch], n_after=tail)
            t_pre = tgt_model.prefill_rows([tg.ids[:tg.eot] for tg, _ in batch], n_after=tail)
            s_ids, s_mask, s_pos = _layout([s for _, s in batch], pad, tail, None)
            t_ids, t_mask, t_pos = _layout([tg for tg, _ in batch], pad, tail, None)
            t = tail
        else:
            # Source and target share one padded length (a multiple of pad_multiple) and one position
            # layout (span + last token), so the clean runs are one compiled program and every patched
            # run (any layer, either mode) another.
            t = max(max(len(p.ids) for p in pair) for pair in batch)
            t = -(-t // pad_multiple) * pad_multiple
            s_pre = t_pre = None
            s_ids, s_mask, s_pos = _layout([s for _, s in batch], pad, t, t)
            t_ids, t_mask, t_pos = _layout([tg for tg, _ in batch], pad, t, t)
        n_span = s_pos.shape[1] - 1
        s_logits, cache = src_model.run(s_ids, attention_mask=s_mask, capture=hooks, positions=s_pos, prefix=s_pre)
        vals_LxBxKxD = np.stack([np.asarray(cache[h]) for h in hooks])  # last slot: never written (keep=False)
        p_s[sl], ld_s[sl] = _p_a(np.asarray(s_logits)[:, -1], ida, idb)
        t_logits, _ = tgt_model.run(t_ids, attention_mask=t_mask, capture=hooks, positions=t_pos, prefix=t_pre)
        p_t[sl], ld_t[sl] = _p_a(np.asarray(t_logits)[:, -1], ida, idb)
        if bar is not None:
            bar.update(2 * b)
        for m in modes:
            keep = np.zeros(t_pos.shape, bool)
            keep[:, :1 if m == "eot" else n_span] = True
            for li, l in enumerate(layers):
                iv = patch_intervention([l], t_pos, vals_LxBxKxD[li:li + 1], point=point, keep_BxK=keep,
                                        n_layers=model.n_layers, seq_len=t)
                lg, _ = tgt_model.run(t_ids, attention_mask=t_mask, positions=t_pos, intervene=iv, prefix=t_pre)
                p_p[m][li, sl], ld_p[m][li, sl] = _p_a(np.asarray(lg)[:, -1], ida, idb)
                if bar is not None:
                    bar.update(b)
    if bar is not None:
        bar.close()
    out = {"layers": layers, "point": point, "n_pairs": n, "p_target": p_t, "p_source": p_s,
           "ld_target": ld_t, "ld_source": ld_s, "p_patched": p_p, "ld_patched": ld_p,
           "recovered": {m: _recovered(p_p[m], p_t, p_s, min_effect) for m in modes},
           "recovered_logit": {m: _recovered(ld_p[m], ld_t, ld_s, min_effect) for m in modes}}
    return out


# ---------------------------------------------------------------------------------------------
# The pipeline stage.

def _persona_model(model, persona):
    if persona is not None and persona.adapter:
        return model.with_adapter(persona.adapter)
    return model


def _task_frame(res: dict, modes, min_effect: float) -> dict:
    """Swap sources in the task frame: the source's P(choose the task the *target* shows as A) is
    ``1 - P_source(A)`` (logit difference ``-ld_source``); the share recovered is measured against that."""
    return {m: {"p": _recovered(res["p_patched"][m], res["p_target"], 1.0 - res["p_source"], min_effect),
                "logit": _recovered(res["ld_patched"][m], res["ld_target"], -res["ld_source"], min_effect)}
            for m in modes}


def run_patching_stage(config: PatchingConfig, run, model, pool, personas: Mapping[str, Any], *,
                       activation_layers: str, seed: int, layers=None) -> dict:
    """End-of-turn patching on ``config.n_pairs`` random pairs of the pool; JSON-able summary.

    ``config`` is the ``patching`` section: ``layers`` ("" = ``activation_layers``, the
    ``activations.layers`` spec), ``sources`` (``swap``: the same pair in the other order under the
    target persona; ``persona``: the same pair and order under ``source_persona``, "" = the second
    persona, skipped when there is only one), ``persona`` (target, "" = the first), ``modes``
    (``eot``, ``span``), ``min_effect``, ``batch_size``. Raw per-pair arrays go to
    ``stages/patching/<source>.npz`` of ``run``.

    ``recovered`` compares label probabilities (P of the label "A" in source and target). For the swap
    source the label A names the other task, so ``recovered_task_frame`` also gives the share measured
    against the source's probability of choosing the target's task A (``1 - P_source(A)``): a
    boundary that carries "which task" rather than "which label" scores high there.
    """
    names = list(personas)
    tname = config.persona or names[0]
    if tname not in personas:
        raise PatchError(f"patching.persona {tname!r} is not one of the run's personas {names}")
    sname = config.source_persona or (names[1] if len(names) > 1 else None)
    if sname is not None and sname not in personas:
        raise PatchError(f"patching.source_persona {sname!r} is not one of the run's personas {names}")
    if layers is None:
        layers = resolve_layers(config.layers or activation_layers, model.n_layers)
    sources = list(config.sources)
    bad = [s for s in sources if s not in ("swap", "persona")]
    if bad:
        raise PatchError(f"patching.sources has unknown source kind(s) {bad}; known: swap, persona")
    modes = tuple(config.modes)
    n_pairs = min(int(config.n_pairs), len(pool) // 2)
    rng = np.random.default_rng(int(seed) + 17)
    idx = rng.permutation(len(pool))
    pairs = [(pool[int(idx[2 * k])], pool[int(idx[2 * k + 1])]) for k in range(n_pairs)]
    tp = personas[tname]
    tmodel = _persona_model(model, tp)
    targets = [choice_prompt(model, a, b, tp) for a, b in pairs]
    out: dict[str, Any] = {"target_persona": tname, "layers": list(layers), "modes": list(modes),
                           "n_pairs": n_pairs, "sources": {}}
    for kind in sources:
        if kind == "persona" and sname is None:
            out["sources"]["persona"] = {"skipped": "only one persona in this run"}
            continue
        sp = tp if kind == "swap" else personas[sname]
        srcs = [choice_prompt(model, b, a, sp) if kind == "swap" else choice_prompt(model, a, b, sp)
                for a, b in pairs]
        res = patching_curves(model, list(zip(targets, srcs)), layers, modes=modes,
                              source_model=_persona_model(model, sp), target_model=tmodel,
                              batch_size=int(config.batch_size),
                              min_effect=float(config.min_effect), desc=f"patching[{kind}]")
        atomic_save_npz(run.stage_file("patching", f"{kind}.npz"),
                        layers=np.asarray(layers), p_target=res["p_target"], p_source=res["p_source"],
                        **{f"p_patched_{m}": res["p_patched"][m] for m in modes},
                        **{f"ld_patched_{m}": res["ld_patched"][m] for m in modes})
        out["sources"][kind] = to_jsonable({
            "source_persona": sp.name,
            "mean_abs_effect": float(np.abs(res["p_source"] - res["p_target"]).mean()),
            "p_target_mean": float(res["p_target"].mean()), "p_source_mean": float(res["p_source"].mean()),
            "recovered": res["recovered"], "recovered_logit": res["recovered_logit"],
            **({"recovered_task_frame": _task_frame(res, modes, float(config.min_effect))}
               if kind == "swap" else {})}, nan_to_none=True)
    return out
