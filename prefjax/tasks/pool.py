"""Tasks and ordered task pools.

A :class:`Task` is one thing a model could be asked to do (``id``, ``prompt``, ``topic``,
``source``). A :class:`TaskPool` is an ordered, id-unique collection of tasks; every later stage
(choices, utilities, activations, probes) refers to tasks by their index in one pool, so a pool's
order is part of its identity and nothing here reorders silently.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Mapping, Sequence, overload

import numpy as np

#: The eleven topics of the bundled default pool (the taxonomy of the public task sets, with the
#: British spelling ``summarisation``; public files spell it ``summarization``).
TOPICS: tuple[str, ...] = (
    "fiction",
    "persuasive_writing",
    "content_generation",
    "knowledge_qa",
    "coding",
    "math",
    "summarisation",
    "harmful_request",
    "sensitive_creative",
    "model_manipulation",
    "security_legal",
)


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: a stable ``id``, the user-facing ``prompt``, a ``topic`` label and its ``source``."""

    id: str
    prompt: str
    topic: str = "unknown"
    source: str = "unknown"

    def __post_init__(self):
        for field in ("id", "prompt", "topic", "source"):
            value = getattr(self, field)
            if not isinstance(value, str):
                raise TypeError(f"Task.{field} must be a str, got {type(value).__name__}: {value!r}")
        if not self.id:
            raise ValueError("Task.id must be non-empty")
        if not self.prompt.strip():
            raise ValueError(f"Task {self.id!r} has an empty prompt")

    def to_dict(self) -> dict[str, str]:
        """The task as a plain JSON-ready dict (``id, prompt, topic, source``)."""
        return dataclasses.asdict(self)


