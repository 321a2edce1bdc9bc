"""GGUF reading: a tiny synthetic Gemma-3 file (fast) and the packaged 270M file against transformers (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from prefjax.checkpoints.gguf import GGUFError, default_gguf_path, read_gguf

N_LAYERS, D, F, H, KV, HD, V = 2, 64, 128, 2, 1, 32, 96


def _write_tiny_gguf(path, *, arch="gemma3", extra_tensors=(), tied=True, quant_q=True, n_tokens=0):
    """Write a small gemma3-shaped GGUF; returns the float32 HF-layout tensors that went in."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(N_LAYERS)
    w.add_context_length(1024)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_key_length(HD)
    w.add_value_length(HD)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(16)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    if n_tokens:  # long arrays: the header parser skips these instead of expanding them
        w.add_token_list([f"tok{i}" for i in range(n_tokens)])
        w.add_token_scores([float(i) for i in range(n_tokens)])
        w.add_array("tokenizer.ggml.short_list", [1, 2, 3])
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    expected = {}

    def add(gguf_name, hf_name, shape_hf, *, norm=False, q8=False):
        a = rng.standard_normal(shape_hf).astype(np.float32)
        if norm:
            w.add_tensor(gguf_name, a + np.float32(1.0))  # llama.cpp stores 1 + w
            expected[hf_name] = (a + np.float32(1.0)) - np.float32(1.0)
        elif q8:
            qa = quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name, qa, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[hf_name] = gguf.quants.dequantize(qa, gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name, a)
            expected[hf_name] = a

    add("token_embd.weight", "model.embed_tokens.weight", (V, D), q8=True)
    add("output_norm.weight", "model.norm.weight", (D,), norm=True)
    if not tied:
        add("output.weight", "lm_head.weight", (V, D))
    for l in range(N_LAYERS):
        p, hp = f"blk.{l}.", f"model.layers.{l}."
        add(p + "attn_norm.weight", hp + "input_layernorm.weight", (D,), norm=True)
        add(p + "attn_q.weight", hp + "self_attn.q_proj.weight", (H * HD, D), q8=quant_q)
        add(p + "attn_k.weight", hp + "self_attn.k_proj.weight", (KV * HD, D))
        add(p + "attn_v.weight", hp + "self_attn.v_proj.weight", (KV * HD, D))
        add(p + "attn_output.weight", hp + "self_attn.o_proj.weight", (D, H * HD), q8=True)
        add(p + "attn_q_norm.weight", hp + "self_attn.q_norm.weight", (HD,), norm=True)
        add(p + "attn_k_norm.weight", hp + "self_attn.k_norm.weight", (HD,), norm=True)
        add(p + "post_attention_norm.weight", hp + "post_attention_layernorm.weight", (D,), norm=True)
        add(p + "ffn_norm.weight", hp + "pre_feedforward_layernorm.weight", (D,), norm=True)
        add(p + "ffn_gate.weight", hp + "mlp.gate_proj.weight", (F, D))
        add(p + "ffn_up.weight", hp + "mlp.up_proj.weight", (F, D))
        add(p + "ffn_down.weight", hp + "mlp.down_proj.weight", (D, F))
        add(p + "post_ffw_norm.weight", hp + "post_feedforward_layernorm.weight", (D,), norm=True)
    for name, raw, qtype in extra_tensors:
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_tiny_gguf_names_shapes_values(tmp_path):
    path = tmp_path / "tiny.gguf"
    expected = _write_tiny_gguf(path)
    ck = read_gguf(path)
    assert set(ck.tensor_names()) == set(expected)
    for name, want in expected.items():
        got = ck.load_tensor(name)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert ck.tensor_info(name).shape == want.shape
    # tied embeddings: lm_head is served by the embedding, not listed
    assert ck.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in ck.tensor_names()
    np.testing.assert_array_equal(ck.load_tensor("lm_head.weight"), expected["model.embed_tokens.weight"])
    # a returned array is the caller's: editing it must not change the next load
    a = ck.load_tensor("model.layers.0.mlp.up_proj.weight")
    a[...] = 0
    np.testing.assert_array_equal(ck.load_tensor("model.layers.0.mlp.up_proj.weight"),
                                  expected["model.layers.0.mlp.up_proj.weight"])
    assert ck.chat_template.startswith("{{ bos_token }}")


