"""Qwen-3.5 (qwen3_5_moe / qwen3_5) port vs transformers, in float32 on the CPU.

Tiny random HF models go through ``save_pretrained`` -> prefjax load -> forward and are compared on
logits and every hook point (HF side captured with torch forward hooks). Weights get N(0, 0.05)
noise on top of HF's init so the zero-centred norms and every projection matter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import prefjax  # noqa: E402
from prefjax.hooks import BLOCK_POINTS, FINAL_HOOK, CaptureSpec, hook_name  # noqa: E402
from prefjax.models import deltanet as DN  # noqa: E402
from prefjax.models import moe as M  # noqa: E402
from prefjax.models import moe_layout as ML  # noqa: E402
from prefjax.models import moe_pallas as MP  # noqa: E402
from prefjax.models import qwen35 as Q  # noqa: E402

from hf_reference import assert_parity, float64_compute, float64_copy, forward_context, perturbed, to_numpy  # noqa: E402

TOL = 1e-5  # prefjax against itself (solvers, padding, decode, shards); against transformers: assert_parity
TEXT = dict(vocab_size=160, hidden_size=32, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
            linear_num_value_heads=4)
MOE = dict(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _perturb(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "A_log" in name or "dt_bias" in name:
                continue
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig
    torch.manual_seed(0)
    m = _perturb(Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**TEXT, **MOE)))
    d = tmp_path_factory.mktemp("q35moe")
    m.save_pretrained(d)
    return d, m


@pytest.fixture(scope="module")
def moe_model(moe_dir):
    return prefjax.load(moe_dir[0])


def hf_capture(m, ids, mask=None):
    """Run the HF model and record every prefjax hook point with torch forward hooks (wholly in
    float64, with float64 arrays, for a ``float64_copy``)."""
    rec = {}
    put = lambda k, v: rec.__setitem__(k, to_numpy(v[0] if isinstance(v, tuple) else v))
    hs = []
    for l, layer in enumerate(m.model.layers):
        mixer = layer.linear_attn if hasattr(layer, "linear_attn") else layer.self_attn
        hs.append(layer.register_forward_pre_hook(
            lambda mod, a, kw, l=l: put(hook_name(l, "hook_resid_pre"), kw.get("hidden_states", a[0] if a else None)),
            with_kwargs=True))
        hs.append(mixer.register_forward_hook(lambda mod, a, o, l=l: put(hook_name(l, "hook_attn_out"), o)))
        hs.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda mod, a, l=l: put(hook_name(l, "hook_resid_mid"), a[0])))
        hs.append(layer.mlp.register_forward_hook(lambda mod, a, o, l=l: put(hook_name(l, "hook_mlp_out"), o)))
        hs.append(layer.register_forward_hook(lambda mod, a, o, l=l: put(hook_name(l, "hook_resid_post"), o)))
    hs.append(m.model.norm.register_forward_hook(lambda mod, a, o: put(FINAL_HOOK, o)))
    try:
        with torch.no_grad(), forward_context(m):
            out = m(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                    output_hidden_states=True)
    finally:
        for h in hs:
            h.remove()
    return out, rec


def all_hooks(n_layers):
    return [hook_name(l, p) for l in range(n_layers) for p in BLOCK_POINTS] + [FINAL_HOOK]


def hf_refs(m, ids):
    """``(hf32, hf64)``: logits, every hook and ``hidden_states[i]`` from transformers in float32 and float64."""
    out = []
    for mm in (m, float64_copy(m)):
        o, rec = hf_capture(mm, ids)
        out.append({"logits": to_numpy(o.logits), **rec,
                    **{f"hidden_states[{i}]": to_numpy(h) for i, h in enumerate(o.hidden_states)}})
    return tuple(out)


def pj_arrays(model, ids, names):
    """prefjax's logits and hooks, plus ``hidden_states[L+1]`` = ``blocks.L.hook_resid_post`` for every
    block but the last (HF normalises its last hidden state)."""
    logits, cache = model.run(ids, capture=names)
    hs = {f"hidden_states[{l + 1}]": cache[hook_name(l, "hook_resid_post")] for l in range(model.n_layers - 1)}
    return {"logits": logits, **cache, **hs}


@pytest.fixture(scope="module")
def moe_refs(moe_dir):
    ids = np.random.RandomState(0).randint(0, TEXT["vocab_size"], (2, 150))  # > 2 chunks, not a multiple
    return ids, hf_refs(moe_dir[1], ids)


def test_moe_matches_transformers_logits_and_every_hook(moe_model, moe_refs):
    ids, (hf32, hf64) = moe_refs
    names = all_hooks(TEXT["num_hidden_layers"])
    assert set(names) <= set(hf32)
    got = pj_arrays(moe_model, ids, names)
    for n in names:
        assert got[n].shape == hf32[n].shape, n
    assert_parity(got, hf32, hf64)  # logits, every hook, resid_post == hidden_states[L+1]
    # the unrolled fold gives the same numbers
    lg_u, cache_u = moe_model.run(ids, capture=names[:7], unroll=True)
    np.testing.assert_allclose(np.asarray(lg_u), np.asarray(got["logits"]), rtol=0, atol=1e-6)
    for n in names[:7]:
        np.testing.assert_allclose(np.asarray(cache_u[n]), np.asarray(got[n]), rtol=0, atol=1e-6)


def test_parity_gate_catches_a_1e4_weight_change(moe_model, moe_refs):
    """Layer 0's (DeltaNet) output projection x (1 + 1e-4): the gate must refuse it."""
    assert 0 in moe_model.config.linear_layers
    ids, (hf32, hf64) = moe_refs
    bad = perturbed(moe_model, "lin/out", layer=0)
    with pytest.raises(AssertionError, match="blocks.0.hook_attn_out"):
        assert_parity(pj_arrays(bad, ids, all_hooks(TEXT["num_hidden_layers"])), hf32, hf64)


