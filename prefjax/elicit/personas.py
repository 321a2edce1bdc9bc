"""Personas: who the model is asked to be when it chooses between tasks.

A :class:`Persona` is either a system prompt (``system_prompt``), a LoRA adapter folder
(``adapter``), both, or neither (the ``default`` persona: no system message, base weights).
The bundled library lives in ``prefjax/elicit/data/personas.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
from typing import Sequence

ADAPTER_PREFIX = "adapter:"


class PersonaError(ValueError):
    """An unknown persona name, a bad persona spec, or a malformed persona file."""


@dataclasses.dataclass(frozen=True)
class Persona:
    """A persona: ``name``, an optional ``system_prompt`` and an optional LoRA ``adapter`` folder.

    ``system_prompt=None`` means no system message is sent at all (not an empty one).
    """

    name: str
    system_prompt: str | None = None
    adapter: str | None = None
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise PersonaError(f"persona name must be a non-empty string, got {self.name!r}")
        if self.system_prompt is not None and (not isinstance(self.system_prompt, str)
                                               or not self.system_prompt.strip()):
            raise PersonaError(f"persona {self.name!r}: system_prompt must be None or a non-empty string")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter.strip()):
            raise PersonaError(f"persona {self.name!r}: adapter must be None or a non-empty path string")

    @property
    def is_adapter(self) -> bool:
        """True when this persona changes the weights (a LoRA adapter) rather than only the prompt."""
        return self.adapter is not None


def _parse_persona_file(text: str, where: str) -> dict[str, Persona]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PersonaError(f"{where}:{e.lineno}: malformed JSON ({e.msg})") from None
    items = data.get("personas") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise PersonaError(f"{where}: expected an object with a 'personas' list")
    out: dict[str, Persona] = {}
    allowed = {f.name for f in dataclasses.fields(Persona)}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "name" not in item:
            raise PersonaError(f"{where}: personas[{i}] must be an object with a 'name'")
        extra = set(item) - allowed
        if extra:
            raise PersonaError(f"{where}: personas[{i}] ({item['name']!r}) has unknown fields {sorted(extra)}")
        p = Persona(**item)
        if p.name in out:
            raise PersonaError(f"{where}: duplicate persona name {p.name!r} (personas[{i}])")
        out[p.name] = p
    return out


@functools.lru_cache(maxsize=None)
def _bundled() -> dict[str, Persona]:
    ref = importlib.resources.files("prefjax.elicit") / "data" / "personas.json"
    return _parse_persona_file(ref.read_text(encoding="utf-8"), "personas.json")


def load_personas(path: str | os.PathLike | None = None) -> dict[str, Persona]:
    """``{name: Persona}`` from a personas JSON file (the bundled library when ``path`` is None)."""
    if path is None:
        return dict(_bundled())
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        return _parse_persona_file(f.read(), path)


def persona_names() -> tuple[str, ...]:
    """Names of the bundled personas, in file order."""
    return tuple(_bundled())


def get_persona(name: str) -> Persona:
    """The bundled persona called ``name``; PersonaError listing the known names otherwise."""
    lib = _bundled()
    if name not in lib:
        raise PersonaError(f"unknown persona {name!r}; known personas: {', '.join(lib)} "
                           f"(or '{ADAPTER_PREFIX}/path/to/lora_folder')")
    return lib[name]


def adapter_persona(path: str | os.PathLike, name: str | None = None, check_exists: bool = True) -> Persona:
    """A persona that is a LoRA adapter folder (no system prompt), named ``adapter:<folder>``."""
    path = os.fspath(path)
    if check_exists and not os.path.isdir(path):
        raise PersonaError(f"adapter persona: {path!r} is not a folder")
    if name is None:
        name = ADAPTER_PREFIX + os.path.basename(os.path.normpath(path))
    return Persona(name=name, system_prompt=None, adapter=path, description=f"LoRA adapter at {path}")


def personas_from_spec(spec: Sequence[str | Persona] | str, check_exists: bool = True) -> tuple[Persona, ...]:
    """Resolve a list like ``["default", "evil", "adapter:/path/to/folder"]`` to personas.

    A comma-separated string is accepted too. ``Persona`` objects pass through unchanged. Names
    must be unique (two adapters with the same folder name clash: pass Persona objects instead).
    """
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    out: list[Persona] = []
    for item in spec:
        if isinstance(item, Persona):
            p = item
        elif not isinstance(item, str):
            raise PersonaError(f"persona spec items must be names or Persona objects, got {item!r}")
        elif item.startswith(ADAPTER_PREFIX):
            folder = item[len(ADAPTER_PREFIX):]
            if not folder:
                raise PersonaError(f"persona spec {item!r}: missing adapter folder after '{ADAPTER_PREFIX}'")
            p = adapter_persona(folder, check_exists=check_exists)
        else:
            p = get_persona(item)
        if any(q.name == p.name for q in out):
            raise PersonaError(f"persona {p.name!r} appears twice in the spec {list(map(str, spec))}")
        out.append(p)
    if not out:
        raise PersonaError("empty persona spec")
    return tuple(out)
