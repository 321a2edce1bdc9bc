"""Capture each task's residual stream at its turn boundary, streamed to a resumable zarr3 store.

Each task is shown alone as a user turn (optionally under a persona's system prompt). The captured
positions are the end-of-turn token that closes the user turn and the ``n_after`` tokens after it
(``<end_of_turn>``, ``\\n``, ``<start_of_turn>``, ``model``, ``\\n`` for Gemma). The store also
accumulates the mean residual norm per hook, which steering uses as its scale.

Tasks run shortest first (a stable sort by ``(token length, pool index)``) and each batch is
left-padded to a width from a small fixed set (:func:`width_bucket`), so a run compiles one forward
program per bucket it meets, a handful, instead of one per distinct batch width. Batches are
written at the store's committed counter in that processing order (the store keeps the order in
its layout and maps every read back to pool order), so a killed run resumes where it stopped and
reads back exactly what an uninterrupted run would have written.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from prefjax.elicit.personas import Persona
from prefjax.elicit.prompts import task_messages
from prefjax.progress import log, process_index, progress
from prefjax.store import ActivationStore, open_for_host, open_or_create, read_layout
from prefjax.tasks.pool import TaskPool
from prefjax.tokenize import left_pad


def task_token_ids(model, pool: TaskPool, persona: Persona | None) -> list[list[int]]:
    """Rendered, tokenised single-task chats (generation prompt included)."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("activation extraction needs a model with a tokenizer")
    return [tok.encode_chat(task_messages(t, persona), add_generation_prompt=True) for t in pool]


def boundary_positions(model, ids: list[int], n_after: int, *, task_id: str = "?") -> list[int]:
    """End-of-turn index of the user turn and the ``n_after`` tokens after it."""
    pos = model.tokenizer.turn_boundary_positions(ids, n_after=n_after)
    if len(pos) != n_after + 1:
        raise ValueError(f"task {task_id!r}: only {len(pos)} turn-boundary tokens available "
                         f"(asked for the end-of-turn token and {n_after} after it)")
    return list(pos)


#: The smallest padded width: shorter prompts share it (chat prompts are longer than this anyway).
MIN_WIDTH = 16


def width_bucket(n: int, cap: int | None = None) -> int:
    """The padded width for a batch whose longest prompt has ``n`` tokens.

    The rule: the smallest member of ``{2**k, 3 * 2**(k-1)}`` = 16, 24, 32, 48, 64, 96, 128, 192, ...
    that is at least ``max(n, MIN_WIDTH)``, but never more than ``cap`` (the model's context, when
    known): a batch that would round past ``cap`` is padded to ``cap`` exactly. Consecutive widths
    differ by at most 1.5x, so padding wastes under a third of a batch's columns, and prompt lengths
    spanning ``a..b`` tokens meet about ``2 * log2(b / a) + 1`` widths. ``n > cap`` is an error.
    """
    n = int(n)
    if cap is not None and n > int(cap):
        raise ValueError(f"a prompt of {n} tokens is longer than the width cap {cap}")
    w = MIN_WIDTH
    while w < n:
        # 16 -> 24 -> 32 -> 48 -> 64 ...: w is 2**k or 3 * 2**(k-1); the next member is the smaller of
        # 1.5 w (from 2**k) and 4/3 w (from 3 * 2**(k-1))
        w = w * 3 // 2 if w & (w - 1) == 0 else w * 4 // 3
    return w if cap is None else min(w, int(cap))


def width_buckets(cap: int, lo: int = 1) -> list[int]:
    """Every width :func:`width_bucket` can give for prompts of ``lo..cap`` tokens, ascending."""
    out, n = [], max(int(lo), 1)
    while n <= int(cap):
        w = width_bucket(n, cap)
        out.append(w)
        n = w + 1
    return out


def processing_order(seqs: Sequence[Sequence[int]]) -> list[int]:
    """Pool indices in the order extraction runs them: stable sort by ``(len(seq), pool index)``."""
    return sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))


