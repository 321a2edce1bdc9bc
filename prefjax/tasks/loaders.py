"""Read task files into a :class:`TaskPool`, validating as we go.

Formats (``load_tasks(path, format=...)``):

* ``"jsonl"`` -- one JSON object per line with ``id`` and ``prompt`` (or ``text``); optional
  ``topic`` and ``source``. A ``.json`` file holding an array of such objects is also read.
* ``"csv"`` -- a header row with a content column (``content``, ``text`` or ``prompt``, first
  found wins), optional ``topic`` (else ``category``) and optional ``id``; missing ids are generated
  as ``<source>-<row:05d>`` (row = 1-based data row).
* ``"alpaca"`` -- a JSON array (or JSONL) of ``{instruction, input, output}``; the prompt is the
  instruction followed by a blank line and the input when the input is non-empty.
* ``"math"`` -- MATH problems (``problem, level, type, solution``) as a JSON array, a single JSON
  object, JSONL, or a folder tree of one-problem ``.json`` files (the original MATH layout; ids are
  the relative paths); topic ``"math"``, the prompt is the problem.
* ``"auto"`` -- picked from the extension and the first record's keys.

Every problem raises :class:`TaskFileError` (a ValueError) whose message starts with
``<path>:<line>:`` and names the field or id involved. Prompts are stripped of leading and
trailing whitespace (nothing else is changed).
"""

from __future__ import annotations

import csv
import importlib.resources
import io
import json
import os
from typing import Any, Iterable, Iterator

from prefjax.tasks.pool import Task, TaskPool

FORMATS = ("auto", "jsonl", "csv", "alpaca", "math")
DEFAULT_POOL_SOURCE = "prefjax-default"

_CSV_CONTENT_COLUMNS = ("content", "text", "prompt")
_CSV_TOPIC_COLUMNS = ("topic", "category")


