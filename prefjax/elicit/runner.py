"""The pairwise revealed-choice runner: pairs x orders x personas x samples -> comparison rows.

Every job has a key ``(task_a, task_b, order, persona, sample)``. The runner lists the jobs, drops
those the store already holds, runs the rest in batches and appends each batch's rows (raw text,
parsed choice, status, refusal flag; sample mode also ``extra["declined_other"]``, a reply that does one
task and declines the other) to the append-only :class:`~prefjax.store.ComparisonsStore`.
Killed at any moment and restarted, it redoes at most the batch in flight, and the store skips any
key it already holds, so nothing is lost or duplicated.

Sampling is reproducible per job: the PRNG stream of a completion is derived from (seed, job key),
not from its place in a batch. ``mode="sample"`` runs through :class:`prefjax.engine.Engine` where the
model allows it (``ElicitConfig.engine``; Gemma-3, Llama, Qwen-3 and Qwen-3.5, whose recurrent DeltaNet
state the engine serves too, on one device or on a mesh within one process): the jobs that differ only in
their sample index share one prompt prefill, the engine's cache rows (``ElicitConfig.rows``; by default
from free memory on a GPU, else ``batch_size``, under a mesh rounded up to split over its batch axes)
decode continuously and each row stops at end-of-turn/EOS or ``max_new_tokens``. One engine serves every
call that passes the same :class:`ChoiceEngines` (the rounds and personas of a run: built once, shapes
bucketed so its programs compile once; see there). Rows are committed to the store in job order,
``batch_size`` at a time, so a killed run's store holds a prefix of the job list and a restart appends
the rest in the same order. Models the engine refuses (a mesh over
several processes, a family without a decode-state layout; :func:`prefjax.engine.engine_refusal`) fall
back to batched :func:`prefjax.generation.generate`, with a log line. Both paths give every job the
same stream (``fold_in(PRNGKey(seed), Job.stream_id(seed))``). ``mode="logit"`` reads P(A) from the label-token logits after the
forced prefix in one forward pass (no sampling; one row per pair and order).

Logit mode runs the persona's prompts sorted by length, in batches of one size padded to a multiple of
8 tokens (few compiled shapes); where the model keeps prefix caches, the jobs that show the same task first
share a cached head (chat header, system prompt, instructions, the first task), and the heads are cached
in chunks of at most ``ElicitConfig.logit_rows`` rows, one chunk at a time, so memory does not grow with
the number of tasks. The chunks and batches are a fixed function of the job list (and of ``logit_rows``),
so a resumed run computes exactly the same rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from prefjax.elicit.parse import judge_refusal, parse_choice
from prefjax.elicit.personas import Persona
from prefjax.elicit.prompts import DEFAULT_TEMPLATE, ChoiceTemplate, choice_messages
from prefjax.engine import (Engine, EngineError, Request, auto_rows, free_device_bytes, mesh_rows,
                            state_bytes_per_row)
from prefjax.progress import log, progress
from prefjax.store import Comparison, ComparisonsStore
from prefjax.tasks.pool import TaskPool


@dataclasses.dataclass(frozen=True)
class Job:
    """One completion to elicit. ``order="AB"`` shows task_a as Task A."""

    task_a: str
    task_b: str
    order: str
    persona: str
    sample: int

    @property
    def key(self) -> tuple:
        return (self.task_a, self.task_b, self.order, self.persona, self.sample)

    def shown(self) -> tuple[str, str]:
        """(id shown as Task A, id shown as Task B)."""
        return (self.task_a, self.task_b) if self.order == "AB" else (self.task_b, self.task_a)

    def stream_id(self, seed: int) -> int:
        """A 31-bit id for this job's PRNG stream, stable across runs and batchings."""
        h = hashlib.blake2b(repr((seed,) + self.key).encode(), digest_size=4).digest()
        return int.from_bytes(h, "little") & 0x7FFFFFFF


