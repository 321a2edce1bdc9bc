"""Llama-3.1 port vs transformers (float32), via save_pretrained -> prefjax.load."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import prefjax
from prefjax.hooks import BLOCK_POINTS, CaptureSpec, hook_name
from prefjax.models import llama

from hf_reference import assert_parity, float64_copy, forward_context, perturbed, rel_err, to_numpy

jax.config.update("jax_default_matmul_precision", "highest")

RTOL = 1e-5  # prefjax against itself (padding, scan/unroll, KV cache); against transformers: assert_parity

LLAMA_KW = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
                eos_token_id=2, tie_word_embeddings=False,
                # short original context so all three llama3 bands (kept / smoothed / divided) occur
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64})


def randomize_(model, seed=0):
    """Non-trivial norm weights (HF inits them to 1) so that a wrong norm would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def hf_reference(hf_model, tokens, mask=None, position_ids=None):
    """Logits and every hook from a transformers decoder, via forward hooks on its modules (float64
    arrays, computed wholly in float64, for a ``float64_copy``)."""
    inner = hf_model.base_model if hasattr(hf_model, "base_model") else hf_model
    while not hasattr(inner, "layers"):
        inner = inner.model
    got: dict[str, np.ndarray] = {}
    handles = []
    for l, layer in enumerate(inner.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, l=l: got.__setitem__(hook_name(l, "hook_resid_pre"), to_numpy(a[0]))))
        handles.append(layer.self_attn.register_forward_hook(
            lambda m, a, o, l=l: got.__setitem__(hook_name(l, "hook_attn_out"), to_numpy(o[0]))))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, l=l: got.__setitem__(hook_name(l, "hook_resid_mid"), to_numpy(a[0]))))
        handles.append(layer.mlp.register_forward_hook(
            lambda m, a, o, l=l: got.__setitem__(hook_name(l, "hook_mlp_out"), to_numpy(o))))
        handles.append(layer.register_forward_hook(
            lambda m, a, o, l=l: got.__setitem__(hook_name(l, "hook_resid_post"),
                                                 to_numpy(o[0] if isinstance(o, tuple) else o))))
    handles.append(inner.norm.register_forward_hook(
        lambda m, a, o: got.__setitem__("ln_final.hook_normalized", to_numpy(o))))
    try:
        with torch.no_grad(), forward_context(hf_model):
            kw = {}
            if mask is not None:
                kw["attention_mask"] = torch.tensor(np.asarray(mask), dtype=torch.long)
            if position_ids is not None:
                kw["position_ids"] = torch.tensor(np.asarray(position_ids), dtype=torch.long)
            out = hf_model(torch.tensor(np.asarray(tokens), dtype=torch.long), output_hidden_states=True, **kw)
    finally:
        for h in handles:
            h.remove()
    logits = to_numpy(out.logits) if hasattr(out, "logits") and out.logits is not None else None
    return logits, got, [to_numpy(h) for h in out.hidden_states]


def all_hooks(n_layers):
    return tuple(hook_name(l, p) for l in range(n_layers) for p in BLOCK_POINTS) + ("ln_final.hook_normalized",)


def hf_refs(hf_model, tokens, mask=None):
    """``(hf32, hf64)``: transformers' logits, every hook and ``hidden_states[i]``, in float32 and float64."""
    pos = None if mask is None else np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    out = []
    for m in (hf_model, float64_copy(hf_model)):
        logits, ref, hidden = hf_reference(m, tokens, mask, pos)
        d = {**ref, **{f"hidden_states[{i}]": h for i, h in enumerate(hidden)}}
        if logits is not None:
            d["logits"] = logits
        out.append(d)
    return tuple(out)


