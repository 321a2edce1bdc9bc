"""Text generation: batched left-padded prefill, then KV-cache decode under jit.

Only ``model.family.forward`` and ``model.family.init_state`` are used (the family contract,
:class:`prefjax.models.family.ModelFamily`; the family is a static argument of the compiled
programs), so every family (Gemma-3, Qwen-3.5, Llama, ...) works unchanged.

Design (see :func:`generate`):

* Prompts are left-padded to a common length ``P`` (rounded up to a multiple of ``pad_multiple`` so
  nearby lengths share one compiled program). The cache holds ``P + max_new_tokens`` slots.
* One jitted program per (batch, P, max_new_tokens, sampling flags): the prefill, then a
  ``jax.lax.while_loop`` whose body is one decode step (forward of one token per example against the
  cache, sample, write). The loop stops early when every example has hit a stop id. A Python loop
  over a jitted step (``loop="python"``) is kept as an option; on the 2-core CPU sandbox the
  while-loop was faster for the tiny model (no per-step dispatch and no host sync), see
  ``bench/bench_decode.py --compare-loops``.
* Sampling keys: example ``e`` uses ``fold_in(fold_in(PRNGKey(seed), e), step)`` at each step, and
  the sample is drawn per example, so its stream does not depend on which other examples share the
  batch (up to floating-point differences in the logits from different padding, which are ULP-level).
* Stop: a token in ``stop_ids`` (default: the tokenizer's ``eos_ids`` and ``end_of_turn_id``, or the
  config's ``eos_ids``) finishes an example. The stop token is NOT included in ``token_ids``/``texts``;
  ``finished[b]`` says whether example ``b`` stopped (False: it ran out of ``max_new_tokens``).
* Steering (``steer=`` a SteerSpec or tuple) is applied in prefill and decode; see
  :mod:`prefjax.steering` for the token modes. A mask is given per prompt, aligned with each
  prompt's own tokens.
* Prefix caches: ``share_prefix=True`` runs the start every prompt shares once and keeps its KV
  cache for every chunk; ``prefix=`` continues a :class:`prefjax.model.PrefixCache` (e.g. prompts
  prefilled once under many steering specs, then decoded in one batch). The cache is copied into
  each chunk's decode state; the results equal an unshared run up to float rounding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prefjax import hooks as H
from prefjax.model import auto_unroll, check_prefix_rows, common_prefix_len, extend_kv_state
from prefjax.models.family import Family
from prefjax.models.stack import unstack_layers
from prefjax.sharding import batch_axes, batch_multiple, batch_sharding, mesh_context
from prefjax.tokenize import left_pad


class GenerationError(ValueError):
    """Bad input to :func:`generate` (found before any compute)."""


@dataclasses.dataclass
class Generation:
    """The result of :func:`generate`, one entry per prompt in the order given.

    ``token_ids``: new token ids (stop token excluded). ``texts``: decoded ``token_ids`` (None without
    a tokenizer). ``finished``: True where a stop id was produced. ``prompt_lens``: prompt lengths in
    tokens. ``stop_ids``: the stop set used. ``captured``: hook name -> [n, max_new_tokens, d_model]
    numpy; entry ``i`` is the activation at the position whose logits chose new token ``i`` (the
    last prompt token for ``i = 0``); rows past an example's end are whatever the loop computed
    (zeros after an early exit of the whole batch).
    """

    token_ids: list[list[int]]
    texts: list[str] | None
    finished: list[bool]
    prompt_lens: list[int]
    stop_ids: tuple[int, ...]
    captured: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def default_stop_ids(model) -> tuple[int, ...]:
    """Tokenizer ``eos_ids`` plus ``end_of_turn_id`` when there is a tokenizer, else ``cfg.eos_ids``."""
    tok = model.tokenizer
    ids: list[int] = []
    if tok is not None:
        eos = getattr(tok, "eos_ids", None)
        if eos is not None:
            ids += [int(i) for i in (eos() if callable(eos) else eos)]
        eot = getattr(tok, "end_of_turn_id", None)
        eot = eot() if callable(eot) else eot
        if eot is not None:
            ids.append(int(eot))
    if not ids:
        ids = [int(i) for i in getattr(model.config, "eos_ids", ())]
    return tuple(dict.fromkeys(ids))


# --------------------------------------------------------------------------------------------
# Sampling.

def sample_tokens(logits_BxV, keys_Bx2, step, temperature, top_p, *, greedy: bool, top_k: int,
                  use_top_p: bool):
    """One token per row. Greedy is argmax; otherwise temperature, then top-k, then top-p (nucleus)
    filtering in float32 and a categorical draw with key ``fold_in(keys[b], step)`` per row (``step`` a
    scalar, or one step per row)."""
    logits = logits_BxV.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        srt = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each sorted token
        n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
        cutoff = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    step_B = jnp.broadcast_to(jnp.asarray(step, jnp.int32), logits.shape[:1])  # one step for all rows, or one per row
    step_keys = jax.vmap(jax.random.fold_in)(keys_Bx2, step_B)
    return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)


def per_layer_cache(state, n_layers: int, unroll: bool | None = None):
    """A plain KV-cache state (``k``/``v`` [L, B, S, ...], ``valid``) with one buffer per layer
    (:class:`prefjax.models.stack.PerLayer`) when the layers are unrolled (default: :func:`auto_unroll`),
    so a decode step that donates it writes each layer's new slot in place; any other state unchanged.

    With stacked leaves an unrolled step copies every layer's cache out and stacks the copies back.
    Measured on one H200 (bench/bench_engine.py, random bf16 Gemma-3-27B, 320-slot cache): 65.1 ->
    40.0 ms per step at batch 64 (10.4 GB of cache), 21.6 -> 19.9 ms at batch 8."""
    unroll = auto_unroll() if unroll is None else unroll
    if not unroll or not isinstance(state, dict) or set(state) != {"k", "v", "valid"}:
        return state
    return {"k": unstack_layers(state["k"], n_layers), "v": unstack_layers(state["v"], n_layers),
            "valid": state["valid"]}


# --------------------------------------------------------------------------------------------
# The compiled core.

_STATIC = ("family", "cfg", "spec", "n_new", "greedy", "top_k", "use_top_p", "state_dtype",
           "mesh")


def _state_constraint(state, batch, n_layers, mesh):
    """Shard every decode-state leaf along its batch axis (layer-stacked leaves: axis 1)."""
    if mesh is None:
        return state
    from jax.sharding import NamedSharding, PartitionSpec as P
    data = batch_axes(mesh)
    if not data:
        return state

    def one(a):
        if a.ndim >= 2 and a.shape[0] == n_layers and a.shape[1] == batch:
            ax = 1
        elif a.ndim >= 1 and a.shape[0] == batch:
            ax = 0
        else:
            return a
        parts = [P.UNCONSTRAINED] * a.ndim
        parts[ax] = data
        return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(*parts)))

    return jax.tree_util.tree_map(one, state)


def _prefix_len(prefix_state) -> int:
    return 0 if prefix_state is None else prefix_state["valid"].shape[1]


def _prefill(fam: Family, cfg, params, tokens_BxP, valid_BxP, intervene, spec, state_dtype, n_new, mesh,
             prefix_state=None, rows_B=None):
    b, p = tokens_BxP.shape
    if prefix_state is None:
        state = fam.init_state(cfg, b, p + n_new, state_dtype)
    else:  # the shared prompt prefix's KV cache, then slots for this chunk's prompt tails and new tokens
        state = extend_kv_state(prefix_state, rows_B, p + n_new)
    state = _state_constraint(state, b, cfg.n_layers, mesh)
    last = jnp.full((b, 1), p - 1, jnp.int32)
    logits, captured, _, state = fam.forward(cfg, params, tokens_BxP, valid_BxP, capture=spec, pos_BxK=last,
                                             intervene=intervene, state=state, start=_prefix_len(prefix_state),
                                             is_prompt=True, unroll=auto_unroll())
    return logits[:, 0], captured, state


def _decode_step(fam: Family, cfg, params, tok_B, state, start, intervene, spec):
    b = tok_B.shape[0]
    logits, captured, _, state = fam.forward(cfg, params, tok_B[:, None], jnp.ones((b, 1), bool),
                                             capture=spec, intervene=intervene, state=state, start=start,
                                             is_prompt=False, unroll=auto_unroll())
    return logits[:, 0], captured, state


def _init_carry(spec, captured, b, n_new, tok0, stop_K, d_dtype):
    out = jnp.full((b, n_new), -1, jnp.int32).at[:, 0].set(tok0)
    bufs = {k: jnp.zeros((b, n_new) + v.shape[2:], v.dtype).at[:, 0].set(v[:, 0]) for k, v in captured.items()}
    fin = jnp.isin(tok0, stop_K)
    return out, bufs, fin


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_while(params, tokens_BxP, valid_BxP, keys_Bx2, temperature, top_p, stop_K, intervene, prefix_state,
                    rows_B, *, family, cfg, spec, n_new, greedy, top_k, use_top_p, state_dtype, mesh):
    b, p = tokens_BxP.shape
    p = p + _prefix_len(prefix_state)  # slot of the first new token
    samp = functools.partial(sample_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
                             top_k=top_k, use_top_p=use_top_p)
    logits, captured, state = _prefill(family, cfg, params, tokens_BxP, valid_BxP, intervene, spec, state_dtype,
                                       n_new, mesh, prefix_state, rows_B)
    tok0 = samp(logits, keys_Bx2, 0)
    out, bufs, fin = _init_carry(spec, captured, b, n_new, tok0, stop_K, None)

    def cond(c):
        i, _, _, _, fin, _ = c
        return (i < n_new) & ~jnp.all(fin)

    def body(c):
        i, state, out, bufs, fin, prev = c
        logits, cap, state = _decode_step(family, cfg, params, prev, state, p + i - 1, intervene, spec)
        tok = samp(logits, keys_Bx2, i)
        out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(fin, -1, tok)[:, None], i, axis=1)
        bufs = {k: jax.lax.dynamic_update_slice_in_dim(v, cap[k].astype(v.dtype), i, axis=1)
                for k, v in bufs.items()}
        fin = fin | jnp.isin(tok, stop_K)
        return i + 1, state, out, bufs, fin, tok

    carry = (jnp.int32(1), state, out, bufs, fin, tok0)
    _, _, out, bufs, fin, _ = jax.lax.while_loop(cond, body, carry)
    return out, bufs, fin


@functools.partial(jax.jit, static_argnames=_STATIC)
def _python_prefill(params, tokens_BxP, valid_BxP, keys_Bx2, temperature, top_p, stop_K, intervene, prefix_state,
                    rows_B, *, family, cfg, spec, n_new, greedy, top_k, use_top_p, state_dtype, mesh):
    b, _ = tokens_BxP.shape
    logits, captured, state = _prefill(family, cfg, params, tokens_BxP, valid_BxP, intervene, spec, state_dtype,
                                       n_new, mesh, prefix_state, rows_B)
    tok0 = sample_tokens(logits, keys_Bx2, 0, temperature, top_p, greedy=greedy, top_k=top_k,
                         use_top_p=use_top_p)
    out, bufs, fin = _init_carry(spec, captured, b, n_new, tok0, stop_K, None)
    return per_layer_cache(state, cfg.n_layers), out, bufs, fin, tok0


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnums=(1, 2, 3))
def _python_step(params, state, out, bufs, fin, prev, i, p, keys_Bx2, temperature, top_p, stop_K, intervene,
                 *, family, cfg, spec, n_new, greedy, top_k, use_top_p, state_dtype, mesh):
    logits, cap, state = _decode_step(family, cfg, params, prev, state, p + i - 1, intervene, spec)
    tok = sample_tokens(logits, keys_Bx2, i, temperature, top_p, greedy=greedy, top_k=top_k,
                        use_top_p=use_top_p)
    out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(fin, -1, tok)[:, None], i, axis=1)
    bufs = {k: jax.lax.dynamic_update_slice_in_dim(v, cap[k].astype(v.dtype), i, axis=1) for k, v in bufs.items()}
    fin = fin | jnp.isin(tok, stop_K)
    return state, out, bufs, fin, tok


# --------------------------------------------------------------------------------------------
# Host side.

def _encode_prompts(model, prompts) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
        raise GenerationError("prompts must be a list of prompts (strings or token-id lists), not one prompt")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise GenerationError(f"prompt {i} is a string but model {model.source!r} has no tokenizer; "
                                      "pass token ids")
            ids = list(model.tokenizer.encode(p))
        else:
            ids = [int(t) for t in np.asarray(p).reshape(-1)]
        if not ids:
            raise GenerationError(f"prompt {i} is empty")
        bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary of size "
                                  f"{model.config.vocab_size}")
        out.append(ids)
    return out


def _context_limit(cfg) -> int:
    return int(getattr(cfg, "max_position_embeddings", 1 << 62))


def _chunk_specs(specs, lo, hi, rows, p_pad, prompt_lens, n_prompts, skip=0):
    """Slice per-example coefs/masks to rows [lo, hi) (+ dummy rows) and move masks to the padded layout
    (without their first ``skip`` columns: the shared prefix, which is never steered)."""
    out = []
    b = len(rows)
    for s in specs:
        coef = np.asarray(jax.device_get(s.coef), np.float64)
        if coef.ndim == 1:
            if coef.shape[0] != n_prompts:
                raise GenerationError(f"SteerSpec coef has {coef.shape[0]} entries for {n_prompts} prompts")
            coef = np.array([coef[r] if r >= 0 else 0.0 for r in rows])
        tok = s.tokens
        if not isinstance(tok, str):
            m = np.asarray(jax.device_get(tok), np.float32)
            if m.ndim != 2 or m.shape[0] != n_prompts or m.shape[1] < max(prompt_lens):
                raise GenerationError(f"SteerSpec token mask has shape {m.shape}; generate expects "
                                      f"[n_prompts={n_prompts}, >= longest prompt={max(prompt_lens)}] aligned "
                                      "with each prompt's own tokens")
            for r, n in enumerate(prompt_lens):
                if np.any(m[r, n:] != 0):
                    raise GenerationError(f"SteerSpec token mask row {r} is nonzero past the prompt's "
                                          f"{n} tokens")
            padded = np.zeros((b, p_pad), np.float32)
            for j, r in enumerate(rows):
                if r >= 0:
                    n = prompt_lens[r]
                    padded[j, p_pad - (n - skip):] = m[r, skip:n]
            tok = padded
        out.append(s.replace(coef=coef, tokens=tok))
    return tuple(out)


def _unsteered_prefix_limit(specs, n_prompts: int) -> int | None:
    """How many leading prompt tokens no spec steers (None: no limit), for sharing a prompt prefix."""
    limit = None
    for s in specs:
        coef = np.asarray(jax.device_get(s.coef))
        if isinstance(s.tokens, str):
            if s.tokens in ("all", "prompt") and np.any(coef != 0):
                return 0
            continue
        m = np.asarray(jax.device_get(s.tokens))
        if m.ndim != 2 or m.shape[0] != n_prompts:
            return 0  # _chunk_specs reports the bad shape
        hit = np.flatnonzero((m != 0).any(0))
        if hit.size and np.any(coef != 0):
            limit = int(hit[0]) if limit is None else min(limit, int(hit[0]))
    return limit


def generate(model, prompts, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, steer=None, capture: Sequence[str] = (), stop_ids=None,
             example_ids=None, batch_size: int | None = None, pad_multiple: int = 8,
             loop: str = "auto", share_prefix: bool = False, prefix=None, prefix_rows=None) -> Generation:
    """Generate continuations of ``prompts``.

    ``prompts``: rendered strings (encoded with ``model.tokenizer.encode``; render chat turns first)
    or token-id lists. ``temperature=0`` is greedy; otherwise temperature, ``top_k`` (0 = off) and
    ``top_p`` (1 = off) sampling. Example ``b`` draws from ``fold_in(PRNGKey(seed), example_ids[b])``
    (default ids: 0..n-1), so its stream does not depend on the batch it lands in. ``stop_ids``
    default: :func:`default_stop_ids`. ``steer``: SteerSpec or tuple (per-example ``coef`` arrays and
    token masks are indexed like ``prompts``). ``capture``: hook names recorded at each step (see
    :class:`Generation`). ``batch_size``: split into chunks of this size (the last chunk is padded
    with dummy rows so every chunk reuses one compiled program). ``loop``: ``"auto"`` (default: ``"python"`` on GPUs, ``"while"`` elsewhere), ``"while"`` or
    ``"python"``. Works with ``model.mesh`` set (batch sharded over the data axes).
    ``share_prefix``: when every prompt starts with the same tokens (a system prompt, a template), run
    that prefix once and keep its KV cache for every chunk (:meth:`prefjax.model.Model.prefill`); the
    results equal an unshared run up to float rounding. Only the unsteered part of the prompts is
    shared, and only where the model allows it (one device, a plain KV cache, the sliding window).
    ``prefix``: a :class:`prefjax.model.PrefixCache` the prompts continue (prompt ``b`` continues row
    ``prefix_rows[b]``; default: the one row, or row ``b``), e.g. prompts prefilled once under several
    steering specs and then generated from; ``steer`` then acts on the new tokens only.
    """
    from prefjax.steering import as_specs, spec_intervention

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if loop == "auto":
        # On GPUs a decode step inside a while_loop measured like the scanned step (~59 ms at 27B,
        # batch 8, H100): the loop-carried weights are sliced per layer by copy. A jitted step called
        # from Python gets the weights as entry parameters; the same unrolled step measured 23.6 ms.
        loop = "python" if auto_unroll() else "while"
    if loop not in ("while", "python"):
        raise GenerationError(f"loop must be 'auto', 'while' or 'python', got {loop!r}")
    temperature, top_p, top_k = float(temperature), float(top_p), int(top_k)
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise GenerationError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= top_k <= model.config.vocab_size:
        raise GenerationError(f"top_k must be in [0, vocab_size], got {top_k}")
    ids = _encode_prompts(model, prompts)
    n = len(ids)
    if n == 0:
        raise GenerationError("no prompts")
    lens = [len(x) for x in ids]
    limit = _context_limit(model.config)
    for i, ln in enumerate(lens):
        if ln + max_new_tokens > limit:
            raise GenerationError(f"prompt {i} has {ln} tokens; with max_new_tokens={max_new_tokens} that is "
                                  f"{ln + max_new_tokens} > the model's context of {limit}")
    ex_ids = np.arange(n) if example_ids is None else np.asarray(example_ids).reshape(-1)
    if ex_ids.shape[0] != n:
        raise GenerationError(f"example_ids has {ex_ids.shape[0]} entries for {n} prompts")
    if not np.issubdtype(ex_ids.dtype, np.integer) or np.any(ex_ids < 0) or np.any(ex_ids >= 2 ** 31):
        raise GenerationError("example_ids must be non-negative int32-range integers")
    stops = default_stop_ids(model) if stop_ids is None else tuple(int(s) for s in stop_ids)
    specs = as_specs(steer)
    cap_spec = H.CaptureSpec.from_names(capture, model.n_layers)
    if cap_spec.final:
        raise GenerationError("capture of ln_final.hook_normalized is not supported in generate")

    skip, pre_rows = 0, None
    if prefix is not None:
        if share_prefix:
            raise GenerationError("pass share_prefix or a prefix cache, not both")
        if not model.prefix_ok():
            raise GenerationError(f"model {model.source!r} cannot continue a prefix cache (see Model.prefix_ok)")
        pre_rows = check_prefix_rows(prefix, prefix_rows, n)
    elif share_prefix and model.prefix_ok():
        skip = common_prefix_len(ids, limit=_unsteered_prefix_limit(specs, n))
    def padded_len(run_lens, ahead):  # padding never pushes past the context
        p = -(-max(run_lens) // pad_multiple) * pad_multiple
        return max(min(p, limit - max_new_tokens - ahead), max(run_lens))

    slens = [ln - skip for ln in lens]  # what each chunk runs: the prompts past the shared prefix
    ahead = prefix.length if prefix is not None else skip  # cache slots before the chunk's own
    p_pad = padded_len(slens, ahead)
    gap_free = (prefix is None or prefix.contiguous) and all(ln == p_pad for ln in slens)
    if ahead and not gap_free and not model.fits_window(ahead + p_pad + max_new_tokens):
        if prefix is not None:  # left padding between the cache and the prompts would count against the window
            raise GenerationError(f"the prefix cache ({prefix.length} slots), prompts ({p_pad}) and new tokens "
                                  f"({max_new_tokens}) exceed the sliding window of {model.config.sliding_window} "
                                  "with padding in between; use prompts of one length and a contiguous cache")
        skip, slens, ahead = 0, lens, 0
        p_pad = padded_len(lens, 0)
    if skip:
        prefix = model.prefill(np.asarray([ids[0][:skip]], np.int32))
        pre_rows = np.zeros(n, np.int32)
    mesh = model.mesh
    dsize = batch_multiple(mesh)
    bs = min(batch_size or n, n)
    bs = -(-bs // dsize) * dsize
    greedy = temperature == 0.0
    use_top_p = (not greedy) and top_p < 1.0
    params = model.run_params()
    static = dict(family=model.family, cfg=model.config, spec=cap_spec, n_new=int(max_new_tokens),
                  greedy=greedy, top_k=0 if greedy else top_k, use_top_p=use_top_p, state_dtype=model.dtype,
                  mesh=mesh)

    def put(a):
        a = np.asarray(a)
        return jnp.asarray(a) if mesh is None else jax.device_put(a, batch_sharding(mesh, a.ndim, a.shape[0]))

    root = jax.random.PRNGKey(int(seed))
    stop_arr = jnp.asarray(np.array(stops if stops else [-2], np.int32))
    temp_arr, top_p_arr = jnp.float32(max(temperature, 1e-30)), jnp.float32(top_p)
    token_ids: list[list[int]] = [None] * n  # type: ignore[list-item]
    finished = [False] * n
    caps: dict[str, list] = {k: [None] * n for k in cap_spec.names}
    for lo in range(0, n, bs):
        rows = list(range(lo, min(n, lo + bs)))
        rows += [-1] * (bs - len(rows))  # dummy rows repeat prompt 0, coef 0
        src = [r if r >= 0 else rows[0] for r in rows]
        toks, valid = left_pad([ids[r][skip:] for r in src], int(model.config.pad_id), width=p_pad)
        eids = np.asarray([ex_ids[r] for r in src], np.int64)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(root, jnp.asarray(eids, jnp.uint32))
        iv = None
        if specs:
            iv = spec_intervention(_chunk_specs(specs, lo, lo + bs, rows, p_pad, lens, n, skip), model, batch=bs,
                                   seq=p_pad, prompt_len=p_pad)
        args = (put(toks), put(valid), put(np.asarray(keys)), temp_arr, top_p_arr, stop_arr, iv,
                None if prefix is None else prefix.state,
                None if prefix is None else jnp.asarray([pre_rows[r if r >= 0 else rows[0]] for r in rows], jnp.int32))
        with mesh_context(mesh):
            if loop == "while":
                out, bufs, fin = _generate_while(params, *args, **static)
            else:
                state, out, bufs, fin, prev = _python_prefill(params, *args, **static)
                for i in range(1, max_new_tokens):
                    if i % 8 == 0 and bool(jnp.all(fin)):
                        break
                    state, out, bufs, fin, prev = _python_step(
                        params, state, out, bufs, fin, prev, jnp.int32(i), jnp.int32(ahead + p_pad), args[2], temp_arr,
                        top_p_arr, stop_arr, iv, **static)
        out, fin = np.asarray(out), np.asarray(fin)
        bufs = {k: np.asarray(v) for k, v in bufs.items()}
        stop_set = set(stops)
        for j, r in enumerate(rows):
            if r < 0:
                continue
            seq = []
            for t in out[j]:
                t = int(t)
                if t < 0 or t in stop_set:
                    break
                seq.append(t)
            token_ids[r] = seq
            finished[r] = bool(fin[j])
            for k in caps:
                caps[k][r] = bufs[k][j]
    texts = None
    if model.tokenizer is not None:
        texts = [model.tokenizer.decode(t) for t in token_ids]
    captured = {k: np.stack(v) for k, v in caps.items()}
    return Generation(token_ids=token_ids, texts=texts, finished=finished, prompt_lens=lens, stop_ids=stops,
                      captured=captured)
