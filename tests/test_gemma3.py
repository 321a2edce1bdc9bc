"""Gemma-3 port vs transformers, through the real file path (save_pretrained -> prefjax.load)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import prefjax
from prefjax.hooks import BLOCK_POINTS, HookError, hook_name
from hf_reference import assert_parity, collect, float64_copy, perturbed, rel_err

TOL = 1e-5  # prefjax against itself (padding, positions); against transformers: hf_reference.assert_parity


def make_hf(tmp_path, *, kv_heads=2, window=6, layers=7, scaling=True, seed=0, vocab=320):
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=kv_heads, head_dim=16, sliding_window=window, query_pre_attn_scalar=24,
              max_position_embeddings=512, attn_implementation="eager")
    if scaling:
        kw["rope_scaling"] = {"rope_type": "linear", "factor": 8.0}
    cfg = Gemma3TextConfig(**kw)
    torch.manual_seed(seed)
    m = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms are zero-initialised in HF; give them content so (1 + w) matters
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.5)
    path = tmp_path / f"gemma3_kv{kv_heads}"
    m.save_pretrained(path)
    return m, path


def all_hooks(n_layers):
    return tuple(hook_name(l, p) for l in range(n_layers) for p in BLOCK_POINTS) + ("ln_final.hook_normalized",)


def hf_refs(hf, ids, **kw):
    """``(hf32, hf64)``: logits and every hook from transformers in float32 and in float64."""
    out = []
    for m in (hf, float64_copy(hf)):
        logits, ref = collect(m, ids, layers=m.model.layers, final_norm=m.model.norm, **kw)
        out.append({"logits": logits, **ref})
    return tuple(out)


def pj_run(pm, ids, **kw):
    logits, cache = pm.run(ids, capture=all_hooks(pm.n_layers), **kw)
    return {"logits": logits, **cache}


@pytest.fixture(scope="module")
def gemma_case(tmp_path_factory):
    """``case(kv_heads) -> (pm, ids, hf32, hf64)``, built once per module and kv_heads."""
    cache = {}

    def case(kv_heads):
        if kv_heads not in cache:
            hf, path = make_hf(tmp_path_factory.mktemp(f"kv{kv_heads}"), kv_heads=kv_heads)
            pm = prefjax.load(path)
            ids = np.random.RandomState(1).randint(0, 320, size=(2, 29))  # 29 > sliding window 6
            cache[kv_heads] = (pm, ids, *hf_refs(hf, ids))
        return cache[kv_heads]
    return case


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_every_hook_matches_transformers(gemma_case, kv_heads):
    pm, ids, hf32, hf64 = gemma_case(kv_heads)
    assert pm.tokenizer is None  # tiny checkpoints carry no tokenizer files
    got = pj_run(pm, ids)
    assert len(got) == 1 + 7 * len(BLOCK_POINTS) + 1
    assert_parity(got, hf32, hf64)


def test_parity_gate_catches_a_1e4_weight_change(gemma_case):
    """Layer 0's post-attention norm weight x (1 + 1e-4): the gate must refuse it."""
    pm, ids, hf32, hf64 = gemma_case(2)
    with pytest.raises(AssertionError, match="blocks.0.hook_attn_out"):
        assert_parity(pj_run(perturbed(pm, "blocks/ln_post_attn", layer=0), ids), hf32, hf64)


def test_hidden_states_correspondence(tmp_path):
    """blocks.L.hook_resid_post == HF hidden_states[L+1] except the last, which HF normalises."""
    hf, path = make_hf(tmp_path)
    pm = prefjax.load(path)
    ids = np.random.RandomState(2).randint(0, 320, size=(1, 12))
    hs32, hs64 = (collect(m, ids, layers=m.model.layers, hidden_states=True)[2] for m in (hf, float64_copy(hf)))
    _, cache = pm.run(ids, capture=pm.hook_names() + ("blocks.0.hook_resid_pre", "ln_final.hook_normalized"))
    pj = {"hidden_states[0]": cache["blocks.0.hook_resid_pre"],
          **{f"hidden_states[{l + 1}]": cache[hook_name(l, "hook_resid_post")] for l in range(pm.n_layers - 1)},
          f"hidden_states[{pm.n_layers}]": cache["ln_final.hook_normalized"]}
    assert_parity(pj, {f"hidden_states[{i}]": h for i, h in enumerate(hs32)},
                  {f"hidden_states[{i}]": h for i, h in enumerate(hs64)})
    assert rel_err(cache[hook_name(pm.n_layers - 1, "hook_resid_post")], hs64[-1]) > 1e-3


