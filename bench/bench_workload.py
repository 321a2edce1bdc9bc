"""The elicitation workload of issue 16, items (b) and (c): prefjax's engine against transformers
``generate`` on the same pair prompts, with the share of the read bound.

H200 run (one ``nvidia-h200`` call; estimated 6-7 minutes from the B=64 step times in BUILD_NOTES, not
yet measured; the JAX part skips a run it would start after ``--budget`` = 240 s and transformers stops
starting batches after ``--hf-budget`` = 150 s, so the worst case stays under the 10-minute call limit):

    python bench/bench_workload.py --preset gemma3-27b --pairs 128

CPU smoke test (under a minute):

    python bench/bench_workload.py --preset gemma3-tiny --device cpu

Workload: ``--pairs`` pair prompts from ``bench/data/workload_prompts.npz``: pairs of distinct tasks
of the bundled pool (``prefjax.tasks.load_default_pool()``) drawn with a fixed seed, rendered with the
default choice template under the ``evil`` persona's system prompt and tokenized with the Gemma-3
tokenizer (their real lengths: 145-215 tokens). The GPU box has no tokenizer, so the file is made once
where the packaged Gemma-3 tokenizer is installed (``--write-prompts``) and committed. Each prompt gets
K = ``--samples`` samples (temperature 1) of at most ``--new`` tokens, stopping at end-of-turn or EOS
(Gemma ids 106 and 1, stored in the file). Random bf16 weights at the preset's shape (timing does not
depend on values). With random weights a stop is about as likely as any other token, so almost every
sample runs to ``--new`` tokens; the tables count the tokens really generated.

1. JAX process: read bandwidth (read-only reduction over 4 GiB); the engine (``--rows`` cache rows,
   K samples sharing their prompt's prefill) on the workload unsteered (b), then with 64 distinct
   steering directions, one per request round-robin (c: layer ``n_layers // 2``, every token steered).
   The engine prefills the prompt prefix all requests share (chat header, system prompt, template
   instructions: 122 tokens) once per run where the sliding window allows it (Gemma-3-27B's 1,024-slot
   window does; gemma3-tiny's 8 does not); steering every token (c) makes the prefix per request again.
   Untimed warm-up runs (the same requests, 8 new tokens) compile the programs.
2. transformers process: ``Gemma3ForCausalLM`` built from prefjax's config (its own random weights,
   same shapes, sdpa attention, dynamic cache), ``generate(do_sample=True, num_return_sequences=K)`` over
   static batches of ``ceil(rows / K)`` prompts sorted by length (left padded), same stop ids, same
   ``max_new_tokens``; one untimed warm-up batch.

Bound: the decode steps a perfectly packed run needs (generated tokens / rows) each read every weight
once, plus every generated token reads its own context's keys and values once; divided by the measured
read bandwidth. Prefill FLOPs are not in the bound (the prompts are short; prefill's share of the run is
printed as the engine's prefill count only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = os.path.join(HERE, "data", "workload_prompts.npz")
PERSONA = "evil"
N_DIRECTIONS = 64


# --------------------------------------------------------------------------------------------
# The prompt file (built where the packaged Gemma-3 tokenizer is installed).

def write_prompts(path: str, n: int, seed: int = 0) -> None:
    from prefjax.checkpoints.gguf import default_gguf_path
    from prefjax.elicit.personas import get_persona
    from prefjax.elicit.prompts import DEFAULT_TEMPLATE, choice_messages
    from prefjax.model import common_prefix_len
    from prefjax.tasks import load_default_pool
    from prefjax.tokenize import Tokenizer

    tok = Tokenizer.from_gguf(default_gguf_path())
    pool = load_default_pool()
    persona = get_persona(PERSONA)
    rng = np.random.default_rng(seed)
    ids = pool.ids
    prompts = []
    for _ in range(n):
        a, b = rng.choice(len(ids), 2, replace=False)
        prompts.append(tok.encode_chat(choice_messages(DEFAULT_TEMPLATE, pool[ids[a]], pool[ids[b]], persona)))
    stops = sorted(set(tok.eos_ids) | {tok.end_of_turn_id})
    lens = np.array([len(p) for p in prompts], np.int32)
    meta = {"persona": PERSONA, "template": "default", "seed": seed, "pool": len(pool), "stop_ids": stops,
            "common_prefix": int(common_prefix_len(prompts, min_len=1))}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(path, tokens=np.concatenate([np.asarray(p, np.int32) for p in prompts]), lens=lens,
                        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    print(f"wrote {n} prompts to {path}: lengths {lens.min()}-{lens.max()} (mean {lens.mean():.1f}), "
          f"shared prefix {meta['common_prefix']} tokens, stop ids {stops}")


def read_prompts(path: str, n: int, vocab: int) -> tuple[list[list[int]], list[int], dict]:
    with np.load(path) as z:
        toks, lens, meta = z["tokens"], z["lens"], json.loads(bytes(z["meta"]).decode())
    if n > len(lens):
        raise SystemExit(f"{path} holds {len(lens)} prompts; asked for {n}")
    off = np.concatenate([[0], np.cumsum(lens)])
    prompts = [toks[off[i]:off[i + 1]].tolist() for i in range(n)]
    stops = list(meta["stop_ids"])
    if vocab < 262_144:  # a tiny preset: same lengths, ids folded into its vocabulary (smoke test only)
        prompts = [[t % vocab for t in p] for p in prompts]
    return prompts, stops, meta


def kv_bytes_per_token(cfg, itemsize: int) -> int:
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize


def ideal_steps(gen_lens, rows) -> int:
    return max(math.ceil(sum(gen_lens) / rows), max(gen_lens, default=0))


def bound_seconds(prompt_lens, gen_lens, rows, weight_bytes, kvt, bw) -> float:
    """Read bound of a decode run that generated ``gen_lens[j]`` tokens after a prompt of
    ``prompt_lens[j]`` tokens: perfectly packed steps (at least the longest sample's) each read all
    weights; each token reads its context's keys and values."""
    gen = np.asarray(gen_lens, np.float64)
    p = np.asarray(prompt_lens, np.float64)
    steps = ideal_steps(gen_lens, rows)
    kv = float(np.sum(gen * p + gen * (gen + 1) / 2)) * kvt
    return (steps * weight_bytes + kv) / bw


# --------------------------------------------------------------------------------------------
# JAX process.

def run_jax(args) -> dict:
    import jax
    import prefjax
    from prefjax.engine import Engine, Request, RowSteer
    from prefjax.steering import random_direction
    from _timing import read_bandwidth

    from prefjax.models.layers import decode_kernel

    t_start = time.time()
    kind, _, opts = args.decode_kernel.partition(":")  # e.g. "pallas:block=64;num_warps=8"
    opts = {k_: (v_ if k_ == "products" else int(v_)) for k_, v_ in (o.split("=") for o in opts.split(";") if o)}
    decode_kernel(kind, **opts).__enter__()  # this worker's whole run (prefjax.models.layers.decode_kernel)
    gpu = args.device == "gpu"
    model = prefjax.load(args.preset, dtype="bfloat16" if gpu else "float32")
    cfg = model.config
    prompts, stops, meta = read_prompts(args.prompts, args.pairs, cfg.vocab_size)
    k, new = args.samples, args.new
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "runs": {}, "meta": meta,
           "decode_kernel": args.decode_kernel,
           "prompt_lens": [len(p) for p in prompts]}
    out["weight_bytes"] = wb = int(sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(model.params)))
    out["kv_bytes_per_token"] = kv_bytes_per_token(cfg, np.dtype(model.dtype).itemsize)
    out["read_Bps"] = bw = read_bandwidth(4.0 if gpu else 1 / 16)
    print(f"[jax] read bandwidth {bw / 1e9:.0f} GB/s, weights {wb / 1e9:.2f} GB", file=sys.stderr, flush=True)

    p0 = -(-max(len(p) for p in prompts) // 16) * 16
    # + one prompt bucket: with a shared prefix the engine's prompt width is the prefix plus the bucketed
    # tail, which can exceed the bucketed longest prompt by up to a bucket
    # rounded up to 64 slots: the GPU decode kernel's tiles (it skips the blocks no row has reached)
    cache_len = -(-(p0 + 16 + args.cache_gens * new) // 64) * 64
    eng = Engine(model, rows=args.rows, cache_len=cache_len, temperature=1.0, seed=0, stop_ids=stops, sync_every=8,
                 prompt_bucket=16, prefill_rows=8)
    out["cache_len"] = cache_len
    layer = cfg.n_layers // 2
    dirs = [random_direction(cfg.d_model, i) for i in range(N_DIRECTIONS)]
    runs = {
        "unsteered": [Request(p, new, n_samples=k, example_id=i * k) for i, p in enumerate(prompts)],
        f"steered{N_DIRECTIONS}": [Request(p, new, n_samples=k, example_id=i * k,
                                           steer=RowSteer(layer, dirs[i % N_DIRECTIONS], coef=4.0, tokens="all"))
                                   for i, p in enumerate(prompts)],
    }
    # warm-up: every request of each run with 8 new tokens: the same prompts give the same shared prefix
    # and prefill width, so the timed runs use only compiled programs
    t0 = time.perf_counter()
    for reqs in runs.values():
        eng.run([dataclasses.replace(r, max_new_tokens=min(8, new)) for r in reqs])
    out["warmup_seconds"] = time.perf_counter() - t0
    print(f"[jax] warm-up (compile) {out['warmup_seconds']:.1f}s", file=sys.stderr, flush=True)
    for name, reqs in runs.items():
        if time.time() - t_start > args.budget:
            out.setdefault("skipped", []).append(name)
            print(f"[jax] time budget spent: {name} skipped", file=sys.stderr, flush=True)
            continue
        t0 = time.perf_counter()
        res = eng.run(reqs)
        t = time.perf_counter() - t0
        gen = [len(s.token_ids) for r in res for s in r]
        out["runs"][name] = {"seconds": t, "gen_lens": gen, "stopped": int(sum(s.finished for r in res for s in r)),
                             "stats": vars(eng.stats).copy()}
        print(f"[jax] {name}: {t:.2f}s, {sum(gen)} tokens, {eng.stats}", file=sys.stderr, flush=True)
    out["elapsed"] = time.time() - t_start
    return out


# --------------------------------------------------------------------------------------------
# transformers process.

def run_torch(args) -> dict:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    from prefjax.models.gemma3 import PRESETS, hf_config

    t_start = time.time()
    cfg = PRESETS[args.preset]
    gpu = args.device == "gpu"
    dev = "cuda" if gpu else "cpu"
    prompts, stops, _ = read_prompts(args.prompts, args.pairs, cfg.vocab_size)
    hf_cfg = Gemma3TextConfig(**{k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")},
                              attn_implementation="sdpa")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if gpu else torch.float32)
    with torch.device(dev):
        model = Gemma3ForCausalLM(hf_cfg).eval()
    torch.set_default_dtype(prev)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    k, new = args.samples, args.new
    ppb = -(-args.rows // k)  # prompts per static batch: about ``rows`` sequences
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    batches = [order[i:i + ppb] for i in range(0, len(order), ppb)]
    stop_set = set(stops)

    def gen(idx, n_new):
        w = max(len(prompts[i]) for i in idx)
        x = torch.full((len(idx), w), cfg.pad_id, dtype=torch.long)
        am = torch.zeros((len(idx), w), dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, w - len(prompts[i]):] = torch.tensor(prompts[i])
            am[r, w - len(prompts[i]):] = 1
        with torch.no_grad():
            o = model.generate(x.to(dev), attention_mask=am.to(dev), do_sample=True, temperature=1.0, top_k=0,
                               top_p=1.0, max_new_tokens=n_new, num_return_sequences=k, eos_token_id=stops,
                               pad_token_id=cfg.pad_id)
        if gpu:
            torch.cuda.synchronize()
        lens = []
        for row in o[:, w:].tolist():
            n = next((j for j, t in enumerate(row) if t in stop_set), len(row))
            lens.append(n)
        return lens

    gen(batches[-1], 2)  # warm-up (the longest prompts)
    out = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__, "batches": 0,
           "pairs": 0, "gen_lens": [], "prompt_lens": []}
    import transformers
    out["transformers"] = transformers.__version__
    t0 = time.perf_counter()
    for idx in batches:
        if time.perf_counter() - t0 > args.hf_budget:
            out["partial"] = True
            break
        out["gen_lens"] += gen(idx, new)
        out["prompt_lens"] += [len(prompts[i]) for i in idx for _ in range(k)]
        out["batches"] += 1
        out["pairs"] += len(idx)
    out["seconds"] = time.perf_counter() - t0
    out["elapsed"] = time.time() - t_start
    print(f"[torch] {out['pairs']} pairs in {out['seconds']:.2f}s", file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------------------------

def _worker(which: str, argv: list[str], timeout: float | None) -> dict:
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.95")
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker", which] + argv,
                           stdout=subprocess.PIPE, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{which} part ran past {timeout} s"}
    if r.returncode:
        return {"error": f"rc {r.returncode}: " + r.stdout[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gemma3-27b")
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--pairs", type=int, default=None, help="pair prompts (default: 128 on gpu, 8 on cpu)")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--cache-gens", type=int, default=1,
                    help="cache slots = longest prompt (bucketed) + this many times --new. 1 suits random "
                         "weights (samples never stop early, rows finish together); real replies stopping "
                         "early refill rows mid-wave with a larger value")
    ap.add_argument("--prompts", default=PROMPTS)
    ap.add_argument("--budget", type=float, default=240, help="JAX part: seconds after which runs are skipped")
    ap.add_argument("--hf-budget", type=float, default=150, help="transformers: stop starting batches after this")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--decode-kernel", default="auto", help="decode attention: auto, xla, pallas[:block=64;num_warps=8] (layers.decode_kernel)")
    ap.add_argument("--write-prompts", type=int, default=0, metavar="N",
                    help="tokenize N pair prompts into --prompts and exit (needs the packaged Gemma tokenizer)")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pairs is None:
        args.pairs = 128 if args.device == "gpu" else 8
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args.write_prompts:
        write_prompts(args.prompts, args.write_prompts)
        return
    if args._worker:
        print(json.dumps(run_jax(args) if args._worker == "jax" else run_torch(args)))
        return
    argv = [a for a in sys.argv[1:]]
    jx = _worker("jax", argv, None)
    if "error" in jx:
        raise SystemExit("jax part failed: " + jx["error"])
    th = None if args.no_hf else _worker("torch", argv, args.hf_budget + 240)
    bw, wb, kvt = jx["read_Bps"], jx["weight_bytes"], jx["kv_bytes_per_token"]
    meta, plens, k = jx["meta"], jx["prompt_lens"], args.samples
    print(f"# bench_workload {args.preset}: {args.pairs} pair prompts x K={k}, max new {args.new}, stop ids "
          f"{meta['stop_ids']}, persona {meta['persona']!r} (system prompt), prompts {min(plens)}-{max(plens)} "
          f"tokens (mean {np.mean(plens):.1f}; {meta['common_prefix']} shared by all); {args.rows} rows, "
          f"{jx['cache_len']} cache slots")
    print(f"# decode attention: {jx.get('decode_kernel', 'auto')} (prefjax.models.layers.decode_kernel)")
    print(f"# {jx['device']} jax {jx['jax']}; read bandwidth {bw / 1e9:.0f} GB/s (reduction over "
          f"{'4 GiB' if args.device == 'gpu' else '64 MiB'}); weights {wb / 1e9:.2f} GB; KV {kvt / 1e3:.1f} kB/token; "
          f"jax part {jx['elapsed']:.0f}s (warm-up {jx['warmup_seconds']:.0f}s)")
    if th and "error" not in th:
        print(f"# transformers {th['transformers']} torch {th['torch']} on {th['device']}: static batches of "
              f"{-(-args.rows // k)} prompts x {k}, sorted by length; {th['pairs']} pairs"
              + (" (stopped at --hf-budget)" if th.get("partial") else "") + f"; part {th['elapsed']:.0f}s")
    elif th:
        print(f"# transformers failed: {th['error'][-800:]}")
    hf_rate = None
    print(f"{'run':<22} {'seconds':>8} {'pairs/s':>8} {'gen tok/s':>10} {'tok/sample':>10} {'vs hf':>6} "
          f"{'bound s':>8} {'share':>6}")

    def line(name, sec, pairs, gen, prompt_lens, ref_rate):
        rate = pairs / sec
        b = bound_seconds(prompt_lens, gen, args.rows, wb, kvt, bw)
        ratio = f"{rate / ref_rate:6.2f}" if ref_rate else "     -"
        print(f"{name:<22} {sec:8.2f} {rate:8.3f} {sum(gen) / sec:10.1f} {np.mean(gen):10.1f} {ratio} "
              f"{b:8.2f} {100 * b / sec:5.1f}%")
        return rate

    if th and "error" not in th and th["pairs"]:
        hf_rate = line("transformers generate", th["seconds"], th["pairs"], th["gen_lens"], th["prompt_lens"], None)
    rep = [p for p in plens for _ in range(k)]
    rates = {}
    for name, r in jx["runs"].items():
        rates[name] = line(f"prefjax engine {name}", r["seconds"], args.pairs, r["gen_lens"], rep, hf_rate)
        s = r["stats"]
        ideal = ideal_steps(r["gen_lens"], args.rows)
        print(f"#   {name}: {s['decode_steps']} decode steps ({ideal} if every row were always busy), "
              f"{s['prefills']} prefills, shared prefix prefilled once: {s.get('prefix_tokens', 0)} tokens, "
              f"{s['waves']} waves, {r['stopped']} of {len(r['gen_lens'])} samples stopped at a stop id")
    steered = f"steered{N_DIRECTIONS}"
    if "unsteered" in rates and steered in rates:
        print(f"# {N_DIRECTIONS} distinct steering vectors cost {100 * (1 - rates[steered] / rates['unsteered']):.1f}% "
              "of unsteered pairs/s")
        pu = jx["runs"]["unsteered"]["stats"].get("prefix_tokens", 0)
        ps = jx["runs"][steered]["stats"].get("prefix_tokens", 0)
        if pu != ps:
            print(f"#   (includes prefix reuse: the unsteered run prefilled its {pu}-token shared prefix once, the "
                  f"steered run, steering every token, prefilled it per request)")
    if jx.get("skipped"):
        print(f"# skipped (time budget): {', '.join(jx['skipped'])}")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