class TaskFileError(ValueError):
    """A task file that cannot be read; ``path`` and ``line`` (1-based, or None) say where."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path = os.fspath(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


# -- helpers ---------------------------------------------------------------------------------

def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except FileNotFoundError:
        raise TaskFileError(path, None, "file not found") from None
    except UnicodeDecodeError as e:
        raise TaskFileError(path, None, f"not UTF-8 text ({e})") from None


def _iter_jsonl(path: str, text: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line.

    Lines are split on ``\n`` only: ``str.splitlines`` would also split on U+2028 and friends,
    which JSON allows raw inside strings (real WildChat rows contain them).
    """
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFileError(path, lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None
        yield lineno, obj


def _iter_json_items(path: str, text: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, item)`` for each item of a top-level JSON array (or the one object).

    Items are decoded one by one so that each carries the line it starts on.
    """
    dec = json.JSONDecoder()
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    def decode(i: int):
        try:
            return dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise TaskFileError(path, e.lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None

    i = skip_ws(0)
    if i == n:
        raise TaskFileError(path, 1, "empty file: expected a JSON array or object")
    if text[i] != "[":
        obj, end = decode(i)
        if skip_ws(end) != n:
            raise TaskFileError(path, line_of(skip_ws(end)),
                                "malformed JSON (extra data after the top-level value; is this JSONL?)")
        yield line_of(i), obj
        return
    i = skip_ws(i + 1)
    if i < n and text[i] == "]":
        return
    while True:
        start = i
        obj, i = decode(i)
        yield line_of(start), obj
        i = skip_ws(i)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
            continue
        if i < n and text[i] == "]":
            break
        raise TaskFileError(path, line_of(min(i, n - 1) if n else 0),
                            "malformed JSON (expected ',' or ']' in the top-level array)")
    if skip_ws(i + 1) != n:
        raise TaskFileError(path, line_of(skip_ws(i + 1)), "malformed JSON (extra data after the array)")


def _str_field(path: str, lineno: int, obj: dict, key: str, what: str) -> str:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TaskFileError(path, lineno, f"field {key!r} ({what}) must be a string, got {type(value).__name__}")
    return str(value)


class _Builder:
    """Collects tasks, checking for empty prompts and duplicate ids with line numbers."""

    def __init__(self, path: str):
        self.path = path
        self.tasks: list[Task] = []
        self.first_line: dict[str, int] = {}

    def add(self, lineno: int, task_id: str, prompt: str, topic: str, source: str) -> None:
        task_id = task_id.strip()
        if not task_id:
            raise TaskFileError(self.path, lineno, "empty id")
        prompt = prompt.strip()
        if not prompt:
            raise TaskFileError(self.path, lineno, f"empty prompt (id {task_id!r})")
        if task_id in self.first_line:
            raise TaskFileError(
                self.path, lineno,
                f"duplicate id {task_id!r} (lines {self.first_line[task_id]} and {lineno})")
        self.first_line[task_id] = lineno
        self.tasks.append(Task(id=task_id, prompt=prompt, topic=topic.strip() or "unknown", source=source))

    def pool(self) -> TaskPool:
        if not self.tasks:
            raise TaskFileError(self.path, None, "no tasks found")
        return TaskPool(self.tasks)


def _require_object(path: str, lineno: int, obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise TaskFileError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    return obj


# -- per-format readers ----------------------------------------------------------------------

def _load_jsonl(path: str, source: str, default_topic: str) -> TaskPool:
    b = _Builder(path)
    for lineno, obj in _json_records(path):
        obj = _require_object(path, lineno, obj)
        if "id" not in obj:
            raise TaskFileError(path, lineno, f"missing field 'id' (keys present: {sorted(obj)})")
        key = "prompt" if "prompt" in obj else "text" if "text" in obj else None
        if key is None:
            raise TaskFileError(path, lineno,
                                f"missing prompt field: expected 'prompt' or 'text' (keys present: {sorted(obj)})")
        task_id = _str_field(path, lineno, obj, "id", "task id")
        prompt = _str_field(path, lineno, obj, key, "prompt")
        topic = _str_field(path, lineno, obj, "topic", "topic") if obj.get("topic") is not None else default_topic
        src = _str_field(path, lineno, obj, "source", "source") if obj.get("source") is not None else source
        b.add(lineno, task_id, prompt, topic, src)
    return b.pool()


def _load_csv(path: str, source: str, default_topic: str) -> TaskPool:
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))  # not splitlines(): see _iter_jsonl
    try:
        header = next(reader)
    except StopIteration:
        raise TaskFileError(path, 1, "empty CSV file (no header row)") from None
    except csv.Error as e:
        raise TaskFileError(path, 1, f"malformed CSV ({e})") from None
    cols = [h.strip().lower() for h in header]
    content = next((c for c in _CSV_CONTENT_COLUMNS if c in cols), None)
    if content is None:
        raise TaskFileError(path, 1, f"missing prompt column: expected one of {list(_CSV_CONTENT_COLUMNS)}, "
                                     f"header has {header}")
    ci = cols.index(content)
    ti = next((cols.index(c) for c in _CSV_TOPIC_COLUMNS if c in cols), None)
    ii = cols.index("id") if "id" in cols else None
    b = _Builder(path)
    prev_end = reader.line_num
    row_no = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise TaskFileError(path, reader.line_num, f"malformed CSV ({e})") from None
        lineno = prev_end + 1
        prev_end = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        row_no += 1
        if len(row) != len(header):
            raise TaskFileError(path, lineno, f"row has {len(row)} fields but the header has {len(header)}")
        task_id = row[ii] if ii is not None else f"{source}-{row_no:05d}"
        topic = row[ti] if ti is not None and row[ti].strip() else default_topic
        b.add(lineno, task_id, row[ci], topic, source)
    return b.pool()


def _json_records(path: str) -> Iterator[tuple[int, Any]]:
    """Records of a ``.jsonl`` file (one per line) or of any other file as one JSON value."""
    text = _read_text(path)
    if path.lower().endswith(".jsonl"):
        return _iter_jsonl(path, text)
    return _iter_json_items(path, text)


def _load_alpaca(path: str, source: str, default_topic: str) -> TaskPool:
    b = _Builder(path)
    for k, (lineno, obj) in enumerate(_json_records(path), start=1):
        obj = _require_object(path, lineno, obj)
        if "instruction" not in obj:
            raise TaskFileError(path, lineno, f"missing prompt field 'instruction' (keys present: {sorted(obj)})")
        instruction = _str_field(path, lineno, obj, "instruction", "prompt")
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            raise TaskFileError(path, lineno, f"field 'input' must be a string, got {type(extra).__name__}")
        prompt = instruction.strip() + ("\n\n" + extra.strip() if extra.strip() else "")
        task_id = _str_field(path, lineno, obj, "id", "task id") if obj.get("id") is not None else f"{source}-{k:05d}"
        topic = obj["topic"] if isinstance(obj.get("topic"), str) else default_topic
        b.add(lineno, task_id, prompt if instruction.strip() else "", topic, source)
    return b.pool()


def _load_math(path: str, source: str, default_topic: str) -> TaskPool:
    del default_topic  # MATH problems are always topic "math"
    b = _Builder(path)
    for k, (lineno, obj) in enumerate(_json_records(path), start=1):
        obj = _require_object(path, lineno, obj)
        if "problem" not in obj:
            raise TaskFileError(path, lineno, f"missing prompt field 'problem' (keys present: {sorted(obj)})")
        prompt = _str_field(path, lineno, obj, "problem", "prompt")
        id_key = "id" if obj.get("id") is not None else "unique_id" if obj.get("unique_id") is not None else None
        task_id = _str_field(path, lineno, obj, id_key, "task id") if id_key else f"{source}-{k:05d}"
        b.add(lineno, task_id, prompt, "math", source)
    return b.pool()


_LOADERS = {"jsonl": _load_jsonl, "csv": _load_csv, "alpaca": _load_alpaca, "math": _load_math}


def detect_format(path: str | os.PathLike) -> str:
    """Guess a task file's format from its extension and, for JSON, its first record's keys."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        return "csv"
    if ext not in (".json", ".jsonl"):
        raise TaskFileError(path, None, f"unknown format for extension {ext!r}: pass format= one of "
                                        f"{[f for f in FORMATS if f != 'auto']}")
    first = None
    for lineno, obj in _json_records(path):
        first = (lineno, obj)
        break
    if first is None:
        raise TaskFileError(path, None, "no records found")
    lineno, obj = first
    if not isinstance(obj, dict):
        raise TaskFileError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    if "instruction" in obj:
        return "alpaca"
    if "problem" in obj:
        return "math"
    if "prompt" in obj or "text" in obj or "id" in obj:
        return "jsonl"
    raise TaskFileError(path, lineno, f"cannot tell the format from keys {sorted(obj)}: expected "
                                      f"'instruction' (alpaca), 'problem' (math) or 'id' + 'prompt'/'text' (jsonl)")


def load_tasks(path: str | os.PathLike, format: str = "auto", *, source: str | None = None,
               default_topic: str = "unknown") -> TaskPool:
    """Load a task file into a :class:`TaskPool` (see the module docstring for formats).

    ``source`` defaults to the file's stem (e.g. ``"bailBench"``) and is also the prefix of
    generated ids; ``default_topic`` is used when a record has no topic. Raises
    :class:`TaskFileError` naming the file, line and field of the first problem found.
    """
    path = os.fspath(path)
    if format not in FORMATS:
        raise TaskFileError(path, None, f"unknown format {format!r}; expected one of {list(FORMATS)}")
    if not os.path.exists(path):
        raise TaskFileError(path, None, "file not found")
    if source is None:
        source = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    if os.path.isdir(path):
        if format not in ("auto", "math"):
            raise TaskFileError(path, None, f"is a folder; only format='math' (a MATH tree of one-problem "
                                            f".json files) reads folders, not {format!r}")
        return _load_math_dir(path, source)
    if format == "auto":
        format = detect_format(path)
    return _LOADERS[format](path, source, default_topic)


def _load_math_dir(root: str, source: str) -> TaskPool:
    """The original MATH layout: ``<root>/<subject>/<n>.json``, one problem per file.

    Files are read in sorted path order; a task's id is its path relative to ``root``.
    """
    files = sorted(os.path.relpath(os.path.join(d, f), root)
                   for d, _, fs in os.walk(root) for f in fs if f.endswith(".json"))
    if not files:
        raise TaskFileError(root, None, "no .json files found in this folder")
    tasks = []
    for rel in files:
        full = os.path.join(root, rel)
        items = list(_iter_json_items(full, _read_text(full)))
        if len(items) != 1:
            raise TaskFileError(full, None, f"expected one problem per file in a MATH folder, found {len(items)}")
        lineno, obj = items[0]
        obj = _require_object(full, lineno, obj)
        if "problem" not in obj:
            raise TaskFileError(full, lineno, f"missing prompt field 'problem' (keys present: {sorted(obj)})")
        prompt = _str_field(full, lineno, obj, "problem", "prompt").strip()
        if not prompt:
            raise TaskFileError(full, lineno, f"empty prompt (id {rel.replace(os.sep, '/')!r})")
        tasks.append(Task(id=rel.replace(os.sep, "/"), prompt=prompt, topic="math", source=source))
    return TaskPool(tasks)


def save_jsonl(tasks: TaskPool | Iterable[Task], path: str | os.PathLike) -> None:
    """Write tasks as JSONL (``id, prompt, topic, source`` per line), atomically.

    ``load_tasks(path)`` gives back an equal pool.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for t in tasks:
            f.write(json.dumps(t.to_dict(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def load_default_pool() -> TaskPool:
    """The bundled default pool: 11 topics, at least 30 short tasks each, written for prefjax."""
    ref = importlib.resources.files("prefjax.tasks") / "data" / "default_pool.jsonl"
    with importlib.resources.as_file(ref) as p:
        return load_tasks(p, format="jsonl")
