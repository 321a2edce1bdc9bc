"""Gemma-3 with a planted preference circuit: the ground-truth organism's architecture.

The real Gemma-3 forward, plus one small, fully specified change at one layer ``L``
(``PlantedConfig.planted_layer``), so that what the model prefers, and the residual direction that
carries it, are known exactly:

* **Lexicon.** A set of single-token words (``planted/is_lex`` [V]); word ``w`` has planted scores
  ``s_k(w)`` on ``K`` features (``planted/scores`` [V, K], zero off the lexicon). A task's feature
  values are the sums of its lexicon words' scores, ``a_k(task)``.
* **Write** (at ``blocks.L.hook_resid_pre``, before any caller intervention): every lexicon token's
  residual gets ``gain * sum_k s_k(w) d_k``, and every ``<end_of_turn>`` token gets
  ``gain * sum_k c_k d_k`` where ``c_k`` is the sum of ``s_k`` over all earlier tokens of the sequence.
  ``d_k`` (``planted/dirs`` [K, D]) are orthonormal. So a one-task prompt's end-of-turn residual
  carries ``a_k(task)`` along ``d_k``: the utility is linearly written at the token the probes read,
  independent of the persona.
* **Read** (after ``blocks.L.hook_resid_post``, i.e. after any caller intervention at layer ``L``):
  in a two-task prompt the first ``words_per_task`` lexicon tokens are task A's, the next ones task
  B's; ``r_k(X) = sum over X's lexicon tokens of (d_k . x) / gain``. At every position after B's
  last lexicon token the logit of label A gains ``kappa/2 * w . (r(A) - r(B))`` and label B loses as
  much, where ``w`` [K] is the persona's weight row (``planted/weights`` [P+1, K]: row 0 without a
  persona trigger token, row ``p+1`` when ``planted/triggers[p]`` occurs in the sequence).

Steering a task's tokens along ``w . d`` at layer ``L`` therefore moves the choice through the same
path the planted utilities take. ``read="tokens"`` is the deliberately broken variant used to show
the recovery test can fail: the readout takes the scores from the token ids, so choices, utilities
and probes are unchanged but nothing the residual carries is read.

Full-sequence forwards only (no decode state: no prefix caches, no generation); the logit-mode
pipeline needs nothing else. Built and scored by :mod:`prefjax.organism_planted`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from prefjax.hooks import CaptureSpec, hook_name
from prefjax.models import gemma3
from prefjax.models.family import Family
from prefjax.models.stack import ForwardOut, gather_positions

READS = ("residual", "tokens")


@dataclasses.dataclass(frozen=True)
class PlantedConfig(gemma3.Gemma3Config):
    """A Gemma-3 config plus the planted circuit's static fields (see the module docstring)."""

    planted_layer: int = 0
    n_features: int = 1
    n_personas: int = 0
    words_per_task: int = 1
    label_ids: tuple[int, int] = (0, 0)
    eot_id: int = 106
    read: str = "residual"

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.planted_layer < self.n_layers:
            raise ValueError(f"planted_layer {self.planted_layer} is not a layer of this {self.n_layers}-layer model")
        if self.read not in READS:
            raise ValueError(f"planted read {self.read!r} is not one of {READS}")
        if self.words_per_task < 1 or self.n_features < 1:
            raise ValueError("words_per_task and n_features must be >= 1")


def planted_shapes(cfg: PlantedConfig) -> dict[str, Any]:
    """``param_shapes`` rows of the planted arrays (replicated; no sharded axes)."""
    k, v, d, p = cfg.n_features, cfg.vocab_size, cfg.d_model, cfg.n_personas
    return {"planted/dirs": ((k, d), (None, None)), "planted/scores": ((v, k), (None, None)),
            "planted/is_lex": ((v,), (None,)), "planted/triggers": ((max(p, 1),), (None,)),
            "planted/weights": ((p + 1, k), (None, None)), "planted/gain": ((), ()), "planted/kappa": ((), ())}


def param_shapes(cfg: PlantedConfig) -> dict[str, Any]:
    return {**gemma3.param_shapes(cfg), **planted_shapes(cfg)}


def token_features(cfg: PlantedConfig, pl, tokens_BxT, valid_BxT):
    """Per-token planted quantities: scores [B, T, K], A/B lexicon masks [B, T], the positions after
    both tasks [B, T], the write [B, T, K] (in units of ``gain``) and the persona weights [B, K]."""
    valid = valid_BxT.astype(jnp.float32)
    lex = jnp.take(pl["is_lex"], tokens_BxT, axis=0).astype(jnp.float32) * valid
    s = jnp.take(pl["scores"], tokens_BxT, axis=0).astype(jnp.float32) * lex[..., None]
    n_lex = jnp.cumsum(lex, axis=1)
    m = cfg.words_per_task
    lex_a = lex * (n_lex <= m)
    lex_b = lex * (n_lex > m) * (n_lex <= 2 * m)
    after = (n_lex >= 2 * m).astype(jnp.float32) * valid
    before = jnp.cumsum(s, axis=1) - s                       # scores of all earlier tokens
    eot = (tokens_BxT == cfg.eot_id).astype(jnp.float32) * valid
    write = s + eot[..., None] * before
    hit = ((tokens_BxT[:, :, None] == pl["triggers"][None, None, :]) & (valid_BxT[:, :, None] > 0)).any(1)
    if cfg.n_personas == 0:
        hit = jnp.zeros_like(hit)
    row = jnp.where(hit.any(1), 1 + jnp.argmax(hit, axis=1), 0)
    w = jnp.take(pl["weights"], row, axis=0).astype(jnp.float32)
    return {"scores": s, "lex_a": lex_a, "lex_b": lex_b, "after": after, "write": write, "weights": w}