def make_jobs(pairs: Iterable[tuple[str, str]], personas: Sequence[str], *, samples: int = 1,
              orders: str = "both", seed: int = 0) -> list[Job]:
    """Jobs for each pair: both orders, or one order drawn per pair from ``seed``."""
    if orders not in ("both", "seeded", "AB"):
        raise ValueError(f"orders must be 'both', 'seeded' or 'AB', got {orders!r}")
    jobs = []
    for a, b in pairs:
        if a == b:
            raise ValueError(f"pair ({a!r}, {b!r}) compares a task with itself")
        if orders == "both":
            ords = ("AB", "BA")
        elif orders == "AB":
            ords = ("AB",)
        else:
            h = hashlib.blake2b(repr((seed, a, b)).encode(), digest_size=1).digest()[0]
            ords = ("AB",) if h % 2 == 0 else ("BA",)
        for p in personas:
            for o in ords:
                for s in range(samples):
                    jobs.append(Job(a, b, o, p, s))
    return jobs


@dataclasses.dataclass
class ElicitConfig:
    """How choices are elicited.

    ``batch_size``: rows per store commit (and per batch of the generate and logit paths). ``rows``:
    sample mode, the engine's cache rows; None = on a GPU (one device) the most its free memory holds
    (:func:`prefjax.engine.auto_rows`, at most 128), elsewhere ``batch_size`` (under a mesh rounded up to
    split over its batch axes). ``logit_rows``: logit mode, the most distinct heads (prefix-cache rows)
    held at once; None = 64, fewer where a GPU's free memory holds fewer, never more than the pool."""

    mode: str = "sample"  # "sample" | "logit"
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 16
    engine: bool = True  # sample mode: the continuous-batching engine where the model allows it
    rows: int | None = None  # sample mode: engine cache rows (None: from free memory on a GPU, else batch_size)
    logit_rows: int | None = None  # logit mode: prefix-cache rows per chunk (None: 64, capped by GPU memory)
    template: ChoiceTemplate = DEFAULT_TEMPLATE
    judge: Callable[[str], str] | None = None  # ask_fn for an optional refusal judge


def _persona_model(model, persona: Persona):
    if persona.adapter:
        if not hasattr(model, "with_adapter"):
            raise ValueError(f"persona {persona.name!r} is a LoRA adapter, but this model cannot load adapters")
        return model.with_adapter(persona.adapter)
    return model


def forced_text(template: ChoiceTemplate) -> str:
    """The text pre-filled in logit mode: the forced prefix without trailing whitespace, because
    SentencePiece-style vocabularies attach the space to the next word ("Task" + " A", not "Task " + "A")."""
    return template.forced_prefix.rstrip()


def label_token_ids(tokenizer, template: ChoiceTemplate) -> tuple[int, int]:
    """The token that follows :func:`forced_text` in each label (e.g. " A", " B")."""
    forced = forced_text(template)
    base = tokenizer.encode(forced, add_bos=False)
    out = []
    for label in template.labels:
        ids = tokenizer.encode(label, add_bos=False)
        if ids[:len(base)] != base or len(ids) == len(base):
            raise ValueError(f"label {label!r} does not tokenize as the forced prefix {forced!r} followed by "
                             f"its own token(s): {ids} vs {base}")
        out.append(ids[len(base)])
    if out[0] == out[1]:
        raise ValueError(f"labels {template.labels} share their first token after the forced prefix")
    return out[0], out[1]


