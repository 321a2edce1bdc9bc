"""PEFT LoRA adapters vs transformers + peft (float32): on the fly, merged, switching, refusals."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch

import prefjax
from prefjax.lora import AdapterError, LoraAdapter, load_adapter

from hf_reference import assert_parity, perturbed_adapter
from test_llama import LLAMA_KW, assert_matches_hf, hf_refs, randomize_, rel_err

peft = pytest.importorskip("peft")  # a declared test dependency (pyproject [test])

jax.config.update("jax_default_matmul_precision", "highest")


def _base():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**LLAMA_KW)
    cfg._attn_implementation = "eager"
    return randomize_(LlamaForCausalLM(cfg).eval())


def _make_adapter(folder, seed, **lora_kw):
    """A PEFT adapter with random (non-zero) A and B, saved to ``folder``; returns the peft model."""
    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(_base(), LoraConfig(init_lora_weights=False, **lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                # 0.1: the adapter moves logits by O(1) while the float32 problem stays well conditioned
                # (at 0.3 with rsLoRA scale 4, transformers' own float32 logits are 7e-6 off its float64)
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.eval()
    pm.save_pretrained(folder)
    return pm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base_dir = root / "base"
    _base().save_pretrained(base_dir)
    a1 = _make_adapter(root / "rslora_all", 1, r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear")
    a2 = _make_adapter(root / "qv_down", 2, r=2, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                       layers_to_transform=[0, 2])
    return {"base_dir": base_dir, "a1_dir": root / "rslora_all", "a2_dir": root / "qv_down", "a1": a1, "a2": a2,
            "base": prefjax.load(base_dir), "root": root, "refs": {}}


TOKS = np.random.default_rng(0).integers(3, 97, size=(2, 11))
MASK = np.ones_like(TOKS)
MASK[1, :3] = 0


def peft_refs(setup, which, masked=False):
    """``(hf32, hf64)`` of peft model ``which`` on TOKS (left-padded by MASK if ``masked``), once per module."""
    key = (which, masked)
    if key not in setup["refs"]:
        setup["refs"][key] = hf_refs(setup[which], TOKS, MASK if masked else None)
    return setup["refs"][key]


def test_adapter_files_are_what_peft_writes(setup):
    cfg = json.loads((setup["a1_dir"] / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["r"] == 4
    ad = load_adapter(setup["a1_dir"], setup["base"].family, setup["base"].config)
    assert set(ad.targets) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert ad.scale == pytest.approx(8 / 2.0)  # rsLoRA: alpha / sqrt(r)


@pytest.mark.parametrize("which", ["a1", "a2"])
def test_on_the_fly_matches_peft(setup, which):
    m = setup["base"].with_adapter(str(setup[which + "_dir"]))
    assert m.params is setup["base"].params  # base weights shared, not copied
    assert_matches_hf(m, setup[which], TOKS, refs=peft_refs(setup, which))
    assert_matches_hf(m, setup[which], TOKS, MASK, refs=peft_refs(setup, which, masked=True))


def test_parity_gate_catches_a_1e4_adapter_change(setup, tmp_path):
    """Adapter a1 with layer 0's o_proj lora_B x (1 + 1e-4), on the fly: the gate must refuse it."""
    bad = perturbed_adapter(setup["a1_dir"], tmp_path / "bad",
                            "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight")
    m = setup["base"].with_adapter(bad)
    with pytest.raises(AssertionError, match="blocks.0.hook_attn_out"):
        assert_matches_hf(m, setup["a1"], TOKS, refs=peft_refs(setup, "a1"))


@pytest.mark.parametrize("which", ["a1", "a2"])
def test_merged_matches_peft(setup, which):
    m = prefjax.load(setup["base_dir"], adapter=setup[which + "_dir"], merge=True)
    assert m.params["blocks"]["q"] is not setup["base"].params["blocks"]["q"]
    assert_matches_hf(m, setup[which], TOKS, refs=peft_refs(setup, which))
    with pytest.raises(AdapterError, match="merged"):
        m.with_adapter(setup["a1_dir"])


def test_adapter_changes_output_and_switching(setup):
    base = setup["base"]
    lb, _ = base.run(TOKS)
    m1 = base.with_adapter(setup["a1_dir"])
    m2 = m1.with_adapter(setup["a2_dir"])  # switch persona without reloading the base
    m0 = m2.with_adapter(None)
    l1, _ = m1.run(TOKS)
    l2, _ = m2.run(TOKS)
    l0, _ = m0.run(TOKS)
    assert rel_err(l1, lb) > 1e-2 and rel_err(l2, lb) > 1e-2 and rel_err(l1, l2) > 1e-2
    assert rel_err(l0, lb) == 0.0
    for m, which in ((m1, "a1"), (m2, "a2")):
        assert_parity({"logits": m.run(TOKS)[0]}, *peft_refs(setup, which), names=["logits"])
    assert m1.params is m2.params is base.params
    # a loaded LoraAdapter object attaches too
    ad = load_adapter(setup["a2_dir"], base.family, base.config)
    assert isinstance(ad, LoraAdapter)
    assert rel_err(base.with_adapter(ad).run(TOKS)[0], l2) == 0.0


