"""The dense attention decoder that Gemma-3 and Llama / Qwen-3 share.

Both are a stack of the same block: pre-norm, grouped-query attention (q/k/v/o projections with
optional on-the-fly LoRA, optional per-head q/k RMSNorm before RoPE, a KV cache written at the
call's slots), then a gated MLP ``down(act(gate(x)) * up(x))``. Gemma-3 adds post-branch norms
(``ln_post_attn``, ``ln_post_mlp``), per-layer RoPE tables and sliding windows; those are arguments
here (:class:`BlockSpec`), not copies. Parameter names and HF names of the shared weights are
built here too, so each family lists only what is its own.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp

from prefjax.models import layers as L
from prefjax.models.stack import ForwardOut, StepInputs, fold, forward_tail, kv_state, step_inputs


# --------------------------------------------------------------------------------------------
# Parameters shared by the dense decoders (order matters: random init draws keys in table order).

def embedding_shapes(cfg) -> dict[str, Any]:
    """``embed`` [vocab, d] and ``final_norm`` [d]."""
    return {"embed": ((cfg.vocab_size, cfg.d_model), ("vocab", "embed")),
            "final_norm": ((cfg.d_model,), ("norm",))}


def attention_shapes(cfg) -> dict[str, Any]:
    """The stacked q/k/v/o projections: [L, d, heads, head_dim] and [L, heads, head_dim, d]."""
    n, d, h, kv, hd = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return {"blocks/q": ((n, d, h, hd), ("layers", "embed", "heads", "head_dim")),
            "blocks/k": ((n, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim")),
            "blocks/v": ((n, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim")),
            "blocks/o": ((n, h, hd, d), ("layers", "heads", "head_dim", "embed"))}


def mlp_shapes(cfg) -> dict[str, Any]:
    """The stacked gated MLP: gate/up [L, d, d_ff], down [L, d_ff, d]."""
    n, d, ff = cfg.n_layers, cfg.d_model, cfg.d_ff
    return {"blocks/gate": ((n, d, ff), ("layers", "embed", "mlp")),
            "blocks/up": ((n, d, ff), ("layers", "embed", "mlp")),
            "blocks/down": ((n, ff, d), ("layers", "mlp", "embed"))}


def norm_shapes(cfg, *names: str, width: str = "d_model") -> dict[str, Any]:
    """Stacked norm weights ``blocks/<name>`` of shape [L, width] (``width``: a config field)."""
    return {f"blocks/{nm}": ((cfg.n_layers, getattr(cfg, width)), ("layers", "norm")) for nm in names}


LAYER = "model.layers.{l}."  # HF name prefix of a decoder layer ("model." is replaced by the checkpoint's)


def embedding_hf_names() -> dict[str, Any]:
    """HF names of ``embed`` and ``final_norm``."""
    return {"embed": ("model.embed_tokens.weight", None), "final_norm": ("model.norm.weight", None)}


def attention_hf_names(cfg) -> dict[str, Any]:
    """HF names of q/k/v/o with their transforms from torch Linear [out, in] to prefjax's layout."""
    h, kv, hd, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    sa = LAYER + "self_attn."
    return {"blocks/q": (sa + "q_proj.weight", lambda w: w.T.reshape(d, h, hd)),
            "blocks/k": (sa + "k_proj.weight", lambda w: w.T.reshape(d, kv, hd)),
            "blocks/v": (sa + "v_proj.weight", lambda w: w.T.reshape(d, kv, hd)),
            "blocks/o": (sa + "o_proj.weight", lambda w: w.T.reshape(h, hd, d))}


def mlp_hf_names() -> dict[str, Any]:
    """HF names of gate/up/down (transposed from torch Linear)."""
    return {f"blocks/{p}": (LAYER + f"mlp.{p}_proj.weight", lambda w: w.T) for p in ("gate", "up", "down")}


def norm_hf_names(**hf_modules: str) -> dict[str, Any]:
    """HF names of stacked norm weights: ``norm_hf_names(ln_attn="input_layernorm")``."""
    return {f"blocks/{nm}": (LAYER + f"{mod}.weight", None) for nm, mod in hf_modules.items()}


# --------------------------------------------------------------------------------------------
# The block.

class BlockSpec(NamedTuple):
    """How a family's block differs from the shared one.

    ``norm(x, w)``: the family's RMSNorm; ``qk_norm``: per-head norm of q and k before RoPE;
    ``mlp_norm``: name of the pre-MLP norm weight; ``post_norms``: norm each branch's output with
    ``ln_post_attn`` / ``ln_post_mlp`` before the residual add (Gemma-3); ``inv_freq(aux)`` the RoPE
    inverse frequencies of a layer; ``window(aux)`` its sliding window (None or 0: none);
    ``scale`` the attention scale; ``act`` the MLP activation.
    """

    norm: Callable
    qk_norm: bool
    mlp_norm: str
    post_norms: bool
    inv_freq: Callable
    window: Callable
    scale: float
    act: Callable


