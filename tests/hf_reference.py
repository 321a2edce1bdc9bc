"""Helpers that run a transformers model and collect the activations prefjax names, via torch hooks.

Used by every port's parity test. ``collect(model, layers_attr, ...)`` registers hooks on the HF modules
that correspond to each TransformerLens point and returns ``{hook_name: np.ndarray}``.
"""

from __future__ import annotations

import numpy as np
import torch


def collect(hf_model, input_ids, *, attention_mask=None, position_ids=None, layers=None, final_norm=None,
            attn_out_module="post_attention_layernorm", attn_out_is_input=False,
            mlp_out_module="post_feedforward_layernorm", mlp_out_is_input=False,
            resid_mid_module="pre_feedforward_layernorm"):
    """Run ``hf_model`` once and capture every block point plus the final norm.

    ``attn_out_module``/``mlp_out_module`` name the submodule whose *output* (or input, when the
    ``*_is_input`` flag is set) is the branch's contribution; ``resid_mid_module`` names the
    submodule whose *input* is the residual after attention.
    """
    got: dict[str, np.ndarray] = {}
    handles = []

    def grab(name, use_input):
        def fn(mod, inp, out):
            t = inp[0] if use_input else (out[0] if isinstance(out, tuple) else out)
            got[name] = t.detach().float().numpy().copy()
        return fn

    for l, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(
            lambda m, i, o, l=l: got.__setitem__(
                f"blocks.{l}.hook_resid_post", (o[0] if isinstance(o, tuple) else o).detach().float().numpy().copy())))
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs=None, l=l: got.__setitem__(
                f"blocks.{l}.hook_resid_pre", args[0].detach().float().numpy().copy()) if args else None))
        handles.append(_get(layer, attn_out_module).register_forward_hook(
            grab(f"blocks.{l}.hook_attn_out", attn_out_is_input)))
        handles.append(_get(layer, mlp_out_module).register_forward_hook(
            grab(f"blocks.{l}.hook_mlp_out", mlp_out_is_input)))
        handles.append(_get(layer, resid_mid_module).register_forward_hook(
            grab(f"blocks.{l}.hook_resid_mid", True)))
    if final_norm is not None:
        handles.append(final_norm.register_forward_hook(grab("ln_final.hook_normalized", False)))
    try:
        with torch.no_grad():
            kw = {}
            if attention_mask is not None:
                kw["attention_mask"] = torch.tensor(np.asarray(attention_mask))
            if position_ids is not None:
                kw["position_ids"] = torch.tensor(np.asarray(position_ids))
            out = hf_model(torch.tensor(np.asarray(input_ids)), **kw)
    finally:
        for h in handles:
            h.remove()
    return out.logits.float().numpy(), got


def _get(mod, dotted):
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
