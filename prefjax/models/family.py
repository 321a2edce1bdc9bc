"""The model-family contract: what ``Model``, generation, loading and LoRA may call on a family.

A family is a :class:`Family` value (one per module: ``gemma3.FAMILY``, ``llama.FAMILY``,
``qwen3.FAMILY``, ``qwen35.FAMILY``), collected in the table :data:`prefjax.models.FAMILIES`. It is
hashable by identity, so jitted functions take it as a static argument; there is no registry to
fill. Optional parts are declared fields (``hf_config`` None, ``supports_lora`` False), never
probed with ``hasattr``.

:meth:`Family.forward` is the family's forward pass with the contract checked at trace time (chex:
ranks, shapes and dtypes of tokens, mask, positions, decode state and every output), so a wrong
shape fails where it enters instead of deep inside a layer, at no run-time cost.

Random parameters for every family come from :func:`random_params` (one path: normal draws, one
layer at a time, generated directly in the target dtype).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Protocol

import chex
import jax
import jax.numpy as jnp

from prefjax.checkpoints.hf import nest_paths
from prefjax.models.stack import ForwardOut


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """The fields every family's config starts with (``Model``, generation and steering read them).

    Family configs are frozen dataclasses deriving from this one, so they hash and serve as static
    arguments; each adds its own fields and calls :meth:`check_shape` from ``__post_init__``.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    def check_shape(self, *, activation: str, activations, layer_types=None, allowed_layer_types=()) -> None:
        """Refuse a config whose heads do not group, whose activation the port lacks (``activations``:
        the supported names) or whose ``layer_types`` are of the wrong length or kind."""
        if layer_types is not None:
            if len(layer_types) != self.n_layers:
                raise ValueError(f"layer_types has {len(layer_types)} entries for {self.n_layers} layers")
            bad = set(layer_types) - set(allowed_layer_types)
            if bad:
                raise ValueError(f"unknown layer_types {sorted(bad)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if activation not in activations:
            raise ValueError(f"hidden_activation {activation!r} is not supported")


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where a family's decode state (``init_state``) keeps a request's data, leaf by leaf: what the
    continuous-batching engine (:mod:`prefjax.engine`) needs to move a prefilled request into one row of
    its shared cache.

    * ``slot_leaves``: KV-cache leaves ``[layers, B, S, ...]``, one entry per cache slot (column); a
      prompt's entries are written at the columns it occupies.
    * ``row_leaves``: per-row recurrent leaves ``[layers, B, ...]`` (conv windows, a recurrent matrix
      state) that sum up a request's whole history; copied whole into a row, replacing what was there.

    Together with ``valid`` [B, S] they must name every leaf of the state.
    """

    slot_leaves: tuple[str, ...] = ("k", "v")
    row_leaves: tuple[str, ...] = ()

    def leaves(self) -> set[str]:
        """Every leaf name the layout accounts for (``valid`` included)."""
        return {"valid", *self.slot_leaves, *self.row_leaves}


KV_LAYOUT = StateLayout()  # a plain KV cache: {"k", "v", "valid"}


class ModelFamily(Protocol):
    """The surface a model family offers (what :class:`Family` holds). Signatures:

    * ``config_from_hf(hf: dict, *, source: str) -> cfg`` (a frozen, hashable config);
      ``hf_config(cfg) -> dict`` (the inverse, or None where the family has none);
    * ``param_shapes(cfg) -> {"a/b": (shape, logical axes)}``: a leading ``"layers"`` axis marks a
      stacked parameter whose rows are the HF layers ``layer_rows(cfg, path)``;
    * ``hf_names(cfg, has=None) -> {"a/b": (template | HFMulti, transform | None)}`` with
      ``hf_prefixes`` (where checkpoints keep the decoder) and ``hf_skip_prefixes`` (tensors to leave);
    * ``init_params(cfg, key, dtype, scale) -> params``; ``init_state(cfg, batch, max_len, dtype)``;
    * ``forward(cfg, params, tokens_BxT, valid_BxT, *, capture, pos_BxK=None, intervene=None,
      unroll=False, state=None, start=0, pos_ids_BxT=None, is_prompt=True, logits=True) -> ForwardOut``;
    * ``embed(cfg, params, tokens_BxT) -> [B, T, D]``; ``unembed(cfg, params, h_BxKxD) -> [B, K, V]``.
    """

    name: str
    presets: Mapping[str, Any]
    config_from_hf: Callable[..., Any]
    hf_config: Callable[[Any], dict] | None
    param_shapes: Callable[[Any], dict]
    layer_rows: Callable[[Any, str], tuple[int, ...]]
    hf_names: Callable[..., dict]
    hf_prefixes: tuple[str, ...]
    hf_skip_prefixes: tuple[str, ...]
    init_params: Callable[..., Any]
    init_state: Callable[..., Any]
    embed: Callable[..., Any]
    unembed: Callable[..., Any]
    supports_lora: bool
    plain_kv_state: bool
    state_layout: StateLayout | None

    def forward(self, cfg, params, tokens_BxT, valid_BxT, **kw) -> ForwardOut: ...


def every_layer(cfg, path: str) -> tuple[int, ...]:
    """``layer_rows`` of a family whose stacked parameters hold every layer, in order."""
    return tuple(range(cfg.n_layers))


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """One model family (satisfies :class:`ModelFamily`). Equal and hashed by identity: build each once.

    ``forward_fn`` is the family's own forward pass; call :meth:`forward`, which checks the contract.
    ``supports_lora``: ``forward_fn`` applies ``params["blocks"]["lora"]`` factors on the fly.
    ``plain_kv_state``: the decode state is exactly ``{"k", "v", "valid"}`` (a KV cache that a prefix
    cache can be cut from and extended); False for recurrent state (Qwen-3.5's DeltaNet).
    ``state_layout``: how the decode state splits into KV slots and per-row recurrent leaves
    (:class:`StateLayout`; what :class:`prefjax.engine.Engine` serves); None for a family the engine
    cannot serve (e.g. one without a decode state).
    """

    name: str
    presets: Mapping[str, Any]
    config_from_hf: Callable[..., Any]
    param_shapes: Callable[[Any], dict]
    hf_names: Callable[..., dict]
    hf_prefixes: tuple[str, ...]
    hf_skip_prefixes: tuple[str, ...]
    init_params: Callable[..., Any]
    init_state: Callable[..., Any]
    forward_fn: Callable[..., ForwardOut]
    embed: Callable[..., Any]
    unembed: Callable[..., Any]
    layer_rows: Callable[[Any, str], tuple[int, ...]] = every_layer
    hf_config: Callable[[Any], dict] | None = None
    supports_lora: bool = False
    plain_kv_state: bool = True
    state_layout: StateLayout | None = KV_LAYOUT

    def __post_init__(self):
        if self.plain_kv_state and self.state_layout != KV_LAYOUT:
            raise ValueError(f"family {self.name!r}: a plain KV state has the layout {KV_LAYOUT}, "
                             f"not {self.state_layout}")

    def forward(self, cfg, params, tokens_BxT, valid_BxT, *, capture, pos_BxK=None, state=None,
                logits: bool = True, **kw) -> ForwardOut:
        """``forward_fn`` with its inputs and outputs checked (shapes, dtypes; at trace time)."""
        check_forward_inputs(self.name, tokens_BxT, valid_BxT, pos_BxK, state)
        out = self.forward_fn(cfg, params, tokens_BxT, valid_BxT, capture=capture, pos_BxK=pos_BxK, state=state,
                              logits=logits, **kw)
        check_forward_outputs(self.name, cfg, out, tokens_BxT, pos_BxK, state, logits)
        return out

    def __repr__(self) -> str:
        return f"Family({self.name!r})"


def check_forward_inputs(name: str, tokens_BxT, valid_BxT, pos_BxK, state) -> None:
    """Ranks, shapes and dtypes of a forward call's inputs (chex; free under jit: shapes are static)."""
    try:
        chex.assert_rank(tokens_BxT, 2)
        chex.assert_type(tokens_BxT, int)
        chex.assert_shape(valid_BxT, tokens_BxT.shape)
        b = tokens_BxT.shape[0]
        if pos_BxK is not None:
            chex.assert_rank(pos_BxK, 2)
            chex.assert_type(pos_BxK, int)
            chex.assert_axis_dimension(pos_BxK, 0, b)
        if state is not None:
            chex.assert_rank(state["valid"], 2)
            chex.assert_axis_dimension(state["valid"], 0, b)
    except (AssertionError, KeyError, AttributeError) as e:
        raise ValueError(f"{name}.forward: bad input (tokens [B, T] ints, valid [B, T], positions [B, K] ints, "
                         f"state with valid [B, S]): {e}") from None


def check_forward_outputs(name: str, cfg, out: ForwardOut, tokens_BxT, pos_BxK, state, logits: bool) -> None:
    """A forward's outputs against the contract: logits [B, K|T, vocab] (None without logits), h and every
    capture [B, K|T, d_model], and a new decode state of the same structure, shapes and dtypes."""
    b, t = tokens_BxT.shape
    k = t if pos_BxK is None else pos_BxK.shape[1]
    try:
        if not isinstance(out, ForwardOut):
            raise AssertionError(f"forward returned {type(out).__name__}, not ForwardOut")
        if logits:
            chex.assert_shape(out.logits, (b, k, cfg.vocab_size))
            chex.assert_type(out.logits, float)
        elif out.logits is not None:
            raise AssertionError("logits=False but logits were returned")
        chex.assert_shape(out.h, (b, k, cfg.d_model))
        for hook, a in out.captured.items():
            if a.shape != (b, k, cfg.d_model):
                raise AssertionError(f"capture {hook!r} has shape {a.shape}, expected {(b, k, cfg.d_model)}")
        if state is None:
            if out.state is not None:
                raise AssertionError("a forward without state returned a state")
        else:
            chex.assert_trees_all_equal_shapes_and_dtypes(out.state, state)
    except AssertionError as e:
        raise AssertionError(f"{name}.forward broke the family contract: {e}") from None


def random_params(shapes: dict[str, Any], key, dtype=jnp.float32, scale: float = 0.02, *,
                  norm_offset: float = 0.0, special: Mapping[str, Callable] | None = None) -> dict[str, Any]:
    """Random parameters for a ``param_shapes`` table (every family's init).

    Matrices are normal * ``scale``; parameters with a ``"norm"`` axis are ``norm_offset`` + normal * 0.1
    (0 for zero-centred ``1 + w`` norms, 1 for plain ones); ``special[path](key, shape, dtype)`` draws a
    parameter that needs its own law. Stacked parameters are drawn one layer at a time (``lax.map``) in
    ``dtype``, so a 27B init never holds a float32 copy of a whole stacked weight.
    """
    dtype = jnp.dtype(dtype)
    special = special or {}
    flat: dict[str, Any] = {}
    keys = jax.random.split(key, len(shapes))
    for k_, (name, (shape, axes)) in zip(keys, shapes.items()):
        if name in special:
            flat[name] = special[name](k_, tuple(shape), dtype)
            continue
        is_norm = "norm" in axes
        s = 0.1 if is_norm else scale
        if axes and axes[0] == "layers":
            arr = _layerwise_normal(k_, tuple(shape), dtype, s)
        else:
            arr = jax.random.normal(k_, shape, dtype) * jnp.asarray(s, dtype)
        if is_norm and norm_offset:
            arr = arr + jnp.asarray(norm_offset, dtype)
        flat[name] = arr
    return nest_paths(flat)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _layerwise_normal(key, shape, dtype, s):
    keys = jax.random.split(key, shape[0])
    return jax.lax.map(lambda k: jax.random.normal(k, shape[1:], dtype) * jnp.asarray(s, dtype), keys)