def test_header_parser_matches_gguf_reader(tmp_path):
    import gguf

    from prefjax.checkpoints.gguf import _parse_gguf

    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, tied=False, n_tokens=5000)
    md, n_vocab, tensors = _parse_gguf(path)
    ref = gguf.GGUFReader(path)
    assert n_vocab == 5000
    assert md["tokenizer.ggml.short_list"] == [1, 2, 3]
    assert "tokenizer.ggml.tokens" not in md and "tokenizer.ggml.scores" not in md
    for key, field in ref.fields.items():
        if key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores"):
            assert md[key] == field.contents(), key
    assert [t.name for t in tensors] == [t.name for t in ref.tensors]
    for a, b in zip(tensors, ref.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        np.testing.assert_array_equal(a.data, b.data, err_msg=a.name)
    assert read_gguf(path).config["vocab_size"] == 5000


def test_tiny_gguf_config(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, tied=False)
    cfg = read_gguf(path).config
    assert cfg["model_type"] == "gemma3_text"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (N_LAYERS, D, F)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (H, KV, HD)
    assert cfg["vocab_size"] == V  # no tokenizer arrays: falls back to the embedding rows
    assert cfg["tie_word_embeddings"] is False
    assert cfg["sliding_window"] == 16 and cfg["max_position_embeddings"] == 1024
    assert cfg["layer_types"] == ["sliding_attention", "sliding_attention"]
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 1, 0)