def test_dense_qwen35_matches_transformers(tmp_path):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    torch.manual_seed(1)
    cfg = dict(TEXT, num_hidden_layers=4, intermediate_size=40)
    m = _perturb(Qwen3_5ForCausalLM(Qwen3_5TextConfig(**cfg)), seed=1)
    m.save_pretrained(tmp_path)
    model = prefjax.load(tmp_path)
    assert not model.config.is_moe and model.config.d_ff == 40
    ids = np.random.RandomState(1).randint(0, cfg["vocab_size"], (2, 70))
    assert_parity(pj_arrays(model, ids, all_hooks(4)), *hf_refs(m, ids))


def test_multimodal_checkpoint_layout(tmp_path):
    """``model.language_model.*`` text weights, vision tower skipped, logits equal HF's."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration
    torch.manual_seed(2)
    text = dict(TEXT, num_hidden_layers=4, **MOE)
    cfg = Qwen3_5MoeConfig(text_config=text, vision_config=dict(depth=1, hidden_size=16, intermediate_size=16,
                                                                 num_heads=2, out_hidden_size=32))
    m = _perturb(Qwen3_5MoeForConditionalGeneration(cfg), seed=2)
    m.save_pretrained(tmp_path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" in hf_cfg and hf_cfg["model_type"] == "qwen3_5_moe"
    model = prefjax.load(tmp_path)
    ids = np.random.RandomState(2).randint(0, text["vocab_size"], (1, 40))
    refs = []
    for mm in (m, float64_copy(m)):
        with torch.no_grad(), forward_context(mm):
            refs.append({"logits": to_numpy(mm(input_ids=torch.tensor(ids)).logits)})
    logits, _ = model.run(ids)
    assert_parity({"logits": logits}, *refs)


def test_fused_expert_layout_loads_the_same(moe_dir, moe_model, tmp_path):
    from safetensors.numpy import load_file, save_file
    src, _ = moe_dir
    tensors = load_file(str(src / "model.safetensors"))
    e = MOE["num_experts"]
    fused = {}
    for k, v in tensors.items():
        if ".mlp.experts." not in k:
            fused[k] = v
    for l in range(TEXT["num_hidden_layers"]):
        p = f"model.layers.{l}.mlp.experts."
        fused[p + "gate_up_proj"] = np.stack([np.concatenate([tensors[p + f"{i}.gate_proj.weight"],
                                                              tensors[p + f"{i}.up_proj.weight"]], 0)
                                              for i in range(e)])
        fused[p + "down_proj"] = np.stack([tensors[p + f"{i}.down_proj.weight"] for i in range(e)])
    save_file(fused, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    model = prefjax.load(tmp_path)
    # every parameter (not only the experts) equals the per-expert load: one loader, two layouts
    chex.assert_trees_all_equal(model.params, moe_model.params)
    # a missing expert tensor is named
    del fused["model.layers.3.mlp.experts.down_proj"]
    save_file(fused, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.3.mlp.experts.down_proj"):
        prefjax.load(tmp_path)


def test_config_refuses_unknown_fields(moe_dir):
    hf = json.loads((moe_dir[0] / "config.json").read_text())
    cfg = Q.config_from_hf(hf)
    assert cfg.layer_types == Q.PRESETS["qwen35-moe-tiny"].layer_types
    assert cfg.rotary_dim == 4 and cfg.n_experts == MOE["num_experts"]
    with pytest.raises(ValueError, match="'sliding_window'"):
        Q.config_from_hf({**hf, "sliding_window": 128})
    with pytest.raises(ValueError, match="hidden_act"):
        Q.config_from_hf({**hf, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="rope_type"):
        Q.config_from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_delta_rule_chunked_equals_recurrent_and_transformers():
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as HM
    rs = np.random.RandomState(0)
    b, t, h, k, v = 2, 150, 4, 8, 6
    q, kk = rs.randn(b, t, h, k).astype(np.float32), rs.randn(b, t, h, k).astype(np.float32)
    vv = rs.randn(b, t, h, v).astype(np.float32)
    g = (-np.abs(rs.randn(b, t, h)) * 0.5).astype(np.float32)
    beta = (1 / (1 + np.exp(-rs.randn(b, t, h)))).astype(np.float32)
    s0 = rs.randn(b, h, k, v).astype(np.float32)
    oc, sc = DN.chunk_gated_delta_rule(q, kk, vv, g, beta, s0)
    orr, sr = DN.recurrent_gated_delta_rule(q, kk, vv, g, beta, s0)
    assert rel(oc, orr) <= TOL and rel(sc, sr) <= TOL
    refs = []
    for dt in (torch.float32, torch.float64):  # transformers' torch reference, in float32 and in float64
        T = lambda a: torch.tensor(a, dtype=dt)
        with (float64_compute() if dt == torch.float64 else contextlib.nullcontext()):
            ref_o, ref_s = HM.torch_chunk_gated_delta_rule(
                T(q), T(kk), T(vv), g=T(g), beta=T(beta), initial_state=T(s0), output_final_state=True,
                use_qk_l2norm_in_kernel=True)
        refs.append({"out": to_numpy(ref_o), "state": to_numpy(ref_s)})
    assert_parity({"out": oc, "state": sc}, *refs, label="triangular solve")
    ot, st_ = DN.chunk_gated_delta_rule(q, kk, vv, g, beta, s0, solve="doubling")  # the other solver
    assert_parity({"out": ot, "state": st_}, *refs, label="doubling solve")
    # its inverse on its own (the refinement step above would hide a poor one on this data): minus a
    # shift matrix makes every power up to A^63 count, so a missing doubling round shows
    shift = np.eye(64, k=-1)
    a = (np.tril(np.random.RandomState(5).randn(3, 64, 64), -1) * 0.01 - shift).astype(np.float32)
    want = np.linalg.inv(np.eye(64) + a.astype(np.float64))
    assert rel(DN.unit_lower_inverse(jnp.asarray(a)), want) <= TOL
    # the chunked form continues from its own state
    o1, s1 = DN.chunk_gated_delta_rule(q[:, :100], kk[:, :100], vv[:, :100], g[:, :100], beta[:, :100], s0)
    o2, s2 = DN.chunk_gated_delta_rule(q[:, 100:], kk[:, 100:], vv[:, 100:], g[:, 100:], beta[:, 100:], s1)
    assert rel(np.concatenate([o1, o2], 1), oc) <= TOL and rel(s2, sc) <= TOL


def test_moe_dense_and_grouped_agree(moe_model):
    rs = np.random.RandomState(3)
    n, d, e, f, k = 37, 16, 5, 12, 2
    x = jnp.asarray(rs.randn(n, d).astype(np.float32))
    gate, up = (jnp.asarray(rs.randn(e, d, f).astype(np.float32) * 0.3) for _ in range(2))
    down = jnp.asarray(rs.randn(e, f, d).astype(np.float32) * 0.3)
    w, i = M.route(x, jnp.asarray(rs.randn(d, e).astype(np.float32)), k)
    np.testing.assert_allclose(np.asarray(jnp.sum(w, -1)), 1.0, rtol=1e-6)
    a = M.experts_dense(x, w, i, gate, up, down)
    b = M.experts_grouped(x, w, i, gate, up, down)
    assert rel(b, a) <= TOL
    for block, chunk in ((4, 2), (8, 3), (64, 1)):  # blocks spanning chunk edges, one block per expert
        c = M.experts_blocked(x, w, i, gate, up, down, block=block, chunk=chunk)
        assert rel(c, a) <= TOL, (block, chunk)
    skew = jnp.zeros_like(i).at[:, 0].set(3)  # every token's first slot on one expert: a group > block
    c = M.experts_blocked(x, w, skew, gate, up, down, block=4, chunk=2)
    assert rel(c, M.experts_dense(x, w, skew, gate, up, down)) <= TOL
    # the Pallas kernels (interpreted here), at the decode block size and a larger one, and skewed
    for block in (16, 32):
        c = MP.experts_pallas(x, w, i, gate, up, down, block=block, interpret=True)
        assert rel(c, a) <= TOL, block
    c = MP.experts_pallas(x, w, skew, gate, up, down, block=16, interpret=True)
    assert rel(c, M.experts_dense(x, w, skew, gate, up, down)) <= TOL
    # the block bound is tight: 6 rows on 6 distinct experts of 64 need (and get) exactly 6 blocks,
    # every row gets its own slot, and an expert's block is its own
    few_i = jnp.arange(6, dtype=jnp.int32).reshape(3, 2) * 7
    lay = ML.block_layout(jnp.full((3, 2), 0.5), few_i, 64, 16)
    assert lay.n_blocks == 6 and int(lay.n_used) == 6
    placed = np.asarray(lay.src)[np.asarray(lay.src) < 6]
    assert sorted(placed.tolist()) == list(range(6))
    np.testing.assert_array_equal(np.asarray(lay.block_e), np.arange(6) * 7)
    # rows marked invalid (another device's experts) take no slot and add nothing
    valid = jnp.asarray(rs.rand(n, k) < 0.5)
    want = M.experts_dense(x, jnp.where(valid, w, 0), i, gate, up, down)
    for impl in ("blocked", "pallas", "dense", "grouped"):
        assert rel(M.run_experts(impl, x, w, i, (gate, up, down), jax.nn.silu, valid_NxK=valid), want) <= TOL, impl
    lay = ML.block_layout(w, i, e, 4, valid_NxK=valid)
    assert int((np.asarray(lay.src) < n * k).sum()) == int(valid.sum())
    # whole model: moe_impl="dense" gives the same logits as the default grouped path
    ids = np.random.RandomState(4).randint(0, TEXT["vocab_size"], (2, 30))
    lg_g, _ = moe_model.run(ids)
    dense = dataclasses.replace(moe_model, config=dataclasses.replace(moe_model.config, moe_impl="dense"))
    lg_d, _ = dense.run(ids)
    assert rel(lg_d, lg_g) <= TOL
    blocked = dataclasses.replace(moe_model, config=dataclasses.replace(moe_model.config, moe_impl="blocked"))
    lg_b, _ = blocked.run(ids)
    assert rel(lg_b, lg_g) <= TOL
    pallas = dataclasses.replace(moe_model, config=dataclasses.replace(moe_model.config, moe_impl="pallas"))
    lg_p, _ = pallas.run(ids)  # a layer scan: the kernels index the expert stacks with a traced layer
    assert rel(lg_p, lg_g) <= TOL
    from prefjax.hooks import CaptureSpec
    tok = jnp.asarray(ids, jnp.int32)
    for impl in ("pallas", "blocked"):  # unrolled: a static layer index
        cfg = dataclasses.replace(moe_model.config, moe_impl=impl)
        lg_u = Q.forward(cfg, moe_model.params, tok, jnp.ones(tok.shape, bool), capture=CaptureSpec(),
                         unroll=True)[0]
        assert rel(lg_u, lg_g) <= TOL, impl


def test_left_padding_equals_each_example_alone(moe_model):
    rs = np.random.RandomState(5)
    lens = (150, 77)
    t = max(lens)
    toks = np.zeros((2, t), np.int32)
    mask = np.zeros((2, t), np.int32)
    seqs = [rs.randint(1, TEXT["vocab_size"], n) for n in lens]
    for b, s in enumerate(seqs):
        toks[b, t - len(s):] = s
        mask[b, t - len(s):] = 1
    names = [hook_name(l, "hook_resid_post") for l in range(TEXT["num_hidden_layers"])]
    lg, cache = moe_model.run(toks, attention_mask=mask, capture=names)
    for b, s in enumerate(seqs):
        lg1, c1 = moe_model.run(s[None], capture=names)
        assert rel(np.asarray(lg)[b, t - len(s):], np.asarray(lg1)[0]) <= TOL
        for n in names:
            assert rel(np.asarray(cache[n])[b, t - len(s):], np.asarray(c1[n])[0]) <= TOL, (b, n)


def test_decode_with_state_equals_full_recomputation(moe_model):
    """Greedy decode by single-token forwards with state == one full forward over the result."""
    cfg, params = moe_model.config, moe_model.params
    rs = np.random.RandomState(6)
    prompt_len, steps, max_len = 70, 6, 80
    toks = np.zeros((2, prompt_len), np.int32)
    valid = np.zeros((2, prompt_len), bool)
    for b, n in enumerate((70, 45)):  # left padding in the prompt batch
        toks[b, prompt_len - n:] = rs.randint(1, cfg.vocab_size, n)
        valid[b, prompt_len - n:] = True
    fwd = jax.jit(lambda p, t, v, st, start: Q.forward(cfg, p, t, v, capture=CaptureSpec(), state=st, start=start))
    state = Q.init_state(cfg, 2, max_len, jnp.float32)
    lg, _, _, state = fwd(params, jnp.asarray(toks), jnp.asarray(valid), state, jnp.int32(0))
    step_logits = [np.asarray(lg)[:, -1]]
    seq = toks
    for i in range(steps):
        nxt = np.argmax(step_logits[-1], -1).astype(np.int32)
        seq = np.concatenate([seq, nxt[:, None]], 1)
        lg, _, _, state = fwd(params, jnp.asarray(nxt[:, None]), jnp.ones((2, 1), bool), state,
                              jnp.int32(prompt_len + i))
        step_logits.append(np.asarray(lg)[:, -1])
    full, _ = moe_model.run(seq, attention_mask=np.concatenate([valid, np.ones((2, steps), bool)], 1))
    full = np.asarray(full)
    for i, got in enumerate(step_logits):
        assert rel(got, full[:, prompt_len - 1 + i]) <= TOL, i
    np.testing.assert_array_equal(np.argmax(full[:, prompt_len - 1:-1], -1), seq[:, prompt_len:])


def _analytic_count(c):
    d, v = c.d_model, c.vocab_size
    nl, nf = len(c.linear_layers), len(c.full_layers)
    kd, vd = c.lin_n_k_heads * c.lin_k_dim, c.lin_n_v_heads * c.lin_v_dim
    lin = d * (2 * kd + vd) + c.lin_conv_kernel * (2 * kd + vd) + d * vd + 2 * d * c.lin_n_v_heads \
        + 2 * c.lin_n_v_heads + c.lin_v_dim + vd * d
    full = d * c.n_heads * c.head_dim * 2 + 2 * d * c.n_kv_heads * c.head_dim + c.n_heads * c.head_dim * d \
        + 2 * c.head_dim
    ffn = d * c.n_experts + c.n_experts * 3 * d * c.d_expert + 3 * d * c.d_shared + d
    return 2 * v * d + d + c.n_layers * (2 * d + ffn) + nl * lin + nf * full


def test_122b_preset_parameter_count():
    cfg = Q.PRESETS["qwen35-122b-a10b"]
    shapes = jax.eval_shape(lambda k: Q.init_params(cfg, k, jnp.bfloat16), jax.random.PRNGKey(0))
    count = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes))
    assert count == _analytic_count(cfg) == Q.param_count(cfg) == 122_111_526_912
    sh = Q.param_shapes(cfg)
    assert sh["blocks/experts_gate"][1][1] == "experts" and sh["blocks/experts_gate"][1][3] == "expert_mlp"


_SHARDED = textwrap.dedent("""
    import dataclasses, json, sys
    import numpy as np, jax
    jax.config.update("jax_default_matmul_precision", "highest")
    assert len(jax.devices()) == 8, jax.devices()
    from prefjax.sharding import make_mesh
    import prefjax
    from prefjax.models import moe as M, qwen35 as Q
    calls = []
    ep = M.experts_parallel
    M.experts_parallel = lambda *a, **k: calls.append(k["impl"]) or ep(*a, **k)
    mesh = make_mesh({"data": 2, "tensor": 2, "expert": 2})
    model = prefjax.load(sys.argv[1], mesh=mesh)
    spec = model.params["blocks"]["experts_gate"].sharding.spec
    assert "expert" in str(spec) and "tensor" in str(spec), spec
    ids = np.load(sys.argv[2])
    out = {}
    for impl in ("grouped", "blocked", "pallas"):
        m = dataclasses.replace(model, config=dataclasses.replace(model.config, moe_impl=impl))
        # unroll: XLA:CPU's in-process collectives deadlock inside scan/cond on a 2-core host
        lg, cache = m.run(ids, capture=["blocks.5.hook_resid_post"], unroll=True)
        out[impl] = np.asarray(lg)
    # 3 rows do not split over data x expert: the tokens stay whole and the expert axis is psum'd
    out["odd_batch"] = np.asarray(model.run(ids[:3], unroll=True)[0])
    assert set(calls) == {"grouped", "blocked", "pallas"}, calls  # each ran expert-parallel
    np.savez(sys.argv[3], **out)
