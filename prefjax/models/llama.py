"""Llama-3.x dense decoder (``LlamaForCausalLM``), and the shared code of the Qwen-3 dense decoder.

Numerics follow transformers' ``modeling_llama`` exactly:

* no embedding scale; RMSNorm in float32 that casts the normalised value back to the activation
  dtype *before* multiplying by the weight (``w * x.to(dtype)``), two norms per block;
* grouped-query attention with scale ``head_dim ** -0.5``; RoPE (rotate-half) with ``default``,
  ``linear`` or ``llama3`` frequency scaling (factor, low/high frequency factors, original context);
* SwiGLU MLP ``down(silu(gate(x)) * up(x))``; no biases anywhere (``attention_bias`` / ``mlp_bias``
  true are refused); untied ``lm_head`` unless ``tie_word_embeddings``.

Llama has no post-norms, so ``hook_attn_out`` is the ``o_proj`` output and ``hook_mlp_out`` the
``down_proj`` output. Qwen-3 (:mod:`prefjax.models.qwen3`) is this block plus per-head RMSNorm on
q and k before RoPE (``qk_norm=True``).

LoRA on the fly: when ``params["blocks"]`` holds a ``"lora"`` subtree (built by
:mod:`prefjax.lora`), each targeted projection adds ``scale * (x @ A) @ B`` to its output inside the
block, so the base weights are shared between personas and never copied.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from safetensors import safe_open

from prefjax.checkpoints import hf as HF
from prefjax.models import decoder as D
from prefjax.models import layers as L
from prefjax.models.family import DecoderShape, Family, random_params


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderShape):
    """Frozen configuration shared by Llama and Qwen-3 dense decoders (prefjax field names)."""

    d_ff: int
    rope_base: float = 500_000.0
    rope_type: str = "default"          # default | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rms_eps: float = 1e-5
    max_position_embeddings: int = 131_072
    tie_embeddings: bool = False
    has_lm_head: bool = True            # False for embedding checkpoints saved without lm_head
    qk_norm: bool = False               # Qwen-3: RMSNorm over head_dim on q and k before RoPE
    hidden_activation: str = "silu"
    pad_id: int = 0                     # filler id for padded slots (masked out); 0 when HF names none
    bos_id: int | None = 128_000
    eos_ids: tuple[int, ...] = (128_001,)
    name: str = "llama"
    family_name: str = "llama"

    def __post_init__(self):
        self.check_shape(activation=self.hidden_activation, activations=L.ACTIVATIONS)
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_type {self.rope_type!r} is not supported (default, linear, llama3)")
        if self.rope_type == "llama3" and self.rope_high_freq_factor == self.rope_low_freq_factor:
            raise ValueError("llama3 RoPE needs high_freq_factor != low_freq_factor")

    @property
    def family(self) -> str:
        return self.family_name

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim / 2], float32, as transformers builds them."""
        kw = {}
        if self.rope_type == "llama3":
            kw = dict(low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                      original_max_position_embeddings=self.rope_original_max_position)
        return L.rope_inv_freq(self.head_dim, self.rope_base, rope_type=self.rope_type,
                               factor=self.rope_factor, **kw)


PRESETS: dict[str, LlamaConfig] = {
    # Tiny random model for tests: GQA (4 heads over 2 kv heads) and llama3 RoPE scaling with a short
    # original context so that all three frequency bands (kept, smoothed, divided) occur.
    "llama31-tiny": LlamaConfig(
        vocab_size=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
        rope_base=500_000.0, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_position=64, max_position_embeddings=1024,
        bos_id=1, eos_ids=(2,), name="llama31-tiny"),
    # meta-llama/Llama-3.1-8B(-Instruct) config.json.
    "llama31-8b": LlamaConfig(
        vocab_size=128_256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=14_336,
        rope_base=500_000.0, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_position=8192, rms_eps=1e-5,
        max_position_embeddings=131_072, bos_id=128_000, eos_ids=(128_001, 128_008, 128_009),
        name="llama31-8b"),
}


# --------------------------------------------------------------------------------------------
# HF config mapping. Unknown fields are refused, never ignored.

# pretraining_tp only split matmuls in old transformers (numerically the same product).
HF_IGNORED = {"pretraining_tp"}
_HANDLED = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps",
    "max_position_embeddings", "hidden_act", "pad_token_id", "bos_token_id", "eos_token_id",
}


