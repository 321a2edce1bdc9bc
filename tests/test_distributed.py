"""Two JAX processes on localhost (CPU, one device each) run one sharded forward pass; the gathered
logits and captures equal a single-process run's."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", PREFJAX_PROGRESS="0", **extra)
    return env


@pytest.mark.slow
def test_two_process_forward_equals_single_process(tmp_path):
    single, multi = tmp_path / "single.npz", tmp_path / "multi.npz"
    r = subprocess.run([sys.executable, WORKER, str(single)], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    port = _free_port()
    procs, logs = [], []
    for pid in (0, 1):
        log = open(tmp_path / f"p{pid}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, str(multi)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env=_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))))
    try:
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    out = "\n".join((tmp_path / f"p{i}.log").read_text()[-2000:] for i in (0, 1))
    assert rcs == [0, 0], out

    a, b = np.load(single), np.load(multi)
    assert list(a["info"]) == [1, 1, 1]
    assert list(b["info"]) == [2, 2, 2], "expected 2 processes, 2 global devices, logits sharded over both"
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        if k == "info":
            continue
        assert a[k].shape == b[k].shape, k
        assert np.isfinite(a[k]).all(), k
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)  # same math per row: bit-identical on CPU
