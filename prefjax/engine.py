"""A continuous-batching decode engine for ragged request sets (the elicitation workload).

``Engine(model, rows=64).run(requests)`` decodes a list of :class:`Request` (each its own prompt,
``max_new_tokens``, ``n_samples`` and optional per-row :class:`RowSteer`) through a fixed set of
``rows`` cache rows. One compiled decode step serves the whole run: when a row finishes (a stop id or
its token budget) the next request's prompt is prefilled and written into that row, without
recompiling and without touching the other rows.

Layout (built only on the family contract ``forward``/``init_state``/``state_layout`` and
:class:`prefjax.model.Model`):

* The cache has ``cache_len`` slot columns shared by all rows, and one global write column ``t``:
  every decode step writes every row's new token at column ``t``, then ``t += 1``. A request admitted
  at column ``t`` has its prompt's keys/values written at columns ``[t - P, t)`` of its row (``P`` its
  prompt bucket, real tokens last) and every other column of the row marked empty, so its tokens are
  contiguous: RoPE positions (counted over valid slots) and the sliding window are exactly those of a
  single-request run. A request is admitted only while ``t + max_new_tokens <= cache_len``; when none
  fits, the live rows drain and ``t`` goes back to the first column (a new wave).
* Recurrent decode states (Qwen-3.5's Gated DeltaNet layers): the family's
  :class:`prefjax.models.family.StateLayout` names the state leaves that are KV-cache slots (placed at
  columns as above) and the per-row recurrent leaves (conv windows, the delta-rule state), which sum up
  a request's whole history and are copied whole into its row at admission, replacing everything the
  row's previous request left there. A prefill starts from an empty state and its left padding neither
  enters the conv windows nor decays or writes the recurrent state, so a row's state is that of a
  single-request run. An inactive row's decode token is marked invalid (Qwen-3.5 then leaves its state
  as it was); whatever it holds is overwritten at the row's next admission.
* The ``n_samples`` samples of a request share one prefill: its keys/values are written into each
  sample's row. Sample ``s`` of a request draws from ``fold_in(PRNGKey(seed), example_id + s)`` (or
  ``sample_ids[s]``) at step ``i`` (``fold_in(key, i)``), the same stream as
  :func:`prefjax.generation.generate` with those example ids.
* Steering is per row inside the same compiled step: each row carries a layer, a unit direction, a
  coefficient, a weight per prompt token (a span or a signed mask) and whether generated tokens are
  steered. The edit is the one of :mod:`prefjax.steering` (``x + w * unit`` at ``hook_resid_post``,
  rows with weight 0 passed through bit for bit).
* Prefix reuse (``share_prefix``): the prompt prefix every request shares (chat header, a persona's
  system prompt, a template's instructions; at least 8 tokens, none of them steered) is prefilled once
  per run; each admission prefills only the tails after it. Its slots are copied into each row just
  before the row's tail, so a shorter tail leaves padding slots between them: RoPE positions count valid
  slots and stay exact, and the prefix is used only when that row span fits a sliding window (the
  window counts slots) or there is no padding. Families with per-row recurrent leaves never share a
  prefix (the padding between it and a tail would shift zeros through the conv windows, and the
  prefix cache is a plain KV cache); each of their requests is prefilled whole. With ``bucket_shapes`` the
  prefix is left-padded to a fixed number of slots (padding before its first real token, never between
  real tokens), so runs whose prefixes differ in length (personas' system prompts) share their programs.
* The host reads the new tokens every ``sync_every`` steps (one transfer), finishes rows and refills
  them; a row that stopped inside a chunk runs on until the chunk ends and those tokens are dropped.
  With ``lookahead`` (default; not with captures) the first step of the next chunk is launched before
  the read, so the device runs it while the host reads, settles and launches the rest: a row that
  stopped runs one step more and is refilled one step later. Each launched step remembers which
  admission each row held, and its tokens go only to that occupant.
* Activation capture (:class:`RowCapture`) is per row inside the same compiled step. Capture step ``s``
  is the hook's value at the position of generated token ``s`` (the input of decode step ``s``; its
  logits choose token ``s + 1``), i.e. entry ``s + 1`` of :attr:`prefjax.generation.Generation.captured`.
  The run's hooks are the union over its requests (static: one step program); every row records them
  at its one position each step, and a row writes them into its slots of a float32 device buffer
  ``[rows, max steps per request, hooks, d_model]`` only at the steps it asked for (a per-row table
  ``step -> slot`` set when the row is admitted). A finished row's slots are read in one transfer per
  sync and returned in :class:`Sample` (``captures``, ``capture_steps``: only the steps the sample
  reached). A row asking for its last step (``max_new_tokens - 1``) runs one decode step past its
  budget for it. Steering edits ``hook_resid_post`` before the capture there, as in
  :meth:`prefjax.model.Model.run`. Without captures the compiled programs are those of an uncaptured run.

* Meshes (``model.mesh``, one process): the rows split over the mesh's batch axes
  (:func:`prefjax.sharding.batch_axes`, as :func:`prefjax.generation.generate` splits its batch), so
  ``rows`` must be a multiple of their size (:func:`mesh_rows` rounds up) and ``prefill_rows`` is rounded
  up to one (the extra prefill rows are empty). The decode state (KV slot leaves, recurrent row leaves,
  ``valid``), the rowvars and the capture buffer are split along their row axis, and the KV leaves also
  along their head axis as the sharding rules split ``kv_heads`` (over a tensor axis each device keeps
  the heads it computes); every other axis is replicated. The same concrete
  shardings for the arrays placed before the run and for every compiled piece's outputs, so donated
  inputs alias their outputs. Traces run under :func:`prefjax.sharding.mesh_context` (Qwen-3.5's experts
  run expert-parallel). The host reads tokens and captures from the sharded arrays as it does on one
  device. There is no shared prefix: :meth:`prefjax.model.Model.prefill` keeps prefix caches on one
  device only; every prompt is prefilled whole.

Not covered: capture at prompt positions (run :meth:`prefjax.model.Model.run` on the prompt), meshes
over several processes (every host would have to make the same admission decisions from the tokens it
reads back; the engine does not coordinate them), and families without a declared state layout
(:func:`engine_refusal` says why a model is refused).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prefjax.generation import default_stop_ids, per_layer_cache, sample_tokens
from prefjax.hooks import CaptureSpec, HookError, parse_hook
from prefjax.model import auto_unroll, common_prefix_len, extend_kv_state
from prefjax.models.stack import PerLayer, is_split
from prefjax.sharding import batch_axes, batch_multiple, batch_sharding, mesh_context, spec_for
from prefjax.steering import STEER_POINT, unit_direction
from prefjax.tokenize import left_pad


class EngineError(ValueError):
    """A request the engine cannot serve (found on the host before any compute; names the request)."""


def engine_refusal(model) -> str | None:
    """Why :class:`Engine` cannot serve ``model`` (None: it can). It needs one process (a mesh of this
    process's devices is served, see the module docstring) and a family that declares its decode state's
    layout (``Family.state_layout``, a :class:`prefjax.models.family.StateLayout` naming every leaf of
    ``init_state``). This is the engine's own check: :meth:`prefjax.model.Model.prefix_ok` (prefix caches)
    is stricter and unrelated."""
    fam = model.family
    if model.mesh is not None and jax.process_count() > 1:
        return (f"the engine runs in one process; this run has {jax.process_count()} processes, and every host "
                "would have to make the same admission decisions (which request enters which row at which "
                "step, from the tokens it reads back), which the engine does not coordinate")
    if fam.state_layout is None:
        return f"family {fam.name!r} declares no decode-state layout (Family.state_layout)"
    shapes = jax.eval_shape(lambda: fam.init_state(model.config, 1, 1, model.dtype))
    got, want = set(shapes), fam.state_layout.leaves()
    if got != want:
        return (f"family {fam.name!r}: init_state's leaves {sorted(got)} are not those its state_layout "
                f"declares {sorted(want)}")
    return None


def pow2_bucket(n: int, least: int = 1) -> int:
    """The smallest power of two that is at least ``n`` and at least ``least``."""
    return max(_pow2(int(n)), _pow2(int(least)))


def width_bucket(n: int, least: int = 16) -> int:
    """The smallest width of the set ``{2**k, 3 * 2**(k-1)}`` (16, 24, 32, 48, 64, 96, 128, 192, ...) that is
    at least ``n`` and at least ``least``: the prompt widths of an engine with ``bucket_shapes``. A run over
    many prompt lengths compiles one prefill per width it meets, each at most 1.5x the tokens it holds
    (prefill is compute-bound: plain powers of two would waste up to half of it)."""
    n = max(int(n), int(least), 1)
    p = _pow2(n)
    return p * 3 // 4 if p >= 4 and p * 3 // 4 >= n else p


def bucketed_cache_len(prompt_len: int, max_new_tokens: int) -> int:
    """The cache length an engine with ``bucket_shapes`` gives a run whose longest prompt (bucketed) is
    ``prompt_len`` tokens and whose largest budget is ``max_new_tokens``: room for the prompt and four
    budgets (fewer waves), a power of two of at least 64 slots (the decode kernel's tiles on GPUs)."""
    return pow2_bucket(int(prompt_len) + 4 * int(max_new_tokens), 64)


def state_bytes_per_row(model, cache_len: int) -> int:
    """Device bytes of one cache row of ``cache_len`` slots: every leaf of the family's decode state
    (``init_state``: KV slots, ``valid``, recurrent leaves; from shapes only, nothing allocated) plus the
    row's float32 logits and rowvars."""
    cfg = model.config
    shapes = jax.eval_shape(lambda: model.family.init_state(cfg, 1, int(cache_len), model.dtype))
    state = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(shapes))
    return state + 4 * int(cfg.vocab_size) + 4 * int(cfg.d_model) + 64


def free_device_bytes(device=None) -> int | None:
    """Free memory of ``device`` (default: the first device) in bytes, ``bytes_limit - bytes_in_use``
    from :meth:`jax.Device.memory_stats`; None where the device reports no such stats (the CPU)."""
    dev = jax.devices()[0] if device is None else device
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 (backends without memory stats raise or return None)
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def auto_rows(model, cache_len: int, *, fraction: float = 0.5, cap: int = 128, device=None) -> int | None:
    """A row count for :class:`Engine` from free device memory: the most rows whose decode state at
    ``cache_len`` slots (:func:`state_bytes_per_row`) fits in ``fraction`` of the free bytes
    (:func:`free_device_bytes`; the rest is for prefill activations and XLA's scratch), rounded down to a
    power of two (few row-writer programs), at most ``cap`` and at least 1. None where the device reports
    no memory (the CPU: keep the configured rows) or under a mesh (rows split over devices: use
    :func:`mesh_rows` on the configured rows)."""
    if model.mesh is not None:
        return None
    free = free_device_bytes(device)
    if free is None:
        return None
    fit = int(fraction * max(free, 0)) // max(state_bytes_per_row(model, cache_len), 1)
    if fit < 1:
        return 1
    return max(1, min(1 << (fit.bit_length() - 1), int(cap)))


def mesh_rows(model, rows: int) -> int:
    """``rows`` rounded up to a multiple of the batch split of ``model.mesh``
    (:func:`prefjax.sharding.batch_multiple`; 1 without a mesh): a row count :class:`Engine` accepts,
    as :func:`prefjax.generation.generate` rounds its batch up."""
    return _bucket(int(rows), batch_multiple(model.mesh))


@dataclasses.dataclass(frozen=True, eq=False)
class RowSteer:
    """Steering for one request's rows: ``x + coef * scale * weight * direction / ||direction||`` at
    ``blocks.{layer}.hook_resid_post``.

    ``tokens``: ``"all"`` (prompt and generated tokens), ``"prompt"``, ``"generated"``, a token span
    ``(start, end)`` of the prompt (end exclusive), or a float mask with one weight per prompt token
    (signed allowed, e.g. +1 on option A's span and -1 on option B's). Spans and masks steer prompt
    tokens only.
    """

    layer: int
    direction: Any
    coef: float = 1.0
    scale: float = 1.0
    tokens: Any = "all"


@dataclasses.dataclass(frozen=True, eq=False)
class RowCapture:
    """Activations to capture for each sample of a request during decode.

    ``hooks``: hook names (:mod:`prefjax.hooks`, e.g. ``"blocks.1.hook_resid_post"`` or
    ``"ln_final.hook_normalized"``). ``steps``: generated-token indices in ``[0, max_new_tokens)``;
    step ``s`` is the activation at the position of generated token ``s`` (whose logits choose token
    ``s + 1``), steered like the tokens it sees. A sample returns the steps it reached, i.e. those ``s``
    with ``s < len(token_ids)`` (a stop token is not reached: it is not part of the sample). A request
    whose steps include ``max_new_tokens - 1`` runs one decode step past its budget to compute it.
    The run keeps a float32 device buffer of ``rows x (most steps of a request) x (hooks of all its
    requests) x d_model``; every row computes all those hooks, a row returns its own.
    """

    hooks: Sequence[str]
    steps: Sequence[int]


@dataclasses.dataclass(frozen=True, eq=False)
class Request:
    """One prompt (token ids) to continue ``n_samples`` times, each for up to ``max_new_tokens``.

    ``example_id``: sample ``s`` draws from ``fold_in(PRNGKey(seed), example_id + s)``; default: the
    running count of samples before this request. ``sample_ids``: instead, one stream id per sample
    (sample ``s`` draws from ``fold_in(PRNGKey(seed), sample_ids[s])``), e.g. ids hashed from a job key so
    a sample's stream does not depend on which other samples of the prompt are run with it.
    ``capture``: activations to record for each sample during decode (:class:`RowCapture`)."""

    prompt: Sequence[int]
    max_new_tokens: int
    n_samples: int = 1
    example_id: int | None = None
    steer: RowSteer | None = None
    sample_ids: Sequence[int] | None = None
    capture: RowCapture | None = None


@dataclasses.dataclass
class Sample:
    """One continuation: ``token_ids`` (stop token excluded) and whether a stop id ended it.

    With a :class:`RowCapture`: ``capture_steps`` are the requested steps this sample reached (ascending;
    a requested step ``>= len(token_ids)`` is absent) and ``captures[hook]`` is float32
    ``[len(capture_steps), d_model]``, row ``j`` at step ``capture_steps[j]``. Both None without one.
    """

    token_ids: list[int]
    finished: bool
    captures: dict[str, np.ndarray] | None = None
    capture_steps: list[int] | None = None


@dataclasses.dataclass
class EngineStats:
    """Counts from the last :meth:`Engine.run`: decode steps, host syncs, prefill calls, waves; and where
    its wall time went (seconds, each phase ending in a device sync, so no extra syncs are added):
    ``admit_seconds`` prefilling and writing admitted rows (the shared prefix's prefill included),
    ``decode_seconds`` dispatching decode steps and waiting for their tokens, ``run_seconds`` the whole run
    (the rest is host work: bookkeeping, stops, capture reads)."""

    decode_steps: int = 0
    lookahead_steps: int = 0  # of those, launched before the previous chunk's tokens were read (``lookahead``)
    syncs: int = 0
    prefills: int = 0
    waves: int = 1
    generated_tokens: int = 0
    prefix_tokens: int = 0  # the shared prompt prefix prefilled once for the run (0: none)
    admit_seconds: float = 0.0
    decode_seconds: float = 0.0
    run_seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# Per-row steering (module-level so the Partial's static part never changes).

def _row_steer(layer_B, unit_BxD, w_BxT, point, layer, x_BxTxD, ctx):
    """``x + w * unit`` on rows whose steering layer is ``layer`` (``w`` [B, T] per token)."""
    if point != STEER_POINT:
        return x_BxTxD
    active = (w_BxT != 0) & (layer_B == jnp.asarray(layer))[:, None]
    delta = w_BxT[:, :, None] * unit_BxD[:, None, :]
    return jnp.where(active[:, :, None], x_BxTxD + delta.astype(x_BxTxD.dtype), x_BxTxD)


def _steer_partial(layer_B, unit_BxD, w_BxT):
    return jax.tree_util.Partial(_row_steer, layer_B, unit_BxD, w_BxT)


# --------------------------------------------------------------------------------------------
# Row sharding on a mesh: the engine's decode state and rowvars are split along their row axis over the
# mesh's batch axes (:func:`prefjax.sharding.batch_axes`), and the KV cache's head axis as the sharding rules
# split ``kv_heads`` (a tensor axis: each device keeps the keys and values of the heads it computes), every
# other axis replicated. The same concrete shardings are given to the arrays placed before the run and to
# every compiled piece's outputs, so a donated input and the output that replaces it always match
# (donation aliases, no copies).

def _row_shardings(tree, mesh, *, state: bool, kv: tuple[str, ...] = (), split_rows: bool = True):
    """One :class:`jax.sharding.NamedSharding` per leaf of ``tree`` splitting its row axis over
    ``mesh``'s batch axes (None without a mesh). ``state``: ``tree`` is a decode state (``valid`` and
    :class:`PerLayer` leaves have rows first, other leaves are layer-stacked ``[layers, rows, ...]``);
    otherwise every leaf has rows first (the rowvars). ``kv``: the state's KV-cache leaves
    (``family.state_layout.slot_leaves``, laid out ``[rows, slots, kv heads, head dim]`` after any layer
    axis), whose head axis is split too where the head count divides. ``split_rows=False``: the same
    with every row on every device (the head split kept)."""
    if mesh is None:
        return None
    from jax.sharding import NamedSharding, PartitionSpec as P
    rows = (batch_axes(mesh) or None) if split_rows else None

    def spec(a, axis, heads=False):
        if heads:
            logical = [None] * axis + ["batch", None, "kv_heads"] + [None] * (a.ndim - axis - 3)
            part = list(spec_for(a.shape, logical, mesh))
            part[axis] = rows  # the engine's rows always split (checked at construction)
            return NamedSharding(mesh, P(*part))
        return NamedSharding(mesh, P(*([None] * axis + [rows] + [None] * (a.ndim - axis - 1))))

    if not state:
        return jax.tree_util.tree_map(lambda a: spec(a, 0), tree)
    out = {}
    for name, leaf in tree.items():
        if isinstance(leaf, PerLayer):
            out[name] = PerLayer(spec(a, 0, name in kv) for a in leaf)
        else:
            out[name] = spec(leaf, 0 if name == "valid" else 1, name in kv)
    return out


def _constrain(tree, mesh, *, state: bool, kv: tuple[str, ...] = ()):
    """``tree`` under its :func:`_row_shardings` inside a compiled piece (unchanged without a mesh)."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, _row_shardings(tree, mesh, state=state, kv=kv))


# --------------------------------------------------------------------------------------------
# Compiled pieces.

_STATIC = ("family", "cfg", "greedy", "top_k", "use_top_p", "unroll", "mesh")


@functools.partial(jax.jit, static_argnames=_STATIC + ("dtype",))
def _prefill(params, prefix_state, toks_NxP, valid_NxP, s_layer_N, s_unit_NxD, s_w_NxP, *, family, cfg, greedy,
             top_k, use_top_p, unroll, mesh, dtype):
    """Prefill ``N`` prompts (after the shared ``prefix_state`` when given: its slots come first)."""
    fam = family
    n, p = toks_NxP.shape
    if prefix_state is None:  # (no shared prefix under a mesh)
        state, start = _constrain(fam.init_state(cfg, n, p, dtype), mesh, state=True,
                                  kv=fam.state_layout.slot_leaves), 0
    else:
        state = extend_kv_state(prefix_state, jnp.zeros((n,), jnp.int32), p)
        start = prefix_state["valid"].shape[1]
    iv = _steer_partial(s_layer_N, s_unit_NxD, s_w_NxP)
    logits, _, _, state = fam.forward(cfg, params, toks_NxP, valid_NxP, capture=CaptureSpec(),
                                      pos_BxK=jnp.full((n, 1), p - 1, jnp.int32), intervene=iv, state=state,
                                      start=start, is_prompt=True, unroll=unroll)
    return logits[:, 0], state


def _write_rows(big, small, dst_R, src_R, cols, *, slot_leaves: tuple[str, ...], mesh):
    """The state leaves ``big`` (``{name: [B, ...] or [L, B, ...] or PerLayer}``) with rows ``dst_R`` taken from
    rows ``src_R`` of the prefill's leaves ``small`` (same names and layout, ``N`` rows): KV slot leaves at
    the contiguous columns ``cols`` (the rest of the row kept: :func:`_insert` masks it), per-row leaves whole.

    Per-row leaves (recurrent state) are written one row at a time in a loop: a scatter needs its updates
    whole, ``len(dst_R)`` rows of state (64 rows of Qwen-3.5-122B's recurrent state: 9.47 GiB, which ran out
    of memory on an H200 next to the weights; BUILD_NOTES.md). KV slot leaves keep one scatter (their
    updates are the prompt's columns only). Under a mesh each device writes only the rows it holds
    (``shard_map``), the prefill rows gathered to every device, each keeping its own KV heads."""

    def write(name, b, s, dst, n_local):
        layered = isinstance(b, PerLayer)
        if name in slot_leaves:
            def put(bb, ss):  # one layer: bb [B, S, ...], ss [N, P, ...]
                return bb.at[dst[:, None], cols[None, :]].set(ss[src_R].astype(bb.dtype), mode="drop")
            return PerLayer(put(b[l], s[l]) for l in range(len(b))) if layered else jax.vmap(put)(b, s)
        # per-row leaf: rows on axis 0 of each layer's array (PerLayer) or axis 1 (stacked [L, B, ...])
        leaves, small_leaves, axis = ((tuple(b.items), tuple(s[l] for l in range(len(b))), 0) if layered
                                      else ((b,), (s,), 1))

        def body(j, arrays):
            here = dst[j] < n_local  # out of range: a row another device holds
            d = jnp.minimum(dst[j], n_local - 1)
            out = []
            for bb, ss in zip(arrays, small_leaves):
                row = jax.lax.dynamic_index_in_dim(ss, src_R[j], axis, keepdims=True).astype(bb.dtype)
                old = jax.lax.dynamic_slice_in_dim(bb, d, 1, axis)
                out.append(jax.lax.dynamic_update_slice_in_dim(bb, jnp.where(here, row, old), d, axis))
            return tuple(out)

        leaves = jax.lax.fori_loop(0, dst.shape[0], body, leaves)
        return PerLayer(leaves) if layered else leaves[0]

    def rows_of(leaf):  # rows held here: layer 0 of a PerLayer or stacked leaf
        return leaf[0].shape[0]

    rows = () if mesh is None else batch_axes(mesh)
    if not rows:  # one device, or rows on every device: nothing to split
        return {n: write(n, big[n], small[n], dst_R, rows_of(big[n])) for n in big}
    from jax.sharding import PartitionSpec as P

    def specs(tree, split_rows):
        return jax.tree_util.tree_map(lambda sh: sh.spec, _row_shardings(tree, mesh, state=True, kv=slot_leaves,
                                                                         split_rows=split_rows))

    def local(big, small, dst_R):
        out = {}
        for n in big:
            b_loc = rows_of(big[n])
            here = dst_R - jax.lax.axis_index(rows) * b_loc
            here = jnp.where((here >= 0) & (here < b_loc), here, b_loc)  # other devices' rows: dropped
            out[n] = write(n, big[n], small[n], here, b_loc)
        return out

    big_specs = specs(big, True)
    small_specs = specs(small, False)  # the prefill rows whole on every device, split by KV heads as the cache is
    return jax.shard_map(local, mesh=mesh, in_specs=(big_specs, small_specs, P()), out_specs=big_specs,
                         check_vma=False)(big, small, dst_R)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnums=(0, 1))
def _insert(state, rowvars, pre_state, logits_NxV, src_R, dst_R, t, keys_R, s_layer_R, s_unit_RxD, s_gen_R,
            temperature, top_p, *, family, cfg, greedy, top_k, use_top_p, unroll, mesh):
    """Write prefill rows ``src_R`` into cache rows ``dst_R``: KV slot leaves at columns ``[t - P, t)``
    (the rest of those rows emptied), per-row recurrent leaves whole (``family.state_layout``); sample each
    row's first token, and set its per-row variables."""
    p = pre_state["valid"].shape[1]
    cols = t - p + jnp.arange(p, dtype=jnp.int32)
    layout = family.state_layout
    names = tuple(layout.slot_leaves) + tuple(layout.row_leaves)
    new = _write_rows({n: state[n] for n in names}, {n: pre_state[n] for n in names}, dst_R, src_R, cols,
                      slot_leaves=tuple(layout.slot_leaves), mesh=mesh)
    valid = state["valid"].at[dst_R].set(False)
    new["valid"] = valid.at[dst_R[:, None], cols[None, :]].set(pre_state["valid"][src_R])
    tok0 = sample_tokens(logits_NxV[src_R], keys_R, 0, temperature, top_p, greedy=greedy, top_k=top_k,
                         use_top_p=use_top_p)
    rv = dict(rowvars)
    rv["prev"] = rv["prev"].at[dst_R].set(tok0)
    rv["step"] = rv["step"].at[dst_R].set(1)
    rv["keys"] = rv["keys"].at[dst_R].set(keys_R)
    rv["layer"] = rv["layer"].at[dst_R].set(s_layer_R)
    rv["unit"] = rv["unit"].at[dst_R].set(s_unit_RxD)
    rv["gen"] = rv["gen"].at[dst_R].set(s_gen_R)
    return (_constrain(new, mesh, state=True, kv=layout.slot_leaves), _constrain(rv, mesh, state=False),
            tok0)


@functools.partial(jax.jit, static_argnames=_STATIC + ("capture",), donate_argnums=(1, 2))
def _step(params, state, rowvars, active_B, t, temperature, top_p, *, family, cfg, greedy, top_k,
          use_top_p, unroll, mesh, capture=CaptureSpec()):
    """One decode step of every row at column ``t``; returns the new tokens (also kept as ``prev``).
    With a non-empty ``capture``, also records its hooks into the rows' capture slots (:func:`_record`)."""
    fam = family
    iv = _steer_partial(rowvars["layer"], rowvars["unit"], rowvars["gen"][:, None])
    logits, captured, _, state = fam.forward(cfg, params, rowvars["prev"][:, None], active_B[:, None],
                                             capture=capture, intervene=iv, state=state, start=t,
                                             is_prompt=False, unroll=unroll)
    tok = sample_tokens(logits[:, 0], rowvars["keys"], rowvars["step"], temperature, top_p, greedy=greedy,
                        top_k=top_k, use_top_p=use_top_p)
    rv = dict(rowvars)
    if capture:
        rv["cap"] = _record(rowvars, captured, capture, active_B)
    rv["prev"], rv["step"] = tok, rowvars["step"] + 1
    return (_constrain(state, mesh, state=True, kv=fam.state_layout.slot_leaves), _constrain(rv, mesh, state=False),
            tok)


# --------------------------------------------------------------------------------------------
# Decode-time capture (rowvars "cap_slot" [B, M] int32: generated-token index -> capture slot or -1;
# "cap" [B, C, H, D] float32: the captured hooks per slot). Present only when a request captures.

def _record(rowvars, captured, capture: CaptureSpec, active_B):
    """The capture buffer with this step's hooks written at each active row's slot for its input token
    (generated token ``step - 1``), where that token's step was asked for; other rows unchanged."""
    buf, table = rowvars["cap"], rowvars["cap_slot"]
    b, m = table.shape
    vals = jnp.stack([captured[n][:, 0].astype(jnp.float32) for n in capture.names], axis=1)  # [B, H, D]
    s = rowvars["step"] - 1
    slot = jnp.take_along_axis(table, jnp.clip(s, 0, m - 1)[:, None], axis=1)[:, 0]
    hit = active_B & (s >= 0) & (s < m) & (slot >= 0)
    idx = jnp.where(hit, slot, buf.shape[1])  # out of range: dropped
    return buf.at[jnp.arange(b), idx].set(vals, mode="drop")


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnums=(0,))
def _set_capture_rows(rowvars, dst_R, table_RxM, *, mesh):
    """Give admitted rows ``dst_R`` their ``step -> slot`` tables and NaN capture slots."""
    rv = dict(rowvars)
    rv["cap_slot"] = rv["cap_slot"].at[dst_R].set(table_RxM)
    rv["cap"] = rv["cap"].at[dst_R].set(jnp.nan)
    return _constrain(rv, mesh, state=False)


# --------------------------------------------------------------------------------------------
# Host side.

def _bucket(n: int, m: int) -> int:
    return -(-n // m) * m


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@dataclasses.dataclass
class _Checked:
    prompt: list[int]
    max_new: int
    n_samples: int
    sample_ids: list[int]
    layer: int            # -1: unsteered
    unit: np.ndarray      # [D] float32
    w_prompt: np.ndarray  # [len(prompt)] float32, coef * scale * weight
    w_gen: float


@dataclasses.dataclass
class _CapturePlan:
    """A run's validated captures: what the step records and where each request's steps go."""

    spec: CaptureSpec                # the union of the run's hooks (static in the step)
    hooks: list[tuple[str, ...]]     # per request: its hooks (() when it captures nothing)
    steps: list[tuple[int, ...]]     # per request: its steps, ascending; step steps[j] goes to slot j
    table_len: int                   # M: the step -> slot tables' width (the largest max_new_tokens)
    slots: int                       # C: capture slots per row (the most steps a request asks for)

    def table(self, i: int) -> np.ndarray:
        """Request ``i``'s ``step -> slot`` table [M] (-1: not captured)."""
        t = np.full((self.table_len,), -1, np.int32)
        t[list(self.steps[i])] = np.arange(len(self.steps[i]), dtype=np.int32)
        return t

    def extra_step(self, i: int, max_new: int) -> int:
        """1 when request ``i`` captures its last token (one decode step past its budget), else 0."""
        return int(bool(self.steps[i]) and self.steps[i][-1] == max_new - 1)


def _check_rows(model, rows: int) -> int:
    """The number of devices the mesh's batch axes split rows over; an error when ``rows`` does not split."""
    split = batch_multiple(model.mesh)
    if rows % split:
        raise EngineError(f"rows={rows} does not split over mesh {dict(model.mesh.shape)}: its batch axes "
                          f"{batch_axes(model.mesh)} have {split} devices together; use a multiple of {split}")
    return split


class Engine:
    """Continuous batching over ``rows`` cache rows of ``cache_len`` slots (see the module docstring).

    ``temperature=0`` is greedy; ``top_k``/``top_p`` as in :func:`prefjax.generation.generate`.
    ``stop_ids`` default: :func:`prefjax.generation.default_stop_ids`. ``cache_len`` default: the
    longest prompt's bucket plus four times the largest ``max_new_tokens`` of the run, on GPUs rounded up
    to a multiple of 64 (tiles of :mod:`prefjax.models.decode_pallas`; unused slots are masked and skipped).
    ``prompt_bucket``: the longest prompt is rounded up to a multiple of this; every prefill runs
    ``prefill_rows`` distinct requests at that width, so a run compiles one prefill program, one
    decode step and a few row writers (one per power-of-two count of admitted rows).
    ``unroll`` (default :func:`prefjax.model.auto_unroll`) is the decode step's layer loop;
    ``prefill_unroll`` the prefills' (default: scanned; unrolled when the model's block weights are split
    per layer, :meth:`prefjax.model.Model.split_layers`, whose layer loops always unroll). A scanned prefill compiles one layer instead of all of them (with stacked weights
    the warm-up of a Gemma-3-27B workload spent 510 s compiling unrolled prefills and the step on an H200);
    prefill is compute-bound, so the per-layer weight copy a scan makes on GPUs is a small share of it.
    ``share_prefix``: prefill the prompt prefix every request shares once per run (module docstring);
    no effect for families with per-row recurrent state (Qwen-3.5) or under a mesh, where prompts are
    prefilled whole. Under a mesh ``rows`` must split over its batch axes (:func:`mesh_rows`).
    ``lookahead``: launch the first step of the next chunk before reading a chunk's tokens (module
    docstring); tokens are the same either way, only when rows are refilled moves by a step.
    ``bucket_shapes``: for an engine reused over many runs (the rounds and personas of an elicitation), the
    compiled shapes come from a fixed set: the prompt width past the shared prefix is a
    :func:`width_bucket` (at least ``prompt_bucket``); the shared prefix is left-padded to a power of two of
    at least 16 slots, or to the width :meth:`reserve` set (cut to it when longer: any split point is exact,
    the rest joins the tails), so prompts whose shared prefixes differ (personas' system prompts) run the
    same programs; the default cache length is :func:`bucketed_cache_len`, at least what :meth:`reserve`
    set, and never shrinks below the largest this engine has run. A run then compiles one decode step per
    cache length, one prefill per prompt width and a few row writers, and a later run with the same
    buckets compiles nothing (jit's cache). Without it (default) the widths are those described above, the
    exact fit of each run.
    Raises :class:`EngineError` for a model it cannot serve (:func:`engine_refusal`) or rows that do not
    split.
    """

    def __init__(self, model, *, rows: int = 8, cache_len: int | None = None, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_ids=None, sync_every: int = 8,
                 prompt_bucket: int = 16, prefill_rows: int = 8, unroll: bool | None = None,
                 prefill_unroll: bool | None = None, share_prefix: bool = True, lookahead: bool = True,
                 bucket_shapes: bool = False):
        why = engine_refusal(model)
        if why is not None:
            raise EngineError(f"model {model.source!r}: {why}")
        for name, v in (("rows", rows), ("sync_every", sync_every), ("prompt_bucket", prompt_bucket),
                        ("prefill_rows", prefill_rows)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise EngineError(f"{name} must be a positive int, got {v!r}")
        if not (float(temperature) >= 0 and np.isfinite(temperature)):
            raise EngineError(f"temperature must be >= 0, got {temperature}")
        if not 0 < float(top_p) <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {top_p}")
        split = _check_rows(model, rows)
        prefill_rows = _bucket(prefill_rows, split)  # as generate rounds its batch: the extra rows are empty
        self.model = model
        self.rows, self.cache_len = int(rows), cache_len
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k)
        self.seed, self.sync_every, self.prompt_bucket = int(seed), int(sync_every), int(prompt_bucket)
        self.prefill_rows = int(prefill_rows)
        self.share_prefix = bool(share_prefix)
        self.lookahead = bool(lookahead)
        self.bucket_shapes = bool(bucket_shapes)
        self._cache_floor = 0  # bucket_shapes: the largest default cache this engine has run (never shrinks)
        self._prefix_floor = 0  # bucket_shapes: the reserved slot width of a shared prefix (0: none reserved)
        self.stop_ids = default_stop_ids(model) if stop_ids is None else tuple(int(s) for s in stop_ids)
        self.unroll = auto_unroll() if unroll is None else bool(unroll)
        self.prefill_unroll = is_split(model.params) if prefill_unroll is None else bool(prefill_unroll)
        self.stats = EngineStats()

    # ---- validation ------------------------------------------------------------------------
    def _check(self, requests) -> list[_Checked]:
        cfg = self.model.config
        out, next_id = [], 0
        if not len(requests):
            raise EngineError("no requests")
        for i, r in enumerate(requests):
            where = f"request {i}"
            if not isinstance(r, Request):
                raise EngineError(f"{where}: expected a Request, got {type(r).__name__}")
            ids = [int(t) for t in np.asarray(r.prompt).reshape(-1)]
            if not ids:
                raise EngineError(f"{where}: empty prompt")
            bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
            if bad:
                raise EngineError(f"{where}: token id {bad[0]} outside the vocabulary of size {cfg.vocab_size}")
            for name, v in (("max_new_tokens", r.max_new_tokens), ("n_samples", r.n_samples)):
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                    raise EngineError(f"{where}: {name} must be a positive int, got {v!r}")
            if r.sample_ids is not None:
                if r.example_id is not None:
                    raise EngineError(f"{where}: pass example_id or sample_ids, not both")
                sids = [int(v) for v in np.asarray(r.sample_ids).reshape(-1)]
                if len(sids) != r.n_samples:
                    raise EngineError(f"{where}: {len(sids)} sample_ids for n_samples={r.n_samples}")
                if any(not 0 <= v < 2 ** 31 for v in sids):
                    raise EngineError(f"{where}: a sample id outside [0, 2**31): {sids}")
            else:
                eid = next_id if r.example_id is None else int(r.example_id)
                if eid < 0 or eid + r.n_samples > 2 ** 31:
                    raise EngineError(f"{where}: example_id {eid} outside the int32 range")
                next_id = eid + r.n_samples
                sids = list(range(eid, eid + r.n_samples))
            layer, unit, w_p, w_g = -1, np.zeros(cfg.d_model, np.float32), np.zeros(len(ids), np.float32), 0.0
            if r.steer is not None:
                layer, unit, w_p, w_g = self._check_steer(r.steer, len(ids), where)
            out.append(_Checked(ids, int(r.max_new_tokens), int(r.n_samples), sids, layer, unit, w_p, w_g))
        lp, lw = self._shared_prefix(out)
        p0 = lw + self._width(max(len(c.prompt) for c in out) - lp)
        max_new = max(c.max_new for c in out)
        if self.cache_len:
            cache = int(self.cache_len)
        elif self.bucket_shapes:  # a fixed set of cache lengths, and never a smaller one than before
            cache = max(self._cache_floor, bucketed_cache_len(p0, max_new))
        else:  # on GPUs rounded up to 64 slots: the decode kernel tiles the slots by powers of two
            # (elsewhere XLA's attention reads every slot, so no padding)
            cache = _bucket(p0 + 4 * max_new, 64 if jax.default_backend() == "gpu" else 1)
        limit = int(getattr(cfg, "max_position_embeddings", 1 << 62))
        for i, c in enumerate(out):  # the request that is too long on its own first
            own = lw + self._width(len(c.prompt) - lp) + c.max_new
            if own > cache:
                raise EngineError(f"request {i}: prompt of {len(c.prompt)} tokens plus max_new_tokens={c.max_new} "
                                  f"needs {own} cache slots; the engine's cache has {cache}")
        for i, c in enumerate(out):
            if p0 + c.max_new > cache:
                raise EngineError(f"request {i}: max_new_tokens={c.max_new} after the prompt width {p0} (the "
                                  f"longest prompt, bucketed) needs {p0 + c.max_new} cache slots; the engine's "
                                  f"cache has {cache}")
            if len(c.prompt) + c.max_new > limit:
                raise EngineError(f"request {i}: {len(c.prompt)} prompt tokens + {c.max_new} new exceed the "
                                  f"model's context of {limit}")
        self._p0, self._s, self._lp, self._lw = p0, int(cache), lp, lw
        return out

    @property
    def cache_floor(self) -> int:
        """With ``bucket_shapes`` (and no ``cache_len``): the smallest cache a run gets (the largest run so far
        or :meth:`reserve`); 0 before any."""
        return self._cache_floor

    @property
    def prefix_floor(self) -> int:
        """With ``bucket_shapes``: the slots a shared prefix is laid into (:meth:`reserve`); 0 before any."""
        return self._prefix_floor

    def cache_len_for(self, requests: Sequence[Request]) -> int:
        """The cache length (slots) a run of ``requests`` would get now, validated as :meth:`run` validates
        them (:class:`EngineError`); nothing is computed on the device and nothing kept."""
        self._check(requests)
        return self._s

    def shared_prefix_len(self, requests: Sequence[Request]) -> int:
        """The tokens of the prompt prefix a run of ``requests`` would prefill once and share (0: none; see
        ``share_prefix``), validated as :meth:`run` validates them; nothing is computed on the device."""
        self._check(requests)
        return self._lp

    def reserve(self, cache_len: int = 0, prefix_len: int = 0) -> None:
        """With ``bucket_shapes``: give every later run at least ``cache_len`` cache slots (bucketed up to a
        power of two), e.g. :meth:`cache_len_for` the longest requests a workload can make, so all its runs
        share one decode program; and lay any shared prefix into ``prefix_len`` slots (bucketed up to a
        power of two; a longer prefix is cut to it), e.g. the longest :meth:`shared_prefix_len` of the
        workload's prompt families (one per persona), so they all share the prefill programs. Reserve the
        prefix before asking :meth:`cache_len_for` (the prompt width includes it). An error on an engine with
        a fixed ``cache_len`` or without ``bucket_shapes`` (its shapes are fixed or fitted per run)."""
        if not self.bucket_shapes or self.cache_len:
            raise EngineError("reserve() needs an engine with bucket_shapes=True and no fixed cache_len")
        if cache_len:
            self._cache_floor = max(self._cache_floor, pow2_bucket(int(cache_len), 64))
        if prefix_len:
            self._prefix_floor = max(self._prefix_floor, pow2_bucket(int(prefix_len), 16))

    def _width(self, n: int) -> int:
        """The prefill width of ``n`` prompt tokens (past the shared prefix): a multiple of
        ``prompt_bucket``, or with ``bucket_shapes`` a :func:`width_bucket` of at least ``prompt_bucket``."""
        if self.bucket_shapes:
            return width_bucket(n, self.prompt_bucket)
        return _bucket(n, self.prompt_bucket)

    def _shared_prefix(self, reqs: list[_Checked]) -> tuple[int, int]:
        """``(tokens, slots)`` of the prompt prefix every request shares (the chat header, a persona's system
        prompt, a template's instructions), prefilled once per run: its length, and the slots it takes
        (the same, or with ``bucket_shapes`` a fixed width it is left-padded to: the reserved one, or a power
        of two; a prefix longer than the reserved width is cut to it). ``(0, 0)`` when there is none worth it
        (< 8 tokens), when a request steers a token inside it, when the padding left between it and a
        shorter prompt's tail could reach into a sliding window (the window counts slots), when the family
        keeps per-row recurrent state, or under a mesh."""
        if not self.share_prefix or len(reqs) < 2 or self.model.family.state_layout.row_leaves:
            return 0, 0  # a recurrent state is not a prefix cache (module docstring)
        if self.model.mesh is not None:
            return 0, 0  # Model.prefill keeps prefix caches on one device only (Model.prefix_ok)
        nz = [np.flatnonzero(c.w_prompt) for c in reqs]
        limit = min(int(z[0]) if len(z) else len(c.prompt) for z, c in zip(nz, reqs))
        lp = common_prefix_len([c.prompt for c in reqs], limit=limit)
        if not lp:
            return 0, 0
        lw = lp
        if self.bucket_shapes:  # padding in front of the prefix: no slot between real tokens
            lp = min(lp, self._prefix_floor) if self._prefix_floor else lp
            lw = self._prefix_floor or pow2_bucket(lp, 16)
        span = lw + self._width(max(len(c.prompt) for c in reqs) - lp) + max(c.max_new for c in reqs)
        n0 = len(reqs[0].prompt) - lp
        gap_free = len({len(c.prompt) for c in reqs}) == 1 and self._width(n0) == n0
        return (lp, lw) if gap_free or self.model.fits_window(span) else (0, 0)

    def _check_captures(self, requests, reqs: list[_Checked]) -> _CapturePlan | None:
        """Validate every request's :class:`RowCapture` (hooks, steps) on the host; None when no request
        captures (the run then compiles exactly the uncaptured programs)."""
        n_layers = self.model.config.n_layers
        hooks, steps = [], []
        for i, (r, c) in enumerate(zip(requests, reqs)):
            where = f"request {i}: capture"
            cap = r.capture
            if cap is None:
                hooks.append(())
                steps.append(())
                continue
            if not isinstance(cap, RowCapture):
                raise EngineError(f"request {i}: capture must be a RowCapture, got {type(cap).__name__}")
            hs = (cap.hooks,) if isinstance(cap.hooks, str) else tuple(cap.hooks)
            if not hs:
                raise EngineError(f"{where}: no hooks")
            for h in hs:
                if not isinstance(h, str):
                    raise EngineError(f"{where}: hook {h!r} is not a string")
                try:
                    parse_hook(h, n_layers)
                except HookError as e:
                    raise EngineError(f"{where}: {e}") from None
            if len(set(hs)) != len(hs):
                raise EngineError(f"{where}: duplicate hooks in {hs}")
            ss = list(np.asarray(cap.steps, dtype=object).reshape(-1))
            if not ss:
                raise EngineError(f"{where}: no steps")
            for s in ss:
                if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
                    raise EngineError(f"{where}: step {s!r} is not an int")
                if not 0 <= int(s) < c.max_new:
                    raise EngineError(f"{where}: step {int(s)} is outside [0, max_new_tokens={c.max_new})")
            ss = [int(s) for s in ss]
            if len(set(ss)) != len(ss):
                dup = next(s for s in ss if ss.count(s) > 1)
                raise EngineError(f"{where}: step {dup} is asked for twice")
            hooks.append(hs)
            steps.append(tuple(sorted(ss)))
        if not any(hooks):
            return None
        union = list(dict.fromkeys(h for hs in hooks for h in hs))
        return _CapturePlan(CaptureSpec.from_names(union, n_layers), hooks, steps,
                            table_len=max(c.max_new for c in reqs), slots=max(len(s) for s in steps))

    def _check_steer(self, s: RowSteer, n: int, where: str):
        cfg = self.model.config
        if not isinstance(s, RowSteer):
            raise EngineError(f"{where}: steer must be a RowSteer, got {type(s).__name__}")
        if isinstance(s.layer, bool) or not isinstance(s.layer, (int, np.integer)):
            raise EngineError(f"{where}: steering layer {s.layer!r} is not an int")
        if not 0 <= int(s.layer) < cfg.n_layers:
            raise EngineError(f"{where}: steering layer {int(s.layer)} does not exist (layers 0..{cfg.n_layers - 1})")
        try:
            unit = unit_direction(s.direction, cfg.d_model, f"{where}: steering")
        except ValueError as e:
            raise EngineError(str(e)) from None
        c = float(s.coef) * float(s.scale)
        if not np.isfinite(c):
            raise EngineError(f"{where}: steering coef * scale is {c}")
        tok = s.tokens
        gen = 0.0
        if isinstance(tok, str):
            if tok not in ("all", "prompt", "generated"):
                raise EngineError(f"{where}: steering tokens={tok!r}; expected 'all', 'prompt', 'generated', "
                                  "a (start, end) span or a per-token mask")
            m = np.full(n, 0.0 if tok == "generated" else 1.0, np.float32)
            gen = 0.0 if tok == "prompt" else 1.0
        elif isinstance(tok, tuple) and len(tok) == 2 and all(isinstance(v, (int, np.integer)) for v in tok):
            lo, hi = int(tok[0]), int(tok[1])
            if not 0 <= lo < hi <= n:
                raise EngineError(f"{where}: steering span ({lo}, {hi}) is outside its prompt of {n} tokens")
            m = np.zeros(n, np.float32)
            m[lo:hi] = 1.0
        else:
            m = np.asarray(tok, np.float32).reshape(-1) if np.ndim(tok) else None
            if m is None or m.shape[0] != n:
                raise EngineError(f"{where}: steering mask has {0 if m is None else m.shape[0]} weights for a "
                                  f"prompt of {n} tokens")
            if not np.all(np.isfinite(m)):
                raise EngineError(f"{where}: steering mask contains NaN or inf")
        coef = np.float32(c)
        return int(s.layer), unit, (coef * m).astype(np.float32), float(coef * np.float32(gen))

    # ---- the run ---------------------------------------------------------------------------
    def run(self, requests: Sequence[Request], on_done: Callable[[int, list[Sample]], None] | None = None,
            *, model=None) -> list[list[Sample]]:
        """Decode every request; returns, per request, its ``n_samples`` :class:`Sample` in order.

        ``on_done(i, samples)`` is called on the host as soon as every sample of request ``i`` has
        finished (e.g. to commit results while the run goes on), its samples' captures filled in.

        ``model``: run with this model's weights instead of the engine's, e.g. the engine's model with a
        persona's LoRA adapter attached (:meth:`prefjax.model.Model.with_adapter`), so one engine serves
        every persona. It must have the engine model's family, config, dtype, mesh and weight layout
        (checked: :class:`EngineError` naming the field). The weights are a jit argument, so the compiled
        programs are shared wherever their pytree is the same: an on-the-fly adapter adds its factors to
        the pytree, which compiles the programs once more per adapter shape (rank, targets), not per
        adapter; merged adapters change only values."""
        run_model = self.model if model is None else self._same_layout(model)
        with mesh_context(self.model.mesh):  # traces see the mesh (Qwen-3.5 runs its experts expert-parallel)
            return self._run(requests, on_done, run_model)

    def _same_layout(self, model):
        """``model`` if its programs are this engine's (same family, config, dtype, mesh, weight layout)."""
        mine = self.model
        for what, a, b in (("family", model.family.name, mine.family.name), ("config", model.config, mine.config),
                           ("dtype", model.dtype, mine.dtype), ("mesh", model.mesh, mine.mesh),
                           ("split layers", is_split(model.params), is_split(mine.params))):
            if a != b:
                raise EngineError(f"run(model=...): the model's {what} ({a!r}) is not the engine's ({b!r}); "
                                  f"build an engine for it")
        return model

    def _run(self, requests, on_done, model):
        reqs = self._check(requests)
        if self.bucket_shapes and not self.cache_len:
            self._cache_floor = self._s  # the cache never shrinks: later runs reuse this decode program
        plan = self._check_captures(requests, reqs)
        B, S = self.rows, self._s
        static = self._static()
        temp, top_p = self._sampling()
        params = model.run_params()
        root = jax.random.PRNGKey(self.seed)
        stops = set(self.stop_ids)
        self.stats = stats = EngineStats()

        state, rowvars = self._empty_rows(B, S, plan)
        capture = CaptureSpec() if plan is None else plan.spec
        queue = [(i, s) for i, c in enumerate(reqs) for s in range(c.n_samples)]
        qpos = 0
        results: list[list[Sample | None]] = [[None] * c.n_samples for c in reqs]
        slot: list[tuple[int, int] | None] = [None] * B
        toks: list[list[int]] = [[] for _ in range(B)]
        t = self._p0
        prefix = None
        t_run = time.perf_counter()
        if self._lp:  # left-padded to its slots (bucket_shapes): the same programs for every prefix length
            ids, valid = left_pad([reqs[0].prompt[:self._lp]], int(model.config.pad_id), width=self._lw)
            prefix = model.prefill(ids, attention_mask=valid, unroll=self.prefill_unroll).state
            stats.prefix_tokens = self._lp
            jax.block_until_ready(prefix)
            stats.admit_seconds += time.perf_counter() - t_run

        left = [c.n_samples for c in reqs]
        ran = [0] * B             # decode steps dispatched for each row since its admission
        occ = [0] * B             # admissions into each row so far: tells a step's tokens for its occupant then
        ahead: list[tuple[Any, tuple[int, ...]]] = []  # dispatched steps not read yet: (tokens, occ at dispatch)
        draining = [False] * B    # budget reached; one more decode step for its last capture step
        pending: list[tuple[int, int, Sample]] = []  # finished rows whose captures are still on device

        def done(i):
            left[i] -= 1
            if left[i] == 0 and on_done is not None:
                on_done(i, list(results[i]))

        def finish(b, fin):
            i, s = slot[b]
            results[i][s] = sample = Sample(token_ids=list(toks[b]), finished=fin)
            stats.generated_tokens += len(toks[b]) + (1 if fin else 0)
            slot[b], draining[b] = None, False
            if plan is not None and plan.steps[i]:
                pending.append((b, i, sample))  # completed (and reported) by flush()
            else:
                done(i)

        def flush():  # read the finished rows' captures (one transfer) before their rows are reused
            if pending:
                self._read_captures(plan, rowvars["cap"], pending)
                for _, i, _ in pending:
                    done(i)
                pending.clear()

        def settle(b, new):  # append new tokens to row b until a stop or its budget
            i, _ = slot[b]
            if draining[b]:
                if ran[b] >= reqs[i].max_new:
                    finish(b, False)
                return
            for tk in new:
                if tk in stops:
                    finish(b, True)
                    return
                toks[b].append(tk)
                if len(toks[b]) >= reqs[i].max_new:
                    if plan is not None and plan.extra_step(i, reqs[i].max_new) and ran[b] < reqs[i].max_new:
                        draining[b] = True
                    else:
                        finish(b, False)
                    return

        def steps_left(b):  # decode steps row b still needs (without a stop)
            i, _ = slot[b]
            extra = 0 if plan is None else plan.extra_step(i, reqs[i].max_new)
            return reqs[i].max_new - 1 + extra - ran[b]

        def dispatch(k, active, live):  # k decode steps of every row; their tokens read later (``ahead``)
            nonlocal state, rowvars, t
            for _ in range(k):
                state, rowvars, tok = _step(params, state, rowvars, active, jnp.int32(t), temp, top_p,
                                            capture=capture, **static)
                ahead.append((tok, tuple(occ)))
                t += 1
            for b in live:
                ran[b] += k
            stats.decode_steps += k

        while qpos < len(queue) or any(s is not None for s in slot):
            # admit into free rows
            free = [b for b in range(B) if slot[b] is None]
            admit = []
            while free and qpos < len(queue) and t + reqs[queue[qpos][0]].max_new <= S:
                admit.append((free.pop(0), queue[qpos]))
                qpos += 1
            while admit:  # prefill chunks of at most ``prefill_rows`` distinct requests
                uniq = list(dict.fromkeys(i for _, (i, _) in admit))[:self.prefill_rows]
                part = [a for a in admit if a[1][0] in uniq]
                admit = [a for a in admit if a[1][0] not in uniq]
                t_admit = time.perf_counter()
                state, rowvars, tok0 = self._admit(params, prefix, state, rowvars, part, reqs, t, root, temp, top_p,
                                                   static)  # synchronous: returns the first tokens on the host
                stats.admit_seconds += time.perf_counter() - t_admit
                if plan is not None:
                    rowvars = self._admit_captures(plan, rowvars, part)
                for (b, (i, s)), tk in zip(part, tok0):
                    slot[b], toks[b], ran[b] = (i, s), [], 0
                    occ[b] += 1
                    settle(b, [int(tk)])
            flush()
            live = [b for b in range(B) if slot[b] is not None]
            if not live:
                if qpos < len(queue):  # nothing fits before the cache's end: start a new wave
                    t = self._p0
                    stats.waves += 1
                continue
            n = max(0, min(self.sync_every, S - t, max(steps_left(b) for b in live)))  # 0: only read what is ahead
            t_decode = time.perf_counter()
            active = self._put(np.array([slot[b] is not None for b in range(B)]))
            dispatch(n, active, live)
            # one step of the next chunk before reading this one: the device runs it while the host reads,
            # settles and launches the next chunk (without it the device idles ~10 ms after every read at the
            # Gemma-3-27B shape; BUILD_NOTES.md). Rows that stopped in this chunk run it too, and are refilled
            # one step later. Not with captures: a stopped row's extra step would record into its slots.
            early = int(self.lookahead and plan is None and t < S and any(steps_left(b) > 0 for b in live))
            dispatch(early, active, live)
            stats.lookahead_steps += early
            chunk, ahead = ahead[:len(ahead) - early], ahead[len(ahead) - early:]
            if not chunk:
                raise RuntimeError("engine: live rows with no decode step left and no token to read")
            got = np.stack(jax.device_get([tok for tok, _ in chunk]))  # [steps, B]
            stats.syncs += 1
            stats.decode_seconds += time.perf_counter() - t_decode
            for b in live:  # each row's tokens from the steps it ran as its current occupant
                mine = [int(got[j, b]) for j, (_, seen) in enumerate(chunk) if seen[b] == occ[b]]
                if slot[b] is not None and mine:
                    settle(b, mine)
            flush()
        stats.run_seconds = time.perf_counter() - t_run
        return [list(r) for r in results]  # type: ignore[arg-type]

    def _static(self) -> dict:
        """The static arguments of the compiled pieces (:func:`_prefill`, :func:`_insert`, :func:`_step`) for
        this engine's settings; the same dict gives the same compiled programs."""
        greedy = self.temperature == 0.0
        return dict(family=self.model.family, cfg=self.model.config, greedy=greedy,
                    top_k=0 if greedy else self.top_k, use_top_p=(not greedy) and self.top_p < 1.0,
                    unroll=self.unroll, mesh=self.model.mesh)

    def _sampling(self):
        """The sampling scalars the compiled pieces take: ``(temperature, top_p)`` as float32 arrays."""
        return jnp.float32(max(self.temperature, 1e-30)), jnp.float32(self.top_p)

    def _empty_rows(self, rows: int, slots: int, plan: _CapturePlan | None = None):
        """An empty decode state of ``rows`` rows x ``slots`` columns (one buffer per layer where the step is
        unrolled) and its rowvars (with capture slots for ``plan``), placed as every compiled piece returns
        them (under a mesh: split along their row axis), so donated inputs alias their outputs."""
        model, cfg, B = self.model, self.model.config, int(rows)

        def make():
            state = per_layer_cache(model.family.init_state(cfg, B, int(slots), model.dtype), cfg.n_layers,
                                    self.unroll)
            rowvars = {"prev": jnp.zeros((B,), jnp.int32), "step": jnp.zeros((B,), jnp.int32),
                       "keys": jnp.zeros((B, 2), jnp.uint32), "layer": jnp.full((B,), -1, jnp.int32),
                       "unit": jnp.zeros((B, cfg.d_model), jnp.float32), "gen": jnp.zeros((B,), jnp.float32)}
            if plan is not None:
                rowvars["cap_slot"] = jnp.full((B, plan.table_len), -1, jnp.int32)
                rowvars["cap"] = jnp.zeros((B, plan.slots, len(plan.spec.names), cfg.d_model), jnp.float32)
            return state, rowvars

        mesh = model.mesh
        if mesh is None:
            return make()
        # made in place on every device: built whole on one device and then split, the state of 64 rows of
        # Qwen-3.5-122B (9.8 GB) did not fit next to that device's weights (BUILD_NOTES.md)
        state, rowvars = jax.eval_shape(make)
        shardings = (_row_shardings(state, mesh, state=True, kv=model.family.state_layout.slot_leaves),
                     _row_shardings(rowvars, mesh, state=False))
        return jax.jit(make, out_shardings=shardings)()

    def decode_step(self, rows: int | None = None, slots: int = 256, *, seed: int = 0) -> "DecodeStep":
        """This engine's compiled decode step at ``rows`` rows (default: the engine's) of ``slots`` cache
        columns, every row active with a random previous token and its own sampling key: what a benchmark
        times as "one decode step" (the step :meth:`run` dispatches, with the same static settings and, under
        a mesh, the same placement). See :class:`DecodeStep`."""
        rows = self.rows if rows is None else int(rows)
        if rows < 1:
            raise EngineError(f"rows must be a positive int, got {rows}")
        _check_rows(self.model, rows)
        with mesh_context(self.model.mesh):
            state, rowvars = self._empty_rows(rows, slots)
            rs = np.random.RandomState(seed)
            prev = rs.randint(0, self.model.config.vocab_size, size=rows).astype(np.int32)
            keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.PRNGKey(seed), jnp.arange(rows))
            # placed as run() places them (without a mesh: uncommitted), so jit finds run()'s program
            place = (lambda a, like: jnp.asarray(a)) if self.model.mesh is None else \
                (lambda a, like: jax.device_put(a, like.sharding))
            rowvars = {**rowvars, "prev": place(prev, rowvars["prev"]),
                       "keys": place(np.asarray(keys, np.uint32), rowvars["keys"])}
            temp, top_p = self._sampling()
            active = self._put(np.ones((rows,), bool))
        return DecodeStep(self.model.run_params(), state, rowvars, active, temp, top_p, self._static(),
                          self.model.mesh)

    def _admit(self, params, prefix, state, rowvars, admit, reqs, t, root, temp, top_p, static):
        """Prefill the distinct requests among ``admit`` ((row, (request, sample)) pairs) once each (past
        the shared ``prefix``, when there is one) and write them into their rows."""
        cfg, d = self.model.config, self.model.config.d_model
        uniq = list(dict.fromkeys(i for _, (i, _) in admit))
        lp = self._lp
        n, p = self.prefill_rows, self._p0 - self._lw  # one prefill program per run (the tails' width)
        toks, valid = left_pad([reqs[i].prompt[lp:] for i in uniq], int(cfg.pad_id), width=p, rows=n)
        lay = np.full((n,), -1, np.int32)
        unit = np.zeros((n, d), np.float32)
        w = np.zeros((n, p), np.float32)
        w[valid] = np.concatenate([np.asarray(reqs[i].w_prompt[lp:], np.float32) for i in uniq])
        for j, i in enumerate(uniq):
            lay[j], unit[j] = reqs[i].layer, reqs[i].unit
        put = self._put
        logits, pre = _prefill(params, prefix, put(toks), put(valid), put(lay), put(unit), put(w),
                               dtype=self.model.dtype, **dict(static, unroll=self.prefill_unroll))
        self.stats.prefills += 1
        r = max(_pow2(len(admit)), min(8, _pow2(self.rows)))  # few row-writer programs
        pad = admit + [admit[-1]] * (r - len(admit))  # repeated rows write the same values
        src = np.array([uniq.index(i) for _, (i, _) in pad], np.int32)
        dst = np.array([b for b, _ in pad], np.int32)
        eids = np.array([reqs[i].sample_ids[s] for _, (i, s) in pad], np.uint32)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(root, jnp.asarray(eids))
        s_lay = np.array([reqs[i].layer for _, (i, _) in pad], np.int32)
        s_unit = np.stack([reqs[i].unit for _, (i, _) in pad])
        s_gen = np.array([reqs[i].w_gen for _, (i, _) in pad], np.float32)
        state, rowvars, tok0 = _insert(state, rowvars, pre, logits, jnp.asarray(src), jnp.asarray(dst), jnp.int32(t),
                                       keys, jnp.asarray(s_lay), jnp.asarray(s_unit), jnp.asarray(s_gen), temp, top_p,
                                       **static)
        return state, rowvars, np.asarray(tok0)[:len(admit)]

    def _admit_captures(self, plan: _CapturePlan, rowvars, admit):
        """Set the capture tables of the rows in ``admit`` ((row, (request, sample)) pairs)."""
        r = max(_pow2(len(admit)), min(8, _pow2(self.rows)))  # few programs, as in _admit
        pad = admit + [admit[-1]] * (r - len(admit))
        dst = np.array([b for b, _ in pad], np.int32)
        table = np.stack([plan.table(i) for _, (i, _) in pad])
        return _set_capture_rows(rowvars, jnp.asarray(dst), jnp.asarray(table), mesh=self.model.mesh)

    def _put(self, a: np.ndarray):
        """A host array ``[rows, ...]`` on the device(s): split over the mesh's batch axes under a mesh,
        as :func:`prefjax.generation.generate` places its inputs."""
        mesh = self.model.mesh
        return jnp.asarray(a) if mesh is None else jax.device_put(a, batch_sharding(mesh, a.ndim, a.shape[0]))

    def _read_captures(self, plan: _CapturePlan, cap, pending) -> None:
        """Fill ``captures``/``capture_steps`` of the finished samples in ``pending`` ((row, request,
        sample) triples) from the capture buffer ``cap`` [B, C, H, D]: one transfer for all of them."""
        reached = [[s for s in plan.steps[i] if s < len(smp.token_ids)] for _, i, smp in pending]
        rows = [b for (b, _, _), got in zip(pending, reached) if got]
        if rows:
            idx = rows + [rows[-1]] * (_pow2(len(rows)) - len(rows))  # few gather programs
            host = np.asarray(cap[jnp.asarray(np.array(idx, np.int32))])
        d, k = self.model.config.d_model, 0
        for (b, i, smp), got in zip(pending, reached):
            col = {h: plan.spec.names.index(h) for h in plan.hooks[i]}
            if got:  # the requested steps are ascending, so the reached ones are the first slots
                smp.captures = {h: host[k, :len(got), j].copy() for h, j in col.items()}
                k += 1
            else:
                smp.captures = {h: np.zeros((0, d), np.float32) for h in col}
            smp.capture_steps = got


class DecodeStep:
    """One engine decode step with its own donated state (made by :meth:`Engine.decode_step`).

    ``step(t)`` runs the step at cache column ``t`` and returns the sampled tokens (an unsynchronised
    device array: time a run of calls and block on the last). ``compile(t)`` compiles the program ahead
    of time, without running anything (a benchmark can compile one row count in a thread while another
    runs); without it the first ``step`` compiles through jit's cache, where :meth:`Engine.run` finds the
    same program.
    """

    def __init__(self, params, state, rowvars, active, temperature, top_p, static: dict, mesh):
        self._params, self._state, self._rowvars, self._active = params, state, rowvars, active
        self._temp, self._top_p, self._static, self._mesh = temperature, top_p, static, mesh
        self._fn = functools.partial(_step, capture=CaptureSpec(), **static)  # through jit's cache

    def compile(self, t: int = 0) -> None:
        like = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)  # noqa: E731
        args = jax.tree_util.tree_map(like, (self._params, self._state, self._rowvars, self._active))
        with mesh_context(self._mesh):
            self._fn = _step.lower(*args, like(jnp.int32(t)), self._temp, self._top_p,
                                   capture=CaptureSpec(), **self._static).compile()

    def step(self, t: int):
        with mesh_context(self._mesh):
            self._state, self._rowvars, tok = self._fn(self._params, self._state, self._rowvars, self._active,
                                                       jnp.int32(t), self._temp, self._top_p)
        return tok
