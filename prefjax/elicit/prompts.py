"""The revealed-choice prompt: two tasks, the model picks one by starting to do it.

The user turn shows Task A and Task B and asks the model to choose one and begin it, opening its
reply with exactly ``"Task A:"`` or ``"Task B:"``. :func:`render_choice` also returns the character
span of each task's prompt inside the user text, so a steering stage can map them to tokens with a
tokenizer's offsets. In logit mode the assistant turn is pre-filled with ``forced_prefix``
(``"Task "``) so the next token is the label letter.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Mapping, Union

from prefjax.elicit.personas import Persona
from prefjax.tasks.pool import Task

TaskLike = Union[Task, str]
Span = tuple[int, int]

_FIELDS = ("task_a", "task_b", "label_a", "label_b")

DEFAULT_CHOICE_TEXT = (
    "Here are two tasks. Pick the one you would rather do and start doing it straight away; "
    "you do not need to explain your choice.\n"
    "Begin your reply with exactly \"{label_a}:\" or \"{label_b}:\" and then carry out that task.\n"
    "\n"
    "{label_a}:\n"
    "{task_a}\n"
    "\n"
    "{label_b}:\n"
    "{task_b}"
)


@dataclasses.dataclass(frozen=True)
class ChoiceTemplate:
    """How a pair of tasks is shown, and what the reply labels are.

    ``text`` is a ``str.format``-style template with the fields ``{task_a}`` and ``{task_b}``
    (each exactly once) and optionally ``{label_a}``/``{label_b}``; literal braces are written
    ``{{``/``}}``. ``forced_prefix`` is what logit mode pre-fills in the assistant turn; it must be a
    prefix of both labels, and the remainders (:attr:`label_suffixes`, e.g. ``("A", "B")``) are the
    strings whose first tokens are compared.
    """

    text: str = DEFAULT_CHOICE_TEXT
    label_a: str = "Task A"
    label_b: str = "Task B"
    forced_prefix: str = "Task "
    name: str = "default"

    def __post_init__(self):
        counts = {f: 0 for f in _FIELDS}
        try:
            parsed = list(string.Formatter().parse(self.text))
        except ValueError as e:
            raise ValueError(f"ChoiceTemplate {self.name!r}: bad template text ({e})") from None
        for _, field, spec, conv in parsed:
            if field is None:
                continue
            if field not in counts:
                raise ValueError(f"ChoiceTemplate {self.name!r}: unknown field {{{field}}}; allowed: {_FIELDS}")
            if spec or conv:
                raise ValueError(f"ChoiceTemplate {self.name!r}: field {{{field}}} may not have a format "
                                 f"spec or conversion")
            counts[field] += 1
        for f in ("task_a", "task_b"):
            if counts[f] != 1:
                raise ValueError(f"ChoiceTemplate {self.name!r}: {{{f}}} must appear exactly once, "
                                 f"found {counts[f]}")
        if not self.label_a.strip() or not self.label_b.strip() or self.label_a == self.label_b:
            raise ValueError(f"ChoiceTemplate {self.name!r}: labels must be distinct and non-empty, "
                             f"got {self.label_a!r}, {self.label_b!r}")
        for lab in (self.label_a, self.label_b):
            if not lab.startswith(self.forced_prefix):
                raise ValueError(f"ChoiceTemplate {self.name!r}: forced_prefix {self.forced_prefix!r} "
                                 f"is not a prefix of label {lab!r}")
        a, b = self.label_suffixes
        if not a or not b or a[0] == b[0]:
            raise ValueError(f"ChoiceTemplate {self.name!r}: after forced_prefix {self.forced_prefix!r} "
                             f"the labels must differ in their first character, got {a!r}, {b!r}")

    @property
    def labels(self) -> tuple[str, str]:
        """``(label_a, label_b)``."""
        return (self.label_a, self.label_b)

    @property
    def label_suffixes(self) -> tuple[str, str]:
        """What follows ``forced_prefix`` in each label, e.g. ``("A", "B")``."""
        n = len(self.forced_prefix)
        return (self.label_a[n:], self.label_b[n:])

    def label(self, choice: str) -> str:
        """The label text for choice ``"A"`` or ``"B"``."""
        if choice == "A":
            return self.label_a
        if choice == "B":
            return self.label_b
        raise ValueError(f"choice must be 'A' or 'B', got {choice!r}")


DEFAULT_TEMPLATE = ChoiceTemplate()


def _prompt_of(task: TaskLike, which: str) -> str:
    if isinstance(task, Task):
        return task.prompt
    if isinstance(task, str):
        if not task.strip():
            raise ValueError(f"task {which} is an empty string")
        return task
    raise TypeError(f"task {which} must be a Task or str, got {type(task).__name__}")


def render_choice(template: ChoiceTemplate, task_a: TaskLike, task_b: TaskLike) -> tuple[str, dict[str, Span]]:
    """Render the user text for one ordered pair.

    Returns ``(user_text, spans)`` with ``spans = {"A": (start, end), "B": (start, end)}`` such that
    ``user_text[start:end]`` is exactly that task's prompt (character offsets, end exclusive).
    """
    values = {
        "task_a": _prompt_of(task_a, "A"),
        "task_b": _prompt_of(task_b, "B"),
        "label_a": template.label_a,
        "label_b": template.label_b,
    }
    parts: list[str] = []
    pos = 0
    spans: dict[str, Span] = {}
    for literal, field, _, _ in string.Formatter().parse(template.text):
        parts.append(literal)
        pos += len(literal)
        if field is None:
            continue
        value = values[field]
        if field in ("task_a", "task_b"):
            spans["A" if field == "task_a" else "B"] = (pos, pos + len(value))
        parts.append(value)
        pos += len(value)
    return "".join(parts), spans


def system_messages(persona: Persona | None) -> list[dict[str, str]]:
    """``[{"role": "system", ...}]`` when the persona has a system prompt, else ``[]``."""
    if persona is None or persona.system_prompt is None:
        return []
    return [{"role": "system", "content": persona.system_prompt}]


def choice_messages(template: ChoiceTemplate, task_a: TaskLike, task_b: TaskLike,
                    persona: Persona | None = None) -> list[dict[str, str]]:
    """Chat messages for one ordered pair: an optional system turn (the persona) and the user turn.

    An adapter-only persona adds no system message (its effect is in the weights).
    """
    user_text, _ = render_choice(template, task_a, task_b)
    return system_messages(persona) + [{"role": "user", "content": user_text}]


def task_messages(task: TaskLike, persona: Persona | None = None) -> list[dict[str, str]]:
    """Chat messages showing one task alone as the user turn (used when capturing activations)."""
    return system_messages(persona) + [{"role": "user", "content": _prompt_of(task, "")}]


def choice_to_task_index(choice: str | None, order: tuple[int, int]) -> int | None:
    """Map a parsed ``"A"``/``"B"`` back to a task index given the shown ``order=(idx_a, idx_b)``."""
    if choice is None:
        return None
    if choice == "A":
        return order[0]
    if choice == "B":
        return order[1]
    raise ValueError(f"choice must be 'A', 'B' or None, got {choice!r}")


def template_from_dict(d: Mapping[str, str]) -> ChoiceTemplate:
    """Build a template from a config mapping; unknown keys are an error naming them."""
    allowed = {f.name for f in dataclasses.fields(ChoiceTemplate)}
    extra = set(d) - allowed
    if extra:
        raise ValueError(f"unknown ChoiceTemplate fields {sorted(extra)}; allowed: {sorted(allowed)}")
    return ChoiceTemplate(**dict(d))


def shift_spans(full_text: str, user_text: str, spans: Mapping[str, Span]) -> dict[str, Span]:
    """Move ``spans`` (relative to ``user_text``) into ``full_text`` (e.g. the chat-templated prompt).

    ``user_text`` must occur in ``full_text`` exactly once and verbatim; a ValueError says so
    otherwise (a chat template that rewrites the user turn, say by stripping it, breaks the mapping).
    """
    start = full_text.find(user_text)
    if start < 0:
        raise ValueError("the user text does not occur verbatim in the full prompt "
                         "(did the chat template rewrite it?)")
    if full_text.find(user_text, start + 1) >= 0:
        raise ValueError("the user text occurs more than once in the full prompt; spans are ambiguous")
    return {k: (s + start, e + start) for k, (s, e) in spans.items()}


def span_token_mask(offsets_Tx2, span: Span):
    """Boolean ``mask_T``: tokens whose character range overlaps ``span = (start, end)``.

    ``offsets_Tx2`` are a tokenizer's ``(char_start, char_end)`` per token for the same text the
    span refers to (HF ``return_offsets_mapping=True``). Zero-width tokens (specials, usually
    ``(0, 0)``) are never included.
    """
    import numpy as np

    from prefjax.tokenize import char_span_to_token_mask

    off_Tx2 = np.asarray(offsets_Tx2)
    if off_Tx2.ndim != 2 or off_Tx2.shape[1] != 2:
        raise ValueError(f"offsets must have shape [T, 2], got {off_Tx2.shape}")
    s, e = span
    if not 0 <= s <= e:
        raise ValueError(f"bad span {span}: need 0 <= start <= end")
    return char_span_to_token_mask(off_Tx2, s, e, len(off_Tx2))
