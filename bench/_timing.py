"""The one timing rule of the benchmarks: one untimed call (compile, warm-up), then the median of
``repeats`` timed calls. ``fn`` must block until its work is done."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(statistics.median(ts))