class TaskPool:
    """An ordered collection of tasks with unique ids.

    ``pool[i]`` is the i-th task, ``pool["fic-001"]`` the task with that id, ``pool[2:5]`` a new
    pool. Pools are immutable: every method that selects tasks returns a new pool that keeps the
    original relative order.
    """

    def __init__(self, tasks: Iterable[Task]):
        tasks = tuple(tasks)
        index: dict[str, int] = {}
        for i, t in enumerate(tasks):
            if not isinstance(t, Task):
                raise TypeError(f"TaskPool item {i} is a {type(t).__name__}, not a Task")
            if t.id in index:
                raise ValueError(f"duplicate task id {t.id!r} at positions {index[t.id]} and {i}")
            index[t.id] = i
        self._tasks = tasks
        self._index = index

    # -- sequence protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks)

    @overload
    def __getitem__(self, key: int | str) -> Task: ...
    @overload
    def __getitem__(self, key: slice) -> "TaskPool": ...

    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                return self._tasks[self._index[key]]
            except KeyError:
                raise KeyError(f"no task with id {key!r} in this pool of {len(self)} tasks") from None
        if isinstance(key, slice):
            return TaskPool(self._tasks[key])
        if isinstance(key, (int, np.integer)):
            return self._tasks[int(key)]
        raise TypeError(f"TaskPool index must be int, str id or slice, got {type(key).__name__}")

    def __contains__(self, item) -> bool:
        if isinstance(item, Task):
            return self._index.get(item.id) is not None and self._tasks[self._index[item.id]] == item
        return item in self._index

    def __eq__(self, other) -> bool:
        return isinstance(other, TaskPool) and self._tasks == other._tasks

    def __hash__(self) -> int:
        return hash(self._tasks)

    def __repr__(self) -> str:
        return f"TaskPool({len(self)} tasks, topics={list(self.topics)})"

    # -- accessors ---------------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[Task, ...]:
        """The tasks, in pool order."""
        return self._tasks

    @property
    def ids(self) -> tuple[str, ...]:
        """Task ids, in pool order."""
        return tuple(t.id for t in self._tasks)

    @property
    def prompts(self) -> tuple[str, ...]:
        """Task prompts, in pool order."""
        return tuple(t.prompt for t in self._tasks)

    @property
    def topics(self) -> tuple[str, ...]:
        """Distinct topics in order of first appearance."""
        return tuple(dict.fromkeys(t.topic for t in self._tasks))

    def topic_array(self) -> np.ndarray:
        """Integer topic code per task (index into :attr:`topics`), shape ``[N]``."""
        code = {t: i for i, t in enumerate(self.topics)}
        return np.array([code[t.topic] for t in self._tasks], dtype=np.int32)

    def index(self, task_id: str) -> int:
        """Position of the task with id ``task_id``; KeyError naming the id if absent."""
        try:
            return self._index[task_id]
        except KeyError:
            raise KeyError(f"no task with id {task_id!r} in this pool of {len(self)} tasks") from None

    def by_topic(self) -> dict[str, "TaskPool"]:
        """``{topic: pool of that topic's tasks}``, topics in first-appearance order."""
        groups: dict[str, list[Task]] = {t: [] for t in self.topics}
        for t in self._tasks:
            groups[t.topic].append(t)
        return {k: TaskPool(v) for k, v in groups.items()}

    def filter(self, topics: Sequence[str] | None = None, ids: Sequence[str] | None = None) -> "TaskPool":
        """Tasks whose topic is in ``topics`` and/or whose id is in ``ids`` (pool order kept).

        Unknown topics or ids raise ValueError naming them, so a typo does not give an empty pool.
        """
        keep = list(self._tasks)
        if topics is not None:
            unknown = [t for t in topics if t not in self.topics]
            if unknown:
                raise ValueError(f"unknown topics {unknown}; this pool has {list(self.topics)}")
            wanted = set(topics)
            keep = [t for t in keep if t.topic in wanted]
        if ids is not None:
            unknown = [i for i in ids if i not in self._index]
            if unknown:
                raise ValueError(f"unknown task ids {unknown[:10]} ({len(unknown)} in all)")
            wanted = set(ids)
            keep = [t for t in keep if t.id in wanted]
        return TaskPool(keep)

    def subset(self, n: int, seed: int = 0, stratified: bool = True) -> "TaskPool":
        """A random subset of ``n`` tasks, in original pool order.

        With ``stratified=True`` each topic gets a share proportional to its size (largest-remainder
        rounding, ties broken by topic order), then tasks are drawn uniformly within each topic.
        The same ``(n, seed, stratified)`` always gives the same subset.
        """
        n = int(n)
        if not 0 <= n <= len(self):
            raise ValueError(f"subset size n={n} must be between 0 and the pool size {len(self)}")
        rng = np.random.default_rng(seed)
        if not stratified:
            chosen = rng.choice(len(self), size=n, replace=False)
            return TaskPool(self._tasks[i] for i in sorted(chosen.tolist()))
        groups = {topic: [i for i, t in enumerate(self._tasks) if t.topic == topic] for topic in self.topics}
        sizes = np.array([len(g) for g in groups.values()], dtype=np.int64)
        quota = n * sizes / len(self) if len(self) else sizes.astype(float)
        alloc = np.floor(quota).astype(np.int64)
        remainder = quota - alloc
        # Largest remainders first; stable sort keeps topic order among ties.
        for j in np.argsort(-remainder, kind="stable")[: n - int(alloc.sum())]:
            alloc[j] += 1
        chosen: list[int] = []
        for members, k in zip(groups.values(), alloc.tolist()):
            picked = rng.choice(len(members), size=k, replace=False)
            chosen.extend(members[i] for i in picked.tolist())
        return TaskPool(self._tasks[i] for i in sorted(chosen))

    def concat(self, other: "TaskPool") -> "TaskPool":
        """This pool followed by ``other`` (ids must stay unique)."""
        return TaskPool(self._tasks + tuple(other))

    def to_records(self) -> list[dict[str, str]]:
        """The pool as a list of plain dicts, in order."""
        return [t.to_dict() for t in self._tasks]

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, str]]) -> "TaskPool":
        """Inverse of :meth:`to_records` (keys ``id, prompt`` and optional ``topic, source``)."""
        return cls(Task(**dict(r)) for r in records)
