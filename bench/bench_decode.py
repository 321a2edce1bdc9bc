"""Sampled KV-cache decode: prefjax ``generate`` vs transformers ``generate``, same weights, same shapes.

Random bf16 weights at a preset's shape. The JAX process builds the prefjax model, times
``generate`` (prefill of ``--prompt`` tokens, ``--new`` sampled tokens, no early stop) at each batch,
the same with a steering vector (one coefficient per example), and the read bandwidth (a read-only
reduction over 4 GiB) for the bound; it then writes the weights in HF layout to ``--weights-dir``. A second process
loads them into ``Gemma3ForCausalLM`` (bf16, sdpa, static cache when available) and times
``generate(do_sample=True)``. Decode ms/step = (time(new) - time(new=1)) / (new - 1), both medians.

    python bench/bench_decode.py --preset gemma3-4b --batch 8,64 --prompt 256 --new 64          # GPU
    python bench/bench_decode.py --preset gemma3-tiny --batch 2 --prompt 16 --new 8 --device cpu  # smoke
    python bench/bench_decode.py --preset gemma3-tiny --batch 4 --compare-loops --no-hf --device cpu

Columns: tok/s = batch * new / time(new); ms/step; kv GB = KV-cache bytes a step reads (every layer
reads all ``prompt + new`` slots); bound ms = (weight bytes + kv bytes) / read bandwidth, the read
bandwidth measured in the same run by a read-only reduction over 4 GiB; %bound = bound / ms/step;
ratio = prefjax tok/s over transformers tok/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from _timing import median_seconds, read_bandwidth



def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import prefjax
    from prefjax.generation import generate
    from prefjax.steering import SteerSpec, random_direction

    model = prefjax.load(args.preset, dtype=args.dtype)
    cfg = model.config
    out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "rows": []}
    leaves = jax.tree_util.tree_leaves(model.params)
    out["weight_bytes"] = int(sum(a.size * a.dtype.itemsize for a in leaves))

    # the ceiling: read bandwidth of a read-only reduction over 4 GiB (GPU; 64 MiB on the CPU)
    out["read_GBps"] = read_bandwidth(4.0 if args.device == "gpu" else 1 / 16) / 1e9

    rs = np.random.RandomState(0)
    for b in args.batch:
        prompts = [list(rs.randint(10, cfg.vocab_size, size=args.prompt)) for _ in range(b)]
        common = dict(temperature=1.0, top_p=1.0, top_k=0, seed=0, stop_ids=())
        v = random_direction(cfg.d_model, 0)
        spec = SteerSpec(layer=cfg.n_layers // 2, direction=v, coef=np.linspace(-4, 4, b), scale=10.0)
        row = {"batch": b}
        variants = [("prefjax", {})] + ([("prefjax+steer", {"steer": spec})] if b in args.steer_batches else [])
        for name, kw in variants:
            t_full = median_seconds(lambda: generate(model, prompts, max_new_tokens=args.new, **common, **kw),
                                  args.repeats)
            if name == "prefjax":  # the one-token time (prefill + 1 step) is shared by both variants
                t_one = median_seconds(lambda: generate(model, prompts, max_new_tokens=1, **common), args.repeats)
            row[name] = {"t_full": t_full, "t_one": t_one}
            print(f"[jax] batch {b} {name}: full {t_full:.3f}s one {t_one:.3f}s", file=sys.stderr, flush=True)
        if args.compare_loops:
            row["python_loop"] = {
                "t_full": median_seconds(lambda: generate(model, prompts, max_new_tokens=args.new, loop="python",
                                                        **common), args.repeats),
                "t_one": median_seconds(lambda: generate(model, prompts, max_new_tokens=1, loop="python", **common),
                                      args.repeats)}
        g = generate(model, prompts, max_new_tokens=args.new, **common)
        assert all(len(t) == args.new for t in g.token_ids)
        out["rows"].append(row)

    if not args.no_hf and args.hf_weights == "copy":  # weights in HF layout for the torch process
        os.makedirs(args.weights_dir, exist_ok=True)
        from prefjax.models.gemma3 import params_to_hf
        index = {}
        host = jax.device_get(model.params)
        for name, arr in params_to_hf(cfg, host, dtype=np.float32 if args.dtype == "float32" else jnp.bfloat16):
            if args.dtype == "bfloat16":
                arr = arr.view(np.uint16)
            np.save(os.path.join(args.weights_dir, name + ".npy"), arr)
            index[name] = name + ".npy"
        ids = rs.randint(10, cfg.vocab_size, size=(2, 12)).astype(np.int32)
        lg, _ = model.run(ids)
        np.save(os.path.join(args.weights_dir, "check_ids.npy"), ids)
        np.save(os.path.join(args.weights_dir, "check_logits.npy"), np.asarray(lg, np.float32))
        with open(os.path.join(args.weights_dir, "index.json"), "w") as fh:
            json.dump(index, fh)
    return out


def run_torch(args) -> dict:
    import numpy as np
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from prefjax.models.gemma3 import PRESETS, hf_config
    cfg = PRESETS[args.preset]
    dev = "cuda" if args.device == "gpu" else "cpu"
    hf_cfg = Gemma3TextConfig(**{k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")},
                              attn_implementation="sdpa")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))
    with torch.device(dev):
        model = Gemma3ForCausalLM(hf_cfg).eval()
    torch.set_default_dtype(prev)
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
           "rows": []}
    if args.hf_weights == "random":  # same shapes, its own random weights (timing does not depend on values)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    else:
        index = json.load(open(os.path.join(args.weights_dir, "index.json")))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, fname in index.items():
                arr = np.load(os.path.join(args.weights_dir, fname))
                t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16) if args.dtype == "bfloat16" \
                    else torch.from_numpy(np.ascontiguousarray(arr))
                params[name].copy_(t.to(dev))
        ids = np.load(os.path.join(args.weights_dir, "check_ids.npy"))
        ref = np.load(os.path.join(args.weights_dir, "check_logits.npy"))
        with torch.no_grad():
            lg = model(torch.tensor(ids, dtype=torch.long, device=dev)).logits.float().cpu().numpy()
        out["weight_check_rel_err"] = float(np.abs(lg - ref).max() / np.abs(ref).max())
    rs = np.random.RandomState(0)
    for b in args.batch:
        x = torch.tensor(rs.randint(10, cfg.vocab_size, size=(b, args.prompt)), dtype=torch.long, device=dev)
        am = torch.ones_like(x)

        def gen(n, cache):
            kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n,
                      pad_token_id=cfg.pad_id)
            if cache:
                kw["cache_implementation"] = cache
            with torch.no_grad():
                o = model.generate(x, attention_mask=am, **kw)
            if dev == "cuda":
                torch.cuda.synchronize()
            return o

        cache = "static" if args.hf_cache == "static" else None
        if cache:
            try:
                gen(2, cache)
            except Exception as e:  # noqa: BLE001 - report and fall back to the dynamic cache
                out["static_cache_error"] = f"{type(e).__name__}: {e}"[:300]
                cache = None
        out["cache"] = cache or "dynamic"
        t_full = median_seconds(lambda: gen(args.new, cache), args.repeats)
        t_one = median_seconds(lambda: gen(1, cache), args.repeats)
        out["rows"].append({"batch": b, "transformers": {"t_full": t_full, "t_one": t_one}})
        print(f"[torch] batch {b}: full {t_full:.3f}s one {t_one:.3f}s", file=sys.stderr, flush=True)
    return out


def _sub(args, which):
    cmd = [sys.executable, __file__, "--_worker", which] + args.argv
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)  # progress streams through
    if r.returncode:
        sys.stderr.write(r.stdout[-4000:])
        raise SystemExit(f"{which} worker failed (rc={r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gemma3-4b")
    ap.add_argument("--batch", default="8,64")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="float32 only to check the weight transfer (rel err ~1e-6)")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--hf-weights", choices=("copy", "random"), default="copy",
                    help="copy: transformers loads prefjax's weights (checked); random: its own random weights "
                         "at the same shapes (no 54 GB round trip through disk at 27B)")
    ap.add_argument("--steer-batches", default="8", help="batch sizes that also time the steered decode")
    ap.add_argument("--hf-cache", choices=("dynamic", "static"), default="dynamic",
                    help="transformers' KV cache; 'static' makes transformers torch.compile the step (minutes at 27B)")
    ap.add_argument("--compare-loops", action="store_true", help="also time loop='python' (jitted step)")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    argv = [a for a in sys.argv[1:]]
    if "--_worker" in argv:
        i = argv.index("--_worker")
        argv = argv[:i] + argv[i + 2:]
    args = ap.parse_args()
    args.argv = argv
    args.batch = [int(b) for b in str(args.batch).split(",")]
    args.steer_batches = [int(b) for b in str(args.steer_batches).split(",") if b]
    if args.weights_dir is None:
        args.weights_dir = os.path.join(tempfile.gettempdir(), f"prefjax_bench_decode_{args.preset}")
        args.argv += ["--weights-dir", args.weights_dir]
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args._worker == "jax":
        print(json.dumps(run_jax(args)))
        return
    if args._worker == "torch":
        print(json.dumps(run_torch(args)))
        return

    jx = _sub(args, "jax")
    th = None if args.no_hf else _sub(args, "torch")
    wb = jx["weight_bytes"]
    cells = args.prompt + args.new
    from prefjax.models.gemma3 import PRESETS
    c = PRESETS[args.preset]
    print(f"# bench_decode preset={args.preset} prompt={args.prompt} new={args.new} repeats={args.repeats}")
    print(f"# jax device: {jx['device']} (jax {jx['jax']}); read bandwidth {jx['read_GBps']:.1f} GB/s; "
          f"weights {wb / 1e9:.3f} GB")
    if th:
        check = (f"weight transfer check ({args.dtype} logits rel err) {th['weight_check_rel_err']:.2e}"
                 if "weight_check_rel_err" in th else "own random weights at the same shapes")
        print(f"# torch device: {th['device']} (torch {th['torch']}); cache={th.get('cache')}; {check}")
        if "static_cache_error" in th:
            print(f"# static cache failed: {th['static_cache_error']}")
    print(f"{'impl':<16} {'batch':>5} {'tok/s':>10} {'ms/step':>9} {'kv GB':>7} {'bound ms':>9} {'%bound':>7} "
          f"{'ratio':>6}")
    for i, row in enumerate(jx["rows"]):
        b = row["batch"]
        kv_gb = 2 * c.n_layers * b * cells * c.n_kv_heads * c.head_dim * 2 / 1e9
        impls = [(k, row[k]) for k in ("prefjax", "prefjax+steer", "python_loop") if k in row]
        ref_tps = None
        if th:
            tr = th["rows"][i]["transformers"]
            impls.append(("transformers", tr))
            ref_tps = b * args.new / tr["t_full"]
        for name, t in impls:
            tps = b * args.new / t["t_full"]
            step = (t["t_full"] - t["t_one"]) / max(args.new - 1, 1)
            bound = (wb / 1e9 + kv_gb) / jx["read_GBps"]
            share = f"{100 * bound / step:>6.1f}%" if step > 0 else "      -"
            ratio = f"{tps / ref_tps:6.2f}" if ref_tps else "     -"
            print(f"{name:<16} {b:>5} {tps:>10.1f} {step * 1e3:>9.3f} {kv_gb:>7.3f} {bound * 1e3:>9.3f} {share} "
                  f"{ratio}")


if __name__ == "__main__":
    main()
