"""Steering as a pure function transform (the intervention; the experiment is
:mod:`prefjax.experiments.steering`).

A :class:`SteerSpec` says *where* (block ``layer``'s output, i.e. ``blocks.{layer}.hook_resid_post``),
*what* (a direction, normalised to unit length on the host), *how much* (``coef * scale``; ``coef``
may be one number per example so a whole coefficient sweep is one batch and one compiled program)
and *on which tokens* (``"all"``, ``"prompt"``, ``"generated"`` or a [batch, seq] mask, signed masks
allowed: +1 on Task A's span, -1 on Task B's).

The edit is ``x + coef * scale * mask * v / ||v||`` at ``hook_resid_post`` of every layer in
``layer``. A capture of that hook sees the edit and later layers read it. Tokens whose effective
coefficient is zero (``coef == 0`` or mask 0) are passed through with ``where`` so the output is
bit-for-bit the unsteered one.

Token masks are aligned with the token array of the call: for :meth:`prefjax.model.Model.run` the
columns are the columns of ``token_ids`` (left padding included); for
:func:`prefjax.generation.generate` a mask is given per prompt (column ``j`` = token ``j`` of that
prompt, unpadded; zeros past its end) and generate moves it into its left-padded layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from prefjax.hooks import CaptureSpec


TOKEN_MODES = ("all", "prompt", "generated")
STEER_POINT = "hook_resid_post"


class SteeringError(ValueError):
    """A steering spec the model cannot serve (bad layer, direction, coefficient or mask)."""


@dataclasses.dataclass(frozen=True, eq=False)
class SteerSpec:
    """Add ``coef * scale * direction / ||direction||`` to the output of block(s) ``layer``.

    ``layer``: int or tuple of ints. ``direction``: [d_model]. ``coef``: scalar or [batch] (one per
    example). ``scale``: a float multiplier, e.g. the mean residual norm at that layer, so ``coef`` is
    in units of the typical residual size. ``tokens``: ``"all"``, ``"prompt"`` (prefill only),
    ``"generated"`` (decode only: tokens produced by generation; note the *first* generated token is
    sampled from the last prompt token, which "generated" does not steer), or a [batch, seq] float
    mask over prompt tokens (0/1 or signed; never applied to generated tokens).
    """

    layer: Any
    direction: Any
    coef: Any = 1.0
    scale: float = 1.0
    tokens: Any = "all"

    def replace(self, **kw) -> "SteerSpec":
        return dataclasses.replace(self, **kw)

    @property
    def layers(self) -> tuple[int, ...]:
        if isinstance(self.layer, (tuple, list)):
            return tuple(int(l) for l in self.layer)
        return (int(self.layer),)


def as_specs(steer) -> tuple[SteerSpec, ...]:
    """Normalise ``None`` / a spec / a sequence of specs to a tuple of specs."""
    if steer is None:
        return ()
    if isinstance(steer, SteerSpec):
        return (steer,)
    if isinstance(steer, (tuple, list)) and all(isinstance(s, SteerSpec) for s in steer):
        return tuple(steer)
    raise SteeringError(f"steer must be a SteerSpec or a tuple of SteerSpec, got {type(steer).__name__}")


# --------------------------------------------------------------------------------------------
# Validation (host side, before any compute).

def _check_layers(spec: SteerSpec, n_layers: int, where: str) -> tuple[int, ...]:
    raw = spec.layer if isinstance(spec.layer, (tuple, list)) else (spec.layer,)
    if not raw:
        raise SteeringError(f"{where}: layer is an empty tuple")
    out = []
    for l in raw:
        if isinstance(l, bool) or not isinstance(l, (int, np.integer)):
            raise SteeringError(f"{where}: layer {l!r} is not an int")
        if not 0 <= int(l) < n_layers:
            raise SteeringError(f"{where}: layer {int(l)} is outside the model's layers 0..{n_layers - 1}")
        out.append(int(l))
    return tuple(out)


def unit_direction(direction, d_model: int, where: str = "SteerSpec") -> np.ndarray:
    """``direction / ||direction||`` as float32 [d_model] (norm taken in float64); errors name the problem."""
    v = np.asarray(jax.device_get(direction), dtype=np.float64)
    if v.ndim != 1 or v.shape[0] != d_model:
        raise SteeringError(f"{where}: direction has shape {v.shape}, expected ({d_model},) = [d_model]")
    if not np.all(np.isfinite(v)):
        raise SteeringError(f"{where}: direction contains NaN or inf (first at index "
                            f"{int(np.argmax(~np.isfinite(v)))})")
    n = float(np.linalg.norm(v))
    if n == 0.0:
        raise SteeringError(f"{where}: direction has zero norm")
    return (v / n).astype(np.float32)


def _coef_vector(spec: SteerSpec, batch: int, where: str) -> np.ndarray:
    c = np.asarray(jax.device_get(spec.coef), dtype=np.float64)
    if c.ndim == 0:
        c = np.full((batch,), float(c))
    elif c.ndim != 1 or c.shape[0] != batch:
        raise SteeringError(f"{where}: coef has shape {c.shape}; expected a scalar or [batch={batch}]")
    s = float(spec.scale)
    if not np.all(np.isfinite(c)):
        raise SteeringError(f"{where}: coef contains NaN or inf (example {int(np.argmax(~np.isfinite(c)))})")
    if not math.isfinite(s):
        raise SteeringError(f"{where}: scale is {s}")
    return (c * s).astype(np.float32)


def _mask_array(spec: SteerSpec, batch: int, seq: int, where: str) -> np.ndarray | None:
    tok = spec.tokens
    if isinstance(tok, str):
        if tok not in TOKEN_MODES:
            raise SteeringError(f"{where}: tokens={tok!r}; expected one of {TOKEN_MODES} or a [batch, seq] mask")
        return None
    m = np.asarray(jax.device_get(tok))
    if m.shape != (batch, seq):
        raise SteeringError(f"{where}: token mask has shape {m.shape}, expected [batch={batch}, seq={seq}]")
    if m.dtype == bool:
        m = m.astype(np.float32)
    if not np.issubdtype(m.dtype, np.number):
        raise SteeringError(f"{where}: token mask has dtype {m.dtype}; expected numbers")
    m = m.astype(np.float32)
    if not np.all(np.isfinite(m)):
        raise SteeringError(f"{where}: token mask contains NaN or inf")
    return m


# --------------------------------------------------------------------------------------------
# The intervention (module-level functions, so the Partial's static part is stable: no recompiles
# when only the arrays change).

def _apply(mode, layers_K, unit_D, coef_B, mask_BxS, point, layer, x_BxTxD, ctx):
    if point != STEER_POINT:
        return x_BxTxD
    b, t, _ = x_BxTxD.shape
    hit = jnp.any(jnp.asarray(layer) == layers_K)
    if mode == "all":
        tok_BxT = jnp.ones((b, t), jnp.float32)
    elif mode == "prompt":
        tok_BxT = jnp.asarray(ctx.is_prompt_BxT).astype(jnp.float32)
    elif mode == "generated":
        tok_BxT = 1.0 - jnp.asarray(ctx.is_prompt_BxT).astype(jnp.float32)
    else:  # mask over the prompt tokens of this call
        if mask_BxS.shape[1] == t:
            tok_BxT = mask_BxS * jnp.asarray(ctx.is_prompt_BxT).astype(jnp.float32)
        else:  # a decode step: never a prompt token
            tok_BxT = jnp.zeros((b, t), jnp.float32)
    w_BxT = coef_B[:, None] * tok_BxT
    delta = w_BxT[:, :, None] * unit_D[None, None, :]
    active = (w_BxT != 0) & hit
    return jnp.where(active[:, :, None], x_BxTxD + delta.astype(x_BxTxD.dtype), x_BxTxD)


_MODE_FNS = {m: functools.partial(_apply, m) for m in TOKEN_MODES + ("mask",)}


def _apply_many(parts, point, layer, x, ctx):
    for p in parts:
        x = p(point, layer, x, ctx)
    return x


def spec_intervention(spec, model, *, batch: int, seq: int, prompt_len: int | None = None
                      ) -> jax.tree_util.Partial:
    """Build the intervention pytree for ``spec`` (a SteerSpec or tuple of them).

    ``batch``/``seq`` are the shape of the token array of the call; ``prompt_len`` is accepted for
    the Model.run contract (a mask must be [batch, seq] of that call). Every array (layer indices,
    unit direction, per-example coefficient, mask) is a leaf, so a new coefficient or mask with the
    same shapes reuses the compiled program. Validates on the host and raises SteeringError.
    """
    specs = as_specs(spec)
    if not specs:
        raise SteeringError("spec_intervention needs at least one SteerSpec")
    cfg = model.config
    parts = []
    for i, s in enumerate(specs):
        where = "SteerSpec" if len(specs) == 1 else f"SteerSpec #{i}"
        layers = _check_layers(s, cfg.n_layers, where)
        unit = unit_direction(s.direction, cfg.d_model, where)
        coef = _coef_vector(s, batch, where)
        mask = _mask_array(s, batch, seq, where)
        mode = s.tokens if mask is None else "mask"
        parts.append(jax.tree_util.Partial(
            _MODE_FNS[mode], jnp.asarray(layers, jnp.int32), jnp.asarray(unit), jnp.asarray(coef),
            None if mask is None else jnp.asarray(mask)))
    if len(parts) == 1:
        return parts[0]
    return jax.tree_util.Partial(_apply_many, tuple(parts))


def _add_vector(layers_K, mask_BxS, v_D, point, layer, x_BxTxD, ctx):
    if point != STEER_POINT:
        return x_BxTxD
    hit = jnp.any(jnp.asarray(layer) == layers_K)
    add = mask_BxS[:, :, None] * v_D[None, None, :]
    return x_BxTxD + jnp.where(hit, add, 0.0).astype(x_BxTxD.dtype)


@functools.partial(jax.jit, static_argnames=("family", "cfg"))
def _readout_grad(params, tokens_BxT, valid_BxT, pos_Bx1, layers_K, mask_BxT, readout_BxV, *, family, cfg):
    def objective(v_D):
        iv = jax.tree_util.Partial(_add_vector, layers_K, mask_BxT, v_D)
        out = family.forward(cfg, params, tokens_BxT, valid_BxT, capture=CaptureSpec(), pos_BxK=pos_Bx1,
                             intervene=iv, unroll=False)
        return jnp.sum(out.logits[:, 0, :].astype(jnp.float32) * readout_BxV)
    return jax.grad(objective)(jnp.zeros((cfg.d_model,), jnp.float32))


def readout_gradient(model, token_ids, attention_mask, positions, token_mask, layer: int, readout,
                     *, batch_size: int = 16) -> np.ndarray:
    """The gradient [d_model] of ``sum_b readout[b] . logits[b, positions[b]]`` with respect to a vector
    ``v`` added at ``blocks.{layer}.hook_resid_post`` on every token, weighted by ``token_mask`` [B, T].

    The local (coefficient -> 0) steering slope of that readout along any unit direction ``u`` with
    :class:`SteerSpec` (``coef * scale * mask * u``) is then ``scale * <gradient, u>``: one backward pass
    gives the slope of every direction at once, so a null over thousands of random directions is a
    matrix product. ``token_ids``/``attention_mask``/``token_mask``: [B, T] (left padding allowed);
    ``positions``: [B] (one read position per row); ``readout``: [B, vocab]. Rows run in chunks of
    ``batch_size`` (one shape per chunk); one device only.
    """
    cfg = model.config
    ids = np.asarray(token_ids, np.int32)
    if ids.ndim != 2:
        raise SteeringError(f"readout_gradient: token_ids must be [batch, seq], got shape {ids.shape}")
    b, t = ids.shape
    valid = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    mask = np.asarray(token_mask, np.float32)
    pos = np.asarray(positions, np.int32).reshape(-1)
    ro = np.asarray(readout, np.float32)
    for name, a, want in (("attention_mask", valid, (b, t)), ("token_mask", mask, (b, t)), ("positions", pos, (b,)),
                          ("readout", ro, (b, int(cfg.vocab_size)))):
        if a.shape != want:
            raise SteeringError(f"readout_gradient: {name} has shape {a.shape}, expected {want}")
    if not 0 <= int(layer) < cfg.n_layers:
        raise SteeringError(f"readout_gradient: layer {layer} is outside the model's layers 0..{cfg.n_layers - 1}")
    if np.any((pos < 0) | (pos >= t)):
        raise SteeringError(f"readout_gradient: a position is outside 0..{t - 1}")
    if model.mesh is not None:
        raise SteeringError("readout_gradient runs on one device (the model has a mesh)")
    layers = jnp.asarray([int(layer)], jnp.int32)
    params = model.run_params()
    grad = np.zeros(cfg.d_model, np.float64)
    bs = max(1, min(int(batch_size), b))
    for lo in range(0, b, bs):
        rows = np.arange(lo, lo + bs) % b
        keep = (np.arange(lo, lo + bs) < b).astype(np.float32)[:, None]  # the padding rows read nothing
        g = _readout_grad(params, jnp.asarray(ids[rows]), jnp.asarray(valid[rows]), jnp.asarray(pos[rows, None]),
                          layers, jnp.asarray(mask[rows]), jnp.asarray(ro[rows] * keep), family=model.family, cfg=cfg)
        grad += np.asarray(g, np.float64)
    return grad


def steer(run_fn: Callable, spec) -> Callable:
    """Return ``run_fn`` with ``spec`` applied: ``steer(model.run, spec)(tokens, capture=...)``.

    Works for any function with a ``steer=`` keyword (``Model.run``, :func:`prefjax.generation.generate`
    via ``functools.partial``). Composes: ``steer(steer(f, a), b)`` applies both ``a`` and ``b`` (in
    that order at a shared layer). Nothing is mutated; the original function is unchanged.
    """
    mine = as_specs(spec)

    @functools.wraps(run_fn)
    def steered(*args, steer=None, **kwargs):
        return run_fn(*args, steer=mine + as_specs(steer), **kwargs)

    return steered


def random_direction(d_model: int, seed: int = 0) -> np.ndarray:
    """A unit-norm Gaussian direction (float32): the matched-norm control for a probe direction.

    Because SteerSpec normalises every direction, a random direction at the same coef and scale adds
    a vector of exactly the same norm as the probe direction.
    """
    v = np.random.default_rng(seed).standard_normal(d_model)
    return (v / np.linalg.norm(v)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Token masks from character spans.

def token_span_mask(tokenizer, text: str, char_spans, *, signs=None, within: str | None = None,
                    **encode_kw) -> tuple[list[int], np.ndarray]:
    """Tokenise ``text`` and mark the tokens overlapping each character span.

    ``char_spans``: a mapping (e.g. ``{"A": (s, e), "B": (s, e)}`` from
    :func:`prefjax.elicit.prompts.render_choice`) or a sequence of ``(start, end)`` pairs (end
    exclusive). ``signs``: one value per span (same keys or order); default +1 for all, or
    ``{"A": 1, "B": -1}`` for a contrastive mask. ``within``: when the spans are relative to a
    substring of ``text`` (the user text inside a chat-rendered prompt), its first occurrence is
    located and the spans shifted. A token belongs to a span when their character ranges overlap.
    Returns ``(token_ids, mask_T)`` with ``mask_T`` float32 [len(token_ids)].
    """
    if isinstance(char_spans, Mapping):
        keys = list(char_spans)
        spans = [tuple(char_spans[k]) for k in keys]
        sg = [1.0] * len(keys) if signs is None else [float(signs[k]) for k in keys]
    else:
        spans = [tuple(s) for s in char_spans]
        sg = [1.0] * len(spans) if signs is None else [float(x) for x in signs]
    if len(sg) != len(spans):
        raise SteeringError(f"token_span_mask: {len(sg)} signs for {len(spans)} spans")
    base = 0
    if within is not None:
        base = text.find(within)
        if base < 0:
            raise SteeringError("token_span_mask: `within` text does not occur in `text`")
    limit = len(text) if within is None else len(within)
    for i, (s, e) in enumerate(spans):
        if not 0 <= s < e <= limit:
            raise SteeringError(f"token_span_mask: span #{i} ({s}, {e}) is empty or outside the text "
                                f"of length {limit}")
    from prefjax.tokenize import char_span_to_token_mask
    ids, offsets = tokenizer.encode_with_offsets(text, **encode_kw)
    ids = [int(t) for t in ids]
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if off.shape[0] != len(ids):
        raise SteeringError(f"token_span_mask: tokenizer gave {off.shape[0]} offsets for {len(ids)} tokens")
    mask = np.zeros(len(ids), np.float32)
    for i, ((s, e), sign) in enumerate(zip(spans, sg)):
        s, e = s + base, e + base
        hit = char_span_to_token_mask(off, s, e, len(ids))
        if not hit.any():
            raise SteeringError(f"token_span_mask: span #{i} ({s}, {e}) covers no token")
        if np.any(mask[hit] != 0):
            raise SteeringError(f"token_span_mask: span #{i} shares a token with an earlier span")
        mask[hit] = sign
    return ids, mask
