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
its MoE output against ``blocked`` on the first layer's weights (max relative difference, bf16).

Both models get independent random weights of the same shapes (speed does not depend on the
values beyond routing, which is near-uniform for both). Prints tokens/s and the prefjax/reference
ratio. ``--smoke`` runs the tiny preset on the CPU (a correctness-of-plumbing check, not a
benchmark).

    python bench/bench_qwen35.py --layers 8                                   # one GPU
    python bench/bench_qwen35.py --layers 48 --mesh expert=4 --device auto    # 4 GPUs, the whole model
    python bench/bench_qwen35.py --smoke                                      # CPU smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import subprocess
import sys
import time

import numpy as np
from _timing import median_seconds


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


def bench_prefjax(cfg, batch, prompt, new, repeats, seed=0, mesh=None):
    """prefjax prefill and decode; with ``mesh`` the weights are drawn into their shards and the
    experts run expert/tensor-parallel (every call inside ``mesh_context``)."""
    from prefjax.sharding import mesh_context
    with mesh_context(mesh):
        return _bench_prefjax(cfg, batch, prompt, new, repeats, seed, mesh)


def _bench_prefjax(cfg, batch, prompt, new, repeats, seed, mesh):
    import jax
    import jax.numpy as jnp

    from prefjax.api import sharding_tree
    from prefjax.hooks import CaptureSpec, all_resid_post
    from prefjax.models import qwen35 as Q

    # unrolled on GPU (a scan copies each layer's weights) and under a mesh (XLA:CPU's in-process
    # collectives can deadlock inside a scan on a small host)
    unroll = jax.default_backend() == "gpu" or mesh is not None
    cpu_mesh = jax.default_backend() == "cpu" and mesh is not None
    shardings = None if mesh is None else sharding_tree(Q.param_shapes(cfg), mesh)
    params = jax.jit(lambda k: Q.init_params(cfg, k, jnp.bfloat16), out_shardings=shardings)(jax.random.PRNGKey(seed))
    rs = np.random.RandomState(seed)
    tokens = jnp.asarray(rs.randint(0, cfg.vocab_size, (batch, prompt)).astype(np.int32))
    valid = jnp.ones((batch, prompt), bool)
    last = jnp.full((batch, 1), prompt - 1, jnp.int32)
    spec = CaptureSpec.from_names(all_resid_post(cfg.n_layers), cfg.n_layers)

    @jax.jit
    def prefill_capture(params, tokens, valid, pos):
        logits, cap, _, _ = Q.forward(cfg, params, tokens, valid, capture=spec, pos_BxK=pos, unroll=unroll)
        return logits, cap

    t_prefill = median_seconds(lambda: jax.block_until_ready(prefill_capture(params, tokens, valid, last)), repeats)

    max_len = prompt + new

    @jax.jit
    def prefill_state(params, tokens, valid):
        st = Q.init_state(cfg, batch, max_len, jnp.bfloat16)
        lg, _, _, st = Q.forward(cfg, params, tokens, valid, capture=CaptureSpec(), state=st, start=0,
                                 pos_BxK=last, unroll=unroll)
        return lg[:, -1], st

    @functools_partial_donate
    def step(params, st, lg, key, start):
        key, sub = jax.random.split(key)
        nxt = jax.random.categorical(sub, lg.astype(jnp.float32) / 0.7, axis=-1).astype(jnp.int32)
        out, _, _, st = Q.forward(cfg, params, nxt[:, None], jnp.ones((batch, 1), bool), capture=CaptureSpec(),
                                  state=st, start=start, is_prompt=False, unroll=unroll)
        return out[:, -1], st, key, nxt

    def decode():
        lg, st = jax.block_until_ready(prefill_state(params, tokens, valid))
        key = jax.random.PRNGKey(seed)
        t0 = time.perf_counter()
        for i in range(new):
            lg, st, key, nxt = step(params, st, lg, key, jnp.int32(prompt + i))
            if cpu_mesh:  # one collective program in flight at a time (XLA:CPU rendezvous can deadlock)
                jax.block_until_ready(nxt)
        jax.block_until_ready(nxt)
        return time.perf_counter() - t0

    decode()  # compile
    t_decode = float(np.median([decode() for _ in range(max(1, repeats // 2))]))
    out = {"prefill_tok_s": batch * prompt / t_prefill, "decode_tok_s": batch * new / t_decode,
           "prefill_s": t_prefill, "decode_s": t_decode}
    if cfg.moe_impl == "pallas" and mesh is None:
        out.update(check_moe(cfg, params, tokens, seed))
    return out


def check_moe(cfg, params, tokens, seed):
    """Layer 0's routed experts, pallas vs blocked, on a standalone (unsliced) copy of its weights.

    Returns the max relative difference on 1024 embedded tokens and the time of each path at the
    decode size (``batch`` tokens) and the prefill size (all prompt tokens), in ms.
    """
    import jax
    import jax.numpy as jnp

    from prefjax.models import moe as M
    from prefjax.models import moe_pallas as MP
    p0 = jax.tree.map(lambda a: a[0] + 0, params["blocks"])  # "+ 0": a buffer of its own, not a view
    w3 = (p0["experts_gate"], p0["experts_up"], p0["experts_down"])
    out = {}
    fb, fp = jax.jit(M.experts_blocked), jax.jit(MP.experts_pallas)
    flat = tokens.reshape(-1)
    for name, n in (("check", min(1024, flat.shape[0])), ("decode", tokens.shape[0]), ("prefill", flat.shape[0])):
        x = jnp.take(params["embed"], flat[:n], axis=0) * 30.0
        w, i = M.route(x, p0["router"], cfg.top_k)
        if name == "check":
            a, b = (f(x, w, i, *w3).astype(jnp.float32) for f in (fb, fp))
            out["check_rel_vs_blocked"] = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
            continue
        for tag, f in (("pallas", fp), ("blocked", fb)):
            out[f"moe_ms_{name}_{tag}"] = 1e3 * median_seconds(lambda: jax.block_until_ready(f(x, w, i, *w3)), 5)
    return out


def functools_partial_donate(fn):
    import jax
    return jax.jit(fn, donate_argnums=(1,))


def bench_hf(cfg, batch, prompt, new, repeats, device, seed=0):
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    torch.manual_seed(seed)
    dtype = torch.bfloat16
    if device == "auto":
        model, device = _hf_spread(Qwen3_5MoeForCausalLM, hf_config(cfg), dtype)
    else:
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Qwen3_5MoeForCausalLM(hf_config(cfg)).eval()
        finally:
            torch.set_default_dtype(prev)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=device)
    sync = lambda: [torch.cuda.synchronize(i) for i in range(torch.cuda.device_count())]  # every GPU in use

    def prefill():
        with torch.no_grad():
            out = model(ids, output_hidden_states=True, logits_to_keep=1)
            _ = [h[:, -1] for h in out.hidden_states]
        sync()

    # transformers renamed past_key_values to cache after 5.17
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def decode():
        """Manual cached decode with sampling (same work as prefjax's loop); returns seconds."""
        with torch.no_grad():
            out = model(ids, use_cache=True, logits_to_keep=1)
            cache, lg = getattr(out, cache_kw), out.logits[:, -1]
            sync()
            t0 = time.perf_counter()
            for _ in range(new):
                probs = torch.softmax(lg.float() / 0.7, dim=-1)
                nxt = torch.multinomial(probs, 1)
                out = model(nxt, use_cache=True, **{cache_kw: cache})
                cache, lg = getattr(out, cache_kw), out.logits[:, -1]
            sync()
            return time.perf_counter() - t0

    t_prefill = median_seconds(prefill, repeats)
    decode()  # warm-up
    t_decode = float(np.median([decode() for _ in range(max(1, repeats // 2))]))
    return {"prefill_tok_s": batch * prompt / t_prefill, "decode_tok_s": batch * new / t_decode,
            "prefill_s": t_prefill, "decode_s": t_decode,
            "experts_implementation": str(getattr(model.config, "_experts_implementation", None))}


def _hf_spread(cls, config, dtype, scale: float = 0.02):
    """A transformers model with random weights spread over every GPU (or the CPU), as
    ``device_map="auto"`` would place a checkpoint: built on the meta device, each parameter drawn on
    its own device, then dispatched (accelerate moves activations between devices). Returns
    ``(model, input device)``."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    with init_empty_weights():
        model = cls(config).to(dtype).eval()
    n = torch.cuda.device_count()
    if n:
        free = {i: int(torch.cuda.mem_get_info(i)[0] * 0.85) for i in range(n)}
    else:
        free = {"cpu": 1 << 40}
    device_map = infer_auto_device_map(model, max_memory=free, no_split_module_classes=model._no_split_modules,
                                       dtype=dtype)

    def where(name):
        while name not in device_map:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return device_map[name]

    for name, p in model.named_parameters():
        dev = where(name)
        dev = f"cuda:{dev}" if isinstance(dev, int) else dev
        value = torch.randn(p.shape, dtype=dtype, device=dev) * scale
        set_module_tensor_to_device(model, name, dev, value=value)
    model = dispatch_model(model, device_map=device_map)
    first = where("model.embed_tokens.weight")
    return model, (f"cuda:{first}" if isinstance(first, int) else str(first))


def _worker(args, cfg, side):
    """Run one side in this process and print its result as one JSON line."""
    import jax
    if side == "hf":
        import torch
        import transformers
        res = bench_hf(cfg, args.batch, args.prompt, args.new, args.repeats, args.device)
        res["versions"] = f"transformers {transformers.__version__} torch {torch.__version__}"
    else:
        mesh = None
        if args.mesh:
            from prefjax.sharding import make_mesh
            mesh = make_mesh({k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))})
        res = bench_prefjax(dataclasses.replace(cfg, moe_impl=side), args.batch, args.prompt, args.new, args.repeats,
                            mesh=mesh)
        res["versions"] = f"jax {jax.__version__} {jax.devices()[0].device_kind}"
    print("RESULT " + json.dumps(res), flush=True)


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
    ap.add_argument("--impls", default="pallas,blocked", help="prefjax MoE paths to time, comma-separated")
    ap.add_argument("--smoke", action="store_true", help="tiny preset on the CPU")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--side-timeout", type=float, default=None, help="seconds allowed to each side")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.layers, args.batch, args.prompt, args.new, args.device = \
            "qwen35-moe-tiny", 4, 2, 96, 4, "cpu"
        args.repeats = min(args.repeats, 2)
        args.impls = "blocked"

    from prefjax.models import qwen35 as Q
    base = Q.PRESETS[args.preset]
    cfg = dataclasses.replace(base, n_layers=args.layers, layer_types=Q._pattern(args.layers))
    if args.worker:
        return _worker(args, cfg, args.worker)
    print(f"preset={args.preset} layers={cfg.n_layers} params={Q.param_count(cfg) / 1e9:.2f}B "
          f"batch={args.batch} prompt={args.prompt} new={args.new}", flush=True)
    impls = args.impls.split(",")
    sides = impls[:1] + ([] if args.skip_reference else ["hf"]) + impls[1:]
    results = {}
    argv = list(sys.argv[1:] if argv is None else argv)
    for side in sides:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--worker", side],
                                  capture_output=True, text=True, timeout=args.side_timeout)
        except subprocess.TimeoutExpired as e:
            print(f"[{side}] timed out after {args.side_timeout}s:\n" + str(e.stderr or "")[-2000:], flush=True)
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"[{side}] failed (rc={proc.returncode}) after {time.perf_counter() - t0:.0f}s:\n"
                  + "\n".join((proc.stdout + proc.stderr).splitlines()[-25:]), flush=True)
            continue
        results[side] = json.loads(lines[-1][len("RESULT "):])
        print(f"[{side}] {time.perf_counter() - t0:.0f}s {results[side]}", flush=True)
    ref = results.get("hf")
    print(f"{'':24s}{'prefill tok/s':>16s}{'decode tok/s':>16s}{'prefill x':>10s}{'decode x':>10s}")
    for side, r in results.items():
        ratio = (f"{r['prefill_tok_s'] / ref['prefill_tok_s']:10.2f}{r['decode_tok_s'] / ref['decode_tok_s']:10.2f}"
                 if ref and side != "hf" else "")
        name = "transformers" if side == "hf" else f"prefjax/{side}"
        print(f"{name:24s}{r['prefill_tok_s']:16.1f}{r['decode_tok_s']:16.1f}{ratio}")
    return results


if __name__ == "__main__":
    main()
