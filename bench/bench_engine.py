"""Decode step layouts, generate and the continuous-batching engine against the read bound, with
transformers ``generate`` on the same machine as the reference.

    python bench/bench_engine.py --preset gemma3-27b --batch 8,64,256            # one H200
    python bench/bench_engine.py --batch 8,64,256 --decode-kernels xla,auto --stacked-max-batch 0 \
        --gen-batch '' --hf-batch 8,64 --skip-engine                             # decode attention A/B
    python bench/bench_engine.py --preset gemma3-tiny --batch 2,4 --device cpu --prompt 16 --new 8 --requests 12

JAX process (random bf16 weights at the preset's shape):
1. read bandwidth: a read-only reduction over 4 GiB;
2. one decode step (forward of one token per row against a ``prompt + new`` slot cache, sampling over
   the vocabulary, cache donated) with the stacked cache (before) and one buffer per layer (after),
   ms/step as the median over steps of a timed run; the two layouts' logits are compared first; the
   per-layer step once per ``--decode-kernels`` entry (``prefjax.models.layers.decode_kernel``: ``xla``
   the fused multiply-and-sum, ``auto`` the Pallas kernel on a GPU), logits compared with the first;
3. ``generate`` ms/step = (time(new) - time(1)) / (new - 1) at the batches in ``--gen-batch``;
4. the engine on a ragged workload (prompt lengths and max new tokens drawn at random, K samples),
   unsteered and with a distinct steering vector per request, against ``generate`` over the same
   requests in static batches; tokens compared with ``generate``'s (same sampling keys).
Then a second process times transformers ``generate`` (its own random weights, same shapes).
Bound = (weight bytes + KV bytes the step reads) / read bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _timing import bound_line, kernel_spec, median_seconds, read_bandwidth


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import prefjax
    from prefjax.engine import Engine, Request, RowSteer
    from prefjax.generation import generate, per_layer_cache, sample_tokens
    from prefjax.hooks import CaptureSpec
    from prefjax.model import auto_unroll
    from prefjax.models.layers import decode_kernel
    from prefjax.steering import random_direction

    t_start = time.time()
    model = prefjax.load(args.preset, dtype="bfloat16")
    if args.per_layer_weights:
        model = model.split_layers()
    cfg, fam, params = model.config, model.family, model.params
    unroll = auto_unroll() if args.unroll == "auto" else args.unroll == "1"
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "decode": [], "gen": [], "engine": {}}
    out["weight_bytes"] = wb = int(sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(params)))
    out["read_Bps"] = bw = read_bandwidth(4.0 if args.device == "gpu" else 1 / 16)
    print(f"[jax] read bandwidth {bw / 1e9:.0f} GB/s, weights {wb / 1e9:.1f} GB", file=sys.stderr, flush=True)
    s_len = args.prompt + args.new

    def step(p, state, tok, keys, t):
        b = tok.shape[0]
        logits, _, _, state = fam.forward(cfg, p, tok[:, None], jnp.ones((b, 1), bool), capture=CaptureSpec(),
                                          state=state, start=t, is_prompt=False, unroll=unroll)
        return state, sample_tokens(logits[:, 0], keys, t, 1.0, 1.0, greedy=False, top_k=0, use_top_p=False), logits

    step_j = jax.jit(step, donate_argnums=(1,))

    def make_state(b, per_layer, rand):
        # separate programs: random init of the stacked cache, then the split into layers (one program
        # doing both took minutes to compile on the H200)
        def mk():
            st = fam.init_state(cfg, b, s_len, model.dtype)
            if rand:
                k1, k2 = jax.random.split(jax.random.PRNGKey(1))
                st = {**st, "k": jax.random.normal(k1, st["k"].shape, st["k"].dtype),
                      "v": jax.random.normal(k2, st["v"].shape, st["v"].dtype)}
            return {**st, "valid": st["valid"].at[:, :args.prompt].set(True)}
        if not rand and per_layer:
            return jax.jit(lambda: per_layer_cache(mk(), cfg.n_layers, True))()
        st = jax.jit(mk)()
        return jax.jit(lambda x: per_layer_cache(x, cfg.n_layers, True))(st) if per_layer else st

    def over(section):
        if time.time() - t_start > args.budget:
            print(f"[jax] time budget spent: {section} skipped", file=sys.stderr, flush=True)
            out.setdefault("skipped", []).append(section)
            return True
        return False

    for b in args.batch:
        if over(f"decode B={b}"):
            continue
        kv = 2 * cfg.n_layers * b * s_len * cfg.n_kv_heads * cfg.head_dim * 2
        if wb + (2 if b <= args.stacked_max_batch else 1) * kv > args.mem_gb * 1e9:
            print(f"[jax] batch {b}: cache {kv / 1e9:.1f} GB does not fit next to the weights; skipped",
                  file=sys.stderr)
            continue
        tok = jnp.asarray(np.random.RandomState(0).randint(10, cfg.vocab_size, size=b), jnp.int32)
        keys = jax.random.split(jax.random.PRNGKey(0), b)
        row = {"batch": b, "kv_bytes": kv}
        ref_logits = None
        layouts = [("stacked", False, "xla")] + [(f"per_layer/{kn}", True, kn) for kn in args.decode_kernels]
        for layout, per_layer, kernel in layouts:
            if per_layer and not unroll:
                continue
            if not per_layer and b > args.stacked_max_batch:
                continue
            kind, opts = kernel_spec(kernel)
            try:
                with decode_kernel(kind, **opts):  # clears jit's caches: step_j is traced again with this kernel
                    state = make_state(b, per_layer, rand=True)
                    state, _, lg = step_j(params, state, tok, keys, jnp.int32(args.prompt))
                    lg = np.asarray(lg[:, 0, :2048], np.float32)
                    if ref_logits is None:
                        ref_logits = lg
                    else:
                        row.setdefault("max_abs_diff", {})[layout] = float(np.abs(lg - ref_logits).max())
                    ts = []
                    for rep in range(2):  # steps dispatched back to back (as generate does), one sync at the end
                        t0 = time.perf_counter()
                        for i in range(args.steps):
                            state, tk, _ = step_j(params, state, tok, keys, jnp.int32(args.prompt + 1 + i))
                        tk.block_until_ready()
                        ts.append((time.perf_counter() - t0) / args.steps)
                    row[layout] = float(min(ts))
                    if args.trace and b == args.trace_batch and per_layer == unroll:
                        state, row.setdefault("trace", {})[layout] = traced_steps(
                            lambda st, i: step_j(params, st, tok, keys, jnp.int32(args.prompt + 1 + i)),
                            state, args.steps, os.path.join(args.trace, f"b{b}_{layout.replace('/', '_')}"))
                    state = None
            except Exception as e:  # noqa: BLE001 - one kernel failing to build must not lose the others
                state = None
                row.setdefault("errors", {})[layout] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"[jax] batch {b} {layout} failed: {row['errors'][layout]}", file=sys.stderr, flush=True)
                continue
            print(f"[jax] batch {b} {layout}: {row[layout] * 1e3:.2f} ms/step", file=sys.stderr, flush=True)
        out["decode"].append(row)

    rs = np.random.RandomState(0)
    for b in args.gen_batch:
        if over(f"generate B={b}"):
            continue
        prompts = [list(rs.randint(10, cfg.vocab_size, size=args.prompt)) for _ in range(b)]
        kw = dict(temperature=1.0, top_p=1.0, top_k=0, seed=0, stop_ids=())
        t_full = median_seconds(lambda: generate(model, prompts, max_new_tokens=args.new, **kw), args.repeats)
        t_one = median_seconds(lambda: generate(model, prompts, max_new_tokens=1, **kw), args.repeats)
        out["gen"].append({"batch": b, "t_full": t_full, "t_one": t_one,
                           "step": (t_full - t_one) / (args.new - 1)})
        print(f"[jax] generate batch {b}: {out['gen'][-1]['step'] * 1e3:.2f} ms/step", file=sys.stderr, flush=True)

    if args.skip_engine or over("engine"):
        out["elapsed"] = time.time() - t_start
        return out
    # the ragged workload
    n_req, k = args.requests, args.samples
    lens = rs.randint(args.prompt // 4, args.prompt + 1, size=n_req)
    news = rs.randint(max(args.new // 4, 1), args.new + 1, size=n_req)
    prompts = [list(rs.randint(10, cfg.vocab_size, size=int(n))) for n in lens]
    reqs = [Request(p, int(m), n_samples=k) for p, m in zip(prompts, news)]
    steered = [Request(p, int(m), n_samples=k, steer=RowSteer(layer=cfg.n_layers // 2,
                                                              direction=random_direction(cfg.d_model, i % 64),
                                                              coef=4.0, tokens="all"))
               for i, (p, m) in enumerate(zip(prompts, news))]
    eng = Engine(model, rows=args.rows, temperature=1.0, seed=0, stop_ids=(), sync_every=8, prompt_bucket=64,
                 prefill_rows=8)
    for name, rq in (("unsteered", reqs), ("steered64", steered)):
        if name == "unsteered":
            eng.run(rq)  # compile every program the run needs (the steered run reuses them)
        t0 = time.perf_counter()
        res = eng.run(rq)
        t = time.perf_counter() - t0
        ntok = sum(len(s.token_ids) for r in res for s in r)
        out["engine"][name] = {"seconds": t, "tokens": ntok, "stats": vars(eng.stats).copy()}
        print(f"[jax] engine {name}: {t:.2f}s {ntok} tokens {eng.stats}", file=sys.stderr, flush=True)
        if name == "unsteered":
            eng_res = res
    if over("generate static batches"):
        out["elapsed"] = time.time() - t_start
        return out
    flat = [p for p in prompts for _ in range(k)]
    eids = list(range(n_req * k))
    kw = dict(max_new_tokens=args.new, temperature=1.0, seed=0, stop_ids=(), example_ids=eids,
              batch_size=args.rows)
    longest = int(np.argmax(lens)) * k  # same padded width as the timed run: same programs
    warm = [longest] + [i for i in range(args.rows) if i != longest][:args.rows - 1]
    generate(model, [flat[i] for i in warm], **{**kw, "example_ids": [eids[i] for i in warm]})  # compile
    t0 = time.perf_counter()
    g = generate(model, flat, **kw)
    t = time.perf_counter() - t0
    same = sum(g.token_ids[i * k + s][:len(eng_res[i][s].token_ids)] == eng_res[i][s].token_ids
               for i in range(n_req) for s in range(k))
    prefix = [next((j for j, (a, b_) in enumerate(zip(g.token_ids[i * k + s], eng_res[i][s].token_ids)) if a != b_),
                   len(eng_res[i][s].token_ids)) for i in range(n_req) for s in range(k)]
    out["engine"]["generate_static"] = {"seconds": t, "useful_tokens": int(sum(news) * k),
                                        "identical_samples": int(same), "samples": n_req * k,
                                        "mean_agreeing_prefix": float(np.mean(prefix)),
                                        "mean_len": float(np.mean(news))}
    out["engine"]["workload"] = {"requests": n_req, "samples": k, "prompt_lens": [int(lens.min()), int(lens.max())],
                                 "max_new": [int(news.min()), int(news.max())], "rows": args.rows}
    out["elapsed"] = time.time() - t_start
    return out


def traced_steps(step, state, n: int, log_dir: str):
    """``n`` decode steps (``state, tokens, logits = step(state, i)``) under the profiler: ``(state, device time
    per step)`` (``summarize_trace.profiled``)."""
    from summarize_trace import profiled

    def run():
        st = state
        for i in range(n):
            st, _, _ = step(st, i)
        return st

    state, summary = profiled(run, log_dir, per=n)
    print(f"[jax] trace of {n} steps: " + json.dumps(summary), file=sys.stderr, flush=True)
    return state, summary


def run_torch(args) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(here, "bench_decode.py"), "--_worker", "torch", "--preset", args.preset,
           "--batch", ",".join(str(b) for b in args.hf_batch), "--prompt", str(args.prompt), "--new", str(args.new),
           "--repeats", str(args.repeats), "--hf-weights", "random", "--device", args.device,
           "--weights-dir", "/tmp/unused"]
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.torch_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"transformers part ran past {args.torch_timeout} s"}
    if r.returncode:
        return {"error": r.stdout[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gemma3-27b")
    ap.add_argument("--batch", default="8,64,256")
    ap.add_argument("--gen-batch", default="8,64")
    ap.add_argument("--hf-batch", default=None, help="transformers batches (default: --gen-batch)")
    ap.add_argument("--decode-kernels", default="auto",
                    help="per-layer step once per kernel: xla, auto, pallas[:block=64;num_warps=8] (';' between options)")
    ap.add_argument("--unroll", choices=("auto", "1", "0"), default="auto", help="the decode step's layer loop")
    ap.add_argument("--skip-engine", action="store_true", help="skip the ragged engine workload and its generate")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--stacked-max-batch", type=int, default=64)
    ap.add_argument("--mem-gb", type=float, default=125)
    ap.add_argument("--torch-timeout", type=float, default=None)
    ap.add_argument("--budget", type=float, default=1e9, help="seconds after which the JAX part skips sections")
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--trace", default=None, metavar="DIR", help="profile --steps decode steps at --trace-batch "
                    "(each per-layer kernel layout) and print the device time per step by kernel kind")
    ap.add_argument("--trace-batch", type=int, default=8)
    ap.add_argument("--per-layer-weights", action="store_true", help="block weights split into one buffer per "
                    "layer (prefjax.models.stack.split_layers)")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch = [int(b) for b in args.batch.split(",") if b]
    args.gen_batch = [int(b) for b in args.gen_batch.split(",") if b]
    args.hf_batch = args.gen_batch if args.hf_batch is None else [int(b) for b in args.hf_batch.split(",") if b]
    args.decode_kernels = [k for k in args.decode_kernels.split(",") if k]
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args._worker == "jax":
        print(json.dumps(run_jax(args)))
        return
    argv = sys.argv[1:]
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.95")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker", "jax"] + argv, stdout=subprocess.PIPE,
                       text=True, env=env)
    if r.returncode:
        sys.stderr.write(r.stdout[-3000:])
        raise SystemExit("jax worker failed")
    jx = json.loads(r.stdout.strip().splitlines()[-1])
    print("[jax] result " + json.dumps(jx), file=sys.stderr, flush=True)
    bw = jx["read_Bps"]

    def step_lines(row, ref_seconds):  # one line per layout timed at this batch: prefjax, reference, bound
        bound = (jx["weight_bytes"] + row["kv_bytes"]) / bw
        return [bound_line(f"B={row['batch']} {layout}", row[layout], ref_seconds, bound)
                for layout in ["stacked"] + [f"per_layer/{kn}" for kn in args.decode_kernels] if layout in row]

    for row in jx["decode"]:  # prefjax's shares first: a command cut short while transformers runs keeps them
        for line in step_lines(row, None):
            print("# prefjax " + line, flush=True)
    th = None if args.no_hf else run_torch(args)
    print(f"# bench_engine {args.preset} prompt={args.prompt} new={args.new}"
          f"{'; block weights one buffer per layer' if args.per_layer_weights else ''}; {jx['device']} jax {jx['jax']}; "
          f"read bandwidth {bw / 1e9:.0f} GB/s (reduction over {'4 GiB' if args.device == 'gpu' else '64 MiB'}); weights {jx['weight_bytes'] / 1e9:.2f} GB; "
          f"jax part {jx['elapsed']:.0f}s")
    if th and "error" not in th:
        print(f"# transformers on {th['device']} torch {th['torch']} cache={th.get('cache')}")
    elif th:
        print(f"# transformers failed: {th['error'][-500:]}")
    ref = {}
    if th and "error" not in th:
        for row in th["rows"]:
            t = row["transformers"]
            ref[row["batch"]] = (t["t_full"] - t["t_one"]) / (args.new - 1)
    print(f"{'decode step':<28} {'ms':>9} {'hf ms':>9} {'ratio':>6} {'bound ms':>9} {'share':>7}")
    for row in jx["decode"]:
        for line in step_lines(row, ref.get(row["batch"])):
            print(line)
        for layout, err in row.get("errors", {}).items():
            print(f"#   B={row['batch']} {layout} failed: {err}")
        for layout, tr in row.get("trace", {}).items():
            mm = tr["ms"]["matmul"] * 1e-3
            rate = "" if not mm else (f"; matmul kernels read the weights at {jx['weight_bytes'] / mm / 1e9:.0f} GB/s "
                                      f"({100 * jx['weight_bytes'] / mm / bw:.0f}% of the measured read rate)")
            print(f"#   B={row['batch']} {layout} profile, ms per step: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in tr["ms"].items())
                  + f"; device busy {tr['busy_ms']:.2f}, idle {tr['idle_ms']:.2f}; {tr['kernels']:.0f} kernels" + rate)
            for nm, ms, c in tr["top"]:
                print(f"#     {ms:7.3f} ms x{c:<4d} {nm}")
        for layout, d in row.get("max_abs_diff", {}).items():
            print(f"#   B={row['batch']} logits {layout} vs the first layout: max abs diff {d:.3g}")
    for g in jx["gen"]:
        b = g["batch"]
        match = [r for r in jx["decode"] if r["batch"] == b]
        kv = match[0]["kv_bytes"] if match else 0
        print(bound_line(f"B={b} generate", g["step"], ref.get(b), (jx["weight_bytes"] + kv) / bw))
    e = jx["engine"]
    if jx.get("skipped"):
        print(f"# skipped (time budget): {', '.join(jx['skipped'])}")
    if "workload" not in e:
        return
    w = e["workload"]
    print(f"# ragged workload: {w['requests']} requests x {w['samples']} samples, prompts {w['prompt_lens']} tokens, "
          f"max new {w['max_new']}, {w['rows']} rows")
    gs = e["generate_static"]
    for name in ("unsteered", "steered64"):
        r = e[name]
        print(f"engine {name:<10} {r['seconds']:8.2f} s {r['tokens'] / r['seconds']:9.1f} tok/s  "
              f"steps {r['stats']['decode_steps']} waves {r['stats']['waves']} prefills {r['stats']['prefills']}")
    print(f"generate static batches {gs['seconds']:8.2f} s {gs['useful_tokens'] / gs['seconds']:9.1f} useful tok/s; "
          f"engine/generate speed {gs['seconds'] / e['unsteered']['seconds']:.2f}x; steering cost "
          f"{100 * (e['steered64']['seconds'] / e['unsteered']['seconds'] - 1):.1f}%")
    print(f"# engine vs generate tokens (same keys): {gs['identical_samples']}/{gs['samples']} samples identical, "
          f"mean agreeing prefix {gs['mean_agreeing_prefix']:.1f} of {gs['mean_len']:.1f}")


if __name__ == "__main__":
    main()
