"""The ``Model`` object: a config, a parameter pytree, a tokenizer and a pure forward pass.

``model.run`` validates its inputs on the host (hook names, positions, shapes) and then calls one
jitted pure function of ``(params, tokens, mask, positions, intervention)``; the capture spec and the
config are static. Interventions are pytrees (``jax.tree_util.Partial``), so a steering coefficient
is an array argument and a whole sweep reuses one compiled program.

Prompts that share a long prefix (a persona's system prompt, a choice template's instructions) can
run it once: ``cache = model.prefill(prefix_ids)`` keeps its KV cache and ``model.run(rest, prefix=cache)``
runs only the continuations (see :class:`PrefixCache`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prefjax import hooks as H
from prefjax.models.family import Family
from prefjax.models.stack import split_layers
from prefjax.sharding import batch_sharding, mesh_context
from prefjax.tokenize import left_pad


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


@functools.partial(jax.jit, static_argnames=("family", "cfg", "spec", "unroll", "want_logits"))
def _run_jit(params, tokens, valid, pos, intervene, *, family: Family, cfg, spec, unroll, want_logits):
    out = family.forward(cfg, params, tokens, valid, capture=spec, pos_BxK=pos, intervene=intervene, unroll=unroll,
                         logits=want_logits)
    return out.logits, out.captured


@functools.partial(jax.jit, static_argnames=("family", "cfg", "spec", "unroll", "want_logits"))
def _run_prefix_jit(params, prefix_state, rows, tokens, valid, pos, intervene, *, family: Family, cfg, spec, unroll,
                    want_logits):
    p = prefix_state["valid"].shape[1]
    state = extend_kv_state(prefix_state, rows, tokens.shape[1])
    out = family.forward(cfg, params, tokens, valid, capture=spec, pos_BxK=pos, intervene=intervene, state=state,
                         start=p, is_prompt=True, unroll=unroll, logits=want_logits)
    return out.logits, out.captured


@functools.partial(jax.jit, static_argnames=("family", "cfg", "unroll", "dtype"))
def _prefill_jit(params, prefix_state, rows, tokens, valid, intervene, *, family: Family, cfg, unroll, dtype):
    b, t = tokens.shape
    if prefix_state is None:
        state, p = family.init_state(cfg, b, t, dtype), 0
    else:
        state, p = extend_kv_state(prefix_state, rows, t), prefix_state["valid"].shape[1]
    return family.forward(cfg, params, tokens, valid, capture=H.CaptureSpec(), pos_BxK=None, state=state, start=p,
                          is_prompt=True, intervene=intervene, unroll=unroll, logits=False).state


def extend_kv_state(state, rows_B, n_new: int):
    """A KV-cache decode state (``k``/``v`` [L, Bp, S, ...], ``valid`` [Bp, S]) with its rows picked by
    ``rows_B`` and ``n_new`` empty slots appended (traceable)."""
    def grow(a, axis):
        a = jnp.take(a, rows_B, axis=axis)
        pad = [(0, 0)] * a.ndim
        pad[axis + 1] = (0, n_new)
        return jnp.pad(a, pad)
    return {"k": grow(state["k"], 1), "v": grow(state["v"], 1), "valid": grow(state["valid"], 0)}


def common_prefix_len(seqs: Sequence[Sequence[int]], *, limit: int | None = None, min_len: int = 8) -> int:
    """The length of the longest token prefix shared by every sequence of ``seqs``, at most ``limit`` and
    at most the shortest length minus one (every sequence keeps a token of its own); 0 when that is
    shorter than ``min_len`` (not worth a prefix cache)."""
    if not len(seqs):
        return 0
    first = list(seqs[0])
    n = min(len(s) for s in seqs) - 1
    if limit is not None:
        n = min(n, int(limit))
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
        if n < min_len:
            return 0
    return n if n >= min_len else 0


@dataclasses.dataclass(frozen=True)
class PrefixCache:
    """The KV cache of ``batch`` token prefixes (left-padded to ``length`` slots), from :meth:`Model.prefill`.

    ``model.run(tokens, prefix=cache, prefix_rows=rows)`` runs row ``b`` of ``tokens`` as the
    continuation of prefix ``rows[b]`` without recomputing the prefix: the new tokens take the positions
    after the prefix's real tokens and the padding slots are masked, so the result equals running the
    concatenated sequence (up to float rounding). Made by the model it is used with (same weights and
    adapter). Interventions and steering see only the continuation's tokens.

    Layout: prefixes are left-padded (their real tokens end at the last slot); a continuation is best
    right-padded (its real tokens start right after the prefix's), which is exact for any sliding
    window. A left-padded continuation leaves padding in between, which is fine while prefix plus
    continuation fit in the window (:meth:`Model.fits_window`) and refused otherwise.
    """

    state: Any
    batch: int
    length: int
    contiguous: bool = True  # every row's real tokens end at the last slot, with no padding between them


def apply_layer_split(model: "Model", setting: str) -> "Model":
    """``model`` with its block weights split per layer (:meth:`Model.split_layers`) as ``setting`` says:
    "on", "off", or "auto" = on when JAX runs on a GPU, the model is on one device (no mesh) and its family
    is dense (a MoE model keeps its stacked experts). Config field ``model.split_layers``."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"split_layers setting {setting!r}; expected 'auto', 'on' or 'off'")
    if setting == "auto":
        setting = "on" if (jax.default_backend() == "gpu" and model.mesh is None
                           and not getattr(model.config, "n_experts", 0)) else "off"
    return model.split_layers() if setting == "on" else model


@dataclasses.dataclass
class Model:
    """A loaded model. ``params`` is a pytree of (possibly sharded) ``jax.Array``; ``family`` is its
    :class:`prefjax.models.family.Family` (from :data:`prefjax.models.FAMILIES`)."""

    family: Family
    config: Any
    params: Any
    tokenizer: Any = None
    mesh: Any = None
    source: str = ""
    adapter: Any = None

    def __post_init__(self):
        if not isinstance(self.family, Family):
            raise TypeError(f"Model.family must be a prefjax.models.family.Family (e.g. prefjax.models.FAMILIES"
                            f"['gemma3']), got {type(self.family).__name__}")

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

    def split_layers(self) -> "Model":
        """This model with its block weights split into one buffer per layer
        (:func:`prefjax.models.stack.split_layers`), for unrolled programs (the GPU default of :meth:`run`, the
        engine's decode step): on an H200 this removed XLA's copy of each layer's weight slice before its
        cuBLAS matmuls (Gemma-3-27B: decode step at 8 rows 17.45 -> 16.17 ms, prefill + capture at batch 4
        106.4 -> 97.2 ms; BUILD_NOTES.md). Every layer loop over split weights is unrolled (a scan would stack
        them again, a copy per call), so programs that default to a scan compile all layers. The stacked weights are donated:
        use the returned model, not this one. Attach LoRA adapters on the fly (``merge=False``).
        """
        if getattr(self.config, "n_experts", 0):
            raise ValueError(f"{self.source or self.family.name}: split_layers: the MoE expert kernels index the "
                             f"layer-stacked expert weights in place; keep this model's stack")
        return dataclasses.replace(self, params={**self.params,
                                                 "blocks": split_layers(self.params["blocks"], self.n_layers)})

    def run_params(self):
        """The parameters a forward pass uses: the base weights, with the LoRA adapter applied if any."""
        if self.adapter is None:
            return self.params
        return self.adapter.apply(self.params)

    def prefix_ok(self) -> bool:
        """Whether :meth:`prefill` and ``run(prefix=...)`` work for this model: one device, and a decode
        state that is a plain KV cache (not a recurrent state)."""
        return self.mesh is None and self.family.plain_kv_state

    def fits_window(self, n_slots: int) -> bool:
        """Whether ``n_slots`` cache slots fit in the model's sliding window (always true without one).

        The window counts cache slots, so padding between a prefix's last real token and its
        continuation's first one shortens it; layouts without such gaps (see :class:`PrefixCache`)
        never need this."""
        window = getattr(self.config, "sliding_window", None)
        return not window or n_slots <= int(window)

    def prefill(self, token_ids, *, attention_mask=None, prefix: "PrefixCache | None" = None,
                prefix_rows=None, steer=None, intervene: Callable | None = None,
                unroll: bool | None = None) -> PrefixCache:
        """Run ``token_ids`` [batch, seq] (0 in ``attention_mask`` at padding) and keep their KV cache as a
        :class:`PrefixCache`; with ``prefix`` the tokens continue it (see :meth:`run`). ``steer`` and
        ``intervene`` act as in :meth:`run` (on these tokens; the cache keeps the edited keys and
        values). Needs :meth:`prefix_ok`."""
        if not self.prefix_ok():
            raise ValueError(f"model {self.source!r} cannot keep a prefix cache (it needs one device and a "
                             "plain KV cache; see Model.prefix_ok)")
        tokens, valid = self._check_tokens(token_ids, attention_mask)
        b, t = tokens.shape
        rows = None if prefix is None else jnp.asarray(check_prefix_rows(prefix, prefix_rows, b))
        if prefix is None:
            contiguous = _left_padded(valid)
        else:
            contiguous = prefix.contiguous and bool(valid.all())
            self._check_layout(prefix, valid)
        iv = self._intervention(intervene, steer, b, t)
        state = _prefill_jit(self.run_params(), None if prefix is None else prefix.state, rows,
                             jnp.asarray(tokens.astype(np.int32)), jnp.asarray(valid), iv,
                             family=self.family, cfg=self.config,
                             unroll=auto_unroll() if unroll is None else unroll, dtype=self.dtype)
        return PrefixCache(state=state, batch=b, length=t + (prefix.length if prefix is not None else 0),
                           contiguous=contiguous)

    def prefill_rows(self, seqs: Sequence[Sequence[int]], *, n_after: int = 0, min_shared: int = 8,
                     rows: int | None = None, shared_bucket: int = 128, width_bucket: int = 16,
                     slots_bucket: int = 64) -> PrefixCache:
        """A prefix cache whose row ``b`` holds the tokens ``seqs[b]`` (left-padded).

        The start all of ``seqs`` share runs once when it is at least ``min_shared`` tokens long and
        the padding that then sits between it and the rows fits the sliding window together with the
        ``n_after`` slots the continuations will add. Shapes are bucketed so that calls with similar
        inputs share compiled programs: the shared start is left-padded to a multiple of
        ``shared_bucket`` slots, the rows to a multiple of ``width_bucket``, ``rows`` (at least
        ``len(seqs)``) rows are kept (the extra ones empty), and the cache gets empty slots in front up
        to a multiple of ``slots_bucket`` (no compute). Needs :meth:`prefix_ok`."""
        seqs = [[int(t) for t in x] for x in seqs]
        if not seqs:
            raise ValueError("prefill_rows needs at least one sequence")
        n_rows = max(rows or len(seqs), len(seqs))
        skip = common_prefix_len(seqs, min_len=min_shared) if all(seqs) else 0
        s_pad = -(-skip // shared_bucket) * shared_bucket if skip else 0
        t = -(-max(max(len(x) for x in seqs) - skip, 1) // width_bucket) * width_bucket
        if skip and not self.fits_window(s_pad + t + n_after):  # padding would sit between shared start and rows
            skip, s_pad = 0, 0
            t = -(-max(len(x) for x in seqs) // width_bucket) * width_bucket
        shared = None
        pad = int(self.config.pad_id)
        if skip:
            ids, start = left_pad([seqs[0][:skip]], pad, width=s_pad)
            shared = self.prefill(ids, attention_mask=start)
        toks, valid = left_pad([x[skip:] for x in seqs], pad, width=t, rows=n_rows)
        cache = self.prefill(toks, attention_mask=valid, prefix=shared)
        extra = -cache.length % max(int(slots_bucket), 1)
        if not extra:
            return cache
        return dataclasses.replace(cache, state=_pad_slots(cache.state, extra), length=cache.length + extra)

    def _intervention(self, intervene, steer, b: int, t: int):
        iv = as_intervention(intervene)
        if steer is not None:
            from prefjax.steering import spec_intervention
            sv = spec_intervention(steer, self, batch=b, seq=t, prompt_len=t)
            iv = sv if iv is None else _chain(iv, sv)
        return iv

    def _check_layout(self, prefix: "PrefixCache", valid) -> None:
        """A continuation of ``prefix`` with slots past the sliding window must leave no padding between
        the prefix's last real token and its own: a contiguous prefix and right-padded rows."""
        total = prefix.length + valid.shape[1]
        if self.fits_window(total):
            return
        if not (prefix.contiguous and _right_padded(valid)):
            raise ValueError(f"a continuation of a prefix cache takes {total} slots, more than the sliding window "
                             f"of {self.config.sliding_window}: it must be right-padded and continue a contiguous "
                             "prefix (padding in between would count against the window)")

    def _check_tokens(self, token_ids, attention_mask):
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
        return tokens, valid

    def run(self, token_ids, *, attention_mask=None, capture: Sequence[str] = (), positions=None,
            intervene: Callable | None = None, steer=None, unroll: bool | None = None, logits: bool = True,
            prefix: PrefixCache | None = None, prefix_rows=None):
        """Forward pass. See the module docstring of :mod:`prefjax.hooks` for hook names.

        ``token_ids`` [batch, seq] ints; ``attention_mask`` [batch, seq] with 0 at left padding;
        ``positions`` None (every token) or an int array [batch, k] of token indices; ``capture`` hook
        names. Returns ``(logits [batch, seq|k, vocab], cache)`` where ``cache`` maps each captured
        hook to [batch, seq|k, d_model]. ``steer`` is a :class:`prefjax.steering.SteerSpec`.
        ``unroll`` (default: :func:`auto_unroll`) runs the layers as a Python loop instead of a scan;
        both give the same numbers. ``prefix`` (a :class:`PrefixCache` from :meth:`prefill`) runs each
        row as the continuation of prefix ``prefix_rows[b]`` (default: the one prefix, or row ``b``);
        positions, masks, steering and captures then refer to the columns of ``token_ids`` only.
        """
        if unroll is None:
            unroll = auto_unroll()
        tokens, valid = self._check_tokens(token_ids, attention_mask)
        b, t = tokens.shape
        if prefix is not None:
            if not self.prefix_ok():
                raise ValueError(f"model {self.source!r} cannot run a continuation of a prefix cache "
                                 "(see Model.prefix_ok)")
            self._check_layout(prefix, valid)
        pos = None if positions is None else H.validate_positions(positions, t, b).astype(np.int32)
        spec = H.CaptureSpec.from_names(capture, self.n_layers)
        iv = self._intervention(intervene, steer, b, t)
        # a batch that does not divide over the batch axes is replicated (spec_for)
        shard = lambda a: (jnp.asarray(a) if self.mesh is None
                           else jax.device_put(a, batch_sharding(self.mesh, a.ndim, b)))
        if prefix is not None:
            out_logits, captured = _run_prefix_jit(
                self.run_params(), prefix.state, jnp.asarray(check_prefix_rows(prefix, prefix_rows, b)),
                jnp.asarray(tokens.astype(np.int32)), jnp.asarray(valid), None if pos is None else jnp.asarray(pos),
                iv, family=self.family, cfg=self.config, spec=spec, unroll=unroll, want_logits=logits)
            return out_logits, H.order_cache(spec, captured)
        with mesh_context(self.mesh):
            out_logits, captured = _run_jit(
                self.run_params(), shard(tokens.astype(np.int32)), shard(valid),
                None if pos is None else shard(pos), iv, family=self.family, cfg=self.config,
                spec=spec, unroll=unroll, want_logits=logits)
        return out_logits, H.order_cache(spec, captured)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"model {self.source!r} has no tokenizer; pass token ids instead")
        return self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)


@functools.partial(jax.jit, static_argnums=1)
def _pad_slots(state, n: int):
    """``n`` empty (invalid) slots in front of every row of a KV-cache state: positions and masks are
    unchanged (positions count valid slots), and no padding lands between real tokens."""
    return {"k": jnp.pad(state["k"], [(0, 0), (0, 0), (n, 0)] + [(0, 0)] * (state["k"].ndim - 3)),
            "v": jnp.pad(state["v"], [(0, 0), (0, 0), (n, 0)] + [(0, 0)] * (state["v"].ndim - 3)),
            "valid": jnp.pad(state["valid"], [(0, 0), (n, 0)])}


def _left_padded(valid) -> bool:
    """Every row is 0...0 1...1 (real tokens at the end)."""
    v = np.asarray(valid, bool)
    return bool(np.all(v[:, 1:] >= v[:, :-1]))


def _right_padded(valid) -> bool:
    """Every row is 1...1 0...0 (real tokens at the start)."""
    v = np.asarray(valid, bool)
    return bool(np.all(v[:, 1:] <= v[:, :-1]))


def check_prefix_rows(prefix: PrefixCache, rows, batch: int):
    """The prefix row of each of ``batch`` continuations (int32, host), checked against the cache: a clear
    error before any compute for a wrong shape, dtype or row index."""
    if rows is None:
        if prefix.batch not in (1, batch):
            raise ValueError(f"a prefix cache of {prefix.batch} rows needs prefix_rows for a batch of {batch}")
        rows = np.zeros(batch, np.int32) if prefix.batch == 1 else np.arange(batch, dtype=np.int32)
    rows = np.asarray(rows)
    if rows.shape != (batch,) or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"prefix_rows must be {batch} ints; got shape {rows.shape}, dtype {rows.dtype}")
    if rows.size and (rows.min() < 0 or rows.max() >= prefix.batch):
        raise ValueError(f"prefix_rows must index the prefix cache's {prefix.batch} rows; "
                         f"got {rows.min()}..{rows.max()}")
    return rows.astype(np.int32)


def _chain_impl(first, second, point, layer, x, ctx):
    return second(point, layer, first(point, layer, x, ctx), ctx)


def _chain(first, second):
    return jax.tree_util.Partial(_chain_impl, first, second)