def test_persona_adapter_runs(setup):
    from prefjax.elicit.personas import Persona
    p = Persona(name="tuned", adapter=str(setup["a2_dir"]))
    m = setup["base"].with_adapter(p.adapter)
    assert_parity({"logits": m.run(TOKS)[0]}, *peft_refs(setup, "a2"), names=["logits"])


# ---- refusals -------------------------------------------------------------------------------

def _edited(setup, tmp_path, cfg_over=None, tensors=None):
    """Copy adapter a2 to tmp_path with config fields overridden and/or tensors replaced."""
    from safetensors.numpy import load_file, save_file
    acfg = json.loads((setup["a2_dir"] / "adapter_config.json").read_text())
    acfg.update(cfg_over or {})
    (tmp_path / "adapter_config.json").write_text(json.dumps(acfg))
    t = load_file(str(setup["a2_dir"] / "adapter_model.safetensors"))
    if tensors is not None:
        t = tensors(t)
    save_file(t, str(tmp_path / "adapter_model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("over,pattern", [
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "bias"),
    ({"target_modules": ["q_proj", "c_attn"]}, "c_attn"),
    ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
    ({"target_modules": ".*q_proj"}, "target_modules"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"brand_new_option": 1}, "brand_new_option"),
])
def test_config_refusals(setup, tmp_path, over, pattern):
    folder = _edited(setup, tmp_path, over)
    with pytest.raises(AdapterError, match=pattern):
        setup["base"].with_adapter(folder)


def test_tensor_refusals(setup, tmp_path):
    base = setup["base"]
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def wrong_shape(t):  # an adapter trained for a base with another hidden size
        t[key] = np.zeros((2, 40), np.float32)
        return t
    (tmp_path / "a").mkdir()
    with pytest.raises(AdapterError, match="layers.0.q_proj"):
        base.with_adapter(_edited(setup, tmp_path / "a", tensors=wrong_shape))

    def extra_layer(t):
        t[key.replace("layers.0", "layers.7")] = t[key]
        return t
    (tmp_path / "b").mkdir()
    with pytest.raises(AdapterError, match="layers.7"):
        base.with_adapter(_edited(setup, tmp_path / "b", {"layers_to_transform": None}, tensors=extra_layer))

    def untargeted(t):
        t[key.replace("q_proj", "k_proj")] = t[key]
        return t
    (tmp_path / "c").mkdir()
    with pytest.raises(AdapterError, match="k_proj"):
        base.with_adapter(_edited(setup, tmp_path / "c", tensors=untargeted))

    def missing(t):
        del t[key]
        return t
    (tmp_path / "d").mkdir()
    with pytest.raises(AdapterError, match="layer 0 q_proj.lora_A"):
        base.with_adapter(_edited(setup, tmp_path / "d", tensors=missing))

    def alien(t):
        t["base_model.model.lm_head.lora_A.weight"] = np.zeros((2, 48), np.float32)
        return t
    (tmp_path / "e").mkdir()
    with pytest.raises(AdapterError, match="lm_head"):
        base.with_adapter(_edited(setup, tmp_path / "e", tensors=alien))

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        base.with_adapter(tmp_path / "nowhere")


def test_greedy_generation_with_adapter_matches_peft(setup):
    """prefjax.generation (KV-cache decode) runs the on-the-fly adapter like peft's generate."""
    from prefjax.generation import generate
    m = setup["base"].with_adapter(setup["a1_dir"])
    prompt = [5, 9, 33, 41, 7]
    g = generate(m, [prompt], max_new_tokens=6, temperature=0.0, stop_ids=())
    with torch.no_grad():
        ref = setup["a1"].generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
    assert list(g.token_ids[0]) == ref[0, len(prompt):].tolist()
    base_g = generate(setup["base"], [prompt], max_new_tokens=6, temperature=0.0, stop_ids=())
    assert list(base_g.token_ids[0]) != list(g.token_ids[0])


def test_split_weights_take_adapters_on_the_fly_and_refuse_a_merge(setup):
    # Model.split_layers: an on-the-fly adapter reads the split weights and gives the stacked model's numbers;
    # a merge (which needs the stacked weights) is refused with the model and adapter named
    want, _ = setup["base"].with_adapter(setup["a1_dir"]).run(TOKS, unroll=True)
    split = prefjax.load(setup["base_dir"]).split_layers()
    got, _ = split.with_adapter(setup["a1_dir"]).run(TOKS, unroll=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=0)
    with pytest.raises(AdapterError, match="split per layer.*merge adapter"):
        split.with_adapter(setup["a1_dir"], merge=True)
