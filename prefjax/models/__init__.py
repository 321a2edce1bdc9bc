"""Model families. Each family module exposes the same small surface:

``FAMILY``, ``PRESETS`` (frozen configs), ``config_from_hf(dict)``, ``param_shapes(cfg)``,
``hf_names(cfg)``, ``HF_PREFIXES``, ``HF_SKIP_PREFIXES``, ``forward(cfg, params, tokens, valid, ...)``,
``init_state(cfg, batch, max_len, dtype)`` and ``init_params(cfg, key, dtype)``.
"""

from __future__ import annotations

import importlib

# HF model_type -> family module (imported lazily).
MODEL_TYPES = {
    "gemma3": "prefjax.models.gemma3",
    "gemma3_text": "prefjax.models.gemma3",
    "llama": "prefjax.models.llama",
    "qwen3": "prefjax.models.qwen3",
    "qwen3_5": "prefjax.models.qwen35",
    "qwen3_5_text": "prefjax.models.qwen35",
    "qwen3_5_moe": "prefjax.models.qwen35",
    "qwen3_5_moe_text": "prefjax.models.qwen35",
}

# Preset-name prefix -> family module.
PRESET_PREFIXES = {
    "gemma3-": "prefjax.models.gemma3",
    "llama31-": "prefjax.models.llama",
    "llama-": "prefjax.models.llama",
    "qwen3-": "prefjax.models.qwen3",
    "qwen35-": "prefjax.models.qwen35",
}


def family_for_model_type(model_type: str, *, source: str = "config.json"):
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; "
                         f"supported: {sorted(MODEL_TYPES)}")
    return importlib.import_module(MODEL_TYPES[model_type])


def family_for_preset(name: str):
    for prefix, mod in PRESET_PREFIXES.items():
        if name.startswith(prefix):
            try:
                fam = importlib.import_module(mod)
            except ModuleNotFoundError:
                break
            if name in fam.PRESETS:
                return fam
    known = []
    for mod in sorted(set(PRESET_PREFIXES.values())):
        try:
            known += list(importlib.import_module(mod).PRESETS)
        except ModuleNotFoundError:
            pass
    raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(known)}")
