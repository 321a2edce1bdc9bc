"""Stage runner: run.json fingerprint, skip-on-rerun, atomic writers, the workdir layout."""

import json
import os

import numpy as np
import pytest

from prefjax import stages as stages_mod
from prefjax.stages import (Run, StageConfigError, atomic_save_npz, atomic_write_bytes,
                            atomic_write_json, config_fingerprint, to_jsonable)

CFG = {"model": {"name": "tiny", "layers": [1, 2]}, "seed": 0, "progress": True,
       "elicit": {"samples": 3, "log_every": 10}}


def test_run_json_and_fingerprint(tmp_path):
    r = Run(tmp_path / "w", CFG)
    data = json.load(open(tmp_path / "w" / "run.json"))
    assert data["fingerprint"] == r.fingerprint == config_fingerprint(CFG)
    assert data["config"]["model"]["layers"] == [1, 2]
    # safe fields may change (top-level and nested bare names)
    Run(tmp_path / "w", {**CFG, "progress": False, "elicit": {"samples": 3, "log_every": 99}})
    assert config_fingerprint({**CFG, "progress": False}) == r.fingerprint
    assert config_fingerprint({**CFG, "seed": 1}) != r.fingerprint


def test_config_mismatch_names_fields(tmp_path):
    Run(tmp_path / "w", CFG)
    bad = {**CFG, "seed": 1, "model": {"name": "tiny", "layers": [1, 3]}}
    with pytest.raises(StageConfigError) as e:
        Run(tmp_path / "w", bad)
    msg = str(e.value)
    assert "seed: 0 -> 1" in msg and "model.layers" in msg
    assert "progress" not in msg
    with pytest.raises(StageConfigError, match="elicit.temperature"):
        Run(tmp_path / "w", {**CFG, "elicit": {"samples": 3, "log_every": 10, "temperature": 1.0}})


def test_stage_decorator_skips_on_rerun(tmp_path):
    calls = []

    def make(run):
        @run.stage("fit")
        def fit(x):
            calls.append(x)
            atomic_save_npz(run.stage_dir("fit") + "/mu.npz", mu=np.arange(3.0) * x)
            return {"loss": np.float32(0.5), "n": np.int64(x), "vec": np.arange(2)}
        return fit

    run = Run(tmp_path / "w", CFG)
    out = make(run)(2)
    assert out == {"loss": 0.5, "n": 2, "vec": [0, 1]}
    assert os.path.exists(tmp_path / "w" / "stages" / "fit.done")
    out2 = make(Run(tmp_path / "w", CFG))(7)  # a fresh process: skipped, saved result returned
    assert out2 == out and calls == [2]
    np.testing.assert_array_equal(np.load(tmp_path / "w" / "stages" / "fit" / "mu.npz")["mu"],
                                  [0.0, 2.0, 4.0])
    run.invalidate("fit")
    assert make(run)(3)["n"] == 3 and calls == [2, 3]


def test_stage_failure_not_marked_done(tmp_path):
    run = Run(tmp_path / "w", CFG)

    @run.stage("flaky")
    def flaky():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        flaky()
    assert not run.is_done("flaky")
    with pytest.raises(RuntimeError):
        with run.stage("ctx") as st:
            st.result = {"r": 1}
            raise RuntimeError("boom")
    assert not run.is_done("ctx")


def test_stage_context_form(tmp_path):
    run = Run(tmp_path / "w", CFG)
    ran = []
    for _ in range(2):
        with run.stage("probe") as st:
            if not st.done:
                ran.append(1)
                st.result = {"r": 0.71, "nan": float("nan")}
    assert ran == [1]
    assert st.done and st.result == {"r": 0.71, "nan": None}
    assert run.result("probe")["r"] == 0.71
    with pytest.raises(ValueError, match="stage name"):
        run.stage("a/b")


def test_atomic_writers(tmp_path, monkeypatch):
    p = tmp_path / "x.json"
    atomic_write_json(p, {"a": np.float64(1.5), "b": (1, 2)})
    assert json.load(open(p)) == {"a": 1.5, "b": [1, 2]}
    with pytest.raises(ValueError, match="m.k"):
        atomic_write_json(p, {"m": {"k": np.nan}})
    assert json.load(open(p)) == {"a": 1.5, "b": [1, 2]}  # old content untouched

    def failing_replace(src, dst):
        raise OSError("killed before rename")

    monkeypatch.setattr(stages_mod.os, "replace", failing_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"garbage")
    monkeypatch.undo()
    assert json.load(open(p)) == {"a": 1.5, "b": [1, 2]}
    with pytest.raises(TypeError, match="obj"):
        to_jsonable({"obj": object()})