class ChoiceEngines:
    """The sample-mode engines of a run: each built at its first use and reused by every later
    :func:`run_choices` call given this object (the rounds and personas of a run), so a run compiles its
    engine programs once.

    One engine per (model, rows, sampling settings, seed), built with ``bucket_shapes``
    (:class:`prefjax.engine.Engine`): prompt widths past the shared prefix come from a fixed set
    (:func:`prefjax.engine.width_bucket`: 16, 24, 32, 48, 64, ...); the shared prefix (chat header, persona
    system prompt, instructions) is laid into one reserved width for the whole run, the widest persona's
    rounded up to a power of two; and the cache length is one power of two for the whole run, reserved at
    build time for the longest prompts the pool can make (its two longest tasks, both orders, under every
    persona given) and grown only if a prompt still needs more. So switching persona (its system prompt is
    prompt tokens) or round reuses the programs; a LoRA persona runs the same engine with its adapter's
    weights (``Engine.run(model=...)``), which compiles the programs once more per adapter shape (its
    factors join the weights' pytree), not per adapter. ``builds`` counts the engines built."""

    def __init__(self):
        self._engines: dict[tuple, Engine] = {}
        self._refused: dict[tuple, str] = {}
        self.builds = 0

    def get(self, model, pool: TaskPool, personas: dict[str, Persona], cfg: ElicitConfig) -> Engine:
        """The engine for ``model`` (the run's base model) and ``cfg``, built on first use; raises
        :class:`prefjax.engine.EngineError` where the engine refuses the model (remembered)."""
        key = (id(model), cfg.rows, cfg.batch_size, float(cfg.temperature), float(cfg.top_p), int(cfg.top_k),
               int(cfg.seed))
        if key in self._refused:
            raise EngineError(self._refused[key])
        engine = self._engines.get(key)
        if engine is not None and engine.model is model:  # (the engine keeps the model: its id is not reused)
            return engine
        settings = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed,
                        bucket_shapes=True)
        try:
            engine = Engine(model, rows=mesh_rows(model, cfg.batch_size), **settings)
        except EngineError as e:
            self._refused[key] = str(e)
            raise
        # One prefix width and one cache length for the run, from the longest prompts the pool can make:
        # the personas' shared prefixes (header, system prompt, instructions) all laid into the widest one's
        # slots, so every persona runs the same programs, and the cache those prompts need.
        prefix, cache = 0, None
        try:
            longest = longest_requests(model, pool, personas, cfg)
            prefix = max(engine.shared_prefix_len(reqs) for reqs in longest)
            if prefix:
                engine.reserve(prefix_len=prefix)
            cache = max(engine.cache_len_for(reqs) for reqs in longest)
        except EngineError as e:  # (too long for the model: the runs that meet such a pair say so)
            log(f"choices: no cache reserved for the pool's longest prompts ({e})")
        rows, how = choice_rows(model, cfg, cache)
        if rows != engine.rows:
            engine = Engine(model, rows=rows, **settings)
            if prefix:
                engine.reserve(prefix_len=prefix)
        if cache:
            engine.reserve(cache_len=cache)
        self._engines[key] = engine
        self.builds += 1
        log(f"choices: engine of {rows} rows ({how}), shared prefix in {prefix and engine.prefix_floor} slots, "
            f"cache of {engine.cache_floor or 'per-run'} slots")
        return engine


def longest_requests(model, pool: TaskPool, personas: dict[str, Persona], cfg: ElicitConfig) -> list[list]:
    """Per persona, the sample-mode requests of the two tasks with the most tokens, shown in both orders:
    about the longest prompts ``pool`` can make (tokens at the tasks' seams may differ by a few; the engine
    grows its cache if a prompt needs more). Adapter personas share the base prompts."""
    tok = model.tokenizer
    tasks = list(pool)
    if len(tasks) < 2:
        tasks = tasks * 2
    lens = [len(tok.encode(t.prompt, add_bos=False)) for t in tasks]
    top = sorted(range(len(tasks)), key=lambda n: -lens[n])[:2]
    a, b = tasks[top[0]], tasks[top[1]]
    return [[Request(tok.encode_chat(choice_messages(cfg.template, x, y, p)), cfg.max_new_tokens)
             for x, y in ((a, b), (b, a))] for p in personas.values()]


