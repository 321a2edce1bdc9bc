"""Kill the tiny pipeline with SIGKILL at random moments, restart it until it finishes, and check that
the result equals an uninterrupted run's: comparisons (same keys, no duplicate rows), utilities,
activations, probe files and summary.json."""

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small batches so the long stages commit several times (kills land between and inside commits).
OVERRIDES = ["--config.tasks.n=16", "--config.probes.n_perm=5", "--config.steering.n_pairs=3",
             "--config.inlp.n_iter=1", "--config.progress=False", "--config.choices.batch_size=8",
             "--config.activations.batch_size=4"]


def _has_comparisons(wd):
    return any(os.path.getsize(p) > 0 for p in glob.glob(os.path.join(wd, "comparisons", "seg-*.jsonl")))


def _has_committed_acts(wd):
    p = os.path.join(wd, "activations", "default", "committed.json")
    try:
        with open(p) as f:
            return json.load(f).get("committed", 0) > 0
    except (OSError, ValueError):
        return False


def _in_probes(wd):
    return os.path.exists(os.path.join(wd, "stages", "activations-evil.done"))


# Kill k waits until its condition holds on disk (part of a long stage written), then a seeded random
# delay: one kill inside choices, one inside activations, one in the probes/steering tail.
KILL_POINTS = (("comparison rows on disk", _has_comparisons), ("activation rows committed", _has_committed_acts),
               ("activations done", _in_probes))
TIMING_KEYS = {"seconds", "finished", "created", "measured"}


def _cmd(workdir):
    return [sys.executable, os.path.join(ROOT, "launch", "main.py"),
            "--config", os.path.join(ROOT, "configs", "default.py") + ":tiny", "--workdir", str(workdir), *OVERRIDES]


def _env():
    env = dict(os.environ, PREFJAX_PROGRESS="0", JAX_PLATFORMS="cpu")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def _start(workdir, log):
    return subprocess.Popen(_cmd(workdir), cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _run_and_kill(workdir, log, cond, delay):
    """Start the command; once ``cond(workdir)`` holds wait ``delay`` s and SIGKILL. Returns (rc, killed)."""
    p = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def pump():
        for line in p.stdout:
            log.write(line)
            log.flush()
    t = threading.Thread(target=pump, daemon=True)
    t.start()
    deadline = time.time() + 600
    while not cond(workdir) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed = False
    if p.poll() is None:
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            killed = True
    rc = p.wait(timeout=600)
    t.join(timeout=10)
    return rc, killed


def _comparison_rows(workdir):
    rows = []
    for seg in sorted(glob.glob(os.path.join(workdir, "comparisons", "seg-*.jsonl"))):
        with open(seg, "rb") as f:
            data = f.read()
        assert data.endswith(b"\n") or not data, f"{seg} ends in a torn line after a finished run"
        rows += [json.loads(line) for line in data.splitlines() if line.strip()]
    return rows


def _strip_timing(x):
    if isinstance(x, dict):
        return {k: _strip_timing(v) for k, v in x.items() if k not in TIMING_KEYS}
    if isinstance(x, list):
        return [_strip_timing(v) for v in x]
    return x


def _stage_results(workdir):
    out = {}
    for p in sorted(glob.glob(os.path.join(workdir, "stages", "*.done"))):
        with open(p) as f:
            out[os.path.basename(p)] = _strip_timing(json.load(f))
    return out


@pytest.mark.slow
def test_sigkill_resume_matches_uninterrupted_run(tmp_path):
    ref, res = tmp_path / "ref", tmp_path / "resumed"
    with open(tmp_path / "ref.log", "wb") as log:
        rc = _start(ref, log).wait(timeout=600)
    assert rc == 0, (tmp_path / "ref.log").read_text()[-3000:]

    # Three kills at seeded random moments inside the choices, activations and probes stages; every
    # attempt restarts the same command in the same workdir, then a last attempt runs to the end.
    rng = np.random.default_rng(20261127)
    delays = rng.uniform(0.0, 1.5, size=len(KILL_POINTS))
    attempts = []
    with open(tmp_path / "resumed.log", "wb") as log:
        for (marker, cond), d in zip(KILL_POINTS, delays):
            rc, killed = _run_and_kill(res, log, cond, float(d))
            done = sorted(os.path.basename(x)[:-5] for x in glob.glob(os.path.join(res, "stages", "*.done")))
            log.write(f"\n### after {marker!r} + {d:.2f}s: rc {rc}, killed {killed}; done: {done}\n".encode())
            log.flush()
            attempts.append((rc, killed))
        final = _start(res, log).wait(timeout=600)
    text = (tmp_path / "resumed.log").read_text()
    assert final == 0, text[-3000:]
    assert sum(k for _, k in attempts) >= 2, f"the kills mostly missed the run: {attempts}\n{text[-3000:]}"
    assert all(rc == -signal.SIGKILL for rc, k in attempts if k)
    assert "done already, skipping" in text  # a restart really resumed finished stages

    # Comparisons: one row per key in the segments, same keys, same values.
    rows_ref, rows_res = _comparison_rows(ref), _comparison_rows(res)
    key = lambda r: (r["task_a"], r["task_b"], r["order"], r["persona"], r["sample"])  # noqa: E731
    assert len({key(r) for r in rows_res}) == len(rows_res), "duplicate comparison rows after resume"
    assert len({key(r) for r in rows_ref}) == len(rows_ref)
    by_ref = {key(r): r for r in rows_ref}
    by_res = {key(r): r for r in rows_res}
    assert set(by_ref) == set(by_res) and len(by_ref) > 0
    assert by_ref == by_res

    # Utilities, activations, probe files: bit-identical.
    for npz in sorted(glob.glob(os.path.join(ref, "stages", "utilities", "*.npz"))):
        a, b = np.load(npz), np.load(os.path.join(res, "stages", "utilities", os.path.basename(npz)))
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"utilities {npz} [{k}]")
    from prefjax.store import open_existing
    personas = sorted(os.listdir(ref / "activations"))
    assert personas == ["default", "evil"]
    for pname in personas:
        sa, sb = open_existing(str(ref / "activations" / pname)), open_existing(str(res / "activations" / pname))
        assert sa.committed == sb.committed == 16
        np.testing.assert_array_equal(sa.read(), sb.read(), err_msg=f"activations [{pname}]")
        assert sa.mean_norms() == sb.mean_norms()
    probe_files = sorted(os.path.relpath(p, ref) for p in glob.glob(os.path.join(ref, "probes", "**", "*.npz"),
                                                                       recursive=True))
    for rel in probe_files:
        a, b = np.load(ref / rel), np.load(res / rel)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{rel} [{k}]")

    # summary.json and every stage result, timing fields excluded.
    with open(ref / "summary.json") as f:
        s_ref = _strip_timing(json.load(f))
    with open(res / "summary.json") as f:
        s_res = _strip_timing(json.load(f))
    assert s_ref == s_res
    assert _stage_results(ref) == _stage_results(res)
