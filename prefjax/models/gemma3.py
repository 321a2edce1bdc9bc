"""Gemma-3 text decoder (``Gemma3ForCausalLM`` / the text tower of ``Gemma3ForConditionalGeneration``).

Numerics follow transformers exactly:

* embeddings scaled by ``sqrt(d_model)`` cast to the activation dtype (so 55.4256 becomes 55.5 in bf16);
* RMSNorm in float32 with ``(1 + w)``; four norms per block (input, post-attention, pre-MLP,
  post-MLP) plus q/k norms applied per head *before* RoPE;
* attention scale ``query_pre_attn_scalar ** -0.5`` (168 on 27B, not head_dim);
* local (sliding) and global layers from ``layer_types``; RoPE base 10k on local layers and 1M on
  global ones, with linear scaling (factor 8 on 4B+) applied to global layers only;
* sliding mask ``kv_idx > q_idx - sliding_window`` on slot indices, as transformers builds it;
* GeGLU MLP with tanh GELU; tied embeddings; no attention soft-capping (refused if configured).

Parameters are a plain pytree with a leading ``layer`` axis on every block weight; see
:func:`param_shapes` for names, shapes and logical sharding axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from prefjax.checkpoints.hf import check_hf_fields, get_path
from prefjax.models import decoder as D
from prefjax.models import layers as L
from prefjax.models.family import DecoderShape, Family, random_params


@dataclasses.dataclass(frozen=True)
class Gemma3Config(DecoderShape):
    """Frozen model configuration. Field names are prefjax's; :func:`config_from_hf` maps HF's."""

    d_ff: int
    layer_types: tuple[str, ...]
    sliding_window: int
    query_pre_attn_scalar: float
    rope_local_base: float = 10_000.0
    rope_global_base: float = 1_000_000.0
    rope_global_type: str = "default"
    rope_global_factor: float = 1.0
    rms_eps: float = 1e-6
    max_position_embeddings: int = 131_072
    final_logit_softcap: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_id: int = 0
    bos_id: int = 2
    eos_ids: tuple[int, ...] = (1,)
    name: str = "gemma3"

    family = "gemma3"

    def __post_init__(self):
        self.check_shape(activation=self.hidden_activation, activations=L.ACTIVATIONS, layer_types=self.layer_types,
                         allowed_layer_types=("sliding_attention", "full_attention"))

    @property
    def is_global(self) -> np.ndarray:
        return np.array([t == "full_attention" for t in self.layer_types])


def _pattern(n_layers: int, every: int = 6) -> tuple[str, ...]:
    return tuple("full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers))


def _preset(name, vocab, d, n, h, kv, hd, ff, window, qpas, factor=1.0, **kw):
    return Gemma3Config(vocab_size=vocab, d_model=d, n_layers=n, n_heads=h, n_kv_heads=kv, head_dim=hd,
                        d_ff=ff, layer_types=_pattern(n), sliding_window=window, query_pre_attn_scalar=qpas,
                        rope_global_type="linear" if factor != 1.0 else "default",
                        rope_global_factor=factor, name=name, **kw)


# Shapes of the released checkpoints (config.json of google/gemma-3-*).
PRESETS: dict[str, Gemma3Config] = {
    "gemma3-tiny": _preset("gemma3-tiny", 512, 64, 7, 4, 2, 16, 128, 8, 16.0, max_position_embeddings=1024),
    # Tiny architecture with the real Gemma-3 vocabulary, so the packaged tokenizer can drive it (tests).
    "gemma3-tiny-tok": _preset("gemma3-tiny-tok", 262_144, 64, 4, 4, 1, 16, 128, 16, 16.0,
                               max_position_embeddings=4096),
    "gemma3-270m": _preset("gemma3-270m", 262_144, 640, 18, 4, 1, 256, 2048, 512, 256.0,
                           max_position_embeddings=32_768),
    "gemma3-1b": _preset("gemma3-1b", 262_144, 1152, 26, 4, 1, 256, 6912, 512, 256.0,
                         max_position_embeddings=32_768),
    "gemma3-4b": _preset("gemma3-4b", 262_208, 2560, 34, 8, 4, 256, 10_240, 1024, 256.0, factor=8.0),
    "gemma3-12b": _preset("gemma3-12b", 262_208, 3840, 48, 16, 8, 256, 15_360, 1024, 256.0, factor=8.0),
    "gemma3-27b": _preset("gemma3-27b", 262_208, 5376, 62, 32, 16, 128, 21_504, 1024, 168.0, factor=8.0),
}


# --------------------------------------------------------------------------------------------
# HF config mapping. Unknown fields are refused, never ignored.

# Gemma-specific fields that change nothing here (the pattern is read from layer_types when present).
_HF_IGNORED = {"cache_implementation", "sliding_window_pattern", "_sliding_window_pattern"}
# Fields accepted only at the value the port implements.
_HF_PINNED = {
    "attention_bias": False,
    "attn_logit_softcapping": None,
    "use_bidirectional_attention": False,
}


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> Gemma3Config:
    """Build a :class:`Gemma3Config` from an HF ``config.json`` dict (text or multimodal)."""
    if hf.get("model_type") == "gemma3" or "text_config" in hf:
        if "text_config" not in hf:
            raise ValueError(f"{source}: multimodal gemma3 config without text_config")
        hf = dict(hf["text_config"])
    hf = dict(hf)
    mt = hf.get("model_type", "gemma3_text")
    if mt != "gemma3_text":
        raise ValueError(f"{source}: model_type {mt!r} is not gemma3_text")
    handled = {
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "layer_types", "sliding_window", "query_pre_attn_scalar",
        "rope_theta", "rope_local_base_freq", "rope_scaling", "rope_parameters", "rms_norm_eps",
        "max_position_embeddings", "final_logit_softcapping", "hidden_activation", "hidden_act",
        "pad_token_id", "bos_token_id", "eos_token_id",
    }
    check_hf_fields(hf, handled=handled, pinned=_HF_PINNED, ignored=_HF_IGNORED, source=source, port="Gemma-3")
    if hf.get("tie_word_embeddings", True) is False:
        raise ValueError(f"{source}: tie_word_embeddings=false is not supported (Gemma-3 ties them)")
    n = int(hf["num_hidden_layers"])
    if hf.get("layer_types"):
        layer_types = tuple(hf["layer_types"])
    else:
        layer_types = _pattern(n, int(hf.get("sliding_window_pattern", 6)))
    local_base, global_base = 10_000.0, 1_000_000.0
    g_type, g_factor = "default", 1.0
    rp = hf.get("rope_parameters")
    if rp and "full_attention" in rp:
        full, slide = rp["full_attention"], rp.get("sliding_attention", {})
        global_base = float(full.get("rope_theta", global_base))
        local_base = float(slide.get("rope_theta", local_base))
        g_type = full.get("rope_type", "default")
        g_factor = float(full.get("factor", 1.0))
        if slide.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: scaled RoPE on sliding layers ({slide}) is not supported")
    else:
        global_base = float(hf.get("rope_theta", global_base))
        local_base = float(hf.get("rope_local_base_freq", local_base))
        rs = hf.get("rope_scaling") or (rp if rp and "rope_type" in rp else None)
        if rs:
            g_type = rs.get("rope_type", rs.get("type", "default"))
            g_factor = float(rs.get("factor", 1.0))
    if g_type not in ("default", "linear"):
        raise ValueError(f"{source}: rope type {g_type!r} on global layers is not supported")
    eos = hf.get("eos_token_id", 1)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    hidden_size = int(hf["hidden_size"])
    n_heads = int(hf["num_attention_heads"])
    return Gemma3Config(
        vocab_size=int(hf["vocab_size"]), d_model=hidden_size, n_layers=n, n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads", n_heads)),
        head_dim=int(hf.get("head_dim") or hidden_size // n_heads),
        d_ff=int(hf["intermediate_size"]), layer_types=layer_types,
        sliding_window=int(hf.get("sliding_window") or 4096),
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        rope_local_base=local_base, rope_global_base=global_base, rope_global_type=g_type,
        rope_global_factor=g_factor, rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 131_072)),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        hidden_activation=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        pad_id=int(hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0),
        bos_id=int(hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 2),
        eos_ids=eos_ids, name=hf.get("_name_or_path") or "gemma3")


# --------------------------------------------------------------------------------------------
# Parameters: names, shapes, logical axes, HF names.

def param_shapes(cfg: Gemma3Config) -> dict[str, Any]:
    """``{path: (shape, logical_axes)}`` for every parameter (block weights carry a layer axis)."""
    return {**D.embedding_shapes(cfg), **D.norm_shapes(cfg, "ln_attn"), **D.attention_shapes(cfg),
            **D.norm_shapes(cfg, "q_norm", "k_norm", width="head_dim"),
            **D.norm_shapes(cfg, "ln_post_attn", "ln_pre_mlp"), **D.mlp_shapes(cfg), **D.norm_shapes(cfg, "ln_post_mlp")}


def hf_names(cfg: Gemma3Config, has=None) -> dict[str, Any]:
    """For each prefjax parameter: the HF tensor name (``{l}`` = layer) and a host transform.

    The transform maps the HF tensor (torch Linear layout [out, in]) to prefjax's layout. ``has`` (which
    tensors a checkpoint holds) is not needed: Gemma-3 checkpoints name their tensors one way.
    """
    return {**D.embedding_hf_names(), **D.attention_hf_names(cfg), **D.mlp_hf_names(),
            **D.norm_hf_names(ln_attn="input_layernorm", q_norm="self_attn.q_norm", k_norm="self_attn.k_norm",
                              ln_post_attn="post_attention_layernorm", ln_pre_mlp="pre_feedforward_layernorm",
                              ln_post_mlp="post_feedforward_layernorm")}


def hf_config(cfg: Gemma3Config) -> dict[str, Any]:
    """The ``config.json`` of a ``Gemma3ForCausalLM`` with this shape; :func:`config_from_hf` maps it back
    to ``cfg`` (up to ``name``), and ``transformers.Gemma3TextConfig(**hf_config(cfg))`` builds the same model."""
    scaled = cfg.rope_global_type != "default"
    qpas = cfg.query_pre_attn_scalar
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff, "layer_types": list(cfg.layer_types), "sliding_window": cfg.sliding_window,
        "query_pre_attn_scalar": int(qpas) if float(qpas).is_integer() else qpas,
        "rope_parameters": {
            "full_attention": {"rope_type": cfg.rope_global_type, "rope_theta": cfg.rope_global_base,
                               **({"factor": cfg.rope_global_factor} if scaled else {})},
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_base}},
        "rms_norm_eps": cfg.rms_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "final_logit_softcapping": cfg.final_logit_softcap, "attn_logit_softcapping": None,
        "attention_bias": False, "hidden_activation": cfg.hidden_activation,
        "pad_token_id": cfg.pad_id, "bos_token_id": cfg.bos_id, "eos_token_id": list(cfg.eos_ids),
        "tie_word_embeddings": True,
    }


def params_to_hf(cfg: Gemma3Config, params, *, dtype=np.float32):
    """Yield ``(HF tensor name, array in torch Linear layout [out, in])`` for every tensor, one at a time
    (the inverse of :func:`hf_names`' transforms; the tied ``lm_head`` is not written)."""
    h, kv, hd, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    inverse = {"blocks/q": lambda w: w.reshape(d, h * hd).T, "blocks/k": lambda w: w.reshape(d, kv * hd).T,
               "blocks/v": lambda w: w.reshape(d, kv * hd).T, "blocks/o": lambda w: w.reshape(h * hd, d).T,
               "blocks/gate": lambda w: w.T, "blocks/up": lambda w: w.T, "blocks/down": lambda w: w.T}
    for path, (template, _) in hf_names(cfg).items():
        node = get_path(params, path)
        inv = inverse.get(path, lambda w: w)
        if path.startswith("blocks/"):
            for l in range(cfg.n_layers):
                yield template.format(l=l), np.ascontiguousarray(np.asarray(inv(node[l])).astype(dtype))
        else:
            yield template, np.ascontiguousarray(np.asarray(inv(node)).astype(dtype))


# Prefixes under which checkpoints store the text decoder ("model." is replaced by the prefix).
HF_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
HF_SKIP_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.",
                    "model.multi_modal_projector.", "lm_head.", "language_model.lm_head.")