def choice_rows(model, cfg: ElicitConfig, cache_len: int | None) -> tuple[int, str]:
    """The sample-mode engine's row count and how it was chosen: ``cfg.rows`` when set; else on a GPU
    (one device) the most rows of ``cache_len`` slots that fit in half its free memory
    (:func:`prefjax.engine.auto_rows`; not when ``cache_len`` is None, unknown); else ``cfg.batch_size``.
    Rounded up to split over a mesh."""
    if cfg.rows is not None:
        if isinstance(cfg.rows, bool) or not isinstance(cfg.rows, (int, np.integer)) or cfg.rows < 1:
            raise ValueError(f"ElicitConfig.rows must be a positive int or None, got {cfg.rows!r}")
        return mesh_rows(model, cfg.rows), "ElicitConfig.rows"
    if cache_len is not None and jax.default_backend() == "gpu":
        fit = auto_rows(model, cache_len)
        if fit is not None:
            return fit, f"from free device memory, {state_bytes_per_row(model, cache_len) / 2**20:.1f} MiB a row"
    return mesh_rows(model, cfg.batch_size), "batch_size"


def run_choices(model, pool: TaskPool, jobs: Sequence[Job], personas: dict[str, Persona],
                store: ComparisonsStore, cfg: ElicitConfig = ElicitConfig(), *, desc: str = "choices",
                engines: ChoiceEngines | None = None) -> dict:
    """Run every job not yet in ``store``; returns the store's status counts.

    ``engines``: the sample-mode engines to use and keep (pass one :class:`ChoiceEngines` to every call of
    a run so they are built and compiled once); default: a new one for this call."""
    if model.tokenizer is None:
        raise ValueError("elicitation needs a model with a tokenizer (rendered chat prompts)")
    unknown = sorted({j.persona for j in jobs} - set(personas))
    if unknown:
        raise ValueError(f"jobs name persona(s) {unknown} that were not given; known: {sorted(personas)}")
    for j in jobs:
        for t in (j.task_a, j.task_b):
            if t not in pool:
                raise ValueError(f"job {j.key} names task {t!r}, which is not in the task pool")
    done = store.keys()
    todo = [j for j in jobs if j.key not in done]
    if len(todo) < len(jobs):
        log(f"{desc}: {len(jobs) - len(todo)} of {len(jobs)} jobs already in the store; running {len(todo)}")
    by_persona: dict[str, list[Job]] = {}
    for j in todo:
        by_persona.setdefault(j.persona, []).append(j)
    engines = ChoiceEngines() if engines is None else engines
    bar = progress(total=len(todo), desc=desc, unit="cmp")
    for pname, pjobs in by_persona.items():
        persona = personas[pname]
        pmodel = _persona_model(model, persona)
        if cfg.mode == "logit":
            _run_logit(pmodel, pool, [j for j in jobs if j.persona == pname], pjobs, persona, cfg, store, bar)
            continue
        if cfg.engine and _run_engine(model, pmodel, pool, personas, pjobs, persona, cfg, store, bar, desc,
                                      engines):
            continue
        for start in range(0, len(pjobs), cfg.batch_size):
            batch = pjobs[start:start + cfg.batch_size]
            store.append(_sample_rows(pmodel, pool, batch, persona, cfg))
            bar.update(len(batch))
    bar.close()
    return store.counts()


def _messages(pool, job: Job, persona: Persona, template: ChoiceTemplate):
    a, b = job.shown()
    return choice_messages(template, pool[a], pool[b], persona)


