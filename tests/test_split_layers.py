"""Weights split into one buffer per layer (``Model.split_layers``, ``stack.split_layers``): the same numbers as the stacked
weights in both layer loops, and no per-layer slice of a stacked weight left in the unrolled program (the
slices XLA copies before each cuBLAS matmul on a GPU; BUILD_NOTES, seventh session)."""

import jax
import numpy as np

import prefjax
from prefjax.models.stack import PerLayer


def _weight_slices(jaxpr):
    """Equations slicing or indexing one of the program's inputs (the weights) directly."""
    inputs = set(jaxpr.invars)
    return sum(1 for eqn in jaxpr.eqns
               if eqn.primitive.name in ("slice", "dynamic_slice", "gather") and eqn.invars[0] in inputs)


def test_split_weights_same_numbers_and_no_stack_slices():
    model = prefjax.load("gemma3-tiny")
    cfg = model.config
    blocks = model.params["blocks"]
    split_model = prefjax.load("gemma3-tiny").split_layers()  # its own copy: the split donates the stack
    leaves = jax.tree_util.tree_leaves(split_model.params["blocks"], is_leaf=lambda a: isinstance(a, PerLayer))
    assert leaves and all(isinstance(a, PerLayer) and len(a) == cfg.n_layers for a in leaves)
    for a, b in zip(leaves, jax.tree_util.tree_leaves(blocks)):
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))

    ids = np.random.RandomState(0).randint(3, cfg.vocab_size, size=(2, 9))
    names = model.hook_names()
    want_logits, want = model.run(ids, capture=names, unroll=True)
    for unroll in (True, False):  # split weights run unrolled either way (fold), so both equal that bit for bit
        got_logits, got = split_model.run(ids, capture=names, unroll=unroll)
        np.testing.assert_array_equal(np.asarray(got_logits), np.asarray(want_logits))
        for n in names:
            np.testing.assert_array_equal(np.asarray(got[n]), np.asarray(want[n]))

    def fwd(params, unroll=True):
        return model.family.forward(cfg, params, ids, np.ones(ids.shape, bool), capture=prefjax.hooks.CaptureSpec(),
                                    unroll=unroll).logits
    n_weights = len(jax.tree_util.tree_leaves(blocks))
    assert _weight_slices(jax.make_jaxpr(fwd)(model.params).jaxpr) >= n_weights * cfg.n_layers
    assert _weight_slices(jax.make_jaxpr(fwd)(split_model.params).jaxpr) == 0
    # asked for a scan, split weights still run the layer loop unrolled: no scan that would restack them
    prims = lambda params: {e.primitive.name for e in jax.make_jaxpr(lambda p: fwd(p, False))(params).jaxpr.eqns}
    assert "scan" in prims(model.params) and "scan" not in prims(split_model.params)


def test_engine_with_split_weights_samples_the_same_tokens():
    # the engine's GPU layout with split weights: unrolled step and prefills reading per-layer buffers
    from prefjax.engine import Engine, Request
    model = prefjax.load("gemma3-tiny")
    split_model = prefjax.load("gemma3-tiny").split_layers()
    rs = np.random.RandomState(3)
    reqs = [Request(list(rs.randint(3, model.config.vocab_size, size=n)), m, n_samples=2)
            for n, m in ((7, 5), (11, 3), (4, 6))]
    engines = [Engine(m, rows=4, temperature=1.0, seed=0, stop_ids=(), unroll=True) for m in (model, split_model)]
    assert [e.prefill_unroll for e in engines] == [False, True]  # split weights: unrolled prefills by default
    got = [e.run(reqs) for e in engines]
    assert [[s.token_ids for s in r] for r in got[0]] == [[s.token_ids for s in r] for r in got[1]]


def test_layer_split_setting_and_readout_gradient():
    import pytest
    from prefjax.model import apply_layer_split
    from prefjax.steering import readout_gradient
    model = prefjax.load("gemma3-tiny")
    assert apply_layer_split(model, "auto") is model  # this machine's JAX runs on the CPU: auto leaves the stack
    assert apply_layer_split(model, "off") is model
    with pytest.raises(ValueError, match="split_layers setting 'yes'"):
        apply_layer_split(model, "yes")
    moe = prefjax.load("qwen35-moe-tiny")
    assert apply_layer_split(moe, "auto") is moe
    with pytest.raises(ValueError, match="qwen35-moe-tiny: split_layers: the MoE expert kernels"):
        apply_layer_split(moe, "on")

    rs = np.random.RandomState(2)
    ids = rs.randint(3, model.config.vocab_size, size=(2, 6))
    args = (ids, None, np.array([5, 4]), np.ones(ids.shape, np.float32), 3,
            rs.normal(size=(2, model.config.vocab_size)))
    want = readout_gradient(model, *args)
    split = apply_layer_split(prefjax.load("gemma3-tiny"), "on")
    assert any(isinstance(a, PerLayer) for a in jax.tree_util.tree_leaves(
        split.params, is_leaf=lambda a: isinstance(a, PerLayer)))
    # the split model's backward runs unrolled, the stacked one's scanned: float32 sums in another order
    # (5e-7 of a gradient whose largest entry is ~0.8); a wrong layer's weights would move it by O(1)
    np.testing.assert_allclose(readout_gradient(split, *args), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_every_dense_family_gives_the_same_logits_split():
    for name in ("llama31-tiny", "qwen3-tiny", "qwen35-tiny"):
        ids = np.random.RandomState(0).randint(3, 200, size=(2, 7))
        # unrolled: each layer's own buffers (the scanned call is covered by the Gemma test above)
        want, _ = prefjax.load(name).run(ids, unroll=True)
        got, _ = prefjax.load(name).split_layers().run(ids, unroll=True)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