def forward(cfg: PlantedConfig, params, tokens_BxT, valid_BxT, *, capture, pos_BxK=None, intervene=None,
            unroll=False, state=None, start=0, pos_ids_BxT=None, is_prompt=True, logits=True) -> ForwardOut:
    """The Gemma-3 forward with the planted write and read (the family contract's signature)."""
    if state is not None:
        raise ValueError("gemma3_planted runs full sequences only (no decode state: no prefix caches or "
                         "generation); use the logit-mode pipeline (choices.mode='logit', steering.generate_tokens=0)")
    pl = params["planted"]
    base = {k: v for k, v in params.items() if k != "planted"}
    f = token_features(cfg, pl, tokens_BxT, valid_BxT)
    dirs = pl["dirs"].astype(jnp.float32)
    gain = pl["gain"].astype(jnp.float32)
    write_BxTxD = gain * jnp.einsum("btk,kd->btd", f["write"], dirs)
    at = cfg.planted_layer

    def planted_intervention(point, layer, x, ctx):
        if point == "hook_resid_pre":
            x = x + (jnp.asarray(layer) == at).astype(x.dtype) * write_BxTxD.astype(x.dtype)
        return x if intervene is None else intervene(point, layer, x, ctx)

    read_name = hook_name(at, "hook_resid_post")
    spec = CaptureSpec.from_names(tuple(capture.names) + (read_name,), cfg.n_layers)
    out = gemma3.forward(cfg, base, tokens_BxT, valid_BxT, capture=spec, pos_BxK=None,
                         intervene=planted_intervention, unroll=unroll, pos_ids_BxT=pos_ids_BxT,
                         is_prompt=is_prompt, logits=False)
    if cfg.read == "residual":
        r_BxTxK = jnp.einsum("btd,kd->btk", out.captured[read_name].astype(jnp.float32), dirs) / gain
    else:
        r_BxTxK = f["scores"]
    r_a = (r_BxTxK * f["lex_a"][..., None]).sum(1)
    r_b = (r_BxTxK * f["lex_b"][..., None]).sum(1)
    gap_B = pl["kappa"].astype(jnp.float32) * (f["weights"] * (r_a - r_b)).sum(-1)
    h = gather_positions(out.h, pos_BxK)
    captured = {n: gather_positions(out.captured[n], pos_BxK) for n in capture.names}
    lg = None
    if logits:
        lg = gemma3.unembed(cfg, base, h)
        after = gather_positions(f["after"][..., None], pos_BxK)[..., 0]
        delta = (0.5 * gap_B[:, None] * after).astype(lg.dtype)
        a, b = cfg.label_ids
        lg = lg.at[:, :, a].add(delta).at[:, :, b].add(-delta)
    return ForwardOut(lg, captured, h, None)


def init_state(cfg, batch: int, max_len: int, dtype):
    raise ValueError("gemma3_planted has no decode state (full-sequence forwards only)")


def init_params(cfg: PlantedConfig, key, dtype=jnp.float32, scale: float = 0.02) -> dict[str, Any]:
    """Random Gemma-3 weights with an inert planted circuit (zero gain and kappa); tests only."""
    params = gemma3.init_params(cfg, key, dtype, scale)
    k, v, d, p = cfg.n_features, cfg.vocab_size, cfg.d_model, cfg.n_personas
    params["planted"] = {"dirs": jnp.eye(k, d, dtype=jnp.float32), "scores": jnp.zeros((v, k), jnp.float32),
                         "is_lex": jnp.zeros((v,), jnp.float32), "triggers": jnp.full((max(p, 1),), -1, jnp.int32),
                         "weights": jnp.zeros((p + 1, k), jnp.float32), "gain": jnp.float32(1.0),
                         "kappa": jnp.float32(0.0)}
    return params


def _no_hf(*_a, **_k):
    raise ValueError("gemma3_planted is built by prefjax.organism_planted, not read from a HF config")


FAMILY = Family(
    name="gemma3_planted", presets={}, config_from_hf=_no_hf, param_shapes=param_shapes,
    hf_names=gemma3.hf_names, hf_prefixes=gemma3.HF_PREFIXES, hf_skip_prefixes=gemma3.HF_SKIP_PREFIXES,
    init_params=init_params, init_state=init_state, forward_fn=forward, embed=gemma3.embed,
    unembed=gemma3.unembed, supports_lora=False, plain_kv_state=False,
    state_layout=None)  # no decode state: full-sequence forwards only
