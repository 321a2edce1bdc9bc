"""The ``Model`` object: a config, a parameter pytree, a tokenizer and a pure forward pass.

``model.run`` validates its inputs on the host (hook names, positions, shapes) and then calls one
jitted pure function of ``(params, tokens, mask, positions, intervention)``; the capture spec and the
config are static. Interventions are pytrees (``jax.tree_util.Partial``), so a steering coefficient
is an array argument and a whole sweep reuses one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prefjax import hooks as H
from prefjax.sharding import batch_sharding, mesh_context


def auto_unroll() -> bool:
    """Whether to unroll the layer loop by default: on GPUs, XLA copies each layer's weights out of
    the stacked arrays inside a ``scan`` (a 27B decode step measured 56 ms scanned vs 22 ms unrolled
    on an H100; see BUILD_NOTES.md), so GPU runs unroll; CPU and TPU keep the scan (fast compiles)."""
    return jax.default_backend() == "gpu"


def as_intervention(fn) -> jax.tree_util.Partial | None:
    """Wrap a plain ``intervene(point, layer, x, ctx)`` function as a pytree (no-op if it is one)."""
    if fn is None or isinstance(fn, jax.tree_util.Partial):
        return fn
    if not callable(fn):
        raise TypeError(f"intervene must be callable, got {type(fn).__name__}")
    return jax.tree_util.Partial(fn)


@functools.partial(jax.jit, static_argnames=("family_name", "cfg", "spec", "unroll", "want_logits"))
def _run_jit(params, tokens, valid, pos, intervene, *, family_name, cfg, spec, unroll, want_logits):
    fam = _FAMILIES[family_name]
    logits, captured, _, _ = fam.forward(cfg, params, tokens, valid, capture=spec, pos_BxK=pos,
                                         intervene=intervene, unroll=unroll, logits=want_logits)
    return logits, captured


_FAMILIES: dict[str, Any] = {}


def register_family(module) -> None:
    _FAMILIES[module.FAMILY] = module


@dataclasses.dataclass
class Model:
    """A loaded model. ``params`` is a pytree of (possibly sharded) ``jax.Array``."""

    family: Any
    config: Any
    params: Any
    tokenizer: Any = None
    mesh: Any = None
    source: str = ""
    adapter: Any = None

    def __post_init__(self):
        register_family(self.family)

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def dtype(self):
        return jax.tree_util.tree_leaves(self.params)[0].dtype

    def hook_names(self, point: str = "hook_resid_post") -> tuple[str, ...]:
        return tuple(H.hook_name(l, point) for l in range(self.n_layers))

    def with_adapter(self, adapter, *, merge: bool = False) -> "Model":
        """This model with a PEFT LoRA ``adapter`` (folder or :class:`prefjax.lora.LoraAdapter`).

        On the fly (default) the new model shares these base params; ``merge=True`` folds the adapter
        into a copy of the weights. Replaces an on-the-fly adapter already attached; ``None`` gives
        the base model back. See :func:`prefjax.lora.attach_adapter`.
        """
        from prefjax.lora import attach_adapter
        return attach_adapter(self, adapter, merge=merge)

    def _params_for_run(self):
        if self.adapter is None:
            return self.params
        return self.adapter.apply(self.params)

    def run(self, token_ids, *, attention_mask=None, capture: Sequence[str] = (), positions=None,
            intervene: Callable | None = None, steer=None, unroll: bool | None = None, logits: bool = True):
        """Forward pass. See the module docstring of :mod:`prefjax.hooks` for hook names.

        ``token_ids`` [batch, seq] ints; ``attention_mask`` [batch, seq] with 0 at left padding;
        ``positions`` None (every token) or an int array [batch, k] of token indices; ``capture`` hook
        names. Returns ``(logits [batch, seq|k, vocab], cache)`` where ``cache`` maps each captured
        hook to [batch, seq|k, d_model]. ``steer`` is a :class:`prefjax.steering.SteerSpec`.
        ``unroll`` (default: :func:`auto_unroll`) runs the layers as a Python loop instead of a scan;
        both give the same numbers.
        """
        if unroll is None:
            unroll = auto_unroll()
        tokens = np.asarray(token_ids)
        if tokens.ndim != 2:
            raise ValueError(f"token_ids must be [batch, seq]; got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token_ids must be integers; got dtype {tokens.dtype}")
        b, t = tokens.shape
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            bad = np.argwhere((tokens < 0) | (tokens >= self.config.vocab_size))[0]
            raise ValueError(f"token id {int(tokens[tuple(bad)])} at (example {bad[0]}, position {bad[1]}) "
                             f"is outside the vocabulary of size {self.config.vocab_size}")
        if attention_mask is None:
            valid = np.ones((b, t), bool)
        else:
            valid = np.asarray(attention_mask).astype(bool)
            if valid.shape != tokens.shape:
                raise ValueError(f"attention_mask shape {valid.shape} != token_ids shape {tokens.shape}")
        pos = None if positions is None else H.validate_positions(positions, t, b).astype(np.int32)
        spec = H.CaptureSpec.from_names(capture, self.n_layers)
        iv = as_intervention(intervene)
        if steer is not None:
            from prefjax.steering import spec_intervention
            sv = spec_intervention(steer, self, batch=b, seq=t, prompt_len=t)
            iv = sv if iv is None else _chain(iv, sv)
        # a batch that does not divide over the batch axes is replicated (spec_for)
        shard = lambda a: (jnp.asarray(a) if self.mesh is None
                           else jax.device_put(a, batch_sharding(self.mesh, a.ndim, b)))
        with mesh_context(self.mesh):
            out_logits, captured = _run_jit(
                self._params_for_run(), shard(tokens.astype(np.int32)), shard(valid),
                None if pos is None else shard(pos), iv, family_name=self.family.FAMILY, cfg=self.config,
                spec=spec, unroll=unroll, want_logits=logits)
        return out_logits, H.order_cache(spec, captured)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"model {self.source!r} has no tokenizer; pass token ids instead")
        return self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)


def _chain_impl(first, second, point, layer, x, ctx):
    return second(point, layer, first(point, layer, x, ctx), ctx)


def _chain(first, second):
    return jax.tree_util.Partial(_chain_impl, first, second)
