"""Model families: the declared table of every family prefjax ports.

A family is a :class:`prefjax.models.family.Family` value (the contract is
:class:`prefjax.models.family.ModelFamily`). :data:`FAMILIES` maps each family's name to it;
:data:`MODEL_TYPES` maps an HF ``model_type`` to a family name. Both are built once, at import, and
never change. A new family is a module that defines ``FAMILY = Family(...)``, plus one row in each
table below.
"""

from __future__ import annotations

from types import MappingProxyType

from prefjax.models import gemma3, llama, planted, qwen3, qwen35
from prefjax.models.family import Family

FAMILIES: MappingProxyType[str, Family] = MappingProxyType(
    {f.name: f for f in (gemma3.FAMILY, llama.FAMILY, qwen3.FAMILY, qwen35.FAMILY, planted.FAMILY)})

# HF model_type -> family name.
MODEL_TYPES: MappingProxyType[str, str] = MappingProxyType({
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "llama": "llama",
    "qwen3": "qwen3",
    "qwen3_5": "qwen35",
    "qwen3_5_text": "qwen35",
    "qwen3_5_moe": "qwen35",
    "qwen3_5_moe_text": "qwen35",
})


def family_for_model_type(model_type: str, *, source: str = "config.json") -> Family:
    """The family that reads HF ``model_type``; an error naming ``source`` and the supported types if none."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; "
                         f"supported: {sorted(MODEL_TYPES)}")
    return FAMILIES[MODEL_TYPES[model_type]]


def family_for_preset(name: str) -> Family:
    """The family whose presets include ``name``; an error listing every preset if none."""
    for fam in FAMILIES.values():
        if name in fam.presets:
            return fam
    known = sorted(p for fam in FAMILIES.values() for p in fam.presets)
    raise ValueError(f"unknown model preset {name!r}; known presets: {known}")