def check_hf_fields(hf: dict[str, Any], *, pinned: dict[str, Any], extra_handled=(), source: str, port: str):
    """The shared field check (:func:`prefjax.checkpoints.hf.check_hf_fields`) with the Llama-family fields."""
    HF.check_hf_fields(hf, handled=_HANDLED | set(extra_handled), pinned=pinned, ignored=HF_IGNORED, source=source,
                     port=port)


def rope_from_hf(hf: dict[str, Any], *, default_theta: float, source: str) -> dict[str, Any]:
    """RoPE fields of :class:`LlamaConfig` from ``rope_parameters`` (v5) or ``rope_theta``/``rope_scaling``."""
    rp = hf.get("rope_parameters") or {}
    rs = hf.get("rope_scaling") or {}
    if rp and rs:
        raise ValueError(f"{source}: both rope_parameters and rope_scaling are set; ambiguous")
    params = dict(rp or rs)
    theta = params.pop("rope_theta", hf.get("rope_theta", default_theta))
    rtype = params.pop("rope_type", params.pop("type", "default"))
    out: dict[str, Any] = {"rope_base": float(theta), "rope_type": rtype}
    if rtype == "default":
        pass
    elif rtype == "linear":
        out["rope_factor"] = float(params.pop("factor"))
    elif rtype == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in params:
                raise ValueError(f"{source}: llama3 RoPE scaling lacks {key!r}")
        out.update(rope_factor=float(params.pop("factor")),
                   rope_low_freq_factor=float(params.pop("low_freq_factor")),
                   rope_high_freq_factor=float(params.pop("high_freq_factor")),
                   rope_original_max_position=int(params.pop("original_max_position_embeddings")))
    else:
        raise ValueError(f"{source}: rope_type {rtype!r} is not supported (default, linear, llama3)")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    params.pop("partial_rotary_factor", None)
    if params:
        raise ValueError(f"{source}: RoPE fields {sorted(params)} are not handled for rope_type {rtype!r}")
    return out


def _ids(v, default):
    if v is None:
        return default
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)


def checkpoint_has_lm_head(source: str) -> bool | None:
    """Whether the safetensors next to ``source`` (a config.json path) hold ``lm_head.weight``.

    None when it cannot be told (no such folder or no safetensors).
    """
    folder = Path(source).parent if source.endswith(".json") else Path(source)
    if not folder.is_dir():
        return None
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = json.loads(index.read_text()).get("weight_map", {})
        return any(n.endswith("lm_head.weight") for n in names)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    for f in files:
        with safe_open(str(f), framework="numpy") as fh:
            if any(n.endswith("lm_head.weight") for n in fh.keys()):
                return True
    return False


def common_from_hf(hf: dict[str, Any], *, source: str, default_theta: float, arch_no_head: str) -> dict[str, Any]:
    """The fields Llama and Qwen-3 configs share."""
    n_heads = int(hf["num_attention_heads"])
    d = int(hf["hidden_size"])
    tie = bool(hf.get("tie_word_embeddings", False))
    has_head = True
    if not tie:
        peek = checkpoint_has_lm_head(source)
        archs = hf.get("architectures") or []
        has_head = peek if peek is not None else (arch_no_head not in archs)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (Llama/Qwen3 use silu)")
    return dict(
        vocab_size=int(hf["vocab_size"]), d_model=d, n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d // n_heads), d_ff=int(hf["intermediate_size"]),
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=tie, has_lm_head=has_head, hidden_activation=act,
        pad_id=0 if hf.get("pad_token_id") is None else int(hf["pad_token_id"]),
        bos_id=None if hf.get("bos_token_id") is None else int(hf["bos_token_id"]),
        eos_ids=_ids(hf.get("eos_token_id"), ()),
        name=hf.get("_name_or_path") or "", **rope_from_hf(hf, default_theta=default_theta, source=source))


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> LlamaConfig:
    """Build a :class:`LlamaConfig` from an HF ``config.json`` dict (``model_type: llama``)."""
    hf = dict(hf)
    mt = hf.get("model_type", "llama")
    if mt != "llama":
        raise ValueError(f"{source}: model_type {mt!r} is not llama")
    check_hf_fields(hf, pinned={"attention_bias": False, "mlp_bias": False}, source=source, port="Llama")
    kw = common_from_hf(hf, source=source, default_theta=10_000.0, arch_no_head="LlamaModel")
    kw["name"] = kw["name"] or "llama"
    return LlamaConfig(**kw, qk_norm=False, family_name="llama")