def attention(p, lora, h_BxTxD, *, qk_norm, cos, sin, mask, scale, state, start):
    """Grouped-query attention on normed input, writing this call's keys and values into ``state``
    (``{"k", "v"}`` [B, S, K, H], or None). Returns ``(o_proj output, new state)``."""
    q = L.linear(h_BxTxD, p, lora, "q", "btd,dnh->btnh", "btd,dr->btr", "btr,rnh->btnh")
    k = L.linear(h_BxTxD, p, lora, "k", "btd,dkh->btkh", "btd,dr->btr", "btr,rkh->btkh")
    v = L.linear(h_BxTxD, p, lora, "v", "btd,dkh->btkh", "btd,dr->btr", "btr,rkh->btkh")
    if qk_norm is not None:
        q, k = qk_norm(q, p["q_norm"]), qk_norm(k, p["k_norm"])
    q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
    k_all, v_all, state = L.write_kv(state, k, v, start)
    o = L.dot_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask, scale)
    return L.linear(o, p, lora, "o", "btnh,nhd->btd", "btnh,nhr->btr", "btr,rd->btd"), state


def gated_mlp(p, lora, h_BxTxD, act):
    """``down(act(gate(h)) * up(h))`` with optional LoRA on each projection."""
    g = L.linear(h_BxTxD, p, lora, "gate", "btd,df->btf", "btd,dr->btr", "btr,rf->btf")
    u = L.linear(h_BxTxD, p, lora, "up", "btd,df->btf", "btd,dr->btr", "btr,rf->btf")
    return L.linear(act(g) * u, p, lora, "down", "btf,fd->btd", "btf,fr->btr", "btr,rd->btd")


def make_block(spec: BlockSpec, si: StepInputs, start):
    """The block function for :func:`prefjax.models.stack.fold` (see its module docstring)."""
    norm = spec.norm

    def block(p, x, layer, aux, hook, state):
        lora = p.get("lora")  # on-the-fly LoRA factors (prefjax.lora), or None
        x = hook("hook_resid_pre", x)
        cos, sin = L.rope_cos_sin(si.pos_ids_BxT, spec.inv_freq(aux), x.dtype)
        mask = L.attention_mask(si.q_slot_T, si.kv_slot_S, si.kv_valid_BxS, spec.window(aux))
        attn, state = attention(p, lora, norm(x, p["ln_attn"]), qk_norm=norm if spec.qk_norm else None, cos=cos,
                                sin=sin, mask=mask, scale=spec.scale, state=state, start=start)
        if spec.post_norms:
            attn = norm(attn, p["ln_post_attn"])
        attn = hook("hook_attn_out", attn)
        x = hook("hook_resid_mid", x + attn)
        mlp = gated_mlp(p, lora, norm(x, p[spec.mlp_norm]), spec.act)
        if spec.post_norms:
            mlp = norm(mlp, p["ln_post_mlp"])
        mlp = hook("hook_mlp_out", mlp)
        x = hook("hook_resid_post", x + mlp)
        return x, state

    return block


def make_forward(block_spec: Callable, embed: Callable, unembed: Callable, aux: Callable | None = None) -> Callable:
    """A dense decoder's ``forward`` (the family contract's signature) from its parts: ``block_spec(cfg)``
    (:class:`BlockSpec`), ``embed(cfg, params, tokens)``, ``unembed(cfg, params, h)`` and ``aux(cfg)``
    (per-layer host arrays scanned with the weights, or None)."""

    def forward(cfg, params, tokens_BxT, valid_BxT, *, capture, pos_BxK=None, intervene=None, unroll=False,
                state=None, start=0, pos_ids_BxT=None, is_prompt=True, logits=True) -> ForwardOut:
        """One pass over ``tokens_BxT`` (prefill, or a decode step when ``state`` is a KV cache).

        ``valid_BxT`` is 1 on real tokens, 0 on left padding; positions default to the count of real
        tokens before each one (so left padding does not shift RoPE). With ``state`` (a dict ``k``/``v``
        of [L, B, S, K, H] plus ``valid`` [B, S]) the tokens are written at slots ``start .. start+T-1``.
        ``pos_BxK`` picks the positions returned and captured. Returns a
        :class:`~prefjax.models.stack.ForwardOut` ``(logits [B, K|T, V] or None, captured dict,
        final-normed h, new_state)``.
        """
        spec = block_spec(cfg)
        si = step_inputs(valid_BxT, state=state, start=start, pos_ids_BxT=pos_ids_BxT, is_prompt=is_prompt)
        x = embed(cfg, params, tokens_BxT)
        per_layer = None if aux is None else {k: jnp.asarray(v) for k, v in aux(cfg).items()}
        x, captured, layer_state = fold(make_block(spec, si, start), params["blocks"], x, n_layers=cfg.n_layers,
                                        aux=per_layer, state=si.layer_state, capture=capture, pos_BxK=pos_BxK,
                                        intervene=intervene, ctx=si.ctx, unroll=unroll)
        return forward_tail(x, captured, pos_BxK=pos_BxK, capture=capture,
                            final_norm=lambda h: spec.norm(h, params["final_norm"]),
                            unembed=(lambda h: unembed(cfg, params, h)) if logits else None,
                            state=state, inputs=si, layer_state=layer_state)

    return forward


def init_state(cfg, batch: int, max_len: int, dtype) -> dict[str, Any]:
    """An empty KV cache of ``max_len`` slots for every layer (see :func:`prefjax.models.stack.kv_state`)."""
    return kv_state(cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim, dtype)


def no_window(aux) -> None:
    """``BlockSpec.window`` of a decoder without sliding windows."""
    return None


def constant(value) -> Callable[[Any], Any]:
    """A per-layer function that ignores the layer's data (e.g. one RoPE table for every layer)."""
    return lambda aux: value
