"""Read a perfetto trace (``jax.profiler.trace(..., create_perfetto_trace=True)``): GPU kernel time by name
and the device timeline (busy, idle, the largest idle gaps and the kernels around them).

``python bench/summarize_trace.py trace.json.gz [top]``; a directory is searched for its newest
``*.trace.json.gz`` / ``perfetto_trace.json.gz``."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys


def find_trace(path: str) -> str:
    """``path`` itself, or the newest perfetto trace below the directory ``path``."""
    if os.path.isfile(path):
        return path
    found = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True) or \
        glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no perfetto trace under {path}")
    return max(found, key=os.path.getmtime)


def kernels(path: str) -> list[tuple[float, float, str]]:
    """Every kernel on a GPU stream as ``(start_us, duration_us, name)``, sorted by start."""
    with gzip.open(find_trace(path)) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names, procs = {}, {}
    for e in events:  # process and thread names tell device streams from host threads
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            names[(e.get("pid"), e.get("tid"))] = e.get("args", {}).get("name", "")
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e.get("pid")] = e.get("args", {}).get("name", "")
    out = []
    for e in events:
        if e.get("ph") != "X":
            continue
        thread = names.get((e.get("pid"), e.get("tid")), "")
        if "GPU" not in procs.get(e.get("pid"), "") or "stream" not in thread.lower():
            continue
        out.append((float(e["ts"]), float(e.get("dur", 0)), e["name"]))
    return sorted(out)


def timeline(ks: list[tuple[float, float, str]], gap_us: float = 200.0, top: int = 12) -> dict:
    """The device's span, busy time (union of kernel intervals over all streams), idle time, the idle
    time in gaps longer than ``gap_us``, and the ``top`` longest gaps with the kernels before and after."""
    if not ks:
        return {"span_us": 0.0, "busy_us": 0.0, "idle_us": 0.0, "idle_in_long_gaps_us": 0.0, "long_gaps": 0,
                "gap_us": gap_us, "gaps": []}
    busy, gaps = 0.0, []
    cur_s, cur_e, cur_name = ks[0][0], ks[0][0] + ks[0][1], ks[0][2]
    for s, d, name in ks[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((s - cur_e, cur_e, cur_name, name))
            cur_s = s
        if s + d >= cur_e:
            cur_e, cur_name = s + d, name
    busy += cur_e - cur_s
    span = cur_e - ks[0][0]  # cur_e: the latest end of any kernel
    long = [g for g in gaps if g[0] > gap_us]
    return {"span_us": span, "busy_us": busy, "idle_us": span - busy,
            "idle_in_long_gaps_us": sum(g[0] for g in long), "long_gaps": len(long), "gap_us": gap_us,
            "gaps": [{"us": round(g, 1), "at_us": round(at - ks[0][0], 1), "after": a[:90], "before": b[:90]}
                     for g, at, a, b in sorted(gaps, reverse=True)[:top]]}


def by_name(ks, top: int = 40) -> list[tuple[str, float, int]]:
    """``(name, total_us, count)`` of the ``top`` kernels by total time."""
    total, count = collections.Counter(), collections.Counter()
    for _, d, name in ks:
        total[name] += d
        count[name] += 1
    return [(n, us, count[n]) for n, us in total.most_common(top)]


# Kernel kinds by name, first match wins: copies (memcpy/memset), matrix products (cuBLAS's nvjet/xmma/cutlass
# kernels, XLA's Triton gemm fusions, prefjax's Pallas expert kernels), prefjax's Pallas decode attention,
# reductions (norms, softmax, sampling over the vocabulary), everything else (elementwise fusions, cache
# writes, RoPE, ...).
KINDS = (("copy", r"memcpy|memset"),
         ("matmul", r"gemm|nvjet|xmma|cutlass|cublas|gemv|matmul|prefjax_experts|(^|[_.])dot([_.0-9]|$)"),
         ("attention", r"prefjax_decode_attention|flash|fmha|attention"),
         ("reduce", r"reduce|softmax|argmax|sort|top_?k"),
         ("other", r""))


def kind_of(name: str) -> str:
    """The :data:`KINDS` entry a kernel name falls in."""
    return next(k for k, pat in KINDS if re.search(pat, name, re.IGNORECASE))


def by_kind(ks) -> dict[str, tuple[float, int]]:
    """``{kind: (total_us, count)}`` over :data:`KINDS`, every kind present (zeros where none ran)."""
    out = {k: [0.0, 0] for k, _ in KINDS}
    for _, d, name in ks:
        acc = out[kind_of(name)]
        acc[0] += d
        acc[1] += 1
    return {k: (us, n) for k, (us, n) in out.items()}


def summary(ks, per: int = 1, top: int = 12) -> dict:
    """Device time per unit of work (``per`` units traced: decode steps, forwards), in ms: by kernel kind
    (``ms``), busy and idle (:func:`timeline`), kernel count, and the ``top`` kernels by time."""
    tl = timeline(ks)
    return {"units": per, "ms": {k: round(us / per / 1e3, 3) for k, (us, _) in by_kind(ks).items()},
            "busy_ms": round(tl["busy_us"] / per / 1e3, 3), "idle_ms": round(tl["idle_us"] / per / 1e3, 3),
            "kernels": round(len(ks) / per, 1),
            "top": [(n[:90], round(us / per / 1e3, 3), c // per) for n, us, c in by_name(ks, top)]}


def profiled(fn, log_dir: str, per: int = 1):
    """``fn()`` under the JAX profiler (a perfetto trace in ``log_dir``), waited for; returns ``(its result,
    summary(its kernels, per))``."""
    import jax
    jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
    try:
        result = jax.block_until_ready(fn())
    finally:
        jax.profiler.stop_trace()
    return result, summary(kernels(log_dir), per)


def main(path: str, top: int = 40) -> None:
    ks = kernels(path)
    all_us = sum(d for _, d, _ in ks)
    print(f"device kernel time {all_us / 1e3:.2f} ms over {len(ks)} kernels")
    for name, us, n in by_name(ks, top):
        print(f"{us / 1e3:9.3f} ms {100 * us / max(all_us, 1):5.1f}% x{n:<4d} {name[:110]}")
    print("by kind: " + ", ".join(f"{k} {us / 1e3:.2f} ms x{n}" for k, (us, n) in by_kind(ks).items()))
    tl = timeline(ks)
    print(f"timeline: span {tl['span_us'] / 1e3:.2f} ms, busy {tl['busy_us'] / 1e3:.2f} ms, idle "
          f"{tl['idle_us'] / 1e3:.2f} ms ({tl['idle_in_long_gaps_us'] / 1e3:.2f} ms in {tl['long_gaps']} gaps "
          f"> {tl['gap_us']:.0f} us)")
    for g in tl["gaps"]:
        print(f"  gap {g['us'] / 1e3:8.3f} ms at {g['at_us'] / 1e3:9.2f} ms: after {g['after']} | before {g['before']}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