def test_left_padding_matches_unpadded(tmp_path):
    hf, path = make_hf(tmp_path)
    pm = prefjax.load(path)
    rs = np.random.RandomState(3)
    a, b = rs.randint(1, 320, size=17), rs.randint(1, 320, size=11)
    ids = np.zeros((2, 17), np.int64)
    mask = np.zeros((2, 17), np.int64)
    ids[0], mask[0] = a, 1
    ids[1, 6:], mask[1, 6:] = b, 1
    names = all_hooks(pm.n_layers)
    logits, cache = pm.run(ids, attention_mask=mask, capture=names)
    la, ca = pm.run(a[None], capture=names)
    lb, cb = pm.run(b[None], capture=names)
    assert rel_err(np.asarray(logits)[0], la[0]) <= TOL
    assert rel_err(np.asarray(logits)[1, 6:], lb[0]) <= TOL
    for n in names:
        assert rel_err(np.asarray(cache[n])[1, 6:], cb[n][0]) <= TOL, n
    # and against transformers given the same padding and positions, on the real tokens
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    hf32, hf64 = hf_refs(hf, ids, attention_mask=mask, position_ids=pos)
    assert_parity({"logits": logits, **cache}, hf32, hf64, select=mask.astype(bool))


def test_positions_capture_and_unrolled(tmp_path):
    hf, path = make_hf(tmp_path)
    pm = prefjax.load(path)
    ids = np.random.RandomState(4).randint(0, 320, size=(3, 15))
    names = pm.hook_names() + ("ln_final.hook_normalized",)
    full_logits, full = pm.run(ids, capture=names)
    pos = np.array([[14, 3], [0, 7], [9, 9]])
    logits, cache = pm.run(ids, capture=names, positions=pos)
    assert np.asarray(logits).shape == (3, 2, 320)
    for n in names:
        want = np.take_along_axis(np.asarray(full[n]), pos[:, :, None], axis=1)
        np.testing.assert_allclose(np.asarray(cache[n]), want, rtol=1e-6, atol=1e-6)
    un_logits, un = pm.run(ids, capture=names, unroll=True)
    assert rel_err(un_logits, full_logits) <= 1e-6
    for n in names:
        assert rel_err(un[n], full[n]) <= 1e-6
    assert list(cache) == list(names)  # caller's order


def test_bad_inputs(tmp_path):
    _, path = make_hf(tmp_path)
    pm = prefjax.load(path)
    ids = np.zeros((1, 5), np.int32)
    with pytest.raises(HookError, match="blocks.99.hook_resid_post"):
        pm.run(ids, capture=("blocks.99.hook_resid_post",))
    with pytest.raises(HookError, match="hook_resid_middle"):
        pm.run(ids, capture=("blocks.0.hook_resid_middle",))
    with pytest.raises(HookError, match="position 5"):
        pm.run(ids, capture=(), positions=np.array([[5]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pm.run(np.array([[1, 999]]))
    with pytest.raises(TypeError, match="int8"):
        prefjax.load(path, dtype="int8")
    with pytest.raises(FileNotFoundError):
        prefjax.load(tmp_path / "nope" / "x")


def test_checkpoint_errors(tmp_path):
    from safetensors.numpy import load_file, save_file
    _, path = make_hf(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    # unknown config field -> refused
    bad = tmp_path / "badcfg"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "attn_logit_softcapping": 50.0}))
    (bad / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        prefjax.load(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "shiny_new_field": 3}))
    with pytest.raises(ValueError, match="shiny_new_field"):
        prefjax.load(bad)
    # tensor with the wrong shape -> named
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.3.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1]
    wrong = tmp_path / "wrongshape"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, wrong / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.3.mlp.up_proj.weight"):
        prefjax.load(wrong)
    # missing tensor -> named
    del tensors[name]
    save_file(tensors, wrong / "model.safetensors")
    with pytest.raises(ValueError, match="missing"):
        prefjax.load(wrong)


