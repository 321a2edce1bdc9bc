"""The one timing rule of the benchmarks: one untimed call (compile, warm-up), then the median of
``repeats`` timed calls. ``fn`` must block until its work is done."""

from __future__ import annotations

import statistics
import sys
import time


def median_seconds(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(statistics.median(ts))


def read_bandwidth(gib: float = 4.0, repeats: int = 10) -> float:
    """Device read bandwidth in bytes/s: a read-only reduction (sum in float32) over ``gib`` GiB of bf16.

    Each byte is read once and nothing of size is written, so this is the ceiling a decode step that
    must read its weights and KV cache once can reach (not a copy, which also writes every byte)."""
    import jax
    import jax.numpy as jnp

    n = int(gib * (1 << 30)) // 2 // 8192 * 8192
    x = jax.jit(lambda: jnp.ones((n // 8192, 8192), jnp.bfloat16))()
    # two reductions (the best counts): rows then columns, and the whole array at once
    fs = [jax.jit(lambda a: jnp.sum(jnp.sum(a, axis=1, dtype=jnp.float32))),
          jax.jit(lambda a: jnp.max(a))]
    t = min(median_seconds(lambda: f(x).block_until_ready(), repeats) for f in fs)
    x = None  # free the 4 GiB before the caller allocates
    return n * 2 / t


def decode_bound_seconds(weight_bytes: float, kv_bytes: float, read_Bps: float) -> float:
    """The least time a decode step can take when it reads every weight and the KV cache once."""
    return (weight_bytes + kv_bytes) / read_Bps


def bound_line(name: str, seconds: float, ref_seconds: float | None, bound_seconds: float) -> str:
    """``name``, prefjax time, reference time, ratio (reference / prefjax) and share of the bound."""
    ref = f"{ref_seconds * 1e3:9.2f}" if ref_seconds else "        -"
    ratio = f"{ref_seconds / seconds:6.2f}" if ref_seconds else "     -"
    return (f"{name:<28} {seconds * 1e3:9.2f} {ref} {ratio} {bound_seconds * 1e3:9.2f} "
            f"{100 * bound_seconds / seconds:6.1f}%" + over_bound(bound_seconds, seconds))


def over_bound(bound_seconds: float, seconds: float) -> str:
    """A warning to print after a share of the bound above 100%: faster than the bound is impossible, so the
    bound's bandwidth measure (or its byte count) is wrong, not the timing."""
    return "  (OVER THE BOUND: its bandwidth measure or byte count is wrong)" if bound_seconds > seconds else ""


def phase_timer(out: dict, tag: str, on_phase=None):
    """A ``phase(name)`` function recording the seconds since the previous call (or since this one) in
    ``out["phases_s"][name]``, printing ``[tag] name: Ns`` to stderr, then calling ``on_phase(now)``."""
    out.setdefault("phases_s", {})
    tick = [time.time()]

    def phase(name: str) -> None:
        now = time.time()
        out["phases_s"][name] = round(now - tick[0], 1)
        tick[0] = now
        print(f"[{tag}] {name}: {out['phases_s'][name]}s", file=sys.stderr, flush=True)
        if on_phase is not None:
            on_phase(now)

    return phase


def kernel_spec(text: str) -> tuple[str, dict]:
    """``"pallas:block=64;num_warps=8"`` -> ``("pallas", {"block": 64, "num_warps": 8})``: the arguments of
    ``prefjax.models.layers.decode_kernel`` as the benches take them on the command line."""
    kind, _, opts = text.partition(":")
    pairs = (o.split("=") for o in opts.split(";") if o)
    return kind, {k: (v if k == "products" else int(v)) for k, v in pairs}
