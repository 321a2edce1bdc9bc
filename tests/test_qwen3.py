"""Qwen-3 dense port vs transformers (float32), via save_pretrained -> prefjax.load."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import prefjax
from prefjax.models import qwen3

from hf_reference import assert_parity, perturbed
from test_llama import RTOL, all_hooks, assert_matches_hf, hf_refs, randomize_, rel_err

jax.config.update("jax_default_matmul_precision", "highest")

QWEN_KW = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
               tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})


def _hf(tie=False, seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen3Config(**{**QWEN_KW, "tie_word_embeddings": tie})
    cfg._attn_implementation = "eager"
    return randomize_(Qwen3ForCausalLM(cfg).eval(), seed)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    hf = _hf()
    d = tmp_path_factory.mktemp("qwen3")
    hf.save_pretrained(d)
    return d, hf


@pytest.fixture(scope="module")
def qwen_model(qwen_dir):
    return prefjax.load(qwen_dir[0])


def test_loaded_config(qwen_model):
    cfg = qwen_model.config
    assert qwen_model.family.name == "qwen3"
    assert cfg.qk_norm and not cfg.tie_embeddings and cfg.has_lm_head
    assert (cfg.head_dim, cfg.rope_base) == (16, 1_000_000.0)  # head_dim != d_model / n_heads
    assert "q_norm" in qwen_model.params["blocks"]


@pytest.fixture(scope="module")
def qwen_refs(qwen_dir):
    toks = np.random.default_rng(0).integers(0, 101, size=(2, 24))
    return toks, hf_refs(qwen_dir[1], toks)


def test_logits_and_every_hook_match_transformers(qwen_dir, qwen_model, qwen_refs):
    toks, refs = qwen_refs
    assert_matches_hf(qwen_model, qwen_dir[1], toks, refs=refs)


def test_parity_gate_catches_a_1e4_weight_change(qwen_dir, qwen_model, qwen_refs):
    """Layer 0's attention output projection x (1 + 1e-4): the gate must refuse it."""
    toks, refs = qwen_refs
    with pytest.raises(AssertionError, match="blocks.0.hook_attn_out"):
        assert_matches_hf(perturbed(qwen_model, "blocks/o", layer=0), qwen_dir[1], toks, refs=refs)


def test_left_padding(qwen_dir, qwen_model):
    toks = np.random.default_rng(1).integers(0, 101, size=(3, 10))
    mask = np.ones_like(toks)
    mask[1, :4] = 0
    mask[2, :1] = 0
    assert_matches_hf(qwen_model, qwen_dir[1], toks, mask)
    names = all_hooks(qwen_model.n_layers)
    lp, cp = qwen_model.run(toks, attention_mask=mask, capture=names)
    lu, cu = qwen_model.run(toks[1:2, 4:], capture=names)
    assert rel_err(np.asarray(lp)[1, 4:], np.asarray(lu)[0]) <= RTOL
    for n in names:
        assert rel_err(np.asarray(cp[n])[1, 4:], np.asarray(cu[n])[0]) <= RTOL, n


def test_tied_embeddings(tmp_path):
    hf = _hf(tie=True, seed=1)
    hf.save_pretrained(tmp_path)
    m = prefjax.load(tmp_path)
    assert m.config.tie_embeddings and "unembed" not in m.params
    assert_matches_hf(m, hf, np.random.default_rng(2).integers(0, 101, size=(1, 9)))


def test_embedding_checkpoint_without_lm_head(tmp_path):
    """A bare ``Qwen3Model`` checkpoint (how Qwen3-Embedding ships): loads, no logits, hooks still match."""
    from transformers import Qwen3Config, Qwen3Model
    torch.manual_seed(3)
    cfg = Qwen3Config(**QWEN_KW)
    cfg._attn_implementation = "eager"
    hf = randomize_(Qwen3Model(cfg).eval(), 3)
    hf.save_pretrained(tmp_path)
    m = prefjax.load(tmp_path)
    assert not m.config.has_lm_head and "unembed" not in m.params
    toks = np.random.default_rng(4).integers(0, 101, size=(1, 7))
    with pytest.raises(ValueError, match="no lm_head"):
        m.run(toks)
    _, cache = m.run(toks, capture=("ln_final.hook_normalized",), logits=False)
    hf32, hf64 = hf_refs(hf, toks)  # no logits; hidden_states[-1] is last_hidden_state
    last = f"hidden_states[{m.n_layers}]"
    assert "logits" not in hf32
    assert_parity({n: cache["ln_final.hook_normalized"] for n in ("ln_final.hook_normalized", last)}, hf32, hf64)


def _cfg_dict(**over):
    from transformers import Qwen3Config
    d = json.loads(Qwen3Config(**QWEN_KW).to_json_string())
    d.update(over)
    return d


@pytest.mark.parametrize("field,value", [("attention_bias", True), ("use_sliding_window", True),
                                         ("layer_types", ["sliding_attention"] * 3), ("mystery", 1)])
def test_config_refusals(field, value):
    with pytest.raises(ValueError, match=field):
        qwen3.config_from_hf(_cfg_dict(**{field: value}), source="x/config.json")


def test_presets():
    e8 = qwen3.PRESETS["qwen3-embedding-8b"]
    assert not e8.has_lm_head and e8.qk_norm
    shapes = jax.eval_shape(lambda k: qwen3.FAMILY.init_params(e8, k, jnp.bfloat16), jax.random.PRNGKey(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert 7.5e9 < n < 7.6e9  # Qwen3-Embedding-8B: ~7.57B parameters without lm_head
    m = prefjax.load("qwen3-tiny")
    logits, _ = m.run(np.array([[1, 2, 3]]))
    assert np.asarray(logits).shape == (1, 3, 512) and np.isfinite(np.asarray(logits)).all()
