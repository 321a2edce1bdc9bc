"""Prefill with residual capture: prefjax vs transformers+torch (sdpa), same shapes, same run.

Random weights at a preset's real shape (default Gemma-3-27B in bf16). prefjax captures
``blocks.L.hook_resid_post`` at the last token of every layer; transformers keeps all hidden states
(``output_hidden_states=True``), which is what PyTorch glue code does to read the residual stream;
both compute logits at the last position only (``logits_to_keep=1`` for transformers).
Each framework runs in its own subprocess (both models do not fit one card at once). The torch
process also measures the card's bf16 matmul rate (8192^3): MFU is the share of that FLOP bound.

    python bench/bench_prefill.py --preset gemma3-27b --batches 4,16 --seq 256
    python bench/bench_prefill.py --preset gemma3-tiny --batches 2 --seq 32 --device cpu   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def model_flops_per_token(cfg, seq: int) -> float:
    """2 * (non-embedding matmul params) + attention score/value FLOPs (causal, window-aware) + unembed."""
    d, h, kv, hd, ff, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.n_layers
    per_layer = 2 * (d * h * hd * 2 + d * kv * hd * 2 + 3 * d * ff)
    attn = 0.0
    for t in cfg.layer_types:
        ctx = seq / 2 if t == "full_attention" else min(seq / 2, cfg.sliding_window)
        attn += 2 * 2 * h * hd * ctx
    return L * per_layer + attn


def run_jax(args) -> dict:
    import jax
    import numpy as np
    import prefjax
    t_start = time.time()
    model = prefjax.load(args.preset, dtype="bfloat16")
    cfg = model.config
    if args.per_layer_weights:
        model = model.split_layers()
    hooks = model.hook_names()
    say = lambda msg: print(f"[jax {time.time() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)
    say("weights ready")
    out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": []}
    for b in args.batches:
        rs = np.random.RandomState(0)
        ids = [rs.randint(10, cfg.vocab_size, size=(b, args.seq)).astype(np.int32) for _ in range(3)]
        pos = np.full((b, 1), args.seq - 1, np.int32)
        for x in ids:  # compile + warm up
            lg, cache = model.run(x, capture=hooks, positions=pos)
            jax.block_until_ready((lg, cache))
        say(f"batch {b}: compiled and warm")
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            lg, cache = model.run(ids[r % 3], capture=hooks, positions=pos)
            jax.block_until_ready((lg, cache))
            times.append(time.perf_counter() - t0)
        if args.trace:  # one more forward under the profiler: device time by kernel kind
            from summarize_trace import profiled
            _, trace = profiled(lambda: model.run(ids[0], capture=hooks, positions=pos),
                                os.path.join(args.trace, f"prefill_b{b}"))
            print(f"[jax] trace batch {b}: {json.dumps(trace)}", file=sys.stderr, flush=True)
        assert np.isfinite(np.asarray(lg, np.float32)).all()
        assert len(cache) == cfg.n_layers and cache[hooks[-1]].shape == (b, 1, cfg.d_model)
        med = statistics.median(times)
        say(f"batch {b}: {med * 1e3:.1f} ms per forward, {b * args.seq / med:,.0f} tok/s")
        out["rows"].append({"batch": b, "seq": args.seq, "median_s": med, "tok_s": b * args.seq / med,
                            "flops_per_tok": model_flops_per_token(cfg, args.seq)})
        if args.trace:
            out["rows"][-1]["trace"] = trace
    return out


def run_torch(args) -> dict:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from prefjax.models.gemma3 import PRESETS, hf_config
    t_start = time.time()
    say = lambda msg: print(f"[torch {time.time() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)
    cfg = PRESETS[args.preset]
    dev = "cuda" if args.device == "gpu" else "cpu"
    hf_cfg = Gemma3TextConfig(**{k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")},
                              attn_implementation="sdpa")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: a float32 27B would not fit the card
    with torch.device(dev):
        model = Gemma3ForCausalLM(hf_cfg).eval()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__, "rows": []}
    if dev == "cuda":
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        bm = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            a @ bm
        torch.cuda.synchronize()
        ts = []
        for _ in range(10):
            t0 = time.perf_counter(); a @ bm; torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
        out["matmul_tflops"] = 2 * 8192 ** 3 / statistics.median(ts) / 1e12
        say(f"bf16 matmul 8192^3: {out['matmul_tflops']:.0f} TFLOP/s")
        del a, bm
    for b in args.batches:
        g = torch.Generator().manual_seed(0)
        ids = [torch.randint(10, cfg.vocab_size, (b, args.seq), generator=g).to(dev) for _ in range(3)]
        with torch.no_grad():
            for x in ids:
                o = model(x, output_hidden_states=True, logits_to_keep=1)
            if dev == "cuda":
                torch.cuda.synchronize()
            times = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                o = model(ids[r % 3], output_hidden_states=True, logits_to_keep=1)
                hs = [h[:, -1] for h in o.hidden_states]
                if dev == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        say(f"batch {b}: {med * 1e3:.1f} ms per forward, {b * args.seq / med:,.0f} tok/s")
        out["rows"].append({"batch": b, "seq": args.seq, "median_s": med, "tok_s": b * args.seq / med})
        del o, hs
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gemma3-27b")
    ap.add_argument("--batches", default="4,16")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="gpu", choices=["gpu", "cpu"])
    ap.add_argument("--only", choices=["jax", "torch"], default=None)
    ap.add_argument("--per-layer-weights", action="store_true", help="prefjax: block weights split into one buffer "
                    "per layer (prefjax.models.stack.split_layers)")
    ap.add_argument("--trace", default=None, metavar="DIR", help="profile one prefjax forward per batch and print "
                    "its device time by kernel kind and the matmul kernels' share of the measured matmul rate")
    args = ap.parse_args()
    args.batches = [int(x) for x in str(args.batches).split(",")]
    if args.only:
        res = run_jax(args) if args.only == "jax" else run_torch(args)
        print("RESULT " + json.dumps(res))
        return
    results = {}
    for which in ("torch", "jax"):
        cmd = [sys.executable, __file__, "--only", which, "--preset", args.preset, "--seq", str(args.seq),
               "--batches", ",".join(map(str, args.batches)), "--repeats", str(args.repeats), "--device", args.device]
        if args.trace and which == "jax":
            cmd += ["--trace", args.trace]
        if args.per_layer_weights and which == "jax":
            cmd += ["--per-layer-weights"]
        env = dict(os.environ)
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # 27B bf16 weights are 54 GB
        if args.device == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
        # the worker's stderr passes through: its progress lines show where a run cut short had got to
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
        if r.returncode or not line:
            print(r.stdout[-3000:])
            raise SystemExit(f"{which} run failed")
        results[which] = json.loads(line[-1][7:])
    peak = results["torch"].get("matmul_tflops")
    print(f"\nprefill + residual capture, {args.preset}, bf16 random weights, seq {args.seq}"
          + (", prefjax block weights one buffer per layer" if args.per_layer_weights else ""))
    print(f"device: {results['jax']['device']} | jax {results['jax']['jax']} | torch {results['torch']['torch']}"
          + (f" | measured bf16 matmul {peak:.0f} TFLOP/s" if peak else ""))
    print(f"{'batch':>6} {'transformers tok/s':>19} {'prefjax tok/s':>14} {'ratio':>6} {'HF MFU':>7} {'pj MFU':>7}")
    for tr, jr in zip(results["torch"]["rows"], results["jax"]["rows"]):
        fl = jr["flops_per_tok"]
        mfu = (lambda tps: f"{tps * fl / (peak * 1e12):.2f}") if peak else (lambda tps: "-")
        print(f"{jr['batch']:>6} {tr['tok_s']:>19,.0f} {jr['tok_s']:>14,.0f} {jr['tok_s'] / tr['tok_s']:>6.2f} "
              f"{mfu(tr['tok_s']):>7} {mfu(jr['tok_s']):>7}")
    for jr in results["jax"]["rows"]:
        tr = jr.get("trace")
        if not tr:
            continue
        flops = jr["flops_per_tok"] * jr["batch"] * jr["seq"]
        rate = "" if not tr["ms"]["matmul"] else f"; matmul kernels at {flops / (tr['ms']['matmul'] * 1e-3) / 1e12:.0f} TFLOP/s" + (
            f" ({100 * flops / (tr['ms']['matmul'] * 1e-3) / (peak * 1e12):.0f}% of the measured rate)" if peak else "")
        print(f"# batch {jr['batch']} profile of one forward ({jr['median_s'] * 1e3:.1f} ms timed), device ms: "
              + ", ".join(f"{k} {v:.2f}" for k, v in tr["ms"].items())
              + f"; busy {tr['busy_ms']:.2f}, idle {tr['idle_ms']:.2f}; {tr['kernels']:.0f} kernels" + rate)
        for n, ms, c in tr["top"]:
            print(f"#   {ms:8.3f} ms x{c:<4d} {n}")
    print("JSON " + json.dumps(results))


if __name__ == "__main__":
    main()