# --------------------------------------------------------------------------------------------
# Parameters: names, shapes, logical axes, HF names.

def param_shapes(cfg: LlamaConfig) -> dict[str, Any]:
    """``{path: (shape, logical_axes)}`` for every parameter (block weights carry a layer axis)."""
    out = {**D.embedding_shapes(cfg), **D.norm_shapes(cfg, "ln_attn"), **D.attention_shapes(cfg),
           **D.norm_shapes(cfg, "ln_mlp"), **D.mlp_shapes(cfg)}
    if cfg.qk_norm:
        out.update(D.norm_shapes(cfg, "q_norm", "k_norm", width="head_dim"))
    if cfg.has_lm_head and not cfg.tie_embeddings:
        out["unembed"] = ((cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
    return out


def hf_names(cfg: LlamaConfig, has=None) -> dict[str, Any]:
    """For each prefjax parameter: the HF tensor name (``{l}`` = layer) and a host transform.

    The transform maps the HF tensor (torch Linear layout [out, in]) to prefjax's layout. ``has`` (which
    tensors a checkpoint holds) is not needed: the names are fixed by the config.
    """
    out = {**D.embedding_hf_names(), **D.attention_hf_names(cfg), **D.mlp_hf_names(),
           **D.norm_hf_names(ln_attn="input_layernorm", ln_mlp="post_attention_layernorm")}
    if cfg.qk_norm:
        out.update(D.norm_hf_names(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"))
    if cfg.has_lm_head and not cfg.tie_embeddings:
        out["unembed"] = ("lm_head.weight", None)
    return out


# "" covers checkpoints of the bare decoder (``Qwen3Model`` / ``LlamaModel``: ``embed_tokens.weight``).
HF_PREFIXES = ("model.", "")
HF_SKIP_PREFIXES = ("lm_head.",)


# --------------------------------------------------------------------------------------------
# Forward.

def block_spec(cfg: LlamaConfig) -> D.BlockSpec:
    """Llama's block (Qwen-3's with ``qk_norm``): cast-before-weight norms, no post-branch norms, one RoPE
    table for every layer, no sliding window."""
    return D.BlockSpec(norm=lambda x, w: L.rms_norm(x, w, cfg.rms_eps, plus_one=False, cast_before_weight=True),
                       qk_norm=cfg.qk_norm, mlp_norm="ln_mlp", post_norms=False,
                       inv_freq=D.constant(jnp.asarray(cfg.inv_freq())), window=D.no_window,
                       scale=cfg.head_dim ** -0.5, act=L.ACTIVATIONS[cfg.hidden_activation])


def embed(cfg: LlamaConfig, params, tokens_BxT):
    return jnp.take(params["embed"], tokens_BxT, axis=0)


def unembed(cfg: LlamaConfig, params, h_BxKxD):
    if cfg.tie_embeddings:
        w = params["embed"]
    elif "unembed" in params:
        w = params["unembed"]
    else:
        raise ValueError(f"model {cfg.name!r} has no lm_head (an embedding checkpoint); call with logits=False")
    return jnp.einsum("bkd,vd->bkv", h_BxKxD, w)


forward = D.make_forward(block_spec, embed, unembed)
init_state = D.init_state


def init_params(cfg: LlamaConfig, key, dtype=jnp.float32, scale: float = 0.02) -> dict[str, Any]:
    """Random parameters (:func:`prefjax.models.family.random_params`): normal * scale for matrices,
    1 + normal * 0.1 for norm weights (Llama's norms multiply by ``w``, not ``1 + w``)."""
    return random_params(param_shapes(cfg), key, dtype, scale, norm_offset=1.0)


FAMILY = Family(
    name="llama", presets=PRESETS, config_from_hf=config_from_hf, param_shapes=param_shapes, hf_names=hf_names,
    hf_prefixes=HF_PREFIXES, hf_skip_prefixes=HF_SKIP_PREFIXES, init_params=init_params, init_state=init_state,
    forward_fn=forward, embed=embed, unembed=unembed, supports_lora=True)  # forward reads params["blocks"]["lora"]
