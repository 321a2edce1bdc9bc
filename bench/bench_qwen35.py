"""Qwen-3.5 MoE throughput: prefjax (JAX) vs transformers (torch) in the same run.

Random bf16 weights at the layer shape of a preset (default Qwen3.5-122B-A10B) with ``--layers``
layers (keeps the 3:1 DeltaNet/attention pattern). Measures

* prefill: ``batch x prompt`` tokens with the residual captured at every layer's last token
  (prefjax: ``Model.run`` with ``capture``/``positions``; transformers: ``output_hidden_states``);
* sampled decode: ``--new`` tokens per sequence after a cached prefill (not timed): prefjax a
  jitted single-token step with temperature sampling and donated state; transformers the same
  loop with its ``DynamicCache`` (``model(next, cache=...)`` + ``torch.multinomial``).

Each side runs in its own subprocess (so the GPU is all theirs in turn); ``--impls`` lists the
prefjax MoE paths to time (``pallas``: the Triton kernels, ``blocked``: plain XLA). Layers are
unrolled on GPU (a layer scan copies each layer's weight slice). The ``pallas`` worker also checks
its MoE block against ``blocked`` on the first layer's weights (max relative difference, bf16).

Both models get independent random weights of the same shapes (speed does not depend on the
values beyond routing, which is near-uniform for both). Prints tokens/s and the prefjax/reference
ratio. ``--smoke`` runs the tiny preset on the CPU (a correctness-of-plumbing check, not a
benchmark).

    python bench/bench_qwen35.py --layers 8                                   # one GPU
    python bench/bench_qwen35.py --layers 48 --mesh expert=4 --device auto \
        --impls pallas --reference-first --deadline 560                       # 4 GPUs, the whole model
    python bench/bench_qwen35.py --smoke                                      # CPU smoke

With a mesh, the batch is split as the sharding rules say (``expert=4`` splits it four ways too), so
attention and DeltaNet run data-parallel and the experts expert-parallel. The prefill and decode-step
programs compile at the same time (48 unrolled layers take minutes); each worker reports its phase
times, peak device memory and, after each stage, partial results, so a side cut short by
``--deadline`` still reports what it measured.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np
from _hf_place import hf_decode_seconds, hf_spread, sync_all
from _timing import median_seconds, phase_timer


def hf_config(cfg, dtype: str = "bfloat16"):
    """The transformers ``Qwen3_5MoeTextConfig`` of a prefjax :class:`Qwen35Config`."""
    from transformers import Qwen3_5MoeTextConfig
    return Qwen3_5MoeTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        layer_types=list(cfg.layer_types), linear_key_head_dim=cfg.lin_k_dim, linear_value_head_dim=cfg.lin_v_dim,
        linear_num_key_heads=cfg.lin_n_k_heads, linear_num_value_heads=cfg.lin_n_v_heads,
        moe_intermediate_size=cfg.d_expert, shared_expert_intermediate_size=cfg.d_shared,
        num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, rms_norm_eps=cfg.rms_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base,
                         "partial_rotary_factor": cfg.partial_rotary_factor},
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        dtype=dtype)


def bench_prefjax(cfg, batch, prompt, new, repeats, seed=0, mesh=None, emit=None):
    """prefjax prefill and decode; with ``mesh`` the weights are drawn into their shards and the
    experts run expert/tensor-parallel (every call inside ``mesh_context``). ``emit(partial)`` is
    called with the results so far after each stage (so a run cut short still reports)."""
    from prefjax.sharding import mesh_context
    with mesh_context(mesh):
        return _bench_prefjax(cfg, batch, prompt, new, repeats, seed, mesh, emit or (lambda r: None))


def _bench_prefjax(cfg, batch, prompt, new, repeats, seed, mesh, emit):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from prefjax.api import sharding_tree
    from prefjax.hooks import CaptureSpec, all_resid_post
    from prefjax.models import qwen35 as Q
    from prefjax.sharding import mesh_context, spec_for

    out: dict = {}
    phase = phase_timer(out, "prefjax")

    # unrolled on GPU (a scan copies each layer's weights) and under a mesh (XLA:CPU's in-process
    # collectives can deadlock inside a scan on a small host)
    unroll = jax.default_backend() == "gpu" or mesh is not None
    shardings = None if mesh is None else sharding_tree(Q.param_shapes(cfg), mesh)
    # under a mesh the batch is split as the sharding rules say (over data and expert devices), and
    # every output that is not a weight keeps that split: the step's outputs then have the
    # shardings its inputs had, and nothing recompiles mid-loop
    max_len = prompt + new
    state_keys = list(jax.eval_shape(lambda: Q.init_state(cfg, batch, max_len, jnp.bfloat16)))
    if mesh is None:
        rep = rows = state_sh = None
    else:
        bt = spec_for((batch,), ("batch",), mesh)[0]
        rep, rows = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(bt))
        state_sh = {k: rows if k == "valid" else NamedSharding(mesh, PartitionSpec(None, bt)) for k in state_keys}
    params = jax.jit(lambda k: Q.init_params(cfg, k, jnp.bfloat16), out_shardings=shardings)(jax.random.PRNGKey(seed))
    jax.block_until_ready(params)
    phase("init_weights")
    rs = np.random.RandomState(seed)
    place = lambda a: a if rows is None else jax.device_put(a, rows)
    tokens = place(jnp.asarray(rs.randint(0, cfg.vocab_size, (batch, prompt)).astype(np.int32)))
    valid = place(jnp.ones((batch, prompt), bool))
    last = place(jnp.full((batch, 1), prompt - 1, jnp.int32))
    spec = CaptureSpec.from_names(all_resid_post(cfg.n_layers), cfg.n_layers)

    # one prefill program serves both measurements: the residual captured at every layer's last
    # token, plus the decode state (transformers' timed forward builds its cache too)
    @functools.partial(jax.jit, out_shardings=None if mesh is None else (rows, rows, state_sh))
    def prefill(params, tokens, valid, pos):
        st = Q.init_state(cfg, batch, max_len, jnp.bfloat16)
        lg, cap, _, st = Q.forward(cfg, params, tokens, valid, capture=spec, state=st, start=0, pos_BxK=pos,
                                   unroll=unroll)
        return lg[:, -1], cap, st

    @functools.partial(jax.jit, donate_argnums=(1,), out_shardings=None if mesh is None else (rows, state_sh, rep, rows))
    def step(params, st, lg, key, start):
        key, sub = jax.random.split(key)
        nxt = jax.random.categorical(sub, lg.astype(jnp.float32) / 0.7, axis=-1).astype(jnp.int32)
        out, _, _, st = Q.forward(cfg, params, nxt[:, None], jnp.ones((batch, 1), bool), capture=CaptureSpec(),
                                  state=st, start=start, is_prompt=False, unroll=unroll)
        return out[:, -1], st, key, nxt

    def first_key():
        """The sampling key placed as the step's own key output is (replicated on the mesh,
        uncommitted on one device), so the step's first and later calls share one program."""
        key = jax.random.PRNGKey(seed)
        return key if rep is None else jax.device_put(key, rep)

    def compile_step():
        """Compile the decode step ahead of time for the prefill's output shapes and placement (jit
        keeps the executable, so the timed loop's first call does not compile; checked with
        JAX_LOG_COMPILES). Runs in a thread while the prefill compiles and runs: only compilers
        overlap, never two programs with collectives in flight from two threads."""
        with mesh_context(mesh):  # the mesh context is per thread
            lg_s, _, st_s = jax.eval_shape(prefill, params, tokens, valid, last)
            like = lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)
            st_a = {k: like(v, None if state_sh is None else state_sh[k]) for k, v in st_s.items()}
            step.lower(params, st_a, like(lg_s, rows), first_key(), jnp.int32(prompt)).compile()

    # the two programs compile at once (XLA compiles with the GIL released)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stepped = pool.submit(compile_step)
        jax.block_until_ready(prefill(params, tokens, valid, last))
        stepped.result()
    phase("compile_prefill_and_step")
    t_prefill = median_seconds(lambda: jax.block_until_ready(prefill(params, tokens, valid, last)), repeats)
    out.update(prefill_tok_s=batch * prompt / t_prefill, prefill_s=t_prefill)
    phase("time_prefill")
    emit(out)

    def decode():
        lg, _, st = jax.block_until_ready(prefill(params, tokens, valid, last))
        key = first_key()
        t0 = time.perf_counter()
        for i in range(new):
            lg, st, key, nxt = step(params, st, lg, key, jnp.int32(prompt + i))
        jax.block_until_ready(nxt)
        return time.perf_counter() - t0

    decode()  # warm-up
    phase("warm_decode")
    t_decode = float(np.median([decode() for _ in range(max(1, repeats // 2))]))
    out.update(decode_tok_s=batch * new / t_decode, decode_s=t_decode)
    phase("time_decode")
    out["peak_gib"] = peak_gib()
    emit(out)
    if cfg.moe_impl == "pallas":
        out.update(check_moe(cfg, params, tokens, timed=mesh is None))
        phase("check_moe")
    return out


def peak_gib():
    """Largest peak of device memory in use over the devices, GiB (None where not reported)."""
    import jax
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p]
    return round(max(peaks) / 2**30, 2) if peaks else None


def check_moe(cfg, params, tokens, *, timed: bool):
    """Layer 0's MoE block, Pallas vs XLA ``blocked``, reading the stacked expert weights (under an
    active mesh: expert-parallel, as the model runs it). Returns the max relative difference on up to
    1024 embedded tokens; with ``timed``, also each routed-experts path's time on a standalone copy of
    the layer's experts at the decode size (``batch`` tokens) and the prefill size (all prompt
    tokens), in ms."""
    import jax
    import jax.numpy as jnp

    from prefjax.models import moe as M
    from prefjax.models import moe_pallas as MP
    p0 = {k: v[0] for k, v in params["blocks"].items() if k not in M.EXPERT_WEIGHTS}
    experts = {k: params["blocks"][k] for k in M.EXPERT_WEIGHTS}
    flat = tokens.reshape(-1)
    embed = lambda n: jnp.take(params["embed"], flat[:n], axis=0) * 30.0
    x = embed(min(1024, flat.shape[0]))[None]
    a, b = (jax.jit(lambda x, p, e, impl=impl: M.moe_block(x, p, cfg.top_k, impl=impl, experts=e, layer=0))(
        x, p0, experts).astype(jnp.float32) for impl in ("blocked", "pallas"))
    out = {"check_rel_vs_blocked": float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))}
    if timed:
        w3 = tuple(experts[k][0] + 0 for k in M.EXPERT_WEIGHTS)  # "+ 0": a buffer of its own, not a view
        fb, fp = jax.jit(M.experts_blocked), jax.jit(MP.experts_pallas)
        for name, n in (("decode", tokens.shape[0]), ("prefill", flat.shape[0])):
            x = embed(n)
            w, i = M.route(x, p0["router"], cfg.top_k)
            for tag, f in (("pallas", fp), ("blocked", fb)):
                out[f"moe_ms_{name}_{tag}"] = 1e3 * median_seconds(lambda: jax.block_until_ready(f(x, w, i, *w3)), 5)
    return out


def bench_hf(cfg, batch, prompt, new, repeats, device, seed=0, emit=None):
    """transformers prefill (hidden states of every layer) and sampled cached decode; ``emit`` as in
    :func:`bench_prefjax`."""
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    torch.manual_seed(seed)
    dtype = torch.bfloat16
    if device == "auto":
        model, device, _ = hf_spread(Qwen3_5MoeForCausalLM, hf_config(cfg), dtype)
    else:
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Qwen3_5MoeForCausalLM(hf_config(cfg)).eval()
        finally:
            torch.set_default_dtype(prev)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=device)

    def prefill():
        with torch.no_grad():
            out = model(ids, output_hidden_states=True, logits_to_keep=1)
            _ = [h[:, -1] for h in out.hidden_states]
        sync_all()

    def decode():
        """Manual cached decode with sampling (same work as prefjax's loop); returns seconds."""
        return hf_decode_seconds(model, ids, new, temperature=0.7)

    t0 = time.perf_counter()
    t_prefill = median_seconds(prefill, repeats)
    if emit:
        emit({"prefill_tok_s": batch * prompt / t_prefill, "prefill_s": t_prefill,
              "warmup_and_prefill_s": round(time.perf_counter() - t0, 1)})
    decode()  # warm-up
    t_decode = float(np.median([decode() for _ in range(max(1, repeats // 2))]))
    return {"prefill_tok_s": batch * prompt / t_prefill, "decode_tok_s": batch * new / t_decode,
            "prefill_s": t_prefill, "decode_s": t_decode,
            "experts_implementation": str(getattr(model.config, "_experts_implementation", None))}


def _worker(args, cfg, side):
    """Run one side in this process; print its results as JSON lines (``RESULT {...}``), a partial
    one after each stage and the full one last."""
    import jax

    def emit(res):
        print("RESULT " + json.dumps({**res, "versions": versions}), flush=True)

    if side == "hf":
        import torch
        import transformers
        versions = f"transformers {transformers.__version__} torch {torch.__version__}"
        res = bench_hf(cfg, args.batch, args.prompt, args.new, args.repeats, args.device, emit=emit)
    else:
        versions = f"jax {jax.__version__} {jax.devices()[0].device_kind} x{jax.device_count()}"
        mesh = None
        if args.mesh:
            from prefjax.sharding import make_mesh
            mesh = make_mesh({k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))})
        res = bench_prefjax(dataclasses.replace(cfg, moe_impl=side), args.batch, args.prompt, args.new, args.repeats,
                            mesh=mesh, emit=emit)
    emit(res)


def last_result(text: str):
    """The last ``RESULT`` JSON line of a worker's stdout (None if it printed none)."""
    lines = [ln for ln in (text or "").splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else None


def as_text(b) -> str:
    """A subprocess stream (bytes, str or None) as text."""
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen35-122b-a10b")
    ap.add_argument("--layers", type=int, default=4, help="number of layers (pattern 3 DeltaNet : 1 attention)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="torch device for the reference; 'auto' spreads it over "
                    "every GPU as device_map='auto' does")
    ap.add_argument("--mesh", default=None, help="prefjax mesh, e.g. 'expert=4' or 'expert=2,tensor=2' "
                    "(default: one device)")
    ap.add_argument("--impls", default=None, help="prefjax MoE paths to time, comma-separated (default "
                    "'pallas,blocked'; 'blocked' with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny preset on the CPU")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--side-timeout", type=float, default=None, help="seconds allowed to each side")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for the whole run; a side gets at "
                    "most what is left")
    ap.add_argument("--reference-first", action="store_true", help="run transformers before the prefjax sides")
    ap.add_argument("--reference-timeout", type=float, default=None, help="seconds allowed to transformers "
                    "(default: --side-timeout)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.layers, args.batch, args.prompt, args.new, args.device = \
            "qwen35-moe-tiny", 4, 2, 96, 4, "cpu"
        args.repeats = min(args.repeats, 2)
        args.impls = args.impls or "blocked"

    from prefjax.models import qwen35 as Q
    base = Q.PRESETS[args.preset]
    cfg = dataclasses.replace(base, n_layers=args.layers, layer_types=Q._pattern(args.layers))
    if args.worker:
        return _worker(args, cfg, args.worker)
    print(f"preset={args.preset} layers={cfg.n_layers} params={Q.param_count(cfg) / 1e9:.2f}B "
          f"batch={args.batch} prompt={args.prompt} new={args.new}", flush=True)
    impls = (args.impls or "pallas,blocked").split(",")
    ref_side = [] if args.skip_reference else ["hf"]
    sides = ref_side + impls if args.reference_first else impls[:1] + ref_side + impls[1:]
    results = {}
    argv = list(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    for side in sides:
        t0 = time.perf_counter()
        limit = args.reference_timeout if side == "hf" and args.reference_timeout else args.side_timeout
        if args.deadline is not None:  # what is left of the whole run's time
            left = args.deadline - (t0 - t_start)
            limit = left if limit is None else min(limit, left)
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--worker", side],
                                  capture_output=True, text=True, timeout=limit)
            stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            stdout, stderr, rc = as_text(e.stdout), as_text(e.stderr), f"timed out after {limit:.0f}s"
        res = last_result(stdout)
        if rc or res is None:
            print(f"[{side}] failed (rc={rc}) after {time.perf_counter() - t0:.0f}s:\n"
                  + "\n".join((stdout + stderr).splitlines()[-25:]), flush=True)
            if res is None:
                continue
            res["partial"] = True
        results[side] = res
        print(f"[{side}] {time.perf_counter() - t0:.0f}s {res}", flush=True)
    ref = results.get("hf")
    print(f"{'':24s}{'prefill tok/s':>16s}{'decode tok/s':>16s}{'prefill x':>10s}{'decode x':>10s}")
    num = lambda r, k: r.get(k, float("nan"))
    for side, r in results.items():
        ratio = (f"{num(r, 'prefill_tok_s') / num(ref, 'prefill_tok_s'):10.2f}"
                 f"{num(r, 'decode_tok_s') / num(ref, 'decode_tok_s'):10.2f}" if ref and side != "hf" else "")
        name = "transformers" if side == "hf" else f"prefjax/{side}"
        print(f"{name:24s}{num(r, 'prefill_tok_s'):16.1f}{num(r, 'decode_tok_s'):16.1f}{ratio}")
    return results


if __name__ == "__main__":
    main()
