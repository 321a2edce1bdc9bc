"""Worker for tests/test_engine_mesh.py: the continuous-batching engine on meshes of fake CPU devices
against the same engine without a mesh, in one process of 8 fake CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_engine_mesh_worker.py OUT.json

Writes OUT.json: per case, the no-mesh and the mesh results (token ids, finished flags, captures as
lists) and facts the tests check (donated decode states consumed, the rows error's message, the
elicitation runner's log).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("PREFJAX_PROGRESS", "0")


def prompts_of(lengths, seed=0, vocab=512):
    import numpy as np
    rng = np.random.RandomState(seed)
    return [[int(t) for t in rng.randint(3, vocab, size=n)] for n in lengths]


def samples(res):
    """Engine results as JSON: per request, per sample, tokens, finished, captures."""
    return [[{"tokens": s.token_ids, "finished": s.finished, "capture_steps": s.capture_steps,
              "captures": None if s.captures is None else {h: v.tolist() for h, v in s.captures.items()}}
             for s in r] for r in res]


def main(out_path: str) -> None:
    import json
    import io
    import contextlib

    import jax
    import numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    assert len(jax.devices()) == 8, jax.devices()

    import prefjax
    import prefjax.engine as engine_mod
    from prefjax.engine import Engine, EngineError, Request, RowCapture, RowSteer
    from prefjax.sharding import make_mesh
    from prefjax.steering import random_direction

    dev = jax.devices()
    out = {}

    # Donation: every decode step's donated state and rowvars are consumed (their buffers aliased to the
    # outputs, which needs the shardings of inputs and outputs to match). Counted around the real step.
    # Also the row splits the steps' decode states had (``valid``'s partition spec).
    real_step = engine_mod._step
    donation = {"steps": 0, "kept": 0, "valid_specs": [], "kv_head_specs": []}

    def checked_step(params, state, rowvars, *a, **k):
        res = real_step(params, state, rowvars, *a, **k)
        donation["steps"] += 1
        donation["kept"] += sum(not x.is_deleted() for x in jax.tree_util.tree_leaves((state, rowvars)))
        valid = res[0]["valid"]
        axis = getattr(valid.sharding, "spec", (None,))[0]
        axis = "+".join(axis) if isinstance(axis, tuple) else str(axis)
        spec = f"{valid.shape[0]} rows in shards of {valid.sharding.shard_shape(valid.shape)[0]} over {axis}"
        if spec not in donation["valid_specs"]:
            donation["valid_specs"].append(spec)
        k = res[0]["k"]  # the KV cache: its head axis split as the sharding rules split kv_heads
        k, axis = (k[0], 2) if isinstance(k, engine_mod.PerLayer) else (k, 3)
        spec = f"{k.shape[axis]} kv heads in shards of {k.sharding.shard_shape(k.shape)[axis]}"
        if spec not in donation["kv_head_specs"]:
            donation["kv_head_specs"].append(spec)
        return res

    engine_mod._step = checked_step

    # CPU collectives inside a scanned layer loop can deadlock on a 2-core host (tests/test_qwen35.py):
    # every mesh run here unrolls its layers; the no-mesh references run the same settings.
    loops = dict(unroll=True, prefill_unroll=True)

    gemma = prefjax.load("gemma3-tiny")  # sliding window 8: the prompts below run past it
    meshes = {"data2": make_mesh({"data": 2}, dev[:2]), "fsdp2_tensor2": make_mesh({"fsdp": 2, "tensor": 2}, dev[:4])}
    on = {k: prefjax.load("gemma3-tiny", mesh=m) for k, m in meshes.items()}

    # 1. greedy ragged requests: early stops (a stop id from the middle of a continuation), refills
    prompts = prompts_of([5, 14, 3, 20, 9, 11, 7])
    news = [6, 3, 9, 5, 2, 8, 7]
    reqs = [Request(p, n) for p, n in zip(prompts, news)]
    free = Engine(gemma, rows=4, temperature=0.0, stop_ids=(), **loops).run(reqs)
    stop = free[0][0].token_ids[3]
    kw = dict(rows=4, temperature=0.0, stop_ids=(stop,), sync_every=2, **loops)
    ref = Engine(gemma, **kw)
    out["greedy"] = {"ref": samples(ref.run(reqs)), "ref_prefills": ref.stats.prefills}
    for name, m in on.items():
        eng = Engine(m, **kw)
        out["greedy"][name] = samples(eng.run(reqs))
        out["greedy"][name + "_prefills"] = eng.stats.prefills

    # 2. temperature 1, top-k 50: three samples per request share a prefill, per-sample streams
    sreqs = [Request(p, 6, n_samples=3, example_id=100 * i) for i, p in enumerate(prompts_of([6, 13, 4], seed=2))]
    skw = dict(rows=4, temperature=1.0, top_k=50, seed=3, stop_ids=(), **loops)
    out["sampled"] = {"ref": samples(Engine(gemma, **skw).run(sreqs)),
                      "data2": samples(Engine(on["data2"], **skw).run(sreqs))}

    # 3. a steered row (a signed prompt mask and generated tokens) and captures (one of them on the
    #    steered row), next to unsteered rows. The prompts share a 10-token head with no padding after
    #    it, which the no-mesh engine shares (``shared_prefix``); under a mesh every prompt is prefilled
    #    whole, compared with the no-mesh engine without sharing (the same computation).
    d = gemma.config.d_model
    head = prompts_of([10], seed=5)[0]
    cp = [head + t for t in prompts_of([8, 8, 8], seed=6)]
    mask = np.zeros(len(cp[1]), np.float32)
    mask[11:13], mask[14] = 1.0, -1.0
    creqs = [Request(cp[0], 6, capture=RowCapture(("blocks.1.hook_resid_post", "ln_final.hook_normalized"), (0, 3, 5))),
             Request(cp[1], 7, steer=RowSteer(2, random_direction(d, 1), 4.0, scale=10.0, tokens=mask),
                     capture=RowCapture(("blocks.2.hook_resid_post",), (1, 6))),
             Request(cp[2], 5, steer=RowSteer(0, random_direction(d, 2), -3.0, scale=10.0, tokens="generated")),
             Request(cp[0], 4, n_samples=2)]
    ckw = dict(rows=2, temperature=0.0, stop_ids=(), sync_every=3, prompt_bucket=8, **loops)
    shared = Engine(gemma, **ckw)
    shared.run(creqs)
    out["steer_capture"] = {"ref": samples(Engine(gemma, share_prefix=False, **ckw).run(creqs)),
                            "shared_prefix": shared.stats.prefix_tokens}
    for name, m in on.items():
        eng = Engine(m, **ckw)
        out["steer_capture"][name] = samples(eng.run(creqs))
        out["steer_capture"][name + "_prefix"] = eng.stats.prefix_tokens

    # 4. Qwen-3.5 MoE (DeltaNet recurrent rows, routed experts) on an expert axis: the experts run
    #    expert-parallel and the expert devices split the rows
    moe = prefjax.load("qwen35-moe-tiny", dtype="float32")
    moe_on = prefjax.load("qwen35-moe-tiny", dtype="float32", mesh=make_mesh({"expert": 2}, dev[:2]))
    qp = prompts_of([3, 12, 1, 7, 9], seed=11)
    qreqs = [Request(p, n) for p, n in zip(qp, [6, 4, 6, 4, 6])]
    qfree = Engine(moe, rows=2, temperature=0.0, stop_ids=(), **loops).run(qreqs)
    qkw = dict(rows=2, temperature=0.0, stop_ids=(qfree[0][0].token_ids[2],), sync_every=2, **loops)
    out["moe"] = {"ref": samples(Engine(moe, **qkw).run(qreqs)), "expert2": samples(Engine(moe_on, **qkw).run(qreqs))}
    spec = moe_on.params["blocks"]["experts_gate"].sharding.spec
    out["moe"]["experts_sharded"] = "expert" in str(spec)

    out["donation"] = donation

    # 5. rows that do not split over the batch axes
    try:
        Engine(on["data2"], rows=3)
        out["rows_error"] = None
    except EngineError as e:
        out["rows_error"] = str(e)

    # 6. the elicitation runner serves a mesh-loaded model through the engine (its log line)
    from prefjax.elicit.personas import get_persona
    from prefjax.elicit.runner import ElicitConfig, make_jobs, run_choices
    from prefjax.store import ComparisonsStore
    from prefjax.tasks import load_default_pool
    import tempfile
    tok_model = prefjax.load("gemma3-tiny-tok", dtype="float32", mesh=meshes["data2"])
    pool = load_default_pool().subset(4, seed=0)
    ids = pool.ids
    jobs = make_jobs([(ids[0], ids[1]), (ids[2], ids[3])], ["default"], samples=2)
    err = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(err):
        store = ComparisonsStore(os.path.join(tmp, "s"))
        cfg = ElicitConfig(mode="sample", max_new_tokens=4, batch_size=3, temperature=0.0)  # 3 rows -> 4
        run_choices(tok_model, pool, jobs, {"default": get_persona("default")}, store, cfg)
        out["runner"] = {"rows": len(store), "jobs": len(jobs), "log": err.getvalue()}

    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1])
