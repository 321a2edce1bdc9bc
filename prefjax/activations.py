"""Capture each task's residual stream at its turn boundary, streamed to a resumable zarr3 store.

Each task is shown alone as a user turn (optionally under a persona's system prompt). The captured
positions are the end-of-turn token that closes the user turn and the ``n_after`` tokens after it
(``<end_of_turn>``, ``\\n``, ``<start_of_turn>``, ``model``, ``\\n`` for Gemma). Rows are written in
batches at the store's committed counter, so a killed run resumes where it stopped and reads back
exactly what an uninterrupted run would have written. The store also accumulates the mean residual
norm per hook, which steering uses as its scale.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from prefjax.elicit.personas import Persona
from prefjax.elicit.prompts import task_messages
from prefjax.progress import log, progress
from prefjax.store import ActivationStore, open_for_host, open_or_create
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


def extract(model, pool: TaskPool, path: str, *, hooks: Sequence[str], persona: Persona | None = None,
            n_after: int = 0, batch_size: int = 8, dtype: str = "float32", max_len: int | None = None,
            desc: str = "activations", per_host: bool = False) -> ActivationStore:
    """Capture ``hooks`` at the turn-boundary positions of every task of ``pool`` into ``path``.

    Returns the (complete) store; rows are ordered like ``pool``. Bad hooks and tasks longer than
    ``max_len`` (default: the model's context) are refused before any compute.
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
    opener = open_for_host if per_host else open_or_create
    store = opener(path, len(pool), list(hooks), n_after + 1, model.d_model, dtype=dtype, meta=meta,
                   row_ids=list(pool.ids))
    start = store.committed
    if start >= len(pool):
        return store
    if start:
        log(f"{desc}: resuming at row {start} of {len(pool)}")
    # Sort the remaining rows by length inside each batch window to reduce padding, but write in order.
    bar = progress(total=len(pool), initial=start, desc=desc, unit="task")
    row = start
    while row < len(pool):
        end = min(row + batch_size, len(pool))
        ids, mask, pos = _pad_batch(seqs[row:end], positions[row:end], model.tokenizer.pad_id or 0)
        _, cache = model.run(ids, attention_mask=mask, capture=hooks, positions=pos)
        acts = np.stack([np.asarray(cache[h], np.float32) for h in hooks], axis=1)  # [B, H, K, D]
        if not np.isfinite(acts).all():
            bad = int(np.argwhere(~np.isfinite(acts))[0][0])
            raise FloatingPointError(f"non-finite activation for task {pool[row + bad].id!r}; nothing written "
                                     f"for rows {row}..{end - 1}")
        store.write(row, acts)
        bar.update(end - row)
        row = end
    bar.close()
    return store


def _pad_batch(seqs, positions, pad_id: int):
    ids, valid = left_pad(seqs, pad_id)
    t = ids.shape[1]
    pos = np.zeros((len(seqs), len(positions[0])), np.int32)
    for b, (s, p) in enumerate(zip(seqs, positions)):
        pos[b] = np.asarray(p) + (t - len(s))
    return ids, valid.astype(np.int32), pos
