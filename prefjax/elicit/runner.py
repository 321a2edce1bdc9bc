"""The pairwise revealed-choice runner: pairs x orders x personas x samples -> comparison rows.

Every job has a key ``(task_a, task_b, order, persona, sample)``. The runner lists the jobs, drops
those the store already holds, runs the rest in batches and appends each batch's rows (raw text,
parsed choice, status, refusal flag) to the append-only :class:`~prefjax.store.ComparisonsStore`.
Killed at any moment and restarted, it redoes at most the batch in flight, and the store skips any
key it already holds, so nothing is lost or duplicated.

Sampling is reproducible per job: the PRNG stream of a completion is derived from (seed, job key),
not from its place in a batch. ``mode="logit"`` reads P(A) from the label-token logits after the
forced prefix in one forward pass (no sampling; one row per pair and order).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Iterable, Sequence

import numpy as np

from prefjax.elicit.parse import judge_refusal, parse_choice
from prefjax.elicit.personas import Persona
from prefjax.elicit.prompts import DEFAULT_TEMPLATE, ChoiceTemplate, choice_messages
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
    """How choices are elicited."""

    mode: str = "sample"  # "sample" | "logit"
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 16
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


def run_choices(model, pool: TaskPool, jobs: Sequence[Job], personas: dict[str, Persona],
                store: ComparisonsStore, cfg: ElicitConfig = ElicitConfig(), *, desc: str = "choices") -> dict:
    """Run every job not yet in ``store``; returns the store's status counts."""
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
    bar = progress(total=len(todo), desc=desc, unit="cmp")
    for pname, pjobs in by_persona.items():
        persona = personas[pname]
        pmodel = _persona_model(model, persona)
        for start in range(0, len(pjobs), cfg.batch_size):
            batch = pjobs[start:start + cfg.batch_size]
            rows = (_logit_rows if cfg.mode == "logit" else _sample_rows)(pmodel, pool, batch, persona, cfg)
            store.append(rows)
            bar.update(len(batch))
    bar.close()
    return store.counts()


def _messages(pool, job: Job, persona: Persona, template: ChoiceTemplate):
    a, b = job.shown()
    return choice_messages(template, pool[a], pool[b], persona)


def _sample_rows(model, pool, batch: list[Job], persona: Persona, cfg: ElicitConfig) -> list[Comparison]:
    from prefjax.generation import generate
    tok = model.tokenizer
    prompts = [tok.encode_chat(_messages(pool, j, persona, cfg.template)) for j in batch]
    gen = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                   top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed,
                   example_ids=[j.stream_id(cfg.seed) for j in batch])
    rows = []
    for j, text in zip(batch, gen.texts):
        parsed = parse_choice(text, cfg.template)
        refusal = bool(parsed.refusal)
        extra = {}
        if cfg.judge is not None:
            verdict = judge_refusal(cfg.judge, text)
            extra["judge_refusal"] = verdict
            refusal = refusal or bool(verdict)
        status = parsed.status
        rows.append(Comparison(task_a=j.task_a, task_b=j.task_b, order=j.order, persona=j.persona, sample=j.sample,
                               choice=parsed.choice, chosen_task=None, status=status, refusal=refusal,
                               raw=text, model=str(model.source), seed=cfg.seed, extra=extra))
    return rows


def _logit_rows(model, pool, batch: list[Job], persona: Persona, cfg: ElicitConfig) -> list[Comparison]:
    tok = model.tokenizer
    ida, idb = label_token_ids(tok, cfg.template)
    seqs = []
    for j in batch:
        text = tok.chat(_messages(pool, j, persona, cfg.template), add_generation_prompt=True)
        seqs.append(tok.encode(text + forced_text(cfg.template), add_bos=False))
    ids, mask = tok.batch_encode(seqs, pad="left")
    last = np.full((len(seqs), 1), ids.shape[1] - 1, np.int32)
    logits, _ = model.run(ids, attention_mask=mask, positions=last)
    lg = np.asarray(logits[:, 0, :], np.float64)
    two = lg[:, [ida, idb]]
    p_a = np.exp(two[:, 0] - np.logaddexp(two[:, 0], two[:, 1]))
    top = lg.argmax(-1)
    rows = []
    for j, pa, t in zip(batch, p_a, top):
        choice = "A" if pa >= 0.5 else "B"
        on_label = bool(t in (ida, idb))
        rows.append(Comparison(task_a=j.task_a, task_b=j.task_b, order=j.order, persona=j.persona, sample=j.sample,
                               choice=choice, chosen_task=None, status="ok", refusal=False, p_a=float(pa),
                               raw=tok.decode([int(t)], skip_special_tokens=False), model=str(model.source),
                               seed=cfg.seed, extra={"top_token_is_label": on_label}))
    return rows
