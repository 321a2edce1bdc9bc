"""Task pools: the ``Task``/``TaskPool`` types, file loaders and the bundled default pool."""

from prefjax.tasks.loaders import (
    DEFAULT_POOL_SOURCE,
    FORMATS,
    TaskFileError,
    detect_format,
    load_default_pool,
    load_tasks,
    save_jsonl,
)
from prefjax.tasks.pool import TOPICS, Task, TaskPool

__all__ = [
    "DEFAULT_POOL_SOURCE",
    "FORMATS",
    "TOPICS",
    "Task",
    "TaskFileError",
    "TaskPool",
    "detect_format",
    "load_default_pool",
    "load_tasks",
    "save_jsonl",
]