def extract(model, pool: TaskPool, path: str, *, hooks: Sequence[str], persona: Persona | None = None,
            n_after: int = 0, batch_size: int = 8, dtype: str = "float32", max_len: int | None = None,
            desc: str = "activations", per_host: bool = False) -> ActivationStore:
    """Capture ``hooks`` at the turn-boundary positions of every task of ``pool`` into ``path``.

    Returns the (complete) store. Its rows are ``pool``'s tasks (``row_ids`` = ``pool.ids``) and every
    reader returns them in pool order (``store.read``, :func:`prefjax.store.read_rows` by task id);
    they are computed and written in :func:`processing_order` (shortest first), ``batch_size`` tasks
    a batch, each batch ``batch_size`` rows (the last one filled with copies of its last task, which
    are dropped) by :func:`width_bucket` columns (capped at ``max_len``), so the forward program is
    compiled once per bucket met. Bad hooks and tasks longer than ``max_len`` (default: the model's
    context) are refused before any compute. A store written before the length sort (pool order,
    no ``order`` in its layout) is continued in pool order, so its resume stays exact.
    """
    from prefjax.hooks import CaptureSpec
    CaptureSpec.from_names(hooks, model.n_layers)  # validates names now
    seqs = task_token_ids(model, pool, persona)
    limit = max_len or getattr(model.config, "max_position_embeddings", None)
    for t, s in zip(pool, seqs):
        if limit and len(s) > limit:
            raise ValueError(f"task {t.id!r} renders to {len(s)} tokens, longer than the limit {limit}")
    positions = [boundary_positions(model, s, n_after, task_id=t.id) for t, s in zip(pool, seqs)]
    meta = {"model": str(model.source), "persona": None if persona is None else persona.name,
            "n_after": n_after, "positions": "end_of_turn+" + str(n_after)}
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    sub = os.path.join(os.fspath(path), f"host_{process_index()}") if per_host else path
    order = processing_order(seqs)
    old = read_layout(sub)
    if old is not None and old.get("order") is None and old.get("n_rows") == len(pool):
        order = list(range(len(pool)))  # a pool-order store from before the length sort: continue it
    opener = open_for_host if per_host else open_or_create
    store = opener(path, len(pool), list(hooks), n_after + 1, model.d_model, dtype=dtype, meta=meta,
                   row_ids=list(pool.ids), order=order)
    start = store.committed
    if start >= len(pool):
        return store
    if start:
        log(f"{desc}: resuming at row {start} of {len(pool)}")
    rows_per_batch = min(batch_size, len(pool))
    pad_id = model.tokenizer.pad_id or 0
    bar = progress(total=len(pool), initial=start, desc=desc, unit="task")
    slot = start
    while slot < len(pool):
        end = min(slot + batch_size, len(pool))
        take = order[slot:end]
        fill = take + [take[-1]] * (rows_per_batch - len(take))  # fixed row count: one program per width
        width = width_bucket(max(len(seqs[i]) for i in take), limit)
        ids, mask, pos = _pad_batch([seqs[i] for i in fill], [positions[i] for i in fill], pad_id, width)
        _, cache = model.run(ids, attention_mask=mask, capture=hooks, positions=pos, logits=False)
        acts = np.stack([np.asarray(cache[h], np.float32)[:len(take)] for h in hooks], axis=1)  # [B, H, K, D]
        if not np.isfinite(acts).all():
            bad = int(np.argwhere(~np.isfinite(acts))[0][0])
            raise FloatingPointError(f"non-finite activation for task {pool[take[bad]].id!r}; nothing written "
                                     f"for tasks {[pool[i].id for i in take][:8]}")
        store.write(slot, acts)
        bar.update(end - slot)
        slot = end
    bar.close()
    return store


def _pad_batch(seqs, positions, pad_id: int, width: int | None = None):
    ids, valid = left_pad(seqs, pad_id, width=width)
    t = ids.shape[1]
    pos = np.zeros((len(seqs), len(positions[0])), np.int32)
    for b, (s, p) in enumerate(zip(seqs, positions)):
        pos[b] = np.asarray(p) + (t - len(s))
    return ids, valid.astype(np.int32), pos