""")


def test_batch_splits_over_data_and_expert_axes():
    """The expert devices also split the batch (attention and DeltaNet run data-parallel there);
    a batch that does not divide is replicated rather than split unevenly."""
    from jax.sharding import AbstractMesh

    from prefjax.sharding import MESH_AXES, batch_axes, batch_multiple, spec_for
    mesh = AbstractMesh((2, 1, 2, 4), MESH_AXES)  # data, fsdp, tensor, expert
    assert batch_axes(mesh) == ("data", "expert") and batch_multiple(mesh) == 8
    assert spec_for((16, 5), ("batch", None), mesh)[0] == ("data", "expert")
    assert spec_for((6, 5), ("batch", None), mesh)[0] is None
    assert batch_axes(None) == () and batch_multiple(None) == 1


def test_sharded_on_8_fake_devices_equals_one_device(moe_dir, moe_model, tmp_path):
    """A 2 x 2 x 2 (data, tensor, expert) mesh: the experts run expert- and tensor-parallel under
    shard_map for every expert path (Pallas interpreted) and equal one device. Batch 4 splits over
    data x expert (expert shards all-gather tokens, psum_scatter back); batch 3 cannot (psum)."""
    ids = np.random.RandomState(7).randint(0, TEXT["vocab_size"], (4, 70)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = tmp_path / "run.py"
    script.write_text(_SHARDED)
    r = subprocess.run([sys.executable, str(script), str(moe_dir[0]), str(tmp_path / "ids.npy"),
                        str(tmp_path / "out.npz")], env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    ref, _ = moe_model.run(ids)
    got = np.load(tmp_path / "out.npz")
    for impl in ("grouped", "blocked", "pallas"):
        assert rel(got[impl], ref) <= TOL, impl
    assert rel(got["odd_batch"], moe_model.run(ids[:3])[0]) <= TOL


def test_prefjax_load_entry_point(moe_dir, moe_model):
    import prefjax
    model = prefjax.load(moe_dir[0])
    ids = np.arange(20)[None] % TEXT["vocab_size"]
    np.testing.assert_array_equal(np.asarray(model.run(ids)[0]), np.asarray(moe_model.run(ids)[0]))
