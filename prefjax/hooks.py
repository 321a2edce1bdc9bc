"""Hook names, capture specs and token positions: the contract every stage reads.

Hook names follow TransformerLens:

* ``blocks.{L}.hook_resid_pre``  -- residual stream entering block ``L``
* ``blocks.{L}.hook_attn_out``   -- the attention branch's contribution (after any post-attention norm)
* ``blocks.{L}.hook_resid_mid``  -- residual after the attention branch was added
* ``blocks.{L}.hook_mlp_out``    -- the MLP branch's contribution (after any post-MLP norm)
* ``blocks.{L}.hook_resid_post`` -- residual leaving block ``L``
* ``ln_final.hook_normalized``   -- output of the final norm (what the unembedding reads)

``blocks.{L}.hook_resid_post`` equals Hugging Face ``hidden_states[L + 1]`` for every block but the
last; HF applies the final norm to its last hidden state, so there ``hidden_states[-1]`` equals
``ln_final.hook_normalized`` instead. ``blocks.{L}.hook_resid_pre`` equals ``hidden_states[L]``.

Shapes use suffixes: ``x_BxTxD`` is [batch, seq, d_model]; ``pos_BxK`` is [batch, k] token indices.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping

BLOCK_POINTS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
FINAL_HOOK = "ln_final.hook_normalized"

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(hook_[a-z_]+)$")


class HookError(ValueError):
    """A hook name, layer or position that the model cannot serve."""


def hook_name(layer: int, point: str) -> str:
    """``hook_name(3, "hook_resid_post") == "blocks.3.hook_resid_post"``."""
    return f"blocks.{int(layer)}.{point}"


def parse_hook(name: str, n_layers: int) -> tuple[int | None, str]:
    """Split a hook name into ``(layer, point)``; ``(None, FINAL_HOOK)`` for the final norm.

    Raises HookError naming the hook when the point is unknown or the layer is out of range.
    """
    if name == FINAL_HOOK:
        return None, FINAL_HOOK
    m = _BLOCK_RE.match(name)
    if not m:
        raise HookError(
            f"unknown hook {name!r}: expected 'blocks.<L>.<point>' with point in {BLOCK_POINTS} "
            f"or {FINAL_HOOK!r}")
    layer, point = int(m.group(1)), m.group(2)
    if point not in BLOCK_POINTS:
        raise HookError(f"unknown hook point {point!r} in {name!r}; known points: {BLOCK_POINTS}")
    if not 0 <= layer < n_layers:
        raise HookError(f"hook {name!r} names layer {layer}, but the model has layers 0..{n_layers - 1}")
    return layer, point


@dataclasses.dataclass(frozen=True)
class CaptureSpec:
    """Which hooks to materialise. Static (hashable), so it can be a jit static argument.

    ``points`` maps a block point to the sorted tuple of layers wanted there; ``final`` says whether
    ``ln_final.hook_normalized`` is wanted. ``names`` keeps the caller's order for the output dict.
    """

    names: tuple[str, ...] = ()
    points: tuple[tuple[str, tuple[int, ...]], ...] = ()
    final: bool = False

    @classmethod
    def from_names(cls, names: Iterable[str], n_layers: int) -> "CaptureSpec":
        names = tuple(dict.fromkeys(names))  # de-duplicate, keep order
        per_point: dict[str, set[int]] = {}
        final = False
        for n in names:
            layer, point = parse_hook(n, n_layers)
            if layer is None:
                final = True
            else:
                per_point.setdefault(point, set()).add(layer)
        points = tuple((p, tuple(sorted(per_point[p]))) for p in BLOCK_POINTS if p in per_point)
        return cls(names=names, points=points, final=final)

    def layers_for(self, point: str) -> tuple[int, ...]:
        for p, layers in self.points:
            if p == point:
                return layers
        return ()

    @property
    def block_points(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self.points)

    def __bool__(self) -> bool:
        return bool(self.names)


def all_resid_post(n_layers: int) -> tuple[str, ...]:
    """Every block's ``hook_resid_post``, in layer order."""
    return tuple(hook_name(l, "hook_resid_post") for l in range(n_layers))


# An intervention is called at every block point with the block's (traced) layer index.
# It returns the (possibly edited) activation; capture happens after it, so a capture sees the edit.
#   intervene(point: str, layer: jax int scalar, x_BxTxD, ctx: InterventionContext) -> x_BxTxD
Intervene = Callable[..., object]


@dataclasses.dataclass(frozen=True)
class InterventionContext:
    """What an intervention may look at besides the activation.

    ``token_pos_BxT`` are absolute positions (0 at the first real token, so left padding is
    negative); ``is_prompt_BxT`` is 1 for prompt tokens and 0 for tokens produced by generation;
    ``step_mask_BxT`` is an optional per-call float mask supplied by the caller (e.g. a steering
    span for the tokens in this call). All are arrays aligned with the activation's T axis.
    """

    token_pos_BxT: object
    is_prompt_BxT: object
    step_mask_BxT: object | None = None


def validate_positions(positions, seq_len: int, batch: int):
    """Check a [batch, k] int array of token indices against the sequence; return it as numpy.

    Raises HookError naming the offending example and position. Done on the host, before compute.
    """
    import numpy as np

    pos = np.asarray(positions)
    if pos.ndim == 1:
        raise HookError(f"positions must be [batch, k]; got shape {pos.shape} (use pos[:, None])")
    if pos.ndim != 2 or pos.shape[0] != batch:
        raise HookError(f"positions must be [batch={batch}, k]; got shape {pos.shape}")
    if not np.issubdtype(pos.dtype, np.integer):
        raise HookError(f"positions must be integers; got dtype {pos.dtype}")
    bad = np.argwhere((pos < 0) | (pos >= seq_len))
    if bad.size:
        b, k = bad[0]
        raise HookError(
            f"position {int(pos[b, k])} (example {int(b)}, slot {int(k)}) is outside the sequence "
            f"of length {seq_len}")
    return pos


def order_cache(spec: CaptureSpec, got: Mapping[str, object]) -> dict[str, object]:
    """Return the captured activations in the order the caller named them."""
    return {n: got[n] for n in spec.names}