def test_run_layout_owns_every_path(tmp_path):
    """Every path a run writes comes from the layout; a Run is a layout plus the config check."""
    from prefjax.stages import RunLayout, resid_hook
    lay = RunLayout(str(tmp_path / "wd"))
    wd = str(tmp_path / "wd")
    assert lay.run_json == os.path.join(wd, "run.json")
    assert lay.tasks_file() == os.path.join(wd, "stages", "tasks", "tasks.jsonl")
    assert lay.utilities("evil") == os.path.join(wd, "stages", "utilities", "evil.npz")
    assert lay.activations_dir("evil") == os.path.join(wd, "activations", "evil")
    assert lay.probe_dir("evil", 7) == os.path.join(wd, "probes", "evil", "blocks.7.hook_resid_post")
    assert resid_hook(7) == "blocks.7.hook_resid_post"
    assert lay.figure("steering.png") == os.path.join(wd, "figures", "steering.png")
    assert lay.summary_json() == os.path.join(wd, "summary.json") and lay.report_md() == os.path.join(wd, "report.md")
    assert not os.path.exists(wd)  # a layout only names paths
    assert lay.stage_file("steering", "p_a.npz") == os.path.join(wd, "stages", "steering", "p_a.npz")
    assert os.path.isdir(os.path.join(wd, "stages", "steering"))  # stage folders are made on demand
    with pytest.raises(ValueError, match="bad stage name"):
        lay.stage_file("../x", "a.npz")
    run = Run(wd, {"seed": 1})
    assert isinstance(run, RunLayout) and run.utilities("a") == lay.utilities("a")
    run.mark_done("probes", {"r": 0.5})
    assert lay.is_done("probes") and lay.result("probes") == {"r": 0.5}
    assert [d["stage"] for d in lay.done_records()] == ["probes"]
    with pytest.raises(KeyError, match="'utilities' is not done"):
        lay.result("utilities")


# ------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------

def test_progress_env_flag_and_log(monkeypatch, capfd):
    from prefjax.progress import log, progress

    monkeypatch.setenv("PREFJAX_PROGRESS", "0")
    assert list(progress(range(5), desc="quiet")) == [0, 1, 2, 3, 4]
    log("hello from process 0")
    err = capfd.readouterr().err
    assert "quiet" not in err and "hello from process 0" in err
    monkeypatch.setenv("PREFJAX_PROGRESS", "1")
    bar = progress(None, total=4, desc="loud")
    bar.update(4)
    bar.close()
    assert "loud" in capfd.readouterr().err


def test_progress_does_not_initialise_jax_backend():
    import subprocess
    import sys

    code = ("import jax._src.xla_bridge as xb\n"
            "from prefjax.progress import log, process_index\n"
            "log('x'); assert process_index() == 0\n"
            "assert not xb.backends_are_initialized()\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), capture_output=True, timeout=120)


# ------------------------------------------------------------------------------------------
# per-stage measurements in the done record
# ------------------------------------------------------------------------------------------

MEASURED_KEYS = {"wall_seconds", "host_seconds", "compile_count", "compile_seconds", "trace_seconds",
                 "peak_device_bytes", "peak_host_rss_bytes"}


def test_stage_records_compiles_host_seconds_and_peaks(tmp_path):
    import time

    import jax
    import jax.numpy as jnp

    run = Run(tmp_path / "w", CFG)
    x = jnp.arange(7.0)  # any compile for the input happens outside the stages

    @run.stage("jits")
    def jits():
        f = jax.jit(lambda v: jnp.sin(v) * 3.0 + 1.0)  # a fresh function: compiled inside the stage
        return {"y": float(f(x).sum())}

    @run.stage("busy")
    def busy():
        t0, n = time.process_time(), 0
        while time.process_time() - t0 < 0.05:
            n += 1
        return {"n": n}

    jits()
    busy()
    with run.stage("ctx") as st:  # the context form records them too
        if not st.done:
            st.result = {"y": float(jax.jit(lambda v: v ** 2 - 1.0)(x).sum())}
    recs = {d["stage"]: d for d in run.done_records()}
    for name in ("jits", "busy", "ctx"):
        m = recs[name]["measured"]
        assert set(m) == MEASURED_KEYS, name
        assert m["peak_host_rss_bytes"] > 1 << 20
        assert m["peak_device_bytes"] is None or m["peak_device_bytes"] > 0
        assert isinstance(recs[name]["seconds"], float)  # the old keys stay
    assert recs["jits"]["measured"]["compile_count"] >= 1 and recs["jits"]["measured"]["compile_seconds"] > 0
    assert recs["ctx"]["measured"]["compile_count"] >= 1 and recs["ctx"]["measured"]["compile_seconds"] > 0
    assert recs["busy"]["measured"]["compile_count"] == 0 and recs["busy"]["measured"]["compile_seconds"] == 0
    assert recs["busy"]["measured"]["host_seconds"] > 0
    if jax.default_backend() == "cpu":
        assert recs["jits"]["measured"]["peak_device_bytes"] is None
    # a rerun skips: the records (and their measurements) are those of the run that did the work
    assert jits() == {"y": recs["jits"]["result"]["y"]}
    assert {d["stage"]: d for d in run.done_records()}["jits"] == recs["jits"]


def test_done_record_without_measurements_still_reads(tmp_path):
    from prefjax.report.build import stage_times

    run = Run(tmp_path / "w", CFG)
    run.mark_done("old", {"r": 1})  # as records were written before `measured` existed
    atomic_write_json(run.done_path("older"), {"stage": "older", "result": None, "seconds": 2.5,
                                               "finished": "2026-01-01T00:00:00", "fingerprint": run.fingerprint})
    assert "measured" not in read_done(run, "old")
    assert run.result("older") is None
    assert dict((n, s) for n, s, _ in stage_times(run, ["old", "older"])) == {"old": None, "older": 2.5}


def read_done(run, name):
    return json.load(open(run.done_path(name)))
