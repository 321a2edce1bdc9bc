"""Qwen-3 dense decoder (``Qwen3ForCausalLM`` / ``Qwen3Model``), including Qwen3-Embedding checkpoints.

Qwen-3 is the Llama block of :mod:`prefjax.models.llama` with one addition: q and k are each passed
through an RMSNorm over ``head_dim`` (one weight shared by all heads) *before* RoPE, exactly as
transformers' ``Qwen3Attention`` does. No biases; RoPE base ``rope_theta`` (1e6 on released models);
sliding-window attention is off on every released dense model and refused when switched on.

Embedding checkpoints (``Qwen/Qwen3-Embedding-*``) are saved without ``lm_head``; the loader sees that
and the model then has no logits (run it with ``logits=False``; see :mod:`prefjax.embed`).

The family value :data:`FAMILY` is Llama's (:data:`prefjax.models.llama.FAMILY`) with this module's
name, presets and config reader: forward, init, parameter names and HF names are Llama's functions,
named there (``llama.forward``, ``llama.init_params``, ...), not re-exported here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefjax.models import llama
from prefjax.models.llama import LlamaConfig

__all__ = ["FAMILY", "PRESETS", "Qwen3Config", "config_from_hf"]

Qwen3Config = LlamaConfig


def _q(name, vocab, d, n, h, kv, hd, ff, **kw):
    base = dict(rope_base=1_000_000.0, rms_eps=1e-6, max_position_embeddings=40_960, qk_norm=True,
                bos_id=None, eos_ids=(151_645, 151_643), pad_id=151_643, family_name="qwen3")
    base.update(kw)
    return LlamaConfig(vocab_size=vocab, d_model=d, n_layers=n, n_heads=h, n_kv_heads=kv, head_dim=hd, d_ff=ff,
                       name=name, **base)


PRESETS: dict[str, LlamaConfig] = {
    "qwen3-tiny": _q("qwen3-tiny", 512, 64, 3, 4, 2, 32, 128, max_position_embeddings=1024, eos_ids=(2,),
                     pad_id=0),
    # Qwen/Qwen3-8B config.json.
    "qwen3-8b": _q("qwen3-8b", 151_936, 4096, 36, 32, 8, 128, 12_288),
    # Qwen/Qwen3-Embedding-8B (shape only): same trunk as Qwen3-8B, saved without lm_head; the
    # embedding is the final-normed hidden state of the last token (<|endoftext|>).
    "qwen3-embedding-8b": _q("qwen3-embedding-8b", 151_665, 4096, 36, 32, 8, 128, 12_288,
                             has_lm_head=False, eos_ids=(151_643,)),
}


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> LlamaConfig:
    """Build a Qwen-3 :class:`~prefjax.models.llama.LlamaConfig` from an HF ``config.json`` dict."""
    hf = dict(hf)
    mt = hf.get("model_type", "qwen3")
    if mt != "qwen3":
        raise ValueError(f"{source}: model_type {mt!r} is not qwen3")
    llama.check_hf_fields(hf, pinned={"attention_bias": False, "use_sliding_window": False}, source=source,
                          port="Qwen3", extra_handled={"sliding_window", "max_window_layers", "layer_types"})
    lt = hf.get("layer_types")
    if lt is not None:
        if len(lt) != int(hf["num_hidden_layers"]) or set(lt) != {"full_attention"}:
            raise ValueError(f"{source}: layer_types {lt!r} is not supported (only full_attention everywhere)")
    kw = llama.common_from_hf(hf, source=source, default_theta=10_000.0, arch_no_head="Qwen3Model")
    kw["name"] = kw["name"] or "qwen3"
    return LlamaConfig(**kw, qk_norm=True, family_name="qwen3")


FAMILY = dataclasses.replace(llama.FAMILY, name="qwen3", presets=PRESETS, config_from_hf=config_from_hf)
