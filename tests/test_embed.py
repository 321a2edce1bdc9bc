"""Qwen3-Embedding use: prefjax.embed vs the official transformers recipe on a tiny random Qwen3Model."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch

import prefjax
from prefjax.embed import embed_texts, embed_token_ids, format_query, tokenize_for_embedding

from test_llama import RTOL, randomize_, rel_err
from test_qwen3 import QWEN_KW

jax.config.update("jax_default_matmul_precision", "highest")

WORDS = ("the a cat dog sat on mat ran far away and then slept quietly in sun Instruct Query retrieve "
         "passages that answer question : given web search").split()


def _backend(append_eod: bool):
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    vocab = {"[UNK]": 0, "<|endoftext|>": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<|endoftext|>"])
    if append_eod:  # what the released Qwen3-Embedding tokenizer.json does
        tk.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", pair="$A $B <|endoftext|>",
                                                          special_tokens=[("<|endoftext|>", 1)])
    return tk


def _save(folder, append_eod: bool):
    from transformers import Qwen3Config, Qwen3Model
    torch.manual_seed(5)
    cfg = Qwen3Config(**{**QWEN_KW, "pad_token_id": 1, "eos_token_id": 1})
    cfg._attn_implementation = "eager"
    hf = randomize_(Qwen3Model(cfg).eval(), 5)
    hf.save_pretrained(folder)
    _backend(append_eod).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                              "pad_token": "<|endoftext|>"}))
    return hf


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3emb")
    hf = _save(d, append_eod=True)
    return prefjax.load(d), hf


TEXTS = ["the cat sat on the mat", "a dog ran far away and then slept quietly in the sun",
         "the sun", "dog", "cat and dog sat in the sun and then ran away"]
TASK = "given a web search query retrieve passages that answer the question"


def _official(hf, texts, max_length=64):
    """The Qwen3-Embedding README recipe with transformers (left padding, last-token pool, L2)."""
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=_backend(True), padding_side="left",
                                  pad_token="<|endoftext|>")
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        h = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert bool((batch["attention_mask"][:, -1] == 1).all())  # left padding: last column is real
    pooled = h[:, -1]
    return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy(), batch["input_ids"]


def test_documents_match_official_recipe(emb):
    model, hf = emb
    ref, _ = _official(hf, TEXTS)
    got = embed_texts(model, TEXTS, batch_size=2)
    assert got.shape == (5, 48) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    assert rel_err(got, ref) <= RTOL


def test_queries_with_instruction(emb):
    model, hf = emb
    assert format_query("q", "t") == "Instruct: t\nQuery:q"
    ref, _ = _official(hf, [format_query(t, TASK) for t in TEXTS[:3]])
    got = embed_texts(model, TEXTS[:3], instruction=TASK, batch_size=3)
    assert rel_err(got, ref) <= RTOL
    plain = embed_texts(model, TEXTS[:3], batch_size=3)
    assert rel_err(got, plain) > 1e-2  # the instruction matters


def test_batching_and_order_invariance(emb):
    model, _ = emb
    a = embed_texts(model, TEXTS, batch_size=4)
    singles = np.concatenate([embed_texts(model, [t], batch_size=1) for t in TEXTS])
    assert rel_err(a, singles) <= RTOL
    rev = embed_texts(model, TEXTS[::-1], batch_size=3)
    assert rel_err(rev[::-1], a) <= RTOL


def test_eod_appended_once_and_truncation(tmp_path, emb):
    model, _ = emb
    ids = tokenize_for_embedding(model, ["the cat"])
    assert ids == [[WORDS.index("the") + 2, WORDS.index("cat") + 2, 1]]  # exactly one <|endoftext|>
    # a tokenizer that does not append it: prefjax appends it, so results agree
    _save(tmp_path, append_eod=False)
    m2 = prefjax.load(tmp_path)
    assert tokenize_for_embedding(m2, ["the cat"]) == ids
    assert rel_err(embed_texts(m2, TEXTS[:2]), embed_texts(model, TEXTS[:2])) <= RTOL
    long = tokenize_for_embedding(model, [TEXTS[1]], max_length=4)[0]
    assert len(long) == 4 and long[-1] == 1


def test_dim_and_token_id_path(emb):
    model, _ = emb
    full = embed_texts(model, TEXTS[:2])
    small = embed_texts(model, TEXTS[:2], dim=8)
    assert small.shape == (2, 8)
    want = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    assert rel_err(small, want) <= RTOL
    ids = tokenize_for_embedding(model, TEXTS[:2])
    assert rel_err(embed_token_ids(model, ids), full) <= RTOL
    with pytest.raises(ValueError, match="dim"):
        embed_texts(model, TEXTS[:1], dim=49)
    with pytest.raises(ValueError, match="empty"):
        embed_token_ids(model, [[]])
