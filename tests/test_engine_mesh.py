"""The continuous-batching engine on a single-process device mesh equals the same engine on one device.

One worker process with 8 fake CPU devices (XLA_FLAGS must be set before jax is imported, so it is a
subprocess: tests/_engine_mesh_worker.py) runs every case on one device and on meshes: gemma3-tiny on a
data axis of 2 and on a 2 x 2 fsdp x tensor mesh (rows split over fsdp, heads over tensor), the
Qwen-3.5 MoE tiny preset on an expert axis of 2 (experts expert-parallel, rows split over the expert
devices). Greedy tokens are compared exactly. Sampled tokens (temperature 1, top-k 50) are compared
exactly too: the sampling keys are the same and on these float32 models (matmul precision "highest")
the logits of the two layouts differ by float rounding only, far from flipping a draw; should that
ever change, the check to fall back to is per-sample determinism and stream ids, not equality.
Captures are compared at float32 noise (1e-5 of the hook's largest entry; measured ~8e-7).

Also: every decode step's donated state is consumed (its shardings match the step's outputs), the
decode state is split over the batch axes, a row count that does not split is refused naming the
sizes, a multi-process mesh is refused, and the elicitation runner serves a mesh-loaded model through
the engine.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import prefjax
from prefjax.engine import Engine, EngineError, engine_refusal, mesh_rows
from prefjax.sharding import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine_mesh") / "out.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_engine_mesh_worker.py"), str(out)], env=env,
                       capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def tokens(res):
    return [[(s["tokens"], s["finished"]) for s in req] for req in res]


@pytest.mark.parametrize("mesh", ["data2", "fsdp2_tensor2"])
def test_greedy_ragged_stops_and_refills_equal_one_device(worker, mesh):
    g = worker["greedy"]
    assert any(s["finished"] for req in g["ref"] for s in req)  # a row stopped early
    assert g["ref_prefills"] >= 3 and g[mesh + "_prefills"] == g["ref_prefills"]  # rows were refilled
    assert tokens(g[mesh]) == tokens(g["ref"])


def test_sampled_equal_one_device(worker):
    s = worker["sampled"]
    assert tokens(s["data2"]) == tokens(s["ref"])
    assert len({tuple(x["tokens"]) for x in s["ref"][0]}) > 1  # the samples of a request differ


@pytest.mark.parametrize("mesh", ["data2", "fsdp2_tensor2"])
def test_steered_rows_and_captures_equal_one_device(worker, mesh):
    c = worker["steer_capture"]
    assert c["shared_prefix"] == 10 and c[mesh + "_prefix"] == 0  # no shared prefix under a mesh
    assert tokens(c[mesh]) == tokens(c["ref"])
    n = 0
    for req_ref, req_mesh in zip(c["ref"], c[mesh]):
        for a, b in zip(req_ref, req_mesh):
            assert a["capture_steps"] == b["capture_steps"]
            for h, want in (a["captures"] or {}).items():
                want, got = np.asarray(want), np.asarray(b["captures"][h])
                assert want.shape == got.shape and want.size, h
                assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), h
                n += 1
    assert n == 3  # two hooks of request 0, one of the steered request 1


def test_qwen35_moe_on_an_expert_axis_equals_one_device(worker):
    m = worker["moe"]
    assert m["experts_sharded"]
    assert any(s["finished"] for req in m["ref"] for s in req)
    assert tokens(m["expert2"]) == tokens(m["ref"])


def test_donated_state_is_consumed_and_split_over_the_batch_axes(worker):
    d = worker["donation"]
    assert d["steps"] > 0 and d["kept"] == 0  # no decode step kept (copied) a donated input
    specs = set(d["valid_specs"])
    assert {"4 rows in shards of 2 over data", "4 rows in shards of 2 over fsdp",  # gemma3-tiny, 4 rows
            "2 rows in shards of 1 over expert"} <= specs, specs                 # the MoE, 2 rows
    for spec in specs:  # "R rows in shards of N over AXIS": whole on one device, halved on a mesh
        words = spec.split()
        rows, shard, axis = int(words[0]), int(words[5]), words[-1]
        assert (shard == rows) if axis == "None" else (2 * shard == rows and axis in ("data", "fsdp", "expert")), spec
    assert len(specs) == 7, specs  # 4 and 2 rows on one device, data, fsdp; 2 rows on expert
    # the KV cache is split by heads over the tensor axis (gemma3-tiny on fsdp2_tensor2), whole elsewhere
    # (one device, data=2; the MoE's single KV head on expert=2)
    assert set(d["kv_head_specs"]) == {"2 kv heads in shards of 1", "2 kv heads in shards of 2",
                                       "1 kv heads in shards of 1"}, d["kv_head_specs"]


def test_rows_that_do_not_split_are_refused(worker):
    msg = worker["rows_error"]
    assert msg and "rows=3" in msg and "'data': 2" in msg and "multiple of 2" in msg, msg


def test_elicitation_runner_uses_the_engine_on_a_mesh(worker):
    r = worker["runner"]
    assert r["rows"] == r["jobs"] == 8
    assert "choices: engine: 4 prompts, 8 samples" in r["log"] and "instead" not in r["log"], r["log"]


def test_multi_process_meshes_are_refused(monkeypatch):
    model = prefjax.load("gemma3-tiny", mesh=make_mesh())  # no compute: the refusal comes first
    assert engine_refusal(model) is None
    assert mesh_rows(model, 3) == 3  # a mesh of one device splits nothing
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    why = engine_refusal(model)
    assert "one process" in why and "same admission decisions" in why
    with pytest.raises(EngineError, match="same admission decisions"):
        Engine(model)
    assert engine_refusal(dataclasses.replace(model, mesh=None)) is None  # no mesh: one process's own run
