"""Tokenizer: a tiny in-test HF folder (fast) and the packaged Gemma-3 GGUF vs transformers (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from prefjax.tokenize import GEMMA_CHAT_TEMPLATE, Tokenizer, TokenizerError, char_span_to_token_mask, left_pad

CHATML = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ["user", "assistant", "system", "hello", "world", "be", "kind", "pick", "a", "b", "task", "ok"]


def _tiny_dir(tmp_path, *, post_processor=True, add_bos_token=None):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    bk = Backend(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    bk.pre_tokenizer = pre_tokenizers.Whitespace()
    bk.decoder = decoders.WordPiece()  # joins with spaces
    if post_processor:
        bk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    kw = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    hf = PreTrainedTokenizerFast(tokenizer_object=bk, bos_token="<bos>", eos_token="<eos>",
                                 pad_token="<pad>", unk_token="<unk>",
                                 additional_special_tokens=["<|im_start|>", "<|im_end|>"], **kw)
    hf.chat_template = CHATML
    d = tmp_path / "tok"
    hf.save_pretrained(str(d))
    return d


def _hf_ids(hf, messages, add_generation_prompt=True, **kw):
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, **kw)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


@pytest.mark.parametrize("variant", [dict(post_processor=True), dict(post_processor=False, add_bos_token=True)])
def test_tiny_from_dir_matches_transformers(tmp_path, variant):
    from transformers import AutoTokenizer

    d = _tiny_dir(tmp_path, **variant)
    tok = Tokenizer.from_dir(d)
    hf = AutoTokenizer.from_pretrained(str(d))
    assert tok.bos_id == 2 and tok.pad_id == 0
    assert tok.end_of_turn_token == "<|im_end|>" and tok.end_of_turn_id == 5
    assert tok.eos_ids >= {1, 5}
    for text in ["hello world", "be kind  hello", "", "zebra hello"]:
        assert tok.encode(text) == hf(text).input_ids, text
        assert tok.encode(text, add_bos=False) == hf(text, add_special_tokens=False).input_ids
    assert tok.encode("hello")[0] == 2
    msgs = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello world"}]
    rendered = tok.chat(msgs)
    assert rendered == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<bos><|im_start|>system\n")
    ids = tok.encode_chat(msgs)
    assert ids == _hf_ids(hf, msgs)
    assert ids.count(2) == 1  # <bos> not doubled
    assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_tiny_turn_boundaries(tmp_path):
    tok = Tokenizer.from_dir(_tiny_dir(tmp_path))
    msgs = [{"role": "user", "content": "pick a"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "pick b"}]
    ids = tok.encode_chat(msgs)
    # <bos> <s> user pick a <e> <s> assistant ok <e> <s> user pick b <e> <s> assistant
    eots = [i for i, t in enumerate(ids) if t == 5]
    assert len(eots) == 3
    assert tok.end_of_turn_index(ids) == eots[2]
    assert ids[tok.end_of_turn_index(ids) + 1:] == [4, tok.token_to_id("assistant")]
    assert tok.turn_boundary_positions(ids, n_after=2) == [eots[2], eots[2] + 1, eots[2] + 2]
    # A chat that ends with a closed assistant turn: last_user is not the last end-of-turn.
    ids2 = tok.encode_chat(msgs[:2], add_generation_prompt=False)
    e2 = [i for i, t in enumerate(ids2) if t == 5]
    assert tok.end_of_turn_index(ids2) == e2[0]
    assert tok.end_of_turn_index(ids2, which="last") == e2[1]
    assert tok.end_of_turn_index(np.asarray(ids2, np.int32)) == e2[0]
    with pytest.raises(TokenizerError, match="no end-of-turn token"):
        tok.end_of_turn_index(tok.encode("hello world"))
    with pytest.raises(TokenizerError, match="n_after=5"):
        tok.turn_boundary_positions(ids, n_after=5)
    with pytest.raises(TokenizerError, match="no end-of-turn token closes a user turn"):
        tok.end_of_turn_index(tok.encode_chat([{"role": "system", "content": "be"}], False))


def test_maybe_from_dir_and_missing_template(tmp_path):
    assert Tokenizer.maybe_from_dir(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    d = _tiny_dir(tmp_path)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    import json

    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.maybe_from_dir(d)
    assert tok is not None and tok.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.chat([{"role": "user", "content": "hello"}])


def test_batch_encode_and_span_mask(tmp_path):
    tok = Tokenizer.from_dir(_tiny_dir(tmp_path))
    ids_BxT, mask_BxT = tok.batch_encode(["hello", "hello world be kind", [9, 10]], pad="left")
    assert ids_BxT.dtype == np.int32 and ids_BxT.shape == (3, 5)
    np.testing.assert_array_equal(ids_BxT[0], [0, 0, 0, 2, 9])
    np.testing.assert_array_equal(mask_BxT[0], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(ids_BxT[2], [0, 0, 0, 9, 10])
    r_BxT, rm_BxT = tok.batch_encode(["hello"], pad="right", pad_to_multiple_of=4)
    np.testing.assert_array_equal(r_BxT[0], [2, 9, 0, 0])
    np.testing.assert_array_equal(rm_BxT[0], [1, 1, 0, 0])
    text = "task a hello world task b be kind"
    ids, off = tok.encode_with_offsets(text)
    assert off[0] == (0, 0)  # <bos>
    start = text.index("hello")
    m = char_span_to_token_mask(off, start, start + len("hello world"), len(ids))
    assert [tok.decode([i]) for i, on in zip(ids, m) if on] == ["hello", "world"]
    ml = char_span_to_token_mask(off, start, start + len("hello world"), len(ids) + 3, pad="left")
    np.testing.assert_array_equal(ml[3:], m)
    assert not ml[:3].any()


def test_left_pad():
    ids, valid = left_pad([[5, 6, 7], [], [8]], 0)
    assert ids.dtype == np.int32 and valid.dtype == bool and ids.shape == (3, 3)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 0], [0, 0, 8]])
    np.testing.assert_array_equal(valid, [[1, 1, 1], [0, 0, 0], [0, 0, 1]])
    ids, valid = left_pad([[], []], 9)  # nothing to hold: one column of padding
    np.testing.assert_array_equal(ids, [[9], [9]])
    assert not valid.any()
    ids, valid = left_pad([[1, 2, 3, 4, 5]], 0, multiple=4)  # width bucket: 5 -> 8
    np.testing.assert_array_equal(ids, [[0, 0, 0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(valid[0], [0, 0, 0, 1, 1, 1, 1, 1])
    ids, valid = left_pad(np.array([[1, 2]]), 3, width=4, rows=3, row_multiple=2)  # extra rows: padding
    np.testing.assert_array_equal(ids, [[3, 3, 1, 2]] + [[3] * 4] * 3)
    assert valid.sum() == 2 and valid[0, 2:].all()
    ids, valid = left_pad([[1, 2], [3]], 0, width=3, right=True)
    np.testing.assert_array_equal(ids, [[1, 2, 0], [3, 0, 0]])
    np.testing.assert_array_equal(valid, [[1, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match=r"row 1: sequence of 4 tokens is longer than the padded width 3"):
        left_pad([[1], [1, 2, 3, 4]], 0, width=3)
    with pytest.raises(ValueError, match="rows=1 is fewer than the 2 sequences"):
        left_pad([[1], [2]], 0, rows=1)


# ---------------------------------------------------------------------------------------------
# The packaged Gemma-3-270M GGUF against transformers' tokenizer from the same file.

TEXTS = [
    "Hello world",
    "héllo wörld — naïve café; 日本語のテキスト; emoji 🤖🎉; Ελληνικά",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\n\tprint(f(3))",
    "lots      of      spaces\n\n\n\n   and\ttabs\t\t end   ",
    "<start_of_turn>user\nliteral special tokens<end_of_turn>\n",
    "",
    " leading space",
]


@pytest.fixture(scope="module")
def gemma_pair(tmp_path_factory):
    from transformers import AutoTokenizer

    from prefjax.checkpoints.gguf import default_gguf_path

    ours = Tokenizer.from_gguf()  # built from the GGUF metadata, without transformers
    path = default_gguf_path()
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, hf, None


@pytest.mark.slow
def test_gemma_encode_decode_match(gemma_pair):
    ours, hf, cache = gemma_pair
    assert (ours.bos_id, ours.pad_id, ours.end_of_turn_id) == (2, 0, 106)
    assert ours.eos_ids == {1, 106}
    cached = Tokenizer.from_gguf()  # a second build gives the same tokenizer
    for text in TEXTS:
        want = hf(text).input_ids
        assert ours.encode(text) == want, text
        assert cached.encode(text) == want, text
        assert ours.encode(text, add_bos=False) == hf(text, add_special_tokens=False).input_ids
        for skip in (True, False):
            assert ours.decode(want, skip_special_tokens=skip) == hf.decode(want, skip_special_tokens=skip)
    assert cached.chat_template == ours.chat_template == GEMMA_CHAT_TEMPLATE  # the file carries none


@pytest.mark.slow
def test_gemma_chat_template(gemma_pair):
    ours, hf, _ = gemma_pair
    user = {"role": "user", "content": "  Which task do you prefer?\n"}
    system = {"role": "system", "content": "You are a careful assistant."}
    assert ours.chat([user]) == "<bos><start_of_turn>user\nWhich task do you prefer?<end_of_turn>\n<start_of_turn>model\n"
    assert ours.chat([system, user]) == (
        "<bos><start_of_turn>user\nYou are a careful assistant.\n\nWhich task do you prefer?"
        "<end_of_turn>\n<start_of_turn>model\n")
    multi = [system, user, {"role": "assistant", "content": "Task A."}, {"role": "user", "content": "Why?"}]
    for msgs in ([user], [system, user], multi):
        for gen in (True, False):
            want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                          chat_template=GEMMA_CHAT_TEMPLATE)
            assert ours.chat(msgs, add_generation_prompt=gen) == want
            ids = ours.encode_chat(msgs, add_generation_prompt=gen)
            assert ids == _hf_ids(hf, msgs, gen, chat_template=GEMMA_CHAT_TEMPLATE)
            assert ids.count(2) == 1
    with pytest.raises(Exception, match="alternate"):
        ours.chat([user, user])


@pytest.mark.slow
def test_gemma_turn_boundary_and_offsets(gemma_pair):
    ours, hf, _ = gemma_pair
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Task A: sort a list."},
            {"role": "assistant", "content": "Done."}, {"role": "user", "content": "Task B: write a haiku."}]
    ids = ours.encode_chat(msgs)
    k = ours.end_of_turn_index(ids)
    sot, model = hf.convert_tokens_to_ids("<start_of_turn>"), hf.encode("model", add_special_tokens=False)
    assert ids[k] == 106 and ids[k + 2] == sot and ids[k + 3:k + 4] == model and k == len(ids) - 5
    pos = ours.turn_boundary_positions(ids, n_after=4)
    assert [hf.decode([ids[p]]) for p in pos] == ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]
    assert ours.end_of_turn_index(ids, which="last") == k
    closed = ours.encode_chat(msgs[:3], add_generation_prompt=False)
    eots = [i for i, t in enumerate(closed) if t == 106]
    assert ours.end_of_turn_index(closed) == eots[0] and ours.end_of_turn_index(closed, "last") == eots[1]
    # Offsets: spans tile the text in order, and map task spans to the right tokens.
    for text in TEXTS[:4] + [ours.chat(msgs)]:
        tids, off = ours.encode_with_offsets(text, add_bos=False)
        assert tids == ours.encode(text, add_bos=False)
        pieces, last = [], None
        for s, e in off:
            assert 0 <= s <= e <= len(text)
            if (s, e) != last:
                pieces.append(text[s:e])
                last = (s, e)
        assert "".join(pieces) == text
    rendered = ours.chat(msgs)
    a = rendered.index("write a haiku")
    rids, roff = ours.encode_with_offsets(rendered, add_bos=False)
    mask = char_span_to_token_mask(roff, a, a + len("write a haiku"), len(rids))
    assert ours.decode([i for i, on in zip(rids, mask) if on]).strip() == "write a haiku"