def pj_arrays(model, tokens, mask=None):
    """prefjax's logits, every hook, and the same arrays under their HF ``hidden_states[i]`` names:
    ``blocks.L.hook_resid_post`` is ``hidden_states[L+1]`` except the last, which HF normalises."""
    n = model.n_layers
    logits, cache = model.run(tokens, attention_mask=mask, capture=all_hooks(n))
    hs = {"hidden_states[0]": cache[hook_name(0, "hook_resid_pre")],
          **{f"hidden_states[{l + 1}]": cache[hook_name(l, "hook_resid_post")] for l in range(n - 1)},
          f"hidden_states[{n}]": cache["ln_final.hook_normalized"]}
    return {"logits": logits, **cache, **hs}


def assert_matches_hf(model, hf_model, tokens, mask=None, refs=None):
    """The parity gate (hf_reference.assert_parity) on logits, every hook and the documented
    hidden_states correspondence, over the real (unpadded) tokens. ``refs``: ``hf_refs(...)`` if
    already computed. Returns the gate's rows."""
    refs = hf_refs(hf_model, tokens, mask) if refs is None else refs
    keep = np.ones(np.asarray(tokens).shape, bool) if mask is None else np.asarray(mask).astype(bool)
    return assert_parity(pj_arrays(model, tokens, mask), *refs, select=keep)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**LLAMA_KW)
    cfg._attn_implementation = "eager"
    hf = randomize_(LlamaForCausalLM(cfg).eval())
    d = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(d)
    return d, hf


@pytest.fixture(scope="module")
def llama_model(llama_dir):
    return prefjax.load(llama_dir[0])


def test_config_and_rope_table(llama_dir, llama_model):
    cfg = llama_model.config
    assert llama_model.family.name == "llama"
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_type) == (4, 2, 12, "llama3")
    hf32 = llama_dir[1].model.rotary_emb.inv_freq.numpy()
    hf64 = float64_copy(llama_dir[1]).model.rotary_emb.inv_freq.numpy()  # built in float64 throughout
    ours = cfg.inv_freq()
    # layers.rope_inv_freq rounds ``base ** exponent`` differently from torch's float32 pow on some
    # elements (1 ulp): held to the same gate as the activations, against the float64 table.
    assert_parity({"inv_freq": ours}, {"inv_freq": hf32}, {"inv_freq": hf64})
    # the three llama3 bands all occur in this config, so the check above covers each branch
    wavelen = 2 * np.pi / llama.LlamaConfig(**{**dataclass_dict(cfg), "rope_type": "default"}).inv_freq()
    assert (wavelen < 64 / 4).any() and (wavelen > 64).any() and ((wavelen >= 16) & (wavelen <= 64)).any()


def dataclass_dict(cfg):
    import dataclasses
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


@pytest.fixture(scope="module")
def llama_refs(llama_dir):
    tokens = np.random.default_rng(0).integers(3, 97, size=(2, 72))  # > original_max_position_embeddings=64
    return tokens, hf_refs(llama_dir[1], tokens)


def test_logits_and_every_hook_match_transformers(llama_dir, llama_model, llama_refs):
    tokens, refs = llama_refs
    assert_matches_hf(llama_model, llama_dir[1], tokens, refs=refs)


def test_parity_gate_catches_a_1e4_weight_change(llama_dir, llama_model, llama_refs):
    """Layer 0's attention output projection x (1 + 1e-4): the gate must refuse it."""
    tokens, refs = llama_refs
    with pytest.raises(AssertionError, match="blocks.0.hook_attn_out"):
        assert_matches_hf(perturbed(llama_model, "blocks/o", layer=0), llama_dir[1], tokens, refs=refs)


def test_left_padding_matches_transformers_and_unpadded(llama_dir, llama_model):
    rng = np.random.default_rng(1)
    toks = rng.integers(3, 97, size=(2, 12))
    mask = np.ones_like(toks)
    mask[0, :5] = 0
    toks[0, :5] = 0
    assert_matches_hf(llama_model, llama_dir[1], toks, mask)
    names = all_hooks(llama_model.n_layers)
    lp, cp = llama_model.run(toks, attention_mask=mask, capture=names)
    lu, cu = llama_model.run(toks[:1, 5:], capture=names)
    assert rel_err(np.asarray(lp)[0, 5:], np.asarray(lu)[0]) <= RTOL
    for n in names:
        assert rel_err(np.asarray(cp[n])[0, 5:], np.asarray(cu[n])[0]) <= RTOL, n


