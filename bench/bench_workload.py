"""The elicitation workload of issue 16, items (b) and (c): prefjax's engine against transformers
``generate`` on the same pair prompts, with the share of the read bound; optionally (``--step-batches``)
one sampled decode step at given row counts on both sides (item (a)), in the same processes.

Gemma-3-27B, one H200 (one ``nvidia-h200`` call; the JAX part skips a run it would start after
``--budget`` = 240 s and transformers stops starting batches after ``--hf-budget`` = 150 s):

    python bench/bench_workload.py --preset gemma3-27b --pairs 64

Qwen-3.5-122B-A10B on two H200s (one ``nvidia-h200-x2`` call; ``bench/gpu_qwen35_x2.sh`` has the budgeted
command): the engine on the mesh ``expert=2`` (each GPU holds half of every layer's experts and a replica of
the rest; the rows split over the two GPUs; the routed experts run in the Pallas kernels under
``shard_map``), transformers placed over both GPUs as ``device_map="auto"`` would place a checkpoint
(``--device auto``; ``_hf_place.hf_spread``, shared with bench_qwen35.py):

    python bench/bench_workload.py --preset qwen35-122b-a10b --mesh expert=2 --device auto --moe-impl pallas \
        --pairs 32 --step-batches 8,64 --deadline 570

CPU smoke tests (a minute or two each; the Qwen one on two fake CPU devices, transformers placed by the
same ``device_map`` code on the CPU):

    python bench/bench_workload.py --preset gemma3-tiny --device cpu
    python bench/bench_workload.py --preset qwen35-moe-tiny --device cpu --mesh expert=2 --hf-spread \
        --pairs 4 --new 8 --rows 4 --step-batches 2,4

Workload: ``--pairs`` pair prompts from ``bench/data/workload_prompts.npz``: pairs of distinct tasks
of the bundled pool (``prefjax.tasks.load_default_pool()``) drawn with a fixed seed, rendered with the
default choice template under the ``evil`` persona's system prompt and tokenized with the Gemma-3
tokenizer (their real lengths: 145-215 tokens). The GPU box has no tokenizer, so the file is made once
where the packaged Gemma-3 tokenizer is installed (``--write-prompts``) and committed. Each prompt gets
K = ``--samples`` samples (temperature 1) of at most ``--new`` tokens, stopping at end-of-turn or EOS.
Random bf16 weights at the preset's shape (timing does not depend on values beyond routing). With random
weights a stop is about as likely as any other token, so almost every sample runs to ``--new`` tokens;
the tables count the tokens really generated.

* Gemma-3 presets: the prompt ids as stored; stop ids 106 and 1 (end-of-turn, EOS; stored in the file).
* Other vocabularies (Qwen-3.5's 248,320; the tiny presets'): every id is mapped into range as
  ``id % vocab_size`` (ids below the vocabulary size, all but the rarest Gemma tokens, are unchanged).
  The mapped prompts have the real lengths and shared prefix but are not Qwen text; with random weights
  that changes nothing that is timed. Qwen-3.5 stops at its own ids: ``<|im_end|>`` 248046 and
  ``<|endoftext|>`` 248044 (the released generation config's ``eos_token_id``), taken ``% vocab_size`` on
  the tiny preset.

1. JAX process: read bandwidth (read-only reduction over 4 GiB); the engine (``--rows`` cache rows,
   K samples sharing their prompt's prefill) on the workload unsteered (b); with ``--step-batches``, one
   sampled decode step (the engine's own compiled step: forward of one token per row, sampling,
   donated state) timed at each row count, at the workload's context (the bucketed longest prompt): at
   ``--rows`` rows it is the program the run just used, other counts are compiled ahead of time in a
   thread while the engine warms up; then with 64 distinct steering directions, one per request
   round-robin (c: layer ``n_layers // 2``, every token steered). The engine prefills the prompt prefix
   all requests share (122 tokens) once per run where the sliding window allows it (Gemma-3-27B's
   1,024-slot window does; gemma3-tiny's 8 does not); steering every token (c) makes the prefix per request
   again. There is no shared prefix under a mesh or with Qwen-3.5's recurrent state (every prompt is
   prefilled whole). Untimed warm-up runs (the same requests, 8 new tokens) compile the programs.
   ``--mesh`` loads the model sharded over this process's devices (rows split over the batch axes).
2. transformers process: the same family's transformers class built from prefjax's config (its own
   random weights, same shapes; Gemma: sdpa attention), on one device or spread (``--device auto`` /
   ``--hf-spread``); with ``--step-batches``, one sampled cached decode step per row count
   (``_hf_place.hf_decode_seconds``: ``--step-new`` steps after an untimed prefill of the same context,
   per step); then ``generate(do_sample=True, num_return_sequences=K)`` over static batches of
   ``ceil(rows / K)`` prompts sorted by length (left padded), same stop ids, same ``max_new_tokens``;
   one untimed warm-up batch.

Both processes print a ``RESULT`` JSON line after each stage. With ``--deadline`` the first process gets its
share (JAX: the deadline minus ``--hf-reserve``; transformers, with ``--reference-first``: ``--hf-reserve``)
and the second one all that is left; each skips a stage it has no time left for (transformers stops starting
``generate`` batches), and a process killed at its limit still reports the stages it finished (marked partial).

Bound (printed per run and per step with its parts): bytes one decode step must move, per device, over the
read bandwidth measured in the same run. A perfectly packed run needs ``ceil(generated tokens / rows)``
steps (at least the longest sample's), each at ``rows`` rows, plus every generated token reading its own
context's keys and values once. A step reads

* dense models (Gemma-3): every weight once;
* MoE (Qwen-3.5): every non-expert weight once per device (replicated; the input embedding table of an
  untied model is only gathered, so it is left out, the unembedding is read whole), plus the experts the
  step's routed tokens touch, split over the expert devices: ``E * (1 - (1 - k/E) ** rows)`` distinct experts
  per layer, the expectation under uniform routing (random weights route near-uniformly; 57 of 256 at 8 rows,
  222 at 64), times one expert's three matrices, times the MoE layers, over the expert-axis size;
* recurrent state (Qwen-3.5's DeltaNet conv windows and delta-rule state, float32): every row's, read and
  written back (counted twice), split over the row devices;
* keys and values of the context, split over the row devices.
Prefill FLOPs are not in the bound (the prompts are short; the engine's prefill count is printed).
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = os.path.join(HERE, "data", "workload_prompts.npz")
PERSONA = "evil"
N_DIRECTIONS = 64
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring: one XLA compilation
GEMMA_VOCAB = 262_144  # the tokenizer the prompt file was made with
QWEN35_STOP_IDS = (248046, 248044)  # <|im_end|>, <|endoftext|> (Qwen3.5's generation config eos_token_id)


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


def read_prompts(path: str, n: int, vocab: int, family: str) -> tuple[list[list[int]], list[int], dict]:
    """The first ``n`` prompts, their stop ids and the file's meta. Outside Gemma-3's vocabulary every id is
    mapped into range as ``id % vocab`` (module docstring); Qwen-3.5 stops at its own end-of-turn and EOS."""
    with np.load(path) as z:
        toks, lens, meta = z["tokens"], z["lens"], json.loads(bytes(z["meta"]).decode())
    if n > len(lens):
        raise SystemExit(f"{path} holds {len(lens)} prompts; asked for {n}")
    off = np.concatenate([[0], np.cumsum(lens)])
    prompts = [toks[off[i]:off[i + 1]].tolist() for i in range(n)]
    stops = list(meta["stop_ids"])
    if vocab < GEMMA_VOCAB:  # same lengths, ids folded into the vocabulary
        prompts = [[t % vocab for t in p] for p in prompts]
    if family == "qwen35":
        stops = sorted({s % vocab for s in QWEN35_STOP_IDS})
    return prompts, stops, meta


def ideal_steps(gen_lens, rows) -> int:
    return max(math.ceil(sum(gen_lens) / rows), max(gen_lens, default=0))


def step_bytes(info: dict, rows: int) -> dict:
    """Bytes one decode step at ``rows`` rows must move on each device, by part (module docstring), without
    the keys and values of the context (:func:`bound_seconds` adds them): ``weights`` (non-expert, once per
    device), ``experts`` (the expected distinct experts the routed tokens touch, this device's share) and
    ``state`` (recurrent state read and written, this device's rows)."""
    e, k = info["n_experts"], info["top_k"]
    touched = e * (1.0 - (1.0 - k / e) ** rows) if e else 0.0
    return {"weights": float(info["dense_bytes"]),
            "experts": touched * info["expert_bytes_each"] * info["moe_layers"] / info["expert_devices"],
            "state": 2.0 * info["state_bytes_per_row"] * rows / info["row_devices"],
            "experts_touched_per_layer": touched}


def kv_read_bytes(info: dict, contexts) -> float:
    """Keys and values read by one token at each context length in ``contexts``, summed, per device."""
    return float(np.sum(np.asarray(contexts, np.float64))) * info["kv_bytes_per_token"] / info["row_devices"]


def bound_seconds(info: dict, prompt_lens, gen_lens, rows) -> float:
    """Read bound of a decode run that generated ``gen_lens[j]`` tokens after a prompt of ``prompt_lens[j]``
    tokens: perfectly packed steps (at least the longest sample's) at ``rows`` rows, each moving
    :func:`step_bytes`; each token reads its context's keys and values."""
    gen = np.asarray(gen_lens, np.float64)
    p = np.asarray(prompt_lens, np.float64)
    sb = step_bytes(info, rows)
    per_step = sb["weights"] + sb["experts"] + sb["state"]
    kv = float(np.sum(gen * p + gen * (gen + 1) / 2)) * info["kv_bytes_per_token"] / info["row_devices"]
    return (ideal_steps(gen_lens, rows) * per_step + kv) / info["read_Bps"]


def bound_info(model) -> dict:
    """What :func:`step_bytes` needs about ``model`` (sizes in bytes), from its parameters and decode state."""
    import jax
    from prefjax.models import moe as M
    from prefjax.sharding import batch_multiple
    cfg, params = model.config, model.params
    leaves = lambda t: jax.tree_util.tree_leaves(t)
    nbytes = lambda a: int(a.size * a.dtype.itemsize)
    total = sum(nbytes(a) for a in leaves(params))
    blocks = params.get("blocks", {})
    experts = sum(nbytes(blocks[k]) for k in M.EXPERT_WEIGHTS if k in blocks)
    n_exp = int(getattr(cfg, "n_experts", 0) or 0) if experts else 0
    moe_layers = int(blocks[M.EXPERT_WEIGHTS[0]].shape[0]) if n_exp else 0
    tied = bool(getattr(cfg, "tie_word_embeddings", True)) or "lm_head" not in params
    embed = 0 if tied or "embed" not in params else nbytes(params["embed"])  # gathered, not read whole
    mesh = model.mesh
    shape = dict(mesh.shape) if mesh is not None else {}
    st = jax.eval_shape(lambda: model.family.init_state(cfg, 1, 1, model.dtype))
    layout = model.family.state_layout
    row_leaves = layout.row_leaves if layout is not None else ()
    kv_leaves = layout.slot_leaves if layout is not None else ("k", "v")
    return {"weight_bytes": total, "dense_bytes": total - experts - embed, "embed_bytes_left_out": embed,
            "expert_bytes_total": experts, "n_experts": n_exp, "top_k": int(getattr(cfg, "top_k", 0) or 0),
            "moe_layers": moe_layers, "expert_bytes_each": experts // max(n_exp * moe_layers, 1),
            "expert_devices": int(shape.get("expert", 1)), "row_devices": int(batch_multiple(mesh)),
            "state_bytes_per_row": sum(nbytes(st[k]) for k in row_leaves),
            "kv_bytes_per_token": sum(nbytes(st[k]) for k in kv_leaves if k in st)}


def parse_mesh(text: str | None) -> dict[str, int] | None:
    return None if not text else {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}


def _until(args) -> float:
    return args._until if args._until else float("inf")


# --------------------------------------------------------------------------------------------
# JAX process.

def _time_steps(probe, t0: int, steps: int) -> float:
    """Seconds per decode step of ``probe`` (``Engine.decode_step``): two warm steps, then the best of two runs
    of ``steps`` steps dispatched back to back (one sync at the end)."""
    t = t0
    for _ in range(2):
        tok = probe.step(t)
        t += 1
    tok.block_until_ready()
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(steps):
            tok = probe.step(t)
            t += 1
        tok.block_until_ready()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def run_jax(args, emit) -> dict:
    import jax
    import prefjax
    from prefjax.engine import Engine, Request, RowSteer
    from prefjax.models.layers import decode_kernel
    from prefjax.sharding import make_mesh, mesh_context
    from prefjax.steering import random_direction
    from _timing import kernel_spec, phase_timer, read_bandwidth
    from bench_qwen35 import peak_gib

    t_start = time.time()
    until = _until(args)
    kind, opts = kernel_spec(args.decode_kernel)
    decode_kernel(kind, **opts).__enter__()  # this worker's whole run (prefjax.models.layers.decode_kernel)
    gpu = args.device != "cpu"
    mesh_shape = parse_mesh(args.mesh)
    mesh = None if mesh_shape is None else make_mesh(mesh_shape, jax.devices()[:int(np.prod(list(mesh_shape.values())))])
    model = prefjax.load(args.preset, dtype="bfloat16" if gpu else "float32", mesh=mesh)
    if args.moe_impl:
        model = dataclasses.replace(model, config=dataclasses.replace(model.config, moe_impl=args.moe_impl))
    if args.per_layer_weights:  # every layer loop then unrolls, the engine's prefills too
        model = model.split_layers()
    cfg = model.config
    fam = model.family.name
    prompts, stops, meta = read_prompts(args.prompts, args.pairs, cfg.vocab_size, fam)
    k, new = args.samples, args.new
    out = {"device": jax.devices()[0].device_kind, "n_devices": len(jax.devices()), "jax": jax.__version__,
           "runs": {}, "steps": {}, "meta": meta, "stop_ids": stops, "prompt_lens": [len(p) for p in prompts],
           "mesh": mesh_shape, "family": fam, "decode_kernel": args.decode_kernel}

    def report(now):
        out["elapsed"] = now - t_start
        emit(out)

    phase = phase_timer(out, "jax", report)

    jax.block_until_ready(model.params)
    if fam == "qwen35":
        from prefjax.models import qwen35 as Q
        with mesh_context(mesh):
            out["moe_impl"] = Q.moe_impl(cfg)
    out["bound_info"] = info = bound_info(model)
    out["weight_bytes"] = info["weight_bytes"]
    phase("load")

    p0 = -(-max(len(p) for p in prompts) // 16) * 16
    # + one prompt bucket: with a shared prefix the engine's prompt width is the prefix plus the bucketed
    # tail, which can exceed the bucketed longest prompt by up to a bucket
    # rounded up to 64 slots: the GPU decode kernel's tiles (it skips the blocks no row has reached)
    cache_len = -(-(p0 + 16 + args.cache_gens * new) // 64) * 64
    # meshes on XLA:CPU unroll every layer loop (a scanned loop with collectives can deadlock on a small
    # host, tests/_engine_mesh_worker.py); elsewhere the engine's defaults: on GPUs the step unrolled, the
    # prefills scanned, or unrolled with --per-layer-weights
    loops = dict(unroll=True, prefill_unroll=True) if (mesh is not None and not gpu) else \
        dict(prefill_unroll=args.prefill_unroll or None, unroll=None if args.step_unroll == "auto" else args.step_unroll == "1")
    eng = Engine(model, rows=args.rows, cache_len=cache_len, temperature=1.0, seed=0, stop_ids=stops,
                 sync_every=args.sync_every, lookahead=not args.no_lookahead, prompt_bucket=16, prefill_rows=8,
                 **loops)
    out.update(cache_len=cache_len, step_context=p0, engine={
        "unroll": eng.unroll, "prefill_unroll": eng.prefill_unroll, "per_layer_weights": args.per_layer_weights,
        "sync_every": eng.sync_every, "lookahead": eng.lookahead})
    # the read bandwidth first, with nothing else in the process: a compile in the thread below holds the GIL in
    # stretches, and the short timed reductions then read as half the card's bandwidth (1,527-1,977 GB/s on
    # two H200s in the sixth session, against 3,543-3,786 GB/s measured alone; BUILD_NOTES.md)
    out["read_Bps"] = info["read_Bps"] = bw = read_bandwidth(4.0 if gpu else 1 / 16)
    print(f"[jax] read bandwidth {bw / 1e9:.0f} GB/s, weights {info['weight_bytes'] / 1e9:.2f} GB", file=sys.stderr,
          flush=True)
    phase("read_bandwidth")

    # decode steps at other row counts than the engine's: compiled ahead of time in a thread while the
    # engine warms up (only compilers overlap with the main thread's programs; nothing runs there)
    others = {b: eng.decode_step(b, cache_len) for b in args.step_batches if b != args.rows}

    def compile_others():
        for b, probe in others.items():
            t0 = time.time()
            probe.compile(p0)
            print(f"[jax] step at {b} rows compiled ahead of time in {time.time() - t0:.0f}s", file=sys.stderr,
                  flush=True)

    # run in a copy of this thread's context: the decode-kernel choice (a context variable set above) holds there
    thread = threading.Thread(target=contextvars.copy_context().run, args=(compile_others,), daemon=True)
    if others:
        thread.start()

    layer = cfg.n_layers // 2
    dirs = [random_direction(cfg.d_model, i) for i in range(N_DIRECTIONS)]
    runs = {
        "unsteered": [Request(p, new, n_samples=k, example_id=i * k) for i, p in enumerate(prompts)],
        f"steered{N_DIRECTIONS}": [Request(p, new, n_samples=k, example_id=i * k,
                                           steer=RowSteer(layer, dirs[i % N_DIRECTIONS], coef=4.0, tokens="all"))
                                   for i, p in enumerate(prompts)],
    }
    if args.no_steered:
        runs.pop(f"steered{N_DIRECTIONS}")
    est = {"run": 45.0 if gpu else 5.0, "step": 20.0 if gpu else 2.0}

    def skip(name, need):
        if time.time() - t_start > args.budget or until - time.time() < need:
            out.setdefault("skipped", []).append(name)
            print(f"[jax] no time left: {name} skipped", file=sys.stderr, flush=True)
            emit(out)
            return True
        return False

    def timed_run(name, reqs):
        # warm-up: every request with 8 new tokens: the same prompts give the same shared prefix and
        # prefill width, so the timed run uses only compiled programs
        t0 = time.perf_counter()
        eng.run([dataclasses.replace(r, max_new_tokens=min(8, new)) for r in reqs])
        out.setdefault("warmup_seconds", {})[name] = time.perf_counter() - t0
        phase(f"warm_{name}")
        if skip(name, est["run"]):
            return
        t0 = time.perf_counter()
        res = eng.run(reqs)
        t = time.perf_counter() - t0
        est["run"] = 1.2 * t
        gen = [len(s.token_ids) for r in res for s in r]
        out["runs"][name] = {"seconds": t, "gen_lens": gen, "stopped": int(sum(s.finished for r in res for s in r)),
                             "stats": vars(eng.stats).copy()}
        print(f"[jax] {name}: {t:.2f}s, {sum(gen)} tokens, {eng.stats}", file=sys.stderr, flush=True)
        phase(f"run_{name}")

    unsteered = runs.pop("unsteered")
    timed_run("unsteered", unsteered)
    if args.trace and "unsteered" in out["runs"] and not skip("trace", est["run"]):
        out["trace"] = traced_run(eng, unsteered, args.trace, waves=2)
        phase("trace")

    # XLA compilations while the engine's own step is timed (0 expected: the run compiled it)
    compiles = [0]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.__setitem__(0, compiles[0] + (event == COMPILE_EVENT)))
    if others and args.step_batches:
        thread.join(None if until == float("inf") else max(0.0, until - time.time() - est["step"]))
    for b in args.step_batches:
        if skip(f"step B={b}", est["step"]):
            continue
        if b == args.rows:  # the engine's own program, found in jit's cache
            probe = eng.decode_step(b, cache_len)
        elif b in others and not thread.is_alive():
            probe = others.pop(b)
        else:
            out.setdefault("skipped", []).append(f"step B={b} (not compiled in time)")
            continue
        before = compiles[0]
        sec = _time_steps(probe, p0, args.steps)
        probe = None
        row = {"seconds": sec, "context": p0 + 2 + args.steps}
        if not thread.is_alive():  # (a compile in the thread would count too)
            row["compiled_while_timed"] = compiles[0] - before
        out["steps"][str(b)] = row
        print(f"[jax] decode step at {b} rows: {sec * 1e3:.2f} ms", file=sys.stderr, flush=True)
        phase(f"step_B{b}")

    for name, reqs in runs.items():
        if not skip(f"warm-up {name}", est["run"]):
            timed_run(name, reqs)
    out["peak_gib"] = peak_gib()
    out["elapsed"] = time.time() - t_start
    return out


def traced_run(eng, reqs, log_dir: str, waves: int = 2) -> dict:
    """Run ``reqs`` again with the profiler on until the requests of the first ``waves`` waves are done (about
    ``waves * rows / n_samples`` requests; the rest runs untraced), then summarize the device timeline: busy
    and idle time, the longest idle gaps and the kernels by time (``summarize_trace``)."""
    import jax
    from summarize_trace import by_name, kernels, timeline

    per_wave = max(1, eng.rows // max(r.n_samples for r in reqs))
    need = min(len(reqs), waves * per_wave)
    done, stats, tracing = [0], {}, [True]
    t0 = time.perf_counter()
    jax.profiler.start_trace(log_dir, create_perfetto_trace=True)

    def on_done(i, samples):
        done[0] += 1
        if tracing[0] and done[0] >= need:
            jax.profiler.stop_trace()
            tracing[0] = False
            stats["traced_seconds"] = time.perf_counter() - t0

    try:
        eng.run(reqs, on_done=on_done)
    finally:
        if tracing[0]:
            jax.profiler.stop_trace()
            stats["traced_seconds"] = time.perf_counter() - t0
    ks = kernels(log_dir)
    tl = timeline(ks)
    tl.update(stats, requests_traced=need, kernels=len(ks),
              top=[(n[:100], round(us / 1e3, 3), c) for n, us, c in by_name(ks, 15)])
    print(f"[jax] trace: {need} requests, span {tl['span_us'] / 1e6:.2f}s, device busy {tl['busy_us'] / 1e6:.2f}s, idle "
          f"{tl['idle_us'] / 1e6:.2f}s", file=sys.stderr, flush=True)
    return tl


# --------------------------------------------------------------------------------------------
# transformers process.

def _hf_model(args, cfg, family: str, dev: str):
    """The family's transformers model from prefjax's config with random weights (normal * 0.02), on
    ``dev`` or spread over every GPU (or the CPU) as ``device_map="auto"`` places a checkpoint. Returns
    ``(model, input device, placement)``."""
    import torch
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    if family == "qwen35":
        from transformers import Qwen3_5MoeForCausalLM as cls
        from bench_qwen35 import hf_config
        hf_cfg = hf_config(cfg, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    else:
        from transformers import Gemma3ForCausalLM as cls, Gemma3TextConfig
        from prefjax.models.gemma3 import hf_config
        hf_cfg = Gemma3TextConfig(**{k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")},
                                  attn_implementation="sdpa")
    torch.manual_seed(0)
    if args.hf_spread:
        from _hf_place import hf_spread
        return hf_spread(cls, hf_cfg, dtype, frac=args.hf_frac)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = cls(hf_cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model, dev, {dev: round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 2)}


def run_torch(args, emit) -> dict:
    import importlib.util

    import torch
    import transformers
    from prefjax.models import family_for_preset
    from _hf_place import hf_decode_seconds, sync_all
    from _timing import phase_timer

    t_start = time.time()
    until = _until(args)
    fam = family_for_preset(args.preset)
    cfg = fam.presets[args.preset]
    gpu = args.device != "cpu"
    prompts, stops, _ = read_prompts(args.prompts, args.pairs, cfg.vocab_size, fam.name)
    out = {"device": torch.cuda.get_device_name() if gpu else "cpu", "n_devices": torch.cuda.device_count(),
           "torch": torch.__version__, "transformers": transformers.__version__, "batches": 0, "pairs": 0,
           "gen_lens": [], "prompt_lens": [], "steps": {},
           "fla": importlib.util.find_spec("fla") is not None,
           "causal_conv1d": importlib.util.find_spec("causal_conv1d") is not None}

    def report(now):
        out["elapsed"] = now - t_start
        emit(out)

    phase = phase_timer(out, "torch", report)

    model, dev, placed = _hf_model(args, cfg, fam.name, "cuda" if gpu else "cpu")
    out["placement_gib"] = placed
    out["experts_implementation"] = str(getattr(model.config, "_experts_implementation", None))
    phase("build")

    k, new = args.samples, args.new
    # one sampled decode step at each row count, at the workload's context (the bucketed longest prompt)
    p0 = -(-max(len(p) for p in prompts) // 16) * 16
    for b in args.step_batches:
        if until - time.time() < 30:
            out.setdefault("skipped", []).append(f"step B={b}")
            continue
        ids = torch.randint(0, cfg.vocab_size, (b, p0), device=dev)
        hf_decode_seconds(model, ids, 2, temperature=1.0)  # warm-up
        out["steps"][str(b)] = {"seconds": hf_decode_seconds(model, ids, args.step_new, temperature=1.0) / args.step_new,
                                "context": p0 + args.step_new // 2}
        phase(f"step_B{b}")

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
        sync_all()
        lens = []
        for row in o[:, w:].tolist():
            n = next((j for j, t in enumerate(row) if t in stop_set), len(row))
            lens.append(n)
        return lens

    gen(batches[-1], 2)  # warm-up (the longest prompts)
    phase("warm_generate")
    t0 = time.perf_counter()
    # a batch's time before one is measured: --new steps at the slowest step timed above
    last = new * max((r["seconds"] for r in out["steps"].values()), default=0.0)
    for idx in batches:
        now = time.perf_counter()
        if now - t0 > args.hf_budget or until - time.time() < 1.2 * last + 5:
            out["partial"] = True
            break
        out["gen_lens"] += gen(idx, new)
        last = time.perf_counter() - now
        out["prompt_lens"] += [len(prompts[i]) for i in idx for _ in range(k)]
        out["batches"] += 1
        out["pairs"] += len(idx)
        out["seconds"] = time.perf_counter() - t0
        phase(f"batch{out['batches']}")
    out["seconds"] = time.perf_counter() - t0
    out["elapsed"] = time.time() - t_start
    print(f"[torch] {out['pairs']} pairs in {out['seconds']:.2f}s", file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------------------------

def _worker(which: str, argv: list[str], timeout: float | None, env: dict) -> dict:
    """Run one part in its own process; its last ``RESULT`` line (``partial`` when the process failed or ran
    past ``timeout`` after reporting some stages), or ``{"error": ...}`` when it reported none."""
    from bench_qwen35 import last_result, as_text
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker", which] + argv,
                           stdout=subprocess.PIPE, text=True, env=env, timeout=timeout)
        stdout, why = r.stdout, (f"rc {r.returncode}" if r.returncode else None)
    except subprocess.TimeoutExpired as e:
        stdout, why = as_text(e.stdout), f"ran past its {timeout:.0f} s"
    res = last_result(stdout)
    if res is None:
        return {"error": f"{which} part {why or 'printed no result'} after {time.time() - t0:.0f} s: "
                         + (stdout or "")[-2000:]}
    if why:
        res["partial"] = f"{which} part {why} after {time.time() - t0:.0f} s"
    return res


def _report(args, jx: dict, th: dict | None) -> None:
    from _timing import over_bound
    info, k = jx["bound_info"], args.samples
    bw = info["read_Bps"]
    meta, plens = jx["meta"], jx["prompt_lens"]
    print(f"# bench_workload {args.preset}: {args.pairs} pair prompts x K={k}, max new {args.new}, stop ids "
          f"{jx['stop_ids']}, persona {meta['persona']!r} (system prompt), prompts {min(plens)}-{max(plens)} "
          f"tokens (mean {np.mean(plens):.1f}; {meta['common_prefix']} shared by all"
          + ("" if jx["family"] == "gemma3" else "; Gemma-3 ids taken % vocab") + f"); {args.rows} rows, "
          f"{jx['cache_len']} cache slots")
    warm = ", ".join(f"{n} {s:.0f}s" for n, s in jx.get("warmup_seconds", {}).items())
    print(f"# {jx['device']} x{jx['n_devices']} jax {jx['jax']}, mesh {jx['mesh']}, engine {jx['engine']}"
          + (f", experts {jx['moe_impl']}" if jx.get("moe_impl") else "")
          + f", decode attention {jx.get('decode_kernel', 'auto')} (prefjax.models.layers.decode_kernel); read bandwidth {bw / 1e9:.0f} GB/s "
          f"(reduction over {'4 GiB' if args.device != 'cpu' else '64 MiB'}); weights {info['weight_bytes'] / 1e9:.2f} GB; "
          f"KV {info['kv_bytes_per_token'] / 1e3:.1f} kB/token; jax part {jx.get('elapsed', 0):.0f}s "
          f"(warm-up {warm}; phases {jx['phases_s']}; peak {jx.get('peak_gib')} GiB)"
          + (f"; PARTIAL: {jx['partial']}" if jx.get("partial") else ""))
    if info["n_experts"] or info["state_bytes_per_row"]:
        print(f"# bound per device: non-expert weights {info['dense_bytes'] / 1e9:.2f} GB (embedding table "
              f"{info['embed_bytes_left_out'] / 1e9:.2f} GB left out), experts {info['expert_bytes_each'] / 1e6:.1f} MB "
              f"each x {info['moe_layers']} layers / {info['expert_devices']} expert devices, recurrent state "
              f"{info['state_bytes_per_row'] / 1e6:.1f} MB/row read + written / {info['row_devices']} row devices")
    ok = th is not None and "error" not in th
    if ok:
        print(f"# transformers {th['transformers']} torch {th['torch']} on {th['device']}"
              + (f" x{th['n_devices']}" if th["n_devices"] else "")
              + f" (placement GiB {th.get('placement_gib')}, experts {th.get('experts_implementation')}, "
              f"fla {th.get('fla')}, causal_conv1d {th.get('causal_conv1d')}): static batches of "
              f"{-(-args.rows // k)} prompts x {k}, sorted by length; {th['pairs']} pairs"
              + (" (stopped early: time)" if th.get("partial") is True else "")
              + f"; part {th.get('elapsed', 0):.0f}s, phases {th['phases_s']}"
              + (f"; PARTIAL: {th['partial']}" if isinstance(th.get("partial"), str) else ""))
    elif th:
        print(f"# transformers failed: {th['error'][-800:]}")

    if jx["steps"] or (ok and th["steps"]):
        from _timing import bound_line
        print(f"{'decode step (sampled)':<28} {'ms':>9} {'hf ms':>9} {'ratio':>6} {'bound ms':>9} {'share':>7}")
        for b in args.step_batches:
            mine, ref = jx["steps"].get(str(b)), (th["steps"].get(str(b)) if ok else None)
            sb = step_bytes(info, b)
            ctx = (mine or ref or {}).get("context", jx["step_context"])
            bound = (sb["weights"] + sb["experts"] + sb["state"] + kv_read_bytes(info, [ctx] * b)) / bw
            if mine:
                print(bound_line(f"B={b} prefjax engine step", mine["seconds"], ref and ref["seconds"], bound)
                      + (f"  ({mine['compiled_while_timed']} XLA compilations inside the timing)"
                         if mine.get("compiled_while_timed") else ""))
            elif ref:
                print(f"{'B=%d transformers only' % b:<28} {'-':>9} {ref['seconds'] * 1e3:9.2f}")
            print(f"#   B={b} bound parts per device: weights {sb['weights'] / 1e9:.2f} GB, experts "
                  f"{sb['experts'] / 1e9:.2f} GB ({sb['experts_touched_per_layer']:.1f} touched per layer), state "
                  f"{sb['state'] / 1e9:.2f} GB, KV {kv_read_bytes(info, [ctx] * b) / 1e9:.3f} GB at {ctx} tokens")

    print(f"{'run':<30} {'seconds':>8} {'pairs/s':>8} {'gen tok/s':>10} {'tok/sample':>10} {'vs hf':>6} "
          f"{'bound s':>8} {'share':>6}")

    def line(name, sec, pairs, gen, prompt_lens, ref_rate):
        rate = pairs / sec
        b = bound_seconds(info, prompt_lens, gen, args.rows)
        ratio = f"{rate / ref_rate:6.2f}" if ref_rate else "     -"
        print(f"{name:<30} {sec:8.2f} {rate:8.3f} {sum(gen) / sec:10.1f} {np.mean(gen):10.1f} {ratio} "
              f"{b:8.2f} {100 * b / sec:5.1f}%" + over_bound(b, sec))
        return rate

    hf_rate = None
    if ok and th["pairs"]:
        hf_rate = line(f"transformers generate ({th['pairs']})", th["seconds"], th["pairs"], th["gen_lens"],
                       th["prompt_lens"], None)
    rep = [p for p in plens for _ in range(k)]
    rates = {}
    for name, r in jx["runs"].items():
        rates[name] = line(f"prefjax engine {name}", r["seconds"], args.pairs, r["gen_lens"], rep, hf_rate)
        s = r["stats"]
        ideal = ideal_steps(r["gen_lens"], args.rows)
        print(f"#   {name}: {s['decode_steps']} decode steps ({ideal} if every row were always busy), "
              f"{s['prefills']} prefills, shared prefix prefilled once: {s.get('prefix_tokens', 0)} tokens, "
              f"{s['waves']} waves, {r['stopped']} of {len(r['gen_lens'])} samples stopped at a stop id")
        if s.get("run_seconds"):
            host = s["run_seconds"] - s["admit_seconds"] - s["decode_seconds"]
            print(f"#   {name} time: admissions (prefills + row writes) {s['admit_seconds']:.2f}s, decode steps "
                  f"{s['decode_seconds']:.2f}s ({1e3 * s['decode_seconds'] / max(s['decode_steps'], 1):.2f} ms/step; "
                  f"{s.get('lookahead_steps', 0)} launched before the previous read), host {host:.2f}s")
    tr = jx.get("trace")
    if tr:
        print(f"# profile of the unsteered run's first {tr['requests_traced']} requests ({tr.get('traced_seconds', 0):.2f}s "
              f"traced): device span {tr['span_us'] / 1e6:.3f}s, busy {tr['busy_us'] / 1e6:.3f}s, idle "
              f"{tr['idle_us'] / 1e6:.3f}s ({tr['idle_in_long_gaps_us'] / 1e6:.3f}s in {tr['long_gaps']} gaps > "
              f"{tr['gap_us']:.0f} us)")
        for g in tr["gaps"][:8]:
            print(f"#   gap {g['us'] / 1e3:8.2f} ms at {g['at_us'] / 1e6:7.3f}s: after {g['after'][:60]} | before "
                  f"{g['before'][:60]}")
        for name, ms, n in tr["top"][:10]:
            print(f"#   kernel {ms:10.1f} ms x{n:<6d} {name[:80]}")
    if ok and th["pairs"] and th["pairs"] < args.pairs:
        print(f"#   (transformers ran {th['pairs']} of the {args.pairs} pairs, the shortest prompts first; its pairs/s "
              "is over those)")
    steered = f"steered{N_DIRECTIONS}"
    if "unsteered" in rates and steered in rates:
        print(f"# {N_DIRECTIONS} distinct steering vectors cost {100 * (1 - rates[steered] / rates['unsteered']):.1f}% "
              "of unsteered pairs/s")
        pu = jx["runs"]["unsteered"]["stats"].get("prefix_tokens", 0)
        ps = jx["runs"][steered]["stats"].get("prefix_tokens", 0)
        if pu != ps:
            print(f"#   (includes prefix reuse: the unsteered run prefilled its {pu}-token shared prefix once, the "
                  f"steered run, steering every token, prefilled it per request)")
    skipped = jx.get("skipped", []) + [f"transformers {s}" for s in (th or {}).get("skipped", [])]
    if skipped:
        print(f"# skipped (time): {', '.join(skipped)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gemma3-27b")
    ap.add_argument("--device", choices=("gpu", "cpu", "auto"), default="gpu",
                    help="'auto': GPUs, transformers spread over all of them (--hf-spread)")
    ap.add_argument("--mesh", default=None, help="prefjax mesh over this process's devices, e.g. 'expert=2' "
                    "(default: one device); on the CPU that many fake devices")
    ap.add_argument("--moe-impl", default=None, help="prefjax MoE path (default: the preset's: 'grouped', the "
                    "Pallas kernels on GPUs)")
    ap.add_argument("--hf-spread", action="store_true", help="transformers placed as device_map='auto' would "
                    "place it over every GPU (or the CPU)")
    ap.add_argument("--hf-frac", type=float, default=0.9, help="share of each GPU's free memory the spread "
                    "transformers weights may fill")
    ap.add_argument("--pairs", type=int, default=None, help="pair prompts (default: 128 on gpu, 8 on cpu)")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--sync-every", type=int, default=8, help="engine: decode steps between reads of the new "
                    "tokens (each read leaves the device idle while the host launches the next step: ~10 ms per "
                    "read at the 27B shape, BUILD_NOTES.md)")
    ap.add_argument("--no-lookahead", action="store_true", help="engine: read each chunk's tokens before launching "
                    "the next chunk's first step (Engine(lookahead=False))")
    ap.add_argument("--cache-gens", type=int, default=1,
                    help="cache slots = longest prompt (bucketed) + this many times --new. 1 suits random "
                         "weights (samples never stop early, rows finish together); real replies stopping "
                         "early refill rows mid-wave with a larger value")
    ap.add_argument("--step-batches", default="", help="row counts at which to time one sampled decode step "
                    "on both sides, e.g. '8,64' (default: none)")
    ap.add_argument("--steps", type=int, default=12, help="prefjax: decode steps per timed run of --step-batches")
    ap.add_argument("--step-new", type=int, default=16, help="transformers: decode steps timed per --step-batches")
    ap.add_argument("--prefill-unroll", action="store_true", help="engine prefills unrolled (default: scanned)")
    ap.add_argument("--per-layer-weights", action="store_true", help="prefjax block weights split into one buffer "
                    "per layer (Model.split_layers); the engine's prefills are then unrolled")
    ap.add_argument("--step-unroll", choices=("auto", "0", "1"), default="auto",
                    help="the engine's decode step: unrolled (1; the GPU default) or scanned (0: one layer to compile; "
                         "Qwen-3.5's expert stacks stay out of the layer fold either way)")
    ap.add_argument("--no-steered", action="store_true", help="skip the run with 64 steering vectors")
    ap.add_argument("--prompts", default=PROMPTS)
    ap.add_argument("--budget", type=float, default=240, help="JAX part: seconds after which runs are skipped")
    ap.add_argument("--hf-budget", type=float, default=150, help="transformers: stop starting batches after this")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for the whole command: the JAX part gets "
                    "what is left minus --hf-reserve, transformers the rest; each skips stages it has no time for")
    ap.add_argument("--hf-reserve", type=float, default=240, help="seconds of --deadline kept for transformers")
    ap.add_argument("--reference-first", action="store_true", help="run transformers before JAX (with --deadline "
                    "it gets at most --hf-reserve seconds; JAX then gets all that is left)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--trace", default=None, metavar="DIR", help="after the timed unsteered run, run it again with "
                    "the profiler on over its first two waves and print the device timeline (busy, idle, gaps)")
    ap.add_argument("--decode-kernel", default="auto", help="decode attention: auto, xla, "
                    "pallas[:block=64;num_warps=8] (layers.decode_kernel)")
    ap.add_argument("--write-prompts", type=int, default=0, metavar="N",
                    help="tokenize N pair prompts into --prompts and exit (needs the packaged Gemma tokenizer)")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_until", type=float, default=None, help=argparse.SUPPRESS)  # a worker's end, epoch seconds
    args = ap.parse_args()
    if args.device == "auto":
        args.hf_spread = True
    args.step_batches = [int(b) for b in args.step_batches.split(",") if b]
    if args.pairs is None:
        args.pairs = 128 if args.device != "cpu" else 8
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args.write_prompts:
        write_prompts(args.prompts, args.write_prompts)
        return
    if args._worker:
        emit = lambda res: print("RESULT " + json.dumps(res), flush=True)
        emit(run_jax(args, emit) if args._worker == "jax" else run_torch(args, emit))
        sys.stdout.flush()
        os._exit(0)  # a step still compiling in a daemon thread must not hold the process
    t_start = time.time()
    argv = [a for a in sys.argv[1:]]
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    mesh = parse_mesh(args.mesh)
    if mesh and args.device == "cpu" and "device_count" not in env.get("XLA_FLAGS", ""):
        # fake CPU devices: 8 of them (the mesh takes the first ones) as tests/test_engine_mesh.py does; with only
        # as many as the mesh has, the tiny MoE engine hangs on a 2-core host (BUILD_NOTES' XLA:CPU gotcha)
        n = max(8, int(np.prod(list(mesh.values()))))
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    left = lambda: None if args.deadline is None else args.deadline - (time.time() - t_start) - 3

    def part(which, limit):
        extra = [] if limit is None else ["--_until", str(time.time() + limit)]
        if limit is None and which == "torch":
            limit = args.hf_budget + 600
        return _worker(which, argv + extra, limit, env)

    # --deadline: the first part gets its share (transformers: --hf-reserve; JAX: what is left minus that), the
    # second part whatever the first left over
    th = None
    if args.reference_first and not args.no_hf:
        th = part("torch", None if left() is None else min(args.hf_reserve, left()))
    jx = part("jax", None if left() is None else left() - (args.hf_reserve if not (args.no_hf or th) else 0))
    if "error" in jx:
        if th:
            print(f"# transformers part: {json.dumps(th)[-3000:]}")
        raise SystemExit("jax part failed: " + jx["error"])
    if th is None and not args.no_hf:
        th = part("torch", left())
    _report(args, jx, th)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