def aux_arrays(cfg: Gemma3Config) -> dict[str, np.ndarray]:
    """Per-layer data scanned alongside the weights: global flag and RoPE tables."""
    local = L.rope_inv_freq(cfg.head_dim, cfg.rope_local_base)
    glob = L.rope_inv_freq(cfg.head_dim, cfg.rope_global_base, rope_type=cfg.rope_global_type,
                           factor=cfg.rope_global_factor)
    g = cfg.is_global
    return {"is_global": g.astype(np.int32),
            "inv_freq": np.where(g[:, None], glob[None], local[None]).astype(np.float32)}


# --------------------------------------------------------------------------------------------
# Forward.

def block_spec(cfg: Gemma3Config) -> D.BlockSpec:
    """Gemma-3's block: ``1 + w`` norms, q/k norms, post-branch norms, per-layer RoPE tables and windows."""
    return D.BlockSpec(norm=lambda x, w: L.rms_norm(x, w, cfg.rms_eps, plus_one=True), qk_norm=True,
                       mlp_norm="ln_pre_mlp", post_norms=True, inv_freq=lambda aux: aux["inv_freq"],
                       window=lambda aux: jnp.where(aux["is_global"] > 0, 0, cfg.sliding_window),
                       scale=cfg.query_pre_attn_scalar ** -0.5, act=L.ACTIVATIONS[cfg.hidden_activation])