def test_scan_equals_unroll_and_positions(llama_model):
    toks = np.random.default_rng(2).integers(3, 97, size=(2, 9))
    names = ("blocks.1.hook_resid_post", "ln_final.hook_normalized")
    l1, c1 = llama_model.run(toks, capture=names)
    l2, c2 = llama_model.run(toks, capture=names, unroll=True)
    assert rel_err(l1, l2) <= RTOL
    pos = np.array([[8, 3], [0, 5]])
    l3, c3 = llama_model.run(toks, capture=names, positions=pos)
    assert np.asarray(l3).shape == (2, 2, 97)
    for n in names:
        want = np.take_along_axis(np.asarray(c1[n]), pos[:, :, None], axis=1)
        assert rel_err(c3[n], want) <= RTOL


def test_kv_cache_decode_equals_full_forward(llama_model):
    cfg, params, fam = llama_model.config, llama_model.params, llama_model.family
    toks = jnp.asarray(np.random.default_rng(3).integers(3, 97, size=(2, 10)), jnp.int32)
    valid = jnp.ones((2, 10), bool).at[1, :3].set(False)
    spec = CaptureSpec()
    full, _, _, _ = jax.jit(lambda p, t, v: fam.forward(cfg, p, t, v, capture=spec))(params, toks, valid)
    step = jax.jit(lambda p, t, v, st, i: fam.forward(cfg, p, t, v, capture=spec, state=st, start=i))
    state = fam.init_state(cfg, 2, 10, jnp.float32)
    pre, _, _, state = step(params, toks[:, :7], valid[:, :7], state, jnp.int32(0))
    steps = [pre]
    for i in range(7, 10):
        out, _, _, state = step(params, toks[:, i:i + 1], valid[:, i:i + 1], state, jnp.int32(i))
        steps.append(out)
    inc = jnp.concatenate(steps, axis=1)
    m = np.asarray(valid)
    assert rel_err(np.asarray(inc)[m], np.asarray(full)[m]) <= RTOL


def _write_cfg(tmp_path, **over):
    from transformers import LlamaConfig
    d = json.loads(LlamaConfig(**LLAMA_KW).to_json_string())
    d.update(over)
    return d


@pytest.mark.parametrize("field,value", [("attention_bias", True), ("mlp_bias", True),
                                         ("some_new_field", 3), ("hidden_act", "gelu")])
def test_config_refusals(tmp_path, field, value):
    d = _write_cfg(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=field):
        llama.config_from_hf(d, source="x/config.json")


def test_rope_type_refused_and_v4_format_accepted(tmp_path):
    d = _write_cfg(tmp_path)
    d.pop("rope_parameters")
    d["rope_theta"] = 500000.0
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="yarn"):
        llama.config_from_hf(d, source="x/config.json")
    d["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}
    cfg = llama.config_from_hf(d, source="x/config.json")
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position, cfg.rope_base) == \
        ("llama3", 8.0, 8192, 500000.0)


def test_presets_shapes():
    p8 = llama.PRESETS["llama31-8b"]
    shapes = jax.eval_shape(lambda k: llama.init_params(p8, k, jnp.bfloat16), jax.random.PRNGKey(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert n == 8_030_261_248  # Llama-3.1-8B parameter count
    m = prefjax.load("llama31-tiny")
    logits, cache = m.run(np.array([[1, 5, 7]]), capture=("blocks.2.hook_resid_post",))
    assert np.asarray(logits).shape == (1, 3, 512) and np.isfinite(np.asarray(logits)).all()