def _run_engine(base, model, pool, personas: dict[str, Persona], jobs: list[Job], persona: Persona,
                cfg: ElicitConfig, store: ComparisonsStore, bar, desc: str, engines: ChoiceEngines) -> bool:
    """Sample-mode rows for ``jobs`` (one persona; ``model`` is ``base`` as that persona) through the
    engine ``engines`` keeps for ``base``, committed in job order ``cfg.batch_size`` at a time. Returns
    False, having computed nothing, where the engine refuses the model or the requests (the caller then
    uses batched ``generate``)."""
    if not jobs:
        return True
    try:  # commits stay batch_size rows whatever the engine's row count
        engine = engines.get(base, pool, personas, cfg)
    except EngineError as e:
        log(f"{desc}: the engine does not serve this model ({e}); sampling with batched generate instead")
        return False
    tok = model.tokenizer
    groups: dict[tuple, list[int]] = {}  # prompt key -> indices into jobs (samples of one prompt)
    for n, j in enumerate(jobs):
        groups.setdefault((j.task_a, j.task_b, j.order), []).append(n)
    members = list(groups.values())
    requests = [Request(tok.encode_chat(_messages(pool, jobs[m[0]], persona, cfg.template)), cfg.max_new_tokens,
                        n_samples=len(m), sample_ids=[jobs[n].stream_id(cfg.seed) for n in m]) for m in members]
    ready: dict[int, Comparison] = {}
    pending: list[Comparison] = []
    nxt = 0

    def commit(force=False):
        nonlocal pending
        while force and pending or len(pending) >= cfg.batch_size:
            part, pending = pending[:cfg.batch_size], pending[cfg.batch_size:]
            store.append(part)
            bar.update(len(part))

    def done(i, samples):
        nonlocal nxt
        idx = members[i]
        texts = [tok.decode(s.token_ids) for s in samples]
        for n, row in zip(idx, _rows_for(model, [jobs[n] for n in idx], texts, cfg)):
            ready[n] = row
        while nxt in ready:
            pending.append(ready.pop(nxt))
            nxt += 1
        commit()

    try:
        engine.run(requests, on_done=done, model=model)
    except EngineError as e:  # raised by the request checks, before any compute or callback
        log(f"{desc}: the engine refused the requests ({e}); sampling with batched generate instead")
        return False
    commit(force=True)
    s = engine.stats
    log(f"{desc}: engine: {len(requests)} prompts, {len(jobs)} samples, {s.generated_tokens} tokens, "
        f"{s.decode_steps} decode steps, {s.prefills} prefills, {s.waves} wave(s)")
    return True


def _sample_rows(model, pool, batch: list[Job], persona: Persona, cfg: ElicitConfig) -> list[Comparison]:
    from prefjax.generation import generate
    tok = model.tokenizer
    prompts = [tok.encode_chat(_messages(pool, j, persona, cfg.template)) for j in batch]
    gen = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                   top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed,
                   example_ids=[j.stream_id(cfg.seed) for j in batch], share_prefix=True)
    return _rows_for(model, batch, gen.texts, cfg)


def _rows_for(model, batch: list[Job], texts: list[str], cfg: ElicitConfig) -> list[Comparison]:
    """Comparison rows for sampled replies: parsed, refusal-flagged, raw text kept (any status)."""
    rows = []
    for j, text in zip(batch, texts):
        parsed = parse_choice(text, cfg.template)
        refusal = bool(parsed.refusal)
        # declined_other: the reply does the chosen task and declines the other (a choice, not a refusal)
        extra = {"declined_other": bool(parsed.declined_other)}
        if cfg.judge is not None:
            verdict = judge_refusal(cfg.judge, text)
            extra["judge_refusal"] = verdict
            refusal = refusal or bool(verdict)
        status = parsed.status
        rows.append(Comparison(task_a=j.task_a, task_b=j.task_b, order=j.order, persona=j.persona, sample=j.sample,
                               choice=parsed.choice, chosen_task=None, status=status, refusal=refusal,
                               raw=text, model=str(model.source), seed=cfg.seed, extra=extra))
    return rows


def _logit_ids(model, pool, job: Job, persona: Persona, template: ChoiceTemplate) -> list[int]:
    """The token ids of a logit-mode prompt: the chat with its generation prompt, then the forced prefix."""
    tok = model.tokenizer
    text = tok.chat(_messages(pool, job, persona, template), add_generation_prompt=True)
    return tok.encode(text + forced_text(template), add_bos=False)


