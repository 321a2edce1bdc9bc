"""Sum a perfetto trace's GPU kernel time by name: ``python bench/summarize_trace.py trace.json.gz``."""

from __future__ import annotations

import collections
import gzip
import json
import sys


def main(path: str, top: int = 40) -> None:
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names, procs = {}, {}
    for e in events:  # process and thread names tell device streams from host threads
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            names[(e.get("pid"), e.get("tid"))] = e.get("args", {}).get("name", "")
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e.get("pid")] = e.get("args", {}).get("name", "")
    total = collections.Counter()
    count = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        thread = names.get((e.get("pid"), e.get("tid")), "")
        if "GPU" not in procs.get(e.get("pid"), "") or "stream" not in thread.lower():
            continue
        total[e["name"]] += e.get("dur", 0)
        count[e["name"]] += 1
    all_us = sum(total.values())
    print(f"device kernel time {all_us / 1e3:.2f} ms over {sum(count.values())} kernels")
    for name, us in total.most_common(top):
        print(f"{us / 1e3:9.3f} ms {100 * us / max(all_us, 1):5.1f}% x{count[name]:<4d} {name[:110]}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