def test_multimodal_layout_and_sharded_index(tmp_path):
    """Text weights under model.language_model.*, vision weights skipped, split over two shards."""
    from safetensors.numpy import load_file, save_file
    hf, path = make_hf(tmp_path)
    tensors = load_file(path / "model.safetensors")
    text_cfg = json.loads((path / "config.json").read_text())
    mm = {k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()}
    mm["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.ones((4, 3), np.float32)
    mm["model.multi_modal_projector.mm_input_projection_weight"] = np.ones((2, 2), np.float32)
    keys = sorted(mm)
    out = tmp_path / "mm"
    out.mkdir()
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fname, ks in halves.items():
        save_file({k: mm[k] for k in ks}, out / fname)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    (out / "config.json").write_text(json.dumps({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                                                 "text_config": text_cfg}))
    pm = prefjax.load(out)
    ids = np.random.RandomState(5).randint(0, 320, size=(1, 9))
    hf32, hf64 = hf_refs(hf, ids)
    logits, _ = pm.run(ids)
    assert_parity({"logits": logits}, hf32, hf64)


def test_eval_shape_27b_parameter_count():
    from prefjax.models import gemma3
    cfg = gemma3.PRESETS["gemma3-27b"]
    shapes = jax.eval_shape(lambda k: gemma3.init_params(cfg, k, dtype="bfloat16"), jax.random.PRNGKey(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    d, h, kv, hd, ff, L, V = 5376, 32, 16, 128, 21504, 62, 262208
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * ff + 4 * d + 2 * hd
    assert n == V * d + d + L * per_layer
    assert 26.9e9 < n < 27.1e9  # the text decoder of Gemma-3-27B
    assert cfg.query_pre_attn_scalar == 168 and cfg.rope_global_factor == 8.0
    assert sum(t == "full_attention" for t in cfg.layer_types) == 10


def test_sharded_2x4_equals_single_device(tmp_path):
    _, path = make_hf(tmp_path, layers=3)
    code = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, numpy as np
        jax.config.update("jax_default_matmul_precision", "highest")
        import prefjax
        from prefjax.sharding import make_mesh
        assert len(jax.devices()) == 8
        ids = np.random.RandomState(0).randint(0, 320, size=(4, 13))
        names = ("blocks.1.hook_resid_post", "blocks.2.hook_attn_out")
        one = prefjax.load({str(path)!r})
        mesh = make_mesh({{"data": 2, "tensor": 4}})
        many = prefjax.load({str(path)!r}, mesh=mesh)
        assert len(many.params["blocks"]["q"].sharding.device_set) == 8
        a, ca = one.run(ids, capture=names)
        b, cb = many.run(ids, capture=names)
        assert len(b.sharding.device_set) == 8, b.sharding
        err = float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(a)).max())
        assert err <= 1e-6, err
        for n in names:
            e = float(np.abs(np.asarray(ca[n]) - np.asarray(cb[n])).max() / np.abs(np.asarray(ca[n])).max())
            assert e <= 1e-6, (n, e)
        print("OK")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("name", ["gemma3-tiny", "gemma3-270m", "gemma3-4b", "gemma3-27b"])
def test_hf_config_round_trip(name):
    """hf_config (used by the organism writer and the benchmarks) maps back to the same config, and
    transformers reads the same RoPE scaling from it (linear x8 on the global layers of 4B+)."""
    import dataclasses
    from prefjax.models import gemma3
    cfg = gemma3.PRESETS[name]
    hf = gemma3.hf_config(cfg)
    assert dataclasses.replace(gemma3.config_from_hf(hf), name=cfg.name) == cfg
    t = Gemma3TextConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    assert t.rope_parameters["full_attention"].get("factor", 1.0) == cfg.rope_global_factor
    assert t.query_pre_attn_scalar == cfg.query_pre_attn_scalar and list(t.layer_types) == list(cfg.layer_types)


def test_params_to_hf_round_trip(tmp_path):
    from safetensors.numpy import save_file
    from prefjax.models import gemma3
    src = prefjax.load("gemma3-tiny")
    (tmp_path / "config.json").write_text(json.dumps(gemma3.hf_config(src.config)))
    save_file(dict(gemma3.params_to_hf(src.config, src.params)), tmp_path / "model.safetensors")
    back = prefjax.load(tmp_path)
    for a, b in zip(jax.tree_util.tree_leaves(src.params), jax.tree_util.tree_leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
