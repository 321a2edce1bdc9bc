"""The profile reader the engine's time split rests on (bench/summarize_trace.py): device kernels picked
from a perfetto trace's GPU streams only, busy time as the union of overlapping kernels, idle gaps with the
kernels around them; and the warning benches print for a share over the bound (bench/_timing.py)."""

import gzip
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from _timing import bound_line, over_bound  # noqa: E402
from summarize_trace import by_name, find_trace, kernels, timeline  # noqa: E402


def write_trace(path, events):
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "Stream #8(Copy)"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 1, "args": {"name": "python stream of work"}}]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def test_kernels_union_and_gaps(tmp_path):
    x = lambda pid, tid, ts, dur, name: {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}
    sub = tmp_path / "plugins" / "profile" / "run1"
    sub.mkdir(parents=True)
    write_trace(sub / "perfetto_trace.json.gz", [
        x(1, 7, 100, 50, "fusion_a"),      # [100, 150)
        x(1, 8, 120, 60, "memcpy"),        # [120, 180): overlaps on another stream
        x(1, 7, 180, 20, "fusion_b"),      # [180, 200): touches the end, no gap
        x(1, 7, 1200, 100, "fusion_a"),    # gap of 1000 before it
        x(1, 7, 1350, 10, "fusion_c"),     # gap of 50
        x(2, 1, 0, 5000, "host work"),     # a host thread: not a device kernel
    ])
    ks = kernels(str(tmp_path))  # a directory: the trace below it is found
    assert find_trace(str(tmp_path)).endswith("perfetto_trace.json.gz")
    assert [k[2] for k in ks] == ["fusion_a", "memcpy", "fusion_b", "fusion_a", "fusion_c"]
    tl = timeline(ks, gap_us=200)
    assert tl["span_us"] == 1260 and tl["busy_us"] == 100 + 100 + 10
    assert tl["idle_us"] == 1050 and tl["long_gaps"] == 1 and tl["idle_in_long_gaps_us"] == 1000
    assert tl["gaps"][0] == {"us": 1000, "at_us": 100, "after": "fusion_b", "before": "fusion_a"}
    assert by_name(ks)[0] == ("fusion_a", 150.0, 2)


def test_share_over_the_bound_is_flagged():
    assert over_bound(0.010, 0.020) == ""
    assert "OVER THE BOUND" in over_bound(0.030, 0.020)
    assert "OVER THE BOUND" in bound_line("B=8", 0.020, 0.1, 0.030)
    assert "OVER" not in bound_line("B=8", 0.020, 0.1, 0.010)


def test_kernel_kinds():
    from summarize_trace import by_kind, kind_of
    assert kind_of("nvjet_tst_128x64_64x4_1x2_h_bz_TNT") == "matmul"
    assert kind_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n") == "matmul"
    assert kind_of("gemm_fusion_dot_12") == "matmul" and kind_of("prefjax_experts_2w") == "matmul"
    assert kind_of("memcpy128") == "copy" and kind_of("prefjax_decode_attention") == "attention"
    assert kind_of("input_reduce_fusion_3") == "reduce" and kind_of("loop_multiply_fusion") == "other"
    # "dot" only as a name part: a fusion whose name merely contains the letters is not a matmul
    assert kind_of("loop_dotted_fusion") == "other"
    ks = [(0, 10.0, "nvjet_a"), (10, 5.0, "memcpy128"), (15, 2.5, "loop_add_fusion"), (20, 1.0, "nvjet_b")]
    got = by_kind(ks)
    assert got["matmul"] == (11.0, 2) and got["copy"] == (5.0, 1) and got["other"] == (2.5, 1)
    assert got["attention"] == (0.0, 0) and set(got) == {"copy", "matmul", "attention", "reduce", "other"}


def test_summary_per_unit():
    from summarize_trace import summary
    # two units (decode steps) traced: every figure is per unit; busy is the union, idle the gaps
    ks = [(0, 10.0, "nvjet_a"), (10, 6.0, "memcpy128"), (20, 4.0, "loop_add_fusion"), (30, 10.0, "nvjet_a")]
    got = summary(ks, per=2)
    assert got["units"] == 2 and got["kernels"] == 2.0
    assert got["ms"]["matmul"] == 0.01 and got["ms"]["copy"] == 0.003 and got["ms"]["other"] == 0.002
    assert got["busy_ms"] == 0.015 and got["idle_ms"] == 0.005  # span 40 us, idle 4 + 6 us
    assert got["top"][0] == ("nvjet_a", 0.01, 1)