def test_errors(tmp_path):
    import gguf

    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(bad)
    llama = tmp_path / "llama.gguf"
    _write_tiny_gguf(llama, arch="llama")
    with pytest.raises(GGUFError, match="architecture 'llama' is not supported"):
        read_gguf(llama)
    # Q8_1 has no numpy dequantiser in gguf-py: the error names the tensor and the type.
    qt = gguf.GGMLQuantizationType.Q8_1
    block, nbytes = gguf.GGML_QUANT_SIZES[qt]
    raw = np.zeros((D, (D // block) * nbytes), dtype=np.uint8)
    odd = tmp_path / "odd.gguf"
    _write_tiny_gguf(odd, extra_tensors=[("blk.0.ffn_extra.weight", raw, qt)])
    with pytest.raises(GGUFError, match="ffn_extra"):
        read_gguf(odd)  # a tensor with no HF name is refused up front
    odd2 = tmp_path / "odd2.gguf"
    _write_tiny_gguf(odd2, quant_q=False)
    ck = read_gguf(odd2)
    with pytest.raises(KeyError, match="no tensor 'model.layers.9.mlp.up_proj.weight'"):
        ck.load_tensor("model.layers.9.mlp.up_proj.weight")
    # swap a known tensor's type to Q8_1 by writing it raw
    odd3 = tmp_path / "odd3.gguf"
    w = gguf.GGUFWriter(str(odd3), "gemma3")
    for k, v in [("block_count", 1), ("context_length", 8), ("embedding_length", D),
                 ("feed_forward_length", F)]:
        getattr(w, f"add_{k}")(v)
    w.add_head_count(H)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(4)
    w.add_tensor("token_embd.weight", np.zeros((V, (D // block) * nbytes), np.uint8), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = read_gguf(odd3)
    assert ck.tensor_info("model.embed_tokens.weight").qtype == "Q8_1"
    with pytest.raises(GGUFError, match="token_embd.weight.*Q8_1.*cannot dequantise"):
        ck.load_tensor("model.embed_tokens.weight")


# ---------------------------------------------------------------------------------------------
# The packaged Gemma-3-270M file against transformers' own GGUF loader.

CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "sliding_window",
    "layer_types", "query_pre_attn_scalar", "max_position_embeddings", "bos_token_id",
    "eos_token_id", "pad_token_id", "tie_word_embeddings", "hidden_activation",
    "final_logit_softcapping", "attn_logit_softcapping", "attention_bias", "model_type",
    "use_bidirectional_attention",
)


@pytest.fixture(scope="module")
def hf_gemma():
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model


@pytest.fixture(scope="module")
def ck270m():
    return read_gguf(default_gguf_path())


@pytest.mark.slow
def test_270m_tensors_equal_transformers(hf_gemma, ck270m):
    ck = ck270m
    sd = hf_gemma.state_dict()
    assert set(sd) - set(ck.tensor_names()) == {"lm_head.weight"}  # tied, served on request
    assert set(ck.tensor_names()) <= set(sd)
    for name in ck.tensor_names():
        got = ck.load_tensor(name)
        want = sd[name].detach().numpy()
        assert got.shape == want.shape and got.dtype == np.float32, name
        if not np.array_equal(got, want):  # fast path; the tolerance check explains a failure
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=name)
    assert np.array_equal(ck.load_tensor("lm_head.weight"), sd["lm_head.weight"].numpy())


@pytest.mark.slow
def test_270m_config_equals_transformers(hf_gemma, ck270m):
    ck = ck270m
    ours, theirs = ck.config, hf_gemma.config.to_dict()
    for field in CONFIG_FIELDS:
        assert ours[field] == theirs[field], (field, ours[field], theirs[field])
    assert ours["sliding_window_pattern"] == theirs["_sliding_window_pattern"] == 6
    assert ours["rope_theta"] == theirs["rope_parameters"]["full_attention"]["rope_theta"]
    assert ours["rope_local_base_freq"] == theirs["rope_parameters"]["sliding_attention"]["rope_theta"]
    assert ours["rope_scaling"] is None
    # And transformers builds the same config class from our dict.
    from transformers import Gemma3TextConfig

    rebuilt = Gemma3TextConfig(**{k: v for k, v in ours.items()
                                  if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling",
                                               "torch_dtype")}).to_dict()
    for field in CONFIG_FIELDS:
        assert rebuilt[field] == theirs[field], field


@pytest.fixture(scope="module")
def forward_270m(hf_gemma):
    """``(model, ids, names, hf32, hf64)``: prefjax's 270M, a chat prompt past the 512-token window, and
    transformers' logits and every hook on it in float32 and in float64 (computed once per module)."""
    import jax

    import prefjax
    from hf_reference import collect, float64_copy
    from prefjax.hooks import BLOCK_POINTS, hook_name

    jax.config.update("jax_default_matmul_precision", "highest")
    hf_gemma.config._attn_implementation = "eager"
    model = prefjax.load("gemma3-270m")
    words = ("the river carried small boats past old stone houses while children counted clouds "
             "and a baker sang about bread and rain ").split()
    text = " ".join(words[i % len(words)] + (str(i) if i % 7 == 0 else "") for i in range(520))
    ids = model.tokenizer.encode_chat([{"role": "user", "content": "Summarise this: " + text}])
    assert len(ids) > 600
    names = tuple(hook_name(l, p) for l in range(model.n_layers) for p in BLOCK_POINTS) + ("ln_final.hook_normalized",)
    refs = []
    for m in (hf_gemma, float64_copy(hf_gemma, cache=False)):  # the float64 copy (2 GB) is dropped after
        logits, ref = collect(m, np.asarray([ids]), layers=m.model.layers, final_norm=m.model.norm)
        refs.append({"logits": logits, **ref})
        del m
    return model, ids, names, *refs


@pytest.mark.slow
def test_270m_forward_matches_transformers_past_the_window(forward_270m):
    """Real Gemma-3-270M weights: prefjax (float32) and transformers (loading the same GGUF) agree on logits
    and every hook for a chat prompt longer than the 512-token sliding window, under the parity gate
    (prefjax at most 2x as far from transformers-float64 as transformers-float32 is)."""
    from hf_reference import assert_parity, format_rows, worst

    model, ids, names, hf32, hf64 = forward_270m
    logits, cache = model.run(np.asarray([ids]), capture=names)
    rows = assert_parity({"logits": logits, **cache}, hf32, hf64)
    print("\n" + format_rows(sorted(rows, key=lambda r: r.e_pj / r.bound, reverse=True)[:6],
                             f"270M, {len(ids)} tokens: the closest of {len(rows)} arrays to the bound"))
    assert worst(rows).e_pj / worst(rows).bound <= 1.0
    # the end-of-turn capture used by the pipeline is the same activation
    eot = model.tokenizer.end_of_turn_index(ids)
    _, at_eot = model.run(np.asarray([ids]), capture=("blocks.9.hook_resid_post",), positions=np.asarray([[eot]]))
    np.testing.assert_array_equal(np.asarray(at_eot["blocks.9.hook_resid_post"])[0, 0],
                                  np.asarray(cache["blocks.9.hook_resid_post"])[0, eot])


@pytest.mark.slow
def test_270m_parity_gate_catches_a_1e4_weight_change(forward_270m):
    """Layer 0's post-attention norm weight x (1 + 1e-4) in the real 270M: the gate must refuse it."""
    from hf_reference import assert_parity, perturbed

    model, ids, names, hf32, hf64 = forward_270m
    # hooks only: the 262k-vocabulary unembedding is most of this forward's cost
    _, cache = perturbed(model, "blocks/ln_post_attn", layer=0).run(np.asarray([ids]), capture=names, logits=False)
    with pytest.raises(AssertionError, match="blocks.0.hook_attn_out"):
        assert_parity(cache, hf32, hf64)