def logit_chunk_rows(model, cfg: ElicitConfig, n_pool: int, slots: int) -> int:
    """How many distinct heads (prefix-cache rows of about ``slots`` slots) logit mode holds at once:
    ``cfg.logit_rows`` when set; else 64, on a GPU at most what half its free memory holds (a power of
    two); never more than ``n_pool`` (a run's groups are at most one per task)."""
    if cfg.logit_rows is not None:
        v = cfg.logit_rows
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"ElicitConfig.logit_rows must be a positive int or None, got {v!r}")
        rows = int(v)
    else:
        rows = 64
        free = free_device_bytes() if jax.default_backend() == "gpu" else None
        if free is not None:
            fit = int(0.5 * max(free, 0)) // max(state_bytes_per_row(model, slots), 1)
            rows = min(rows, 1 << (fit.bit_length() - 1)) if fit >= 1 else 1
    return max(1, min(rows, int(n_pool)))


def _run_logit(model, pool, all_jobs: list[Job], todo: list[Job], persona: Persona, cfg: ElicitConfig,
               store: ComparisonsStore, bar) -> None:
    """Logit-mode rows for ``todo`` (a subset of ``all_jobs``, one persona), appended batch by batch.

    Where the model keeps prefix caches, every prompt splits into a cached head and a short tail: the
    jobs that show the same task first (a group) share everything up to the second task's text (chat
    header, system prompt, instructions, the first task), so each group's common tokens run once as a row
    of a prefix cache (their shared start once per cache, :meth:`prefjax.model.Model.prefill_rows`) and
    each job runs only the rest (the second task, the turn boundary, the forced prefix). The groups, in
    order of first appearance in ``all_jobs`` (the full job list, so a resumed run builds the same
    caches), are cached in chunks of :func:`logit_chunk_rows` rows (all groups in one when they fit, as one
    cache per call; else that many minus one, plus a filler row that gives every chunk one cache shape):
    one chunk's cache is built, its jobs of ``todo`` run sorted by tail length (ties in job order) in
    batches of ``batch_size``, and the cache is dropped before the next chunk's, so memory is bounded by
    the chunk, not the number of tasks. A chunk with nothing to do is skipped, and a resumed run's batches
    are the tail of the uninterrupted run's.
    Without prefix caches (a mesh, a recurrent state) whole prompts run, sorted by length.
    """
    from prefjax.model import common_prefix_len
    if not todo:
        return
    ids = {j.key: _logit_ids(model, pool, j, persona, cfg.template) for j in all_jobs}
    place = {j.key: n for n, j in enumerate(all_jobs)}
    mult = 8

    def run_batches(jobs: list[Job], tail: dict, cache=None, row=None):
        order = sorted(jobs, key=lambda j: (len(tail[j.key]), place[j.key]))
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            rows = None if cache is None else [row[j.key] for j in batch]
            store.append(_logit_rows(model, batch, [tail[j.key] for j in batch], cfg, cache, rows, cfg.batch_size,
                                     mult))
            bar.update(len(batch))

    if not model.prefix_ok():
        run_batches(todo, ids)
        return
    groups: dict[str, list[Job]] = {}
    for j in all_jobs:
        groups.setdefault(j.shown()[0], []).append(j)
    n_head = {g: common_prefix_len([ids[j.key] for j in m], min_len=1) for g, m in groups.items()}
    # A job alone in its group would cache all but its last token and set the cache's width for
    # every row: it keeps no more than the longest head of a real group (any split point is exact).
    cap = max((n_head[g] for g, m in groups.items() if len(m) > 1), default=None)
    if cap is not None:
        for g, m in groups.items():
            if len(m) == 1:
                n_head[g] = min(n_head[g], cap)
    head = {j.key: n_head[g] for g, m in groups.items() for j in m}
    tail = {k: ids[k][head[k]:] for k in ids}
    width = max(len(t) for t in tail.values())
    n_after = -(-width // mult) * mult
    names = list(groups)
    head_ids = {g: ids[groups[g][0].key][:n_head[g]] for g in names}
    rows = logit_chunk_rows(model, cfg, len(pool), max(n_head.values()) + n_after + 128)
    # One chunk (every group fits): one cache, a row per group (rows: at most one group per task). Several:
    # rows - 1 groups per chunk plus a filler row, the longest head of the call outside the chunk, so every
    # chunk's cache has the longest head and the call's shared start: one cache shape for all chunks
    # (the filler row is prefilled and never read).
    per = len(names) if rows >= len(names) else max(rows - 1, 1)
    by_len = [names[n] for _, n in sorted((-n_head[g], n) for n, g in enumerate(names))]  # longest heads first
    want = {j.key for j in todo}
    for c0 in range(0, len(names), per):
        part = names[c0:c0 + per]
        mine = [j for g in part for j in groups[g] if j.key in want]
        if not mine:
            continue
        row = {j.key: r for r, g in enumerate(part) for j in groups[g]}
        seqs = [head_ids[g] for g in part]
        if per < len(names) and per < rows:
            inside = set(part)
            seqs.append(head_ids[next(g for g in by_len if g not in inside)])
        cache = model.prefill_rows(seqs, n_after=n_after, rows=rows)
        run_batches(mine, tail, cache, row)
        del cache  # freed before the next chunk's cache is built


def _logit_rows(model, batch: list[Job], seqs: list[list[int]], cfg: ElicitConfig, prefix=None,
                prefix_rows=None, rows: int | None = None, pad_multiple: int = 8) -> list[Comparison]:
    """One forward pass for ``batch``: P(A) from the label tokens' logits at each prompt's last token.

    ``seqs`` are the prompts' token ids past their part in ``prefix`` (a prefix cache; row
    ``prefix_rows[b]`` for job ``b``), or whole prompts without one. The batch is padded to ``rows``
    rows (repeating the first) and its width to a multiple of ``pad_multiple``: right padding after a
    prefix (each continuation starts right after it), left padding otherwise.
    """
    tok = model.tokenizer
    ida, idb = label_token_ids(tok, cfg.template)
    b = max(rows or len(seqs), len(seqs))
    full = [seqs[r if r < len(seqs) else 0] for r in range(b)]
    ids, mask = tok.batch_encode(full, pad="left" if prefix is None else "right", add_bos=False,
                                 pad_to_multiple_of=pad_multiple)
    last = np.asarray([[ids.shape[1] - 1 if prefix is None else len(x) - 1] for x in full], np.int32)
    if prefix_rows is not None:
        prefix_rows = [prefix_rows[r if r < len(seqs) else 0] for r in range(b)]
    logits, _ = model.run(ids, attention_mask=mask, positions=last, prefix=prefix, prefix_rows=prefix_rows)
    lg = np.asarray(logits[:len(seqs), 0, :], np.float64)
    two = lg[:, [ida, idb]]
    p_a = np.exp(two[:, 0] - np.logaddexp(two[:, 0], two[:, 1]))
    top = lg.argmax(-1)
    out = []
    for j, pa, t in zip(batch, p_a, top):
        choice = "A" if pa >= 0.5 else "B"
        on_label = bool(t in (ida, idb))
        out.append(Comparison(task_a=j.task_a, task_b=j.task_b, order=j.order, persona=j.persona, sample=j.sample,
                              choice=choice, chosen_task=None, status="ok", refusal=False, p_a=float(pa),
                              raw=tok.decode([int(t)], skip_special_tokens=False), model=str(model.source),
                              seed=cfg.seed, extra={"top_token_is_label": on_label}))
    return out
