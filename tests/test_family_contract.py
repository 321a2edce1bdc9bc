"""The model-family contract (prefjax.models.family): the declared table, named forward outputs, the
chex checks at the boundary, the one HF loader (per-layer row maps, multi-tensor rows) and the one
random-init path."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prefjax
import prefjax.model as model_mod
from prefjax.checkpoints.hf import CheckpointError, HFMulti, load_params, nest_paths
from prefjax.hooks import CaptureSpec
from prefjax.model import Model
from prefjax.models import FAMILIES, MODEL_TYPES, family_for_model_type, family_for_preset, gemma3, llama, qwen3
from prefjax.models.family import KV_LAYOUT, Family, ModelFamily, StateLayout
from prefjax.models.stack import ForwardOut

TINY = {"gemma3": "gemma3-tiny", "llama": "llama31-tiny", "qwen3": "qwen3-tiny", "qwen35": "qwen35-tiny"}


class DictSource:
    """A TensorSource over a dict of numpy arrays."""

    def __init__(self, tensors):
        self.tensors = tensors

    def names(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def get(self, name):
        return self.tensors[name]


def test_table_is_declared_and_complete():
    assert set(FAMILIES) == {"gemma3", "llama", "qwen3", "qwen35", "gemma3_planted"}
    for name, fam in FAMILIES.items():
        assert isinstance(fam, Family) and fam.name == name
        for field in ModelFamily.__annotations__:  # every declared part of the contract is there
            assert hasattr(fam, field), (name, field)
        for preset in fam.presets:
            assert family_for_preset(preset) is fam
    for mt, name in MODEL_TYPES.items():
        assert family_for_model_type(mt) is FAMILIES[name]
    with pytest.raises(TypeError):
        FAMILIES["other"] = FAMILIES["llama"]  # built at import, never filled at run time
    assert not hasattr(model_mod, "_FAMILIES") and not hasattr(model_mod, "register_family")
    assert qwen3.FAMILY.forward_fn is llama.forward and qwen3.FAMILY.presets is qwen3.PRESETS
    assert FAMILIES["gemma3"].hf_config is gemma3.hf_config and FAMILIES["llama"].hf_config is None
    assert [f.plain_kv_state for f in FAMILIES.values()] == [True, True, True, False, False]


@pytest.mark.parametrize("name", sorted(TINY))
def test_state_layout_names_every_leaf_of_the_decode_state(name):
    fam = FAMILIES[name]
    cfg = fam.presets[TINY[name]]
    state = jax.eval_shape(lambda: fam.init_state(cfg, 3, 5, jnp.float32))
    layout = fam.state_layout
    assert set(state) == layout.leaves() and not set(layout.slot_leaves) & set(layout.row_leaves)
    for k in layout.slot_leaves:  # [layers, B, S, ...]
        assert state[k].shape[1:3] == (3, 5), k
    for k in layout.row_leaves:  # [layers, B, ...]
        assert state[k].shape[1] == 3, k
    assert (layout == KV_LAYOUT) == fam.plain_kv_state
    assert FAMILIES["gemma3_planted"].state_layout is None  # no decode state
    with pytest.raises(ValueError, match="a plain KV state has the layout"):
        dataclasses.replace(fam, plain_kv_state=True, state_layout=StateLayout(row_leaves=("rec",)))


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model preset 'gemma4-tiny'.*gemma3-tiny"):
        family_for_preset("gemma4-tiny")
    with pytest.raises(ValueError, match="x/config.json: model_type 'mistral' is not supported"):
        family_for_model_type("mistral", source="x/config.json")
    with pytest.raises(TypeError, match="Model.family must be a prefjax.models.family.Family"):
        Model(gemma3, gemma3.PRESETS["gemma3-tiny"], {})  # a module is not a family any more


@pytest.mark.parametrize("name", sorted(TINY))
def test_init_matches_param_shapes_and_is_reproducible(name):
    fam = FAMILIES[name]
    cfg = fam.presets[TINY[name]]
    want = nest_paths({p: jax.ShapeDtypeStruct(s, jnp.bfloat16) for p, (s, _) in fam.param_shapes(cfg).items()})
    got = jax.eval_shape(lambda k: fam.init_params(cfg, k, jnp.bfloat16), jax.random.PRNGKey(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    a = fam.init_params(cfg, jax.random.PRNGKey(1))
    chex.assert_trees_all_equal(a, fam.init_params(cfg, jax.random.PRNGKey(1)))
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(a, fam.init_params(cfg, jax.random.PRNGKey(2)))


def test_norm_laws_follow_each_family():
    """Zero-centred ``1 + w`` norms start near 0, plain ``w`` norms near 1 (one init path, declared laws)."""
    g = gemma3.init_params(gemma3.PRESETS["gemma3-tiny"], jax.random.PRNGKey(0))
    l_ = llama.init_params(llama.PRESETS["llama31-tiny"], jax.random.PRNGKey(0))
    q = FAMILIES["qwen35"].init_params(FAMILIES["qwen35"].presets["qwen35-tiny"], jax.random.PRNGKey(0))
    assert abs(float(jnp.mean(g["blocks"]["ln_attn"]))) < 0.05
    assert abs(float(jnp.mean(l_["blocks"]["ln_attn"])) - 1.0) < 0.05
    assert abs(float(jnp.mean(q["lin"]["norm"])) - 1.0) < 0.05
    a = np.exp(np.asarray(q["lin"]["A_log"]))
    assert a.min() >= 1.0 and a.max() <= 16.0


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_returns_named_outputs_that_unpack_as_before(name):
    fam = FAMILIES[name]
    cfg = fam.presets[TINY[name]]
    params = fam.init_params(cfg, jax.random.PRNGKey(0))
    toks = jnp.array([[3, 4, 5, 6], [7, 8, 9, 10]], jnp.int32)
    valid = jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]], bool)
    spec = CaptureSpec.from_names(["blocks.0.hook_resid_post", "ln_final.hook_normalized"], cfg.n_layers)
    pos = jnp.array([[3], [2]], jnp.int32)
    out = jax.jit(lambda p: fam.forward(cfg, p, toks, valid, capture=spec, pos_BxK=pos))(params)
    assert isinstance(out, ForwardOut) and out.state is None
    logits, captured, h, state = out  # the 4-tuple callers unpack
    assert logits.shape == (2, 1, cfg.vocab_size) and h.shape == (2, 1, cfg.d_model)
    chex.assert_trees_all_close(captured["ln_final.hook_normalized"], h)
    st = fam.init_state(cfg, 2, 6, jnp.float32)
    out2 = fam.forward(cfg, params, toks, valid, capture=CaptureSpec(), state=st, logits=False)
    assert out2.logits is None
    chex.assert_trees_all_equal_shapes_and_dtypes(out2.state, st)
    # the same last-token state as the plain run
    chex.assert_trees_all_close(out2.h[:, -1], fam.forward(cfg, params, toks, valid, capture=CaptureSpec()).h[:, -1],
                                atol=1e-5, rtol=1e-5)


def test_contract_checks_name_the_family_and_the_input():
    fam = FAMILIES["gemma3"]
    cfg = fam.presets["gemma3-tiny"]
    params = fam.init_params(cfg, jax.random.PRNGKey(0))
    toks = jnp.ones((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="gemma3.forward: bad input"):
        fam.forward(cfg, params, toks.astype(jnp.float32), jnp.ones((2, 3), bool), capture=CaptureSpec())
    with pytest.raises(ValueError, match="gemma3.forward: bad input"):
        fam.forward(cfg, params, toks, jnp.ones((2, 4), bool), capture=CaptureSpec())
    with pytest.raises(ValueError, match="gemma3.forward: bad input"):
        fam.forward(cfg, params, toks, jnp.ones((2, 3), bool), capture=CaptureSpec(), pos_BxK=jnp.zeros((3, 1), int))

    def broken(*a, **kw):  # a port whose h lost a dimension
        out = gemma3.forward(*a, **kw)
        return out._replace(h=out.h[:, 0])

    bad = dataclasses.replace(fam, forward_fn=broken)
    with pytest.raises(AssertionError, match="gemma3.forward broke the family contract"):
        jax.jit(lambda p: bad.forward(cfg, p, toks, jnp.ones((2, 3), bool), capture=CaptureSpec()))(params)


def _hf_tensors(cfg, params):
    return {name: arr for name, arr in gemma3.params_to_hf(cfg, params)}


def test_one_loader_round_trips_gemma3():
    cfg = gemma3.PRESETS["gemma3-tiny"]
    params = gemma3.init_params(cfg, jax.random.PRNGKey(5))
    src = DictSource(_hf_tensors(cfg, params))
    loaded = load_params(gemma3.FAMILY, cfg, src, dtype=jnp.float32)
    chex.assert_trees_all_equal(loaded, params)
    # a prefix the family declares (the multimodal checkpoint's) finds the same weights
    mm = DictSource({("model.language_model." + k[len("model."):]): v for k, v in src.tensors.items()})
    chex.assert_trees_all_equal(load_params(gemma3.FAMILY, cfg, mm, dtype=jnp.float32), params)
    extra = DictSource({**src.tensors, "model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="1 tensor\\(s\\) the gemma3 port would ignore"):
        load_params(gemma3.FAMILY, cfg, extra)


def test_one_loader_maps_layer_subsets_and_multi_tensor_rows():
    """A family whose ``up`` rows are each two HF tensors (HFMulti) and whose stacked rows come from the HF
    layers in reverse order (layer_rows): the loader follows both, as it does for Qwen-3.5's attention
    subsets and per-expert checkpoints."""
    cfg = gemma3.PRESETS["gemma3-tiny"]
    params = gemma3.init_params(cfg, jax.random.PRNGKey(6))
    tensors = _hf_tensors(cfg, params)
    n, half = cfg.n_layers, cfg.d_ff // 2
    for l in range(n):  # torch layout [out=d_ff, in=d]: split the rows in two tensors
        w = tensors.pop(f"model.layers.{l}.mlp.up_proj.weight")
        tensors[f"model.layers.{l}.mlp.up_a.weight"], tensors[f"model.layers.{l}.mlp.up_b.weight"] = w[:half], w[half:]

    def hf_names(c, has=None):
        names = gemma3.hf_names(c)
        names["blocks/up"] = (HFMulti(("model.layers.{l}.mlp.up_a.weight", "model.layers.{l}.mlp.up_b.weight"),
                                      lambda ws: (np if isinstance(ws[0], np.ndarray) else jnp).concatenate(ws)),
                              lambda w: w.T)
        return names

    fam = dataclasses.replace(gemma3.FAMILY, name="split", hf_names=hf_names,
                              layer_rows=lambda c, path: tuple(reversed(range(c.n_layers))))
    loaded = load_params(fam, cfg, DictSource(tensors), dtype=jnp.float32)
    flipped = {**params, "blocks": jax.tree_util.tree_map(lambda a: a[::-1], params["blocks"])}
    chex.assert_trees_all_equal(loaded, flipped)
    del tensors["model.layers.2.mlp.up_b.weight"]
    with pytest.raises(CheckpointError, match="'model.layers.2.mlp.up_b.weight' \\(for blocks/up\\) is missing"):
        load_params(fam, cfg, DictSource(tensors))


def test_model_passes_its_family_as_a_static_argument():
    m = prefjax.load("llama31-tiny")
    assert m.family is FAMILIES["llama"]
    ids = np.array([[5, 6, 7]], np.int32)
    logits, _ = m.run(ids)
    out = FAMILIES["llama"].forward(m.config, m.params, jnp.asarray(ids), jnp.ones((1, 3), bool), capture=CaptureSpec())
    chex.assert_trees_all_close(logits, out.logits, atol=1e-5, rtol=1e-5)