def embed(cfg: Gemma3Config, params, tokens_BxT):
    e = jnp.take(params["embed"], tokens_BxT, axis=0)
    return e * jnp.asarray(np.float32(math.sqrt(cfg.d_model)), jnp.float32).astype(e.dtype)


def unembed(cfg: Gemma3Config, params, h_BxKxD):
    logits = jnp.einsum("bkd,vd->bkv", h_BxKxD, params["embed"])
    if cfg.final_logit_softcap:
        c = cfg.final_logit_softcap
        logits = jnp.tanh(logits / c) * c
    return logits


forward = D.make_forward(block_spec, embed, unembed, aux=aux_arrays)
init_state = D.init_state


def init_params(cfg: Gemma3Config, key, dtype=jnp.float32, scale: float = 0.02) -> dict[str, Any]:
    """Random parameters (normal * scale for matrices, normal * 0.1 for norm offsets).

    Generated directly in ``dtype`` and one layer at a time (``lax.map`` under jit), so a 27B
    init never holds a float32 copy of a whole stacked weight.
    """
    return random_params(param_shapes(cfg), key, dtype, scale)


FAMILY = Family(
    name="gemma3", presets=PRESETS, config_from_hf=config_from_hf, hf_config=hf_config, param_shapes=param_shapes,
    hf_names=hf_names, hf_prefixes=HF_PREFIXES, hf_skip_prefixes=HF_SKIP_PREFIXES, init_params=init_params,
    init_state=init_state, forward_fn=forward, embed=embed, unembed=unembed,
    supports_lora=True)  # forward reads params["blocks"]["lora"] (PEFT adapters applied on the fly)
