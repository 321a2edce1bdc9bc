"""Build a bench task file (prefjax's JSONL task format) from the WildChat sample in ``../shared/datasets``.

    python bench/make_tasks.py                                 # 2,000 tasks -> bench/data/paper_tasks_2k.jsonl.gz
    python bench/make_tasks.py --n 40 --out /tmp/t40.jsonl     # plain JSONL when the name does not end in .gz
    python bench/make_tasks.py --gunzip bench/data/paper_tasks_2k.jsonl.gz /tmp/tasks.jsonl

**A bench input only.** The project neither ships nor requires these datasets: nothing under
``prefjax/``, ``configs/`` or ``tests/`` reads this file, and the archive under ``bench/data/`` is
untracked, made here so a device call (``bench/gpu_paper.sh``, which has no network and no
``../shared``) gets realistic prompts for ``bench/paper_run.py``. Any user task file in a format of
``prefjax.tasks.load_tasks`` works the same way through ``--config.tasks.source``.

The source (``wildchat_en_8k.jsonl``: 8,044 English first turns from WildChat-1M, ODC-BY; JSONL with
``id, text, type, topic``, 15 topics, prompts of at most 1,000 characters) is read with prefjax's own
loader, then ``n`` tasks are drawn stratified by topic (``TaskPool.subset``: each topic keeps its share,
same ``seed`` same subset) and written as ``id, prompt, topic, source`` lines (``save_jsonl``), gzipped
when the output name ends in ``.gz``. ``load_tasks`` reads plain JSONL only, so the device side
unpacks it first (``--gunzip``, or ``bench/paper_run.py`` does it itself).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

DEFAULT_SOURCE = os.path.join(os.path.dirname(_ROOT), "shared", "datasets", "wildchat_en_8k.jsonl")
DEFAULT_OUT = os.path.join(_ROOT, "bench", "data", "paper_tasks_2k.jsonl.gz")


def gunzip(src: str, dst: str) -> str:
    """Decompress ``src`` (a ``.gz``) to ``dst`` atomically; a plain file is copied. Returns ``dst``."""
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = f"{dst}.tmp{os.getpid()}"
    opener = gzip.open if src.endswith(".gz") else open
    with opener(src, "rb") as fi, open(tmp, "wb") as fo:
        shutil.copyfileobj(fi, fo)
    os.replace(tmp, dst)
    return dst


def make_tasks(source: str, n: int, out: str, *, seed: int = 0, max_chars: int = 0) -> dict:
    """Write ``n`` topic-stratified tasks of ``source`` to ``out``; returns a summary."""
    from prefjax.tasks import load_tasks, save_jsonl
    from prefjax.tasks.pool import Task, TaskPool

    pool = load_tasks(source, source="wildchat")
    if max_chars:
        pool = TaskPool(Task(id=t.id, prompt=t.prompt[:max_chars].strip(), topic=t.topic, source=t.source)
                        for t in pool)
    if n > len(pool):
        raise SystemExit(f"--n {n} is larger than {source}'s {len(pool)} tasks")
    sub = pool.subset(n, seed=seed, stratified=True) if n else pool
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        plain = os.path.join(d, "tasks.jsonl")
        save_jsonl(sub, plain)
        back = load_tasks(plain)
        assert [t.id for t in back] == [t.id for t in sub], "round trip through load_tasks changed the pool"
        if out.endswith(".gz"):
            tmp = f"{out}.tmp{os.getpid()}"
            with open(plain, "rb") as fi, gzip.GzipFile(tmp, "wb", compresslevel=9, mtime=0) as fo:
                shutil.copyfileobj(fi, fo)
            os.replace(tmp, out)
        else:
            shutil.copyfile(plain, out)
    lens = sorted(len(t.prompt) for t in sub)
    return {"n": len(sub), "topics": {k: len(v) for k, v in sub.by_topic().items()},
            "chars_median": lens[len(lens) // 2], "chars_max": lens[-1], "bytes": os.path.getsize(out)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=DEFAULT_SOURCE, help="a task file (default: the WildChat 8k sample)")
    ap.add_argument("--n", type=int, default=2000, help="tasks to draw (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-chars", type=int, default=0, help="truncate prompts to this many characters (0: keep)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output JSONL (gzipped when it ends in .gz)")
    ap.add_argument("--gunzip", nargs=2, metavar=("SRC", "DST"), help="only decompress SRC to DST and exit")
    args = ap.parse_args(argv)
    if args.gunzip:
        print(gunzip(*args.gunzip))
        return 0
    if not os.path.exists(args.source):
        raise SystemExit(f"{args.source} not found (the datasets live in ../shared/datasets beside the repo; "
                         f"the project itself never needs them)")
    s = make_tasks(args.source, args.n, args.out, seed=args.seed, max_chars=args.max_chars)
    print(f"{args.out}: {s['n']} tasks, {len(s['topics'])} topics {s['topics']}, prompt chars median "
          f"{s['chars_median']} max {s['chars_max']}, {s['bytes'] / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
