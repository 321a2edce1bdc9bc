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

import jax
import jax.numpy as jnp
import numpy as np

from safetensors import safe_open

from prefjax.checkpoints import hf as HF
from prefjax.models import layers as L
from prefjax.models.family import Family, random_params
from prefjax.models.stack import ForwardOut, fold, forward_tail, kv_state, step_inputs


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Frozen configuration shared by Llama and Qwen-3 dense decoders (prefjax field names)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
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
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.hidden_activation not in L.ACTIVATIONS:
            raise ValueError(f"hidden_activation {self.hidden_activation!r} is not supported")
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
    n, d, h, kv, hd, ff = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    out = {
        "embed": ((cfg.vocab_size, d), ("vocab", "embed")),
        "final_norm": ((d,), ("norm",)),
        "blocks/ln_attn": ((n, d), ("layers", "norm")),
        "blocks/q": ((n, d, h, hd), ("layers", "embed", "heads", "head_dim")),
        "blocks/k": ((n, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "blocks/v": ((n, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "blocks/o": ((n, h, hd, d), ("layers", "heads", "head_dim", "embed")),
        "blocks/ln_mlp": ((n, d), ("layers", "norm")),
        "blocks/gate": ((n, d, ff), ("layers", "embed", "mlp")),
        "blocks/up": ((n, d, ff), ("layers", "embed", "mlp")),
        "blocks/down": ((n, ff, d), ("layers", "mlp", "embed")),
    }
    if cfg.qk_norm:
        out["blocks/q_norm"] = ((n, hd), ("layers", "norm"))
        out["blocks/k_norm"] = ((n, hd), ("layers", "norm"))
    if cfg.has_lm_head and not cfg.tie_embeddings:
        out["unembed"] = ((cfg.vocab_size, d), ("vocab", "embed"))
    return out


# prefjax block weight -> (HF module path inside a layer, in-dims, out-dims) used by hf_names and LoRA.
LINEAR_MODULES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}


def hf_names(cfg: LlamaConfig, has=None) -> dict[str, Any]:
    """For each prefjax parameter: the HF tensor name (``{l}`` = layer) and a host transform.

    The transform maps the HF tensor (torch Linear layout [out, in]) to prefjax's layout. ``has`` (which
    tensors a checkpoint holds) is not needed: the names are fixed by the config.
    """
    h, kv, hd, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    lp = "model.layers.{l}."
    out = {
        "embed": ("model.embed_tokens.weight", None),
        "final_norm": ("model.norm.weight", None),
        "blocks/ln_attn": (lp + "input_layernorm.weight", None),
        "blocks/q": (lp + "self_attn.q_proj.weight", lambda w: w.T.reshape(d, h, hd)),
        "blocks/k": (lp + "self_attn.k_proj.weight", lambda w: w.T.reshape(d, kv, hd)),
        "blocks/v": (lp + "self_attn.v_proj.weight", lambda w: w.T.reshape(d, kv, hd)),
        "blocks/o": (lp + "self_attn.o_proj.weight", lambda w: w.T.reshape(h, hd, d)),
        "blocks/ln_mlp": (lp + "post_attention_layernorm.weight", None),
        "blocks/gate": (lp + "mlp.gate_proj.weight", lambda w: w.T),
        "blocks/up": (lp + "mlp.up_proj.weight", lambda w: w.T),
        "blocks/down": (lp + "mlp.down_proj.weight", lambda w: w.T),
    }
    if cfg.qk_norm:
        out["blocks/q_norm"] = (lp + "self_attn.q_norm.weight", None)
        out["blocks/k_norm"] = (lp + "self_attn.k_norm.weight", None)
    if cfg.has_lm_head and not cfg.tie_embeddings:
        out["unembed"] = ("lm_head.weight", None)
    return out


# "" covers checkpoints of the bare decoder (``Qwen3Model`` / ``LlamaModel``: ``embed_tokens.weight``).
HF_PREFIXES = ("model.", "")
HF_SKIP_PREFIXES = ("lm_head.",)


# --------------------------------------------------------------------------------------------
# Forward.

def _block(cfg: LlamaConfig, kv_valid_BxS, q_slot_T, kv_slot_S, pos_BxT, start, inv_freq):
    act = L.ACTIVATIONS[cfg.hidden_activation]
    scale = cfg.head_dim ** -0.5
    norm = lambda x, w: L.rms_norm(x, w, cfg.rms_eps, plus_one=False, cast_before_weight=True)

    def block(p, x, layer, aux, hook, state):
        lora = p.get("lora")
        x = hook("hook_resid_pre", x)
        h = norm(x, p["ln_attn"])
        q = L.linear(h, p, lora, "q", "btd,dnh->btnh", "btd,dr->btr", "btr,rnh->btnh")
        k = L.linear(h, p, lora, "k", "btd,dkh->btkh", "btd,dr->btr", "btr,rkh->btkh")
        v = L.linear(h, p, lora, "v", "btd,dkh->btkh", "btd,dr->btr", "btr,rkh->btkh")
        if cfg.qk_norm:
            q, k = norm(q, p["q_norm"]), norm(k, p["k_norm"])
        cos, sin = L.rope_cos_sin(pos_BxT, inv_freq, x.dtype)
        q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
        if state is not None:
            k_all = jax.lax.dynamic_update_slice_in_dim(state["k"], k.astype(state["k"].dtype), start, axis=1)
            v_all = jax.lax.dynamic_update_slice_in_dim(state["v"], v.astype(state["v"].dtype), start, axis=1)
            state = {"k": k_all, "v": v_all}
        else:
            k_all, v_all = k, v
        mask = L.attention_mask(q_slot_T, kv_slot_S, kv_valid_BxS, None)
        o = L.dot_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask, scale)
        attn = L.linear(o, p, lora, "o", "btnh,nhd->btd", "btnh,nhr->btr", "btr,rd->btd")
        attn = hook("hook_attn_out", attn)
        x = hook("hook_resid_mid", x + attn)
        h = norm(x, p["ln_mlp"])
        g = L.linear(h, p, lora, "gate", "btd,df->btf", "btd,dr->btr", "btr,rf->btf")
        u = L.linear(h, p, lora, "up", "btd,df->btf", "btd,dr->btr", "btr,rf->btf")
        mlp = L.linear(act(g) * u, p, lora, "down", "btf,fd->btd", "btf,fr->btr", "btr,rd->btd")
        mlp = hook("hook_mlp_out", mlp)
        x = hook("hook_resid_post", x + mlp)
        return x, state

    return block


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


def forward(cfg: LlamaConfig, params, tokens_BxT, valid_BxT, *, capture, pos_BxK=None, intervene=None,
            unroll=False, state=None, start=0, pos_ids_BxT=None, is_prompt=True, logits=True) -> ForwardOut:
    """One pass over ``tokens_BxT`` (prefill, or a decode step when ``state`` is a KV cache).

    ``valid_BxT`` is 1 on real tokens, 0 on left padding; positions default to the count of real
    tokens before each one (so left padding does not shift RoPE). With ``state`` (a dict ``k``/``v``
    of [L, B, S, K, H] plus ``valid`` [B, S]) the tokens are written at slots ``start .. start+T-1``.
    Returns a :class:`~prefjax.models.stack.ForwardOut` ``(logits [B, K|T, V] or None, captured dict,
    final-normed h, new_state)``.
    """
    si = step_inputs(valid_BxT, state=state, start=start, pos_ids_BxT=pos_ids_BxT, is_prompt=is_prompt)
    x = embed(cfg, params, tokens_BxT)
    block = _block(cfg, si.kv_valid_BxS, si.q_slot_T, si.kv_slot_S, si.pos_ids_BxT, start,
                   jnp.asarray(cfg.inv_freq()))
    x, captured, layer_state = fold(block, params["blocks"], x, n_layers=cfg.n_layers, aux=None,
                                    state=si.layer_state, capture=capture, pos_BxK=pos_BxK,
                                    intervene=intervene, ctx=si.ctx, unroll=unroll)
    return forward_tail(x, captured, pos_BxK=pos_BxK, capture=capture,
                        final_norm=lambda h: L.rms_norm(h, params["final_norm"], cfg.rms_eps, plus_one=False,
                                                        cast_before_weight=True),
                        unembed=(lambda h: unembed(cfg, params, h)) if logits else None,
                        state=state, inputs=si, layer_state=layer_state)


def init_state(cfg: LlamaConfig, batch: int, max_len: int, dtype) -> dict[str, Any]:
    """An empty KV cache for ``max_len`` slots."""
    return kv_state(cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim, dtype)


def init_params(cfg: LlamaConfig, key, dtype=jnp.float32, scale: float = 0.02) -> dict[str, Any]:
    """Random parameters (:func:`prefjax.models.family.random_params`): normal * scale for matrices,
    1 + normal * 0.1 for norm weights (Llama's norms multiply by ``w``, not ``1 + w``)."""
    return random_params(param_shapes(cfg), key, dtype, scale, norm_offset=1.0)


FAMILY = Family(
    name="llama", presets=PRESETS, config_from_hf=config_from_hf, param_shapes=param_shapes, hf_names=hf_names,
    hf_prefixes=HF_PREFIXES, hf_skip_prefixes=HF_SKIP_PREFIXES, init_params=init_params, init_state=init_state,
    forward_fn=forward, embed=embed, unembed=unembed, supports_lora=True)  # forward reads params["blocks"]["lora"]
