"""Qwen-3.5 text decoder: ``qwen3_5_moe`` (sparse experts) and ``qwen3_5`` (dense MLP).

Numerics follow transformers (``Qwen3_5MoeForCausalLM`` / ``Qwen3_5ForCausalLM`` and the text tower
of the ``*ForConditionalGeneration`` classes):

* layers from ``layer_types``: ``linear_attention`` (Gated DeltaNet) x3 then ``full_attention``;
* RMSNorms are zero-centred, ``x * rsqrt(mean x^2 + eps) * (1 + w)`` in float32, cast after; plain
  (unscaled) embeddings; untied LM head unless ``tie_word_embeddings``;
* Gated DeltaNet: padding zeroed, ``in_proj_qkv`` -> depthwise causal conv1d (kernel 4, no bias)
  -> SiLU -> q, k, v heads; q and k repeated from key heads to value heads
  (``repeat_interleave``); L2 norm in float32; q scaled by d_k^-1/2; beta = sigmoid(in_proj_b x)
  (in the activation dtype); g = -exp(A_log) * softplus(in_proj_a x + dt_bias) (float32); the gated
  delta rule (chunked for prompts, recurrent for single-token decode); a gated RMSNorm with weight
  ``w`` (not 1 + w) times silu(z); out_proj;
* gated attention: q_proj emits ``[query | gate]`` per head; q/k RMSNorm per head; RoPE on the first
  ``partial_rotary_factor`` (25%) of head_dim (text-only mRoPE has identical t/h/w positions, so it
  reduces to plain RoPE); scale head_dim^-1/2; output * sigmoid(gate) before o_proj;
* MoE: float32 softmax router, top-k renormalised, SwiGLU experts + sigmoid-gated shared expert.

Hook points per block: ``hook_attn_out`` is the token mixer's output (DeltaNet or attention),
``hook_mlp_out`` the MoE / MLP output; there are no post-branch norms in this family.

Parameters: block weights shared by every layer (norms, MLP/MoE) carry a leading ``layer`` axis of
size ``n_layers``; DeltaNet weights live in ``lin`` with a leading axis over the linear layers and
attention weights in ``attn`` with a leading axis over the full-attention layers. The fold indexes
them per layer (``aux["idx"]``) and picks the mixer with ``lax.cond`` on ``aux["is_full"]``; unrolled
runs pick it statically. Decode state lives in the fold's carry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from prefjax.checkpoints.hf import CheckpointError, HFMulti, check_hf_fields
from prefjax.models import deltanet as DN
from prefjax.models import layers as L
from prefjax.models import moe as M
from prefjax.models import moe_layout as ML
from prefjax.models import moe_pallas as MP
from prefjax.models.family import DecoderShape, Family, StateLayout, random_params
from prefjax.models.stack import ForwardOut, fold, forward_tail, step_inputs

LINEAR, FULL = "linear_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class Qwen35Config(DecoderShape):
    """Frozen model configuration (prefjax field names; :func:`config_from_hf` maps HF's).

    ``n_experts == 0`` is the dense ``qwen3_5`` model (SwiGLU MLP of width ``d_ff``).
    """

    layer_types: tuple[str, ...]
    lin_n_k_heads: int
    lin_n_v_heads: int
    lin_k_dim: int
    lin_v_dim: int
    lin_conv_kernel: int = 4
    n_experts: int = 0
    top_k: int = 0
    d_expert: int = 0
    d_shared: int = 0
    d_ff: int = 0
    rope_base: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    rms_eps: float = 1e-6
    max_position_embeddings: int = 262_144
    tie_word_embeddings: bool = False
    hidden_activation: str = "silu"
    moe_impl: str = "grouped"
    chunk_size: int = 64
    pad_id: int = 0
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    name: str = "qwen35"

    family = "qwen35"

    def __post_init__(self):
        self.check_shape(activation=self.hidden_activation, activations=L.ACTIVATIONS, layer_types=self.layer_types,
                         allowed_layer_types=(LINEAR, FULL))
        if self.lin_n_v_heads % self.lin_n_k_heads:
            raise ValueError(f"lin_n_v_heads={self.lin_n_v_heads} is not a multiple of "
                             f"lin_n_k_heads={self.lin_n_k_heads}")
        if self.moe_impl not in M.IMPLS:
            raise ValueError(f"moe_impl must be one of {sorted(M.IMPLS)}, got {self.moe_impl!r}")
        if self.n_experts:
            if not (0 < self.top_k <= self.n_experts) or self.d_expert <= 0:
                raise ValueError(f"MoE config needs 0 < top_k <= n_experts and d_expert > 0 "
                                 f"(got top_k={self.top_k}, n_experts={self.n_experts}, d_expert={self.d_expert})")
        elif self.d_ff <= 0:
            raise ValueError("dense config (n_experts=0) needs d_ff > 0")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == LINEAR)

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL)


def _pattern(n_layers: int, every: int = 4) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % every == 0 else LINEAR for i in range(n_layers))


PRESETS: dict[str, Qwen35Config] = {
    "qwen35-moe-tiny": Qwen35Config(
        vocab_size=512, d_model=64, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=16,
        layer_types=_pattern(8), lin_n_k_heads=2, lin_n_v_heads=4, lin_k_dim=16, lin_v_dim=16,
        n_experts=8, top_k=2, d_expert=32, d_shared=48, rope_base=10_000.0,
        max_position_embeddings=4096, name="qwen35-moe-tiny"),
    "qwen35-tiny": Qwen35Config(
        vocab_size=512, d_model=64, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=16,
        layer_types=_pattern(8), lin_n_k_heads=2, lin_n_v_heads=4, lin_k_dim=16, lin_v_dim=16,
        d_ff=128, rope_base=10_000.0, max_position_embeddings=4096, name="qwen35-tiny"),
    # Shape of Qwen/Qwen3.5-122B-A10B (text tower).
    "qwen35-122b-a10b": Qwen35Config(
        vocab_size=248_320, d_model=3072, n_layers=48, n_heads=32, n_kv_heads=2, head_dim=256,
        layer_types=_pattern(48), lin_n_k_heads=16, lin_n_v_heads=64, lin_k_dim=128, lin_v_dim=128,
        n_experts=256, top_k=8, d_expert=1024, d_shared=1024, rope_base=10_000_000.0,
        max_position_embeddings=262_144, name="qwen35-122b-a10b"),
}


# --------------------------------------------------------------------------------------------
# HF config mapping. Unknown fields are refused, never ignored.

# Qwen-3.5 fields that change nothing in inference.
_HF_IGNORED = {"output_router_logits", "router_aux_loss_coef",
               "mtp_num_hidden_layers", "mtp_use_dedicated_embeddings"}  # MTP head (weights under mtp.*, skipped)
# Fields accepted only at the value the port implements.
_HF_PINNED = {"attention_bias": False, "hidden_act": "silu", "linear_conv_kernel_dim": 4}
# Multimodal wrapper fields (the vision tower is not ported; its config is not read).
_HF_MM_IGNORED = {"vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
                  "vision_end_token_id", "text_config", "architectures", "model_type", "dtype",
                  "torch_dtype", "transformers_version", "tie_word_embeddings", "_name_or_path"}


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> Qwen35Config:
    """Build a :class:`Qwen35Config` from an HF ``config.json`` dict (text-only or multimodal)."""
    hf = dict(hf)
    tie = hf.get("tie_word_embeddings")
    if "text_config" in hf:
        for k in hf:
            if k not in _HF_MM_IGNORED:
                raise ValueError(f"{source}: multimodal config field {k!r} is not handled by the prefjax "
                                 "Qwen-3.5 port; refusing to ignore it")
        inner = dict(hf["text_config"])
        if tie is not None and inner.get("tie_word_embeddings") is None:
            inner["tie_word_embeddings"] = tie
        hf = inner
    mt = hf.get("model_type", "qwen3_5_moe_text")
    if mt not in ("qwen3_5_moe_text", "qwen3_5_text", "qwen3_5_moe", "qwen3_5"):
        raise ValueError(f"{source}: model_type {mt!r} is not a Qwen-3.5 text model")
    moe = "num_experts" in hf or mt.startswith("qwen3_5_moe")
    handled = {
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "layer_types", "full_attention_interval", "rope_parameters", "rope_theta",
        "partial_rotary_factor", "rope_scaling", "rms_norm_eps", "max_position_embeddings",
        "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
        "pad_token_id", "bos_token_id", "eos_token_id",
    }
    handled |= ({"num_experts", "num_experts_per_tok", "moe_intermediate_size",
                 "shared_expert_intermediate_size"} if moe else {"intermediate_size"})
    check_hf_fields(hf, handled=handled, pinned=_HF_PINNED, ignored=_HF_IGNORED, source=source, port="Qwen-3.5")
    n = int(hf["num_hidden_layers"])
    layer_types = tuple(hf["layer_types"]) if hf.get("layer_types") else \
        _pattern(n, int(hf.get("full_attention_interval", 4)))
    rp = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{source}: rope_type {rope_type!r} is not supported (only 'default')")
    unknown_rope = set(rp) - {"rope_type", "type", "rope_theta", "partial_rotary_factor", "mrope_section",
                              "mrope_interleaved"}
    if unknown_rope:
        raise ValueError(f"{source}: rope_parameters fields {sorted(unknown_rope)} are not handled")
    base = float(rp.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    prf = float(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25)))
    eos = hf.get("eos_token_id")
    eos_ids = () if eos is None else (tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),))
    d = int(hf["hidden_size"])
    h = int(hf["num_attention_heads"])
    kw: dict[str, Any] = {}
    if moe:
        kw = dict(n_experts=int(hf["num_experts"]), top_k=int(hf["num_experts_per_tok"]),
                  d_expert=int(hf["moe_intermediate_size"]),
                  d_shared=int(hf["shared_expert_intermediate_size"]))
    else:
        kw = dict(d_ff=int(hf["intermediate_size"]))
    return Qwen35Config(
        vocab_size=int(hf["vocab_size"]), d_model=d, n_layers=n, n_heads=h,
        n_kv_heads=int(hf.get("num_key_value_heads") or h), head_dim=int(hf.get("head_dim") or d // h),
        layer_types=layer_types, lin_n_k_heads=int(hf.get("linear_num_key_heads", 16)),
        lin_n_v_heads=int(hf.get("linear_num_value_heads", 32)),
        lin_k_dim=int(hf.get("linear_key_head_dim", 128)), lin_v_dim=int(hf.get("linear_value_head_dim", 128)),
        lin_conv_kernel=int(hf.get("linear_conv_kernel_dim", 4)), rope_base=base, partial_rotary_factor=prf,
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 262_144)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings") or False),
        pad_id=int(hf["pad_token_id"]) if hf.get("pad_token_id") is not None else 0,
        bos_id=int(hf["bos_token_id"]) if hf.get("bos_token_id") is not None else None,
        eos_ids=eos_ids, name=hf.get("_name_or_path") or "qwen35", **kw)


# --------------------------------------------------------------------------------------------
# Parameters: names, shapes, logical axes.

def param_shapes(cfg: Qwen35Config) -> dict[str, Any]:
    """``{path: (shape, logical_axes)}``. ``blocks/*`` have a leading axis of ``n_layers``,
    ``lin/*`` of the linear-attention layers, ``attn/*`` of the full-attention layers."""
    n, d, h, kv, hd = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    nl, nf = len(cfg.linear_layers), len(cfg.full_layers)
    hk, hv, dk, dv, kk = cfg.lin_n_k_heads, cfg.lin_n_v_heads, cfg.lin_k_dim, cfg.lin_v_dim, cfg.lin_conv_kernel
    out: dict[str, Any] = {
        "embed": ((cfg.vocab_size, d), ("vocab", "embed")),
        "final_norm": ((d,), ("norm",)),
        "blocks/ln_attn": ((n, d), ("layers", "norm")),
        "blocks/ln_mlp": ((n, d), ("layers", "norm")),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head"] = ((cfg.vocab_size, d), ("vocab", "embed"))
    if cfg.is_moe:
        e, f, fs = cfg.n_experts, cfg.d_expert, cfg.d_shared
        out.update({
            "blocks/router": ((n, d, e), ("layers", "embed", None)),
            "blocks/experts_gate": ((n, e, d, f), ("layers", "experts", "embed", "expert_mlp")),
            "blocks/experts_up": ((n, e, d, f), ("layers", "experts", "embed", "expert_mlp")),
            "blocks/experts_down": ((n, e, f, d), ("layers", "experts", "expert_mlp", "embed")),
            "blocks/shared_gate": ((n, d, fs), ("layers", "embed", "mlp")),
            "blocks/shared_up": ((n, d, fs), ("layers", "embed", "mlp")),
            "blocks/shared_down": ((n, fs, d), ("layers", "mlp", "embed")),
            "blocks/shared_expert_gate": ((n, d), ("layers", "embed")),
        })
    else:
        out.update({
            "blocks/gate": ((n, d, cfg.d_ff), ("layers", "embed", "mlp")),
            "blocks/up": ((n, d, cfg.d_ff), ("layers", "embed", "mlp")),
            "blocks/down": ((n, cfg.d_ff, d), ("layers", "mlp", "embed")),
        })
    if nl:
        out.update({
            "lin/q": ((nl, d, hk, dk), ("layers", "embed", "heads", "head_dim")),
            "lin/k": ((nl, d, hk, dk), ("layers", "embed", "heads", "head_dim")),
            "lin/v": ((nl, d, hv, dv), ("layers", "embed", "heads", "head_dim")),
            "lin/conv_q": ((nl, kk, hk, dk), ("layers", "conv", "heads", "head_dim")),
            "lin/conv_k": ((nl, kk, hk, dk), ("layers", "conv", "heads", "head_dim")),
            "lin/conv_v": ((nl, kk, hv, dv), ("layers", "conv", "heads", "head_dim")),
            "lin/z": ((nl, d, hv, dv), ("layers", "embed", "heads", "head_dim")),
            "lin/b": ((nl, d, hv), ("layers", "embed", "heads")),
            "lin/a": ((nl, d, hv), ("layers", "embed", "heads")),
            "lin/dt_bias": ((nl, hv), ("layers", "heads")),
            "lin/A_log": ((nl, hv), ("layers", "heads")),
            "lin/norm": ((nl, dv), ("layers", "norm")),
            "lin/out": ((nl, hv, dv, d), ("layers", "heads", "head_dim", "embed")),
        })
    if nf:
        out.update({
            "attn/q": ((nf, d, h, hd), ("layers", "embed", "heads", "head_dim")),
            "attn/q_gate": ((nf, d, h, hd), ("layers", "embed", "heads", "head_dim")),
            "attn/k": ((nf, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim")),
            "attn/v": ((nf, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim")),
            "attn/o": ((nf, h, hd, d), ("layers", "heads", "head_dim", "embed")),
            "attn/q_norm": ((nf, hd), ("layers", "norm")),
            "attn/k_norm": ((nf, hd), ("layers", "norm")),
        })
    return out


def param_count(cfg: Qwen35Config) -> int:
    """Number of parameters, from :func:`param_shapes`."""
    return int(sum(int(np.prod(s)) for s, _ in param_shapes(cfg).values()))


# --------------------------------------------------------------------------------------------
# HF names. An entry is (template, transform) as in gemma3 -- template with ``{l}`` = the HF layer
# index -- or an HFMulti when one prefjax row is combined from several HF tensors.

# Prefixes under which checkpoints store the text decoder ("model." is replaced by the prefix).
HF_PREFIXES = ("model.", "model.language_model.")
# "lm_head." is left only when tied (untied models name it in hf_names, so the loader requires it).
HF_SKIP_PREFIXES = ("model.visual.", "visual.", "mtp.", "model.mtp.", "lm_head.")


def hf_names(cfg: Qwen35Config, has: Callable[[str], bool] | None = None,
             expert_layout: str | None = None) -> dict[str, Any]:
    """For each prefjax parameter: (HF name template or :class:`~prefjax.checkpoints.hf.HFMulti`, host transform).

    Templates use ``{l}`` for the HF layer index; ``lin/*`` rows map to ``cfg.linear_layers`` and
    ``attn/*`` rows to ``cfg.full_layers`` (see :func:`layer_rows`). ``expert_layout`` is
    ``"fused"`` (``mlp.experts.gate_up_proj`` [E, 2F, D], ``mlp.experts.down_proj`` [E, D, F], as in
    transformers >= 5 and the released Qwen-3.5 checkpoints) or ``"per_expert"``
    (``mlp.experts.{e}.gate_proj.weight`` ..., as ``save_pretrained`` writes them); by default it is
    read from the checkpoint through ``has(template)`` (:func:`detect_expert_layout`), and "fused"
    without one.
    """
    if expert_layout is None:
        expert_layout = "fused" if has is None else detect_expert_layout(cfg, has)
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    hk, hv, dk, dv = cfg.lin_n_k_heads, cfg.lin_n_v_heads, cfg.lin_k_dim, cfg.lin_v_dim
    kd = hk * dk
    lp = "model.layers.{l}."
    la = lp + "linear_attn."
    sa = lp + "self_attn."
    conv = lambda w: w[:, 0, :].T  # [C, 1, K] -> [K, C]
    out: dict[str, Any] = {
        "embed": ("model.embed_tokens.weight", None),
        "final_norm": ("model.norm.weight", None),
        "blocks/ln_attn": (lp + "input_layernorm.weight", None),
        "blocks/ln_mlp": (lp + "post_attention_layernorm.weight", None),
        "lin/q": (la + "in_proj_qkv.weight", lambda w: w[:kd].T.reshape(d, hk, dk)),
        "lin/k": (la + "in_proj_qkv.weight", lambda w: w[kd:2 * kd].T.reshape(d, hk, dk)),
        "lin/v": (la + "in_proj_qkv.weight", lambda w: w[2 * kd:].T.reshape(d, hv, dv)),
        "lin/conv_q": (la + "conv1d.weight", lambda w: conv(w)[:, :kd].reshape(-1, hk, dk)),
        "lin/conv_k": (la + "conv1d.weight", lambda w: conv(w)[:, kd:2 * kd].reshape(-1, hk, dk)),
        "lin/conv_v": (la + "conv1d.weight", lambda w: conv(w)[:, 2 * kd:].reshape(-1, hv, dv)),
        "lin/z": (la + "in_proj_z.weight", lambda w: w.T.reshape(d, hv, dv)),
        "lin/b": (la + "in_proj_b.weight", lambda w: w.T),
        "lin/a": (la + "in_proj_a.weight", lambda w: w.T),
        "lin/dt_bias": (la + "dt_bias", None),
        "lin/A_log": (la + "A_log", None),
        "lin/norm": (la + "norm.weight", None),
        "lin/out": (la + "out_proj.weight", lambda w: w.T.reshape(hv, dv, d)),
        "attn/q": (sa + "q_proj.weight", lambda w: w.reshape(h, 2, hd, d)[:, 0].transpose(2, 0, 1)),
        "attn/q_gate": (sa + "q_proj.weight", lambda w: w.reshape(h, 2, hd, d)[:, 1].transpose(2, 0, 1)),
        "attn/k": (sa + "k_proj.weight", lambda w: w.T.reshape(d, kv, hd)),
        "attn/v": (sa + "v_proj.weight", lambda w: w.T.reshape(d, kv, hd)),
        "attn/o": (sa + "o_proj.weight", lambda w: w.T.reshape(h, hd, d)),
        "attn/q_norm": (sa + "q_norm.weight", None),
        "attn/k_norm": (sa + "k_norm.weight", None),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head"] = ("lm_head.weight", None)
    if cfg.is_moe:
        f = cfg.d_expert
        mp = lp + "mlp."
        out.update({
            "blocks/router": (mp + "gate.weight", lambda w: w.T),
            "blocks/shared_gate": (mp + "shared_expert.gate_proj.weight", lambda w: w.T),
            "blocks/shared_up": (mp + "shared_expert.up_proj.weight", lambda w: w.T),
            "blocks/shared_down": (mp + "shared_expert.down_proj.weight", lambda w: w.T),
            "blocks/shared_expert_gate": (mp + "shared_expert_gate.weight", lambda w: w[0]),
        })
        if expert_layout == "fused":
            out.update({
                "blocks/experts_gate": (mp + "experts.gate_up_proj", lambda w: w[:, :f].transpose(0, 2, 1)),
                "blocks/experts_up": (mp + "experts.gate_up_proj", lambda w: w[:, f:].transpose(0, 2, 1)),
                "blocks/experts_down": (mp + "experts.down_proj", lambda w: w.transpose(0, 2, 1)),
            })
        elif expert_layout == "per_expert":
            ex = lambda proj: HFMulti(tuple(mp + f"experts.{e}.{proj}.weight" for e in range(cfg.n_experts)),
                                      _stack_transposed)
            out.update({
                "blocks/experts_gate": (ex("gate_proj"), None),
                "blocks/experts_up": (ex("up_proj"), None),
                "blocks/experts_down": (ex("down_proj"), None),
            })
        else:
            raise ValueError(f"expert_layout must be 'fused' or 'per_expert', got {expert_layout!r}")
    else:
        out.update({
            "blocks/gate": (lp + "mlp.gate_proj.weight", lambda w: w.T),
            "blocks/up": (lp + "mlp.up_proj.weight", lambda w: w.T),
            "blocks/down": (lp + "mlp.down_proj.weight", lambda w: w.T),
        })
    shapes = param_shapes(cfg)
    return {k: v for k, v in out.items() if k in shapes}


def _stack_transposed(ws):
    """Per-expert torch Linear weights [out, in] -> one [E, in, out] array (numpy or traced)."""
    xp = np if all(isinstance(w, np.ndarray) for w in ws) else jnp
    return xp.stack([w.T for w in ws])


def layer_rows(cfg: Qwen35Config, path: str) -> tuple[int, ...]:
    """HF layer index of each row of a stacked parameter: ``lin/*`` the linear-attention layers,
    ``attn/*`` the full-attention layers, ``blocks/*`` every layer."""
    if path.startswith("lin/"):
        return cfg.linear_layers
    if path.startswith("attn/"):
        return cfg.full_layers
    return tuple(range(cfg.n_layers))


def detect_expert_layout(cfg: Qwen35Config, has: Callable[[str], bool]) -> str:
    """``"fused"`` or ``"per_expert"`` from the tensors a checkpoint holds (``has(template)``, templates
    spelt with the ``model.`` prefix as in :func:`hf_names`)."""
    if not cfg.is_moe:
        return "fused"
    if has("model.layers.0.mlp.experts.gate_up_proj"):
        return "fused"
    if has("model.layers.0.mlp.experts.0.gate_proj.weight"):
        return "per_expert"
    raise CheckpointError("no MoE expert tensors for layer 0 (neither fused mlp.experts.gate_up_proj nor "
                          "per-expert mlp.experts.0.gate_proj.weight)")


# --------------------------------------------------------------------------------------------
# Forward.

def aux_arrays(cfg: Qwen35Config) -> dict[str, np.ndarray]:
    """Per-layer data scanned alongside the weights: mixer kind and row in its own stack."""
    is_full = np.array([t == FULL for t in cfg.layer_types], np.int32)
    idx = np.zeros(cfg.n_layers, np.int32)
    for rows in (cfg.linear_layers, cfg.full_layers):
        for j, l in enumerate(rows):
            idx[l] = j
    return {"is_full": is_full, "idx": idx}


def _norm(cfg, x, w):
    return L.rms_norm(x, w, cfg.rms_eps, plus_one=True)


def _gated_norm(x, w, z, eps):
    """transformers' Qwen3_5MoeRMSNormGated: ``(w * norm(x).to(dtype)) * silu(z.float())``, cast back."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(dtype)
    y = w.astype(dtype) * y
    return (y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))).astype(dtype)


def _index(tree, i):
    if isinstance(i, int):
        return jax.tree_util.tree_map(lambda a: a[i], tree)
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _set(a, i, v):
    if isinstance(i, int):
        return a.at[i].set(v.astype(a.dtype))
    return jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), i, 0)


def deltanet_mixer(cfg: Qwen35Config, p, h_BxTxD, valid_BxT, st=None, *, recurrent: bool = False):
    """Gated DeltaNet token mixer on normed input. ``st``: dict conv_q/conv_k/conv_v windows
    [B, K-1, heads, dim] and ``rec`` [B, Hv, dk, dv] (or None). Returns ``(out, new st)``."""
    b, t, _ = h_BxTxD.shape
    dtype = h_BxTxD.dtype
    hk, hv, dk, dv = cfg.lin_n_k_heads, cfg.lin_n_v_heads, cfg.lin_k_dim, cfg.lin_v_dim
    m = valid_BxT.astype(dtype)[:, :, None]
    x = (h_BxTxD * m).astype(dtype)
    act = L.ACTIVATIONS[cfg.hidden_activation]
    new = {}

    def proj_conv(name, heads, dim):
        y = jnp.einsum("btd,dnh->btnh", x, p[name]).reshape(b, t, heads * dim)
        w = p["conv_" + name].reshape(-1, heads * dim)
        win = None if st is None else st["conv_" + name].reshape(b, -1, heads * dim)
        y, win_new = DN.causal_conv(y, w, win)
        if st is not None:
            if t == 1:  # an invalid (padding) decode token leaves the window as it was
                win_new = jnp.where(valid_BxT[:, :, None], win_new, win)
            new["conv_" + name] = win_new.reshape(st["conv_" + name].shape)
        return act(y).reshape(b, t, heads, dim)

    q = proj_conv("q", hk, dk)
    k = proj_conv("k", hk, dk)
    v = proj_conv("v", hv, dv)
    z = jnp.einsum("btd,dnh->btnh", x, p["z"])
    beta = jax.nn.sigmoid(jnp.einsum("btd,dn->btn", x, p["b"]))
    a = jnp.einsum("btd,dn->btn", x, p["a"])
    g = -jnp.exp(p["A_log"].astype(jnp.float32)) * jax.nn.softplus(
        a.astype(jnp.float32) + p["dt_bias"].astype(jnp.float32))
    # padding neither decays nor writes the recurrent state
    vmask = valid_BxT[:, :, None]
    g = jnp.where(vmask, g, 0.0)
    beta = jnp.where(vmask, beta, jnp.zeros_like(beta))
    rep = hv // hk
    if rep > 1:
        q, k = jnp.repeat(q, rep, axis=2), jnp.repeat(k, rep, axis=2)
    s0 = None if st is None else st["rec"]
    if recurrent:
        o, s = DN.recurrent_gated_delta_rule(q, k, v, g, beta, s0)
    else:
        o, s = DN.chunk_gated_delta_rule(q, k, v, g, beta, s0, chunk=cfg.chunk_size)
    if st is not None:
        new["rec"] = s
    o = _gated_norm(o, p["norm"], z, cfg.rms_eps)
    out = jnp.einsum("btnh,nhd->btd", o, p["out"])
    return out, (new if st is not None else None)


def attention_mixer(cfg: Qwen35Config, p, h_BxTxD, cos, sin, mask, st=None, start=0):
    """Gated full attention on normed input; ``st`` = {"k","v"} [B, S, KV, hd] cache or None."""
    q = jnp.einsum("btd,dnh->btnh", h_BxTxD, p["q"])
    gate = jnp.einsum("btd,dnh->btnh", h_BxTxD, p["q_gate"])
    k = jnp.einsum("btd,dkh->btkh", h_BxTxD, p["k"])
    v = jnp.einsum("btd,dkh->btkh", h_BxTxD, p["v"])
    q, k = _norm(cfg, q, p["q_norm"]), _norm(cfg, k, p["k_norm"])
    q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
    k, v, new = L.write_kv(st, k, v, start)
    o = L.dot_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, cfg.head_dim ** -0.5)
    o = o * jax.nn.sigmoid(gate)
    return jnp.einsum("btnh,nhd->btd", o, p["o"]), new


def moe_impl(cfg: Qwen35Config) -> str:
    """The expert path to run, chosen by the platform the trace targets (:func:`prefjax.models.moe_layout.target_platform`:
    the mesh's under ``jax.set_mesh``, so an ahead-of-time compile for a TPU slice from a CPU host picks the TPU
    path): ``cfg.moe_impl``, except that

    * on GPUs "grouped" means the Pallas kernels (``ragged_dot`` has no grouped GPU kernel in JAX 0.11; see
      :mod:`prefjax.models.moe`); several devices without a mesh context (:func:`prefjax.sharding.mesh_context`)
      get the partitionable "blocked" path, since a Pallas call on sharded weights would gather them whole;
    * on TPUs "pallas" (Triton, GPU-only) means "grouped": ``ragged_dot`` lowers to the TPU's native grouped
      matmul there (only the routed rows are multiplied; checked in tests/test_aot.py)."""
    platform = ML.target_platform()
    if cfg.moe_impl == "grouped" and platform == "gpu":
        if jax.device_count() > 1 and jax.sharding.get_abstract_mesh().empty:
            return "blocked"
        return "pallas" if MP.supported(cfg.d_model, cfg.d_expert) else "blocked"
    if cfg.moe_impl == "pallas" and platform == "tpu":
        return "grouped"
    return cfg.moe_impl


def mlp(cfg: Qwen35Config, p, h_BxTxD, *, impl: str | None = None, experts=None, layer=None):
    """The MoE block (``qwen3_5_moe``) or the dense SwiGLU MLP (``qwen3_5``). ``experts``/``layer``:
    the stacked expert weights and this layer's index (see :func:`prefjax.models.moe.moe_block`)."""
    act = L.ACTIVATIONS[cfg.hidden_activation]
    if cfg.is_moe:
        return M.moe_block(h_BxTxD, p, cfg.top_k, impl=impl or moe_impl(cfg), act=act, experts=experts,
                           layer=layer)
    return M.swiglu(h_BxTxD, p["gate"], p["up"], p["down"], act)


_LIN_STATE = ("conv_q", "conv_k", "conv_v", "rec")


def _block(cfg: Qwen35Config, lin_p, attn_p, experts, valid_BxT, cos, sin, mask, start, recurrent):
    def block(p, carry, layer, aux, hook, _unused_state):
        x, st = carry
        x = hook("hook_resid_pre", x)
        h = _norm(cfg, x, p["ln_attn"])

        def run_lin(h, st, i):
            lst = None if st is None else {k: _index(st[k], i) for k in _LIN_STATE}
            out, new = deltanet_mixer(cfg, _index(lin_p, i), h, valid_BxT, lst, recurrent=recurrent)
            if st is not None:
                st = {**st, **{k: _set(st[k], i, new[k]) for k in _LIN_STATE}}
            return out, st

        def run_full(h, st, i):
            ast = None if st is None else {"k": _index(st["k"], i), "v": _index(st["v"], i)}
            out, new = attention_mixer(cfg, _index(attn_p, i), h, cos, sin, mask, ast, start)
            if st is not None:
                st = {**st, "k": _set(st["k"], i, new["k"]), "v": _set(st["v"], i, new["v"])}
            return out, st

        if isinstance(layer, int):  # unrolled: choose the mixer statically
            if cfg.layer_types[layer] == FULL:
                mixed, st = run_full(h, st, cfg.full_layers.index(layer))
            else:
                mixed, st = run_lin(h, st, cfg.linear_layers.index(layer))
        elif not cfg.linear_layers or not cfg.full_layers:
            mixed, st = (run_full if cfg.full_layers else run_lin)(h, st, aux["idx"])
        else:
            mixed, st = jax.lax.cond(aux["is_full"] > 0, run_full, run_lin, h, st, aux["idx"])
        mixed = hook("hook_attn_out", mixed)
        x = hook("hook_resid_mid", x + mixed)
        y = hook("hook_mlp_out", mlp(cfg, p, _norm(cfg, x, p["ln_mlp"]), experts=experts, layer=layer))
        x = hook("hook_resid_post", x + y)
        return (x, st), None

    return block


def embed(cfg: Qwen35Config, params, tokens_BxT):
    """Token embeddings (unscaled)."""
    return jnp.take(params["embed"], tokens_BxT, axis=0)


def unembed(cfg: Qwen35Config, params, h_BxKxD):
    """Logits from final-normed hidden states (the tied embedding or ``lm_head``)."""
    w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("bkd,vd->bkv", h_BxKxD, w.astype(h_BxKxD.dtype))


def forward(cfg: Qwen35Config, params, tokens_BxT, valid_BxT, *, capture, pos_BxK=None, intervene=None,
            unroll=False, state=None, start=0, pos_ids_BxT=None, is_prompt=True, logits=True) -> ForwardOut:
    """One pass over ``tokens_BxT`` (a prompt, or a decode step / continuation when ``state`` is given).

    ``valid_BxT`` is 1 on real tokens and 0 on (left) padding; padding is masked out of attention
    and never enters the DeltaNet state. With ``state`` (from :func:`init_state`) the tokens are
    written at slots ``start .. start+T-1``; a single-token call (T == 1) uses the recurrent delta
    rule, longer ones the chunked form. Returns a :class:`~prefjax.models.stack.ForwardOut` ``(logits
    [B, K|T, V] or None, captured dict, final-normed h, new_state)``. ``blocks.{L}.hook_resid_post`` equals HF ``hidden_states[L+1]``
    except after the last layer (HF applies the final norm there).
    """
    t = tokens_BxT.shape[1]
    valid_BxT = valid_BxT.astype(bool)
    si = step_inputs(valid_BxT, state=state, start=start, pos_ids_BxT=pos_ids_BxT, is_prompt=is_prompt)
    x = embed(cfg, params, tokens_BxT)
    inv_freq = L.rope_inv_freq(cfg.head_dim, cfg.rope_base, rotary_dim=cfg.rotary_dim)
    cos, sin = L.rope_cos_sin(si.pos_ids_BxT, inv_freq, x.dtype)
    mask = L.attention_mask(si.q_slot_T, si.kv_slot_S, si.kv_valid_BxS, None)
    aux = {k: jnp.asarray(v) for k, v in aux_arrays(cfg).items()}
    # the expert stacks stay whole (each layer indexes them; slicing would copy a layer's experts)
    blocks = {k: v for k, v in params["blocks"].items() if k not in M.EXPERT_WEIGHTS}
    experts = {k: params["blocks"][k] for k in M.EXPERT_WEIGHTS if k in params["blocks"]} or None
    block = _block(cfg, params.get("lin", {}), params.get("attn", {}), experts, valid_BxT, cos, sin, mask, start,
                   recurrent=(state is not None and t == 1))
    (x, st), captured, _ = fold(block, blocks, (x, si.layer_state), n_layers=cfg.n_layers, aux=aux,
                                state=None, capture=capture, pos_BxK=pos_BxK, intervene=intervene, ctx=si.ctx,
                                unroll=unroll)
    return forward_tail(x, captured, pos_BxK=pos_BxK, capture=capture,
                        final_norm=lambda h: _norm(cfg, h, params["final_norm"]),
                        unembed=(lambda h: unembed(cfg, params, h)) if logits else None,
                        state=state, inputs=si, layer_state=st)


def init_state(cfg: Qwen35Config, batch: int, max_len: int, dtype) -> dict[str, Any]:
    """Empty decode state: KV cache [n_full, B, max_len, KV, hd] for attention layers; conv windows
    [n_linear, B, K-1, heads, dim] and recurrent state [n_linear, B, Hv, dk, dv] (float32) for
    DeltaNet layers; ``valid`` [B, max_len]."""
    nl, nf = len(cfg.linear_layers), len(cfg.full_layers)
    hk, hv, dk, dv, kk = cfg.lin_n_k_heads, cfg.lin_n_v_heads, cfg.lin_k_dim, cfg.lin_v_dim, cfg.lin_conv_kernel
    kv = (nf, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(kv, dtype), "v": jnp.zeros(kv, dtype),
            "conv_q": jnp.zeros((nl, batch, kk - 1, hk, dk), dtype),
            "conv_k": jnp.zeros((nl, batch, kk - 1, hk, dk), dtype),
            "conv_v": jnp.zeros((nl, batch, kk - 1, hv, dv), dtype),
            "rec": jnp.zeros((nl, batch, hv, dk, dv), jnp.float32),
            "valid": jnp.zeros((batch, max_len), bool)}


def _near_one(key, shape, dtype):
    return (1.0 + 0.1 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _log_uniform_1_16(key, shape, dtype):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)


def init_params(cfg: Qwen35Config, key, dtype=jnp.float32, scale: float = 0.02) -> dict[str, Any]:
    """Random parameters (:func:`prefjax.models.family.random_params`): normal * scale for matrices, small
    normal for zero-centred norm offsets, and HF-like ``A_log`` (log of U(1, 16)), ``dt_bias`` (around 1)
    and gated-norm weight ``lin/norm`` (around 1, it multiplies by ``w``) so the decay is realistic."""
    special = {"lin/A_log": _log_uniform_1_16, "lin/dt_bias": _near_one, "lin/norm": _near_one}
    return random_params(param_shapes(cfg), key, dtype, scale, special=special)


FAMILY = Family(
    name="qwen35", presets=PRESETS, config_from_hf=config_from_hf, param_shapes=param_shapes, hf_names=hf_names,
    layer_rows=layer_rows, hf_prefixes=HF_PREFIXES, hf_skip_prefixes=HF_SKIP_PREFIXES, init_params=init_params,
    init_state=init_state, forward_fn=forward, embed=embed, unembed=unembed,
    plain_kv_state=False,  # DeltaNet layers keep conv windows and a recurrent state
    # the attention layers' KV cache is placed by slot; the DeltaNet leaves sum up a row's whole history
    state_layout=StateLayout(slot_leaves=("k", "v"), row_leaves=_LIN_STATE))
