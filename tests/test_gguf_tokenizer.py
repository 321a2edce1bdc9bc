"""The GGUF tokenizer built from metadata (no transformers, no torch) against transformers' own
GGUF conversion, the same build in a process where torch/transformers cannot be imported, and
bad-input errors on small synthetic GGUF files."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from prefjax.checkpoints.gguf import GGUFError, default_gguf_path, read_gguf_tokenizer
from prefjax.tokenize import GEMMA_CHAT_TEMPLATE, Tokenizer, TokenizerError, _merges_by_position

ROOT = Path(__file__).resolve().parents[1]

_PIECES = [
    # ASCII words, punctuation, digits
    "hello", "Hello, world!", "The quick brown fox jumps over the lazy dog.", "don't", "e.g.", "U.S.A.",
    "3.14159", "1234567890", "0", "007", "1,000,000", "-42", "2024-05-01T12:34:56Z", "#hashtag", "@user",
    "https://example.com/a?b=c&d=e#f", "foo_bar.baz()", "a/b\\c", "$$x^2$$", "50%", "™®©",
    # non-ASCII scripts
    "日本語のテキスト", "中文分词测试", "한국어 문장", "مرحبا بالعالم", "नमस्ते दुनिया",
    "Привет, мир", "Ελληνικά", "עברית", "ไทย", "tiếng Việt", "Straße", "naïve café", "Zürich",
    "ﬁ ligature", "ｆｕｌｌｗｉｄｔｈ",
    # combining accents (decomposed) and precomposed
    "e\u0301", "a\u0308o\u0308u\u0308", "n\u0303", "\u00e9", "Z\u0351\u0300\u0301a\u0352l\u0353g\u0354o",
    # emoji, ZWJ sequences, flags, skin tones, variation selectors
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷🇯🇵", "❤️", "🧑🏿‍💻", "☕︎",
    # byte-fallback rare characters
    "\U0001d49c\U0001d4b7", "\U00020000\U0002a6d6", "\ue000\uf8ff", "\U0010fffd", "\x00\x01\x7f",
    "\u200b\u200d", "\ufeff", "\u2028\u2029", "\U0001f9ff\U0001fae0", "\u0e3f\u20bf",
    # special-token strings inside text
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "[multimodal]",
    "<start_of_image>", "<unused0>", "<start_of_turn>user\nhi<end_of_turn>\n", "<b>bold</b>", "< bos >",
    # code
    "def f(x):\n    return {'a': x ** 2}  # comment", "for (int i = 0; i < n; ++i) { s += a[i]; }",
    "SELECT * FROM t WHERE id = 1;", "<div class=\"x\">&amp;</div>", "fn main() -> Result<(), E> {}",
    "\tif x:\n\t\tpass", "x = [1, 2, 3]\nprint(x[::-1])",
]
_SEPS = ["", " ", "  ", "   ", "\n", "\n\n", "\t", " \t ", "\r\n", "\n \n", "    "]
_HAND = [
    "", " ", "  ", "\n", "\t", "\n\n\n", "    leading", "trailing    ", "  both  ", " \n \t ", "▁", "▁▁x",
    "lots      of      spaces\n\n\n\n   and\ttabs\t\t end   ", " " * 40, "\n" * 35, "\t" * 33, "a" * 200,
    "ab" * 60, "😀" * 10, "<start_of_turn><end_of_turn><start_of_turn>", "x<eos>y", "<bos><bos>",
]


def _strings() -> list[str]:
    """A few hundred varied strings, the same on every run."""
    rng = random.Random(1234)
    out = list(_HAND) + list(_PIECES)
    for _ in range(260):
        k = rng.randint(1, 6)
        parts = [rng.choice(_PIECES) for _ in range(k)]
        s = ""
        for p in parts:
            s += rng.choice(_SEPS) + p
        if rng.random() < 0.3:
            s += rng.choice(_SEPS)
        out.append(s)
    return out


STRINGS = _strings()

CHATS = [
    [{"role": "user", "content": "Which task do you prefer?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  Hi \n"}],
    [{"role": "user", "content": "日本語で答えて 😀"}, {"role": "assistant", "content": "はい。"},
     {"role": "user", "content": "def f():\n\treturn 1"}],
    [{"role": "user", "content": "literal <start_of_turn>model\n inside<end_of_turn>"}],
]


def _block_script() -> str:
    """Python source that makes importing torch or transformers raise ImportError."""
    return textwrap.dedent("""
        import importlib.abc, sys
        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError(f"{name} is blocked in this test")
                return None
        sys.meta_path.insert(0, _Block())
        for _m in [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]:
            del sys.modules[_m]
        """)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer

    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def ours():
    return Tokenizer.from_gguf()


def _hf_ids(hf, texts, add_bos):
    return [list(hf(t, add_special_tokens=add_bos).input_ids) for t in texts]


# -- against transformers -------------------------------------------------------------------------
@pytest.mark.slow
def test_backend_equals_transformers_conversion(hf, ours):
    """The whole tokenizer.json (model with its 515k merges, normalizer, pre-tokenizer, decoder,
    post-processor, added tokens with their flags) equals what transformers builds."""
    mine, theirs = json.loads(ours.backend.to_str()), json.loads(hf.backend_tokenizer.to_str())
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert mine[key] == theirs[key], key


@pytest.mark.slow
def test_ids_and_decode_match_transformers(hf, ours):
    assert len(STRINGS) >= 300
    for add_bos in (True, False):
        want = _hf_ids(hf, STRINGS, add_bos)
        for text, w in zip(STRINGS, want):
            assert ours.encode(text, add_bos=add_bos) == w, (add_bos, text)
    ids = _hf_ids(hf, STRINGS, True)
    for text, w in zip(STRINGS, ids):
        for skip in (True, False):
            assert ours.decode(w, skip_special_tokens=skip) == hf.decode(w, skip_special_tokens=skip), text
    # byte fallback and the special-token strings really were exercised
    flat = {i for w in ids for i in w}
    assert flat & set(range(238, 238 + 256)), "no byte-fallback token in the corpus"
    assert ours.end_of_turn_id in flat and ours.start_of_turn_id in flat


@pytest.mark.slow
def test_chat_ids_match_transformers(hf, ours):
    assert ours.chat_template == GEMMA_CHAT_TEMPLATE  # the packaged file carries none
    for msgs in CHATS:
        for gen in (True, False):
            want = hf.apply_chat_template(msgs, chat_template=GEMMA_CHAT_TEMPLATE, tokenize=True,
                                          add_generation_prompt=gen, return_dict=False)
            assert ours.encode_chat(msgs, add_generation_prompt=gen) == list(want), msgs
            assert ours.chat(msgs, gen) == hf.apply_chat_template(
                msgs, chat_template=GEMMA_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=gen)


@pytest.mark.slow
def test_special_ids_and_vocab_size_match_transformers(hf, ours):
    assert (ours.bos_id, ours.pad_id, ours.end_of_turn_id) == (hf.bos_token_id, hf.pad_token_id, 106)
    assert ours.token_to_id(ours.eos_token) == hf.eos_token_id == 1
    assert hf.convert_tokens_to_ids("<end_of_turn>") == 106
    assert ours.eos_ids == {1, 106}
    assert ours.special_tokens == {"bos_token": hf.bos_token, "eos_token": hf.eos_token,
                                   "pad_token": hf.pad_token, "unk_token": hf.unk_token}
    assert ours.vocab_size == len(hf) == 262144


@pytest.mark.slow
def test_no_torch_no_transformers_subprocess(tmp_path, hf):
    """With torch and transformers unimportable and an empty HOME (no caches): ``prefjax.load`` gives
    a tokenizer whose ids equal transformers', and launch/main.py runs the activations stage on the
    real model for four tasks."""
    out = tmp_path / "ids.json"
    (tmp_path / "strings.json").write_text(json.dumps(STRINGS, ensure_ascii=False), encoding="utf-8")
    workdir = tmp_path / "run"
    home = tmp_path / "home"
    home.mkdir()
    script = _block_script() + textwrap.dedent(f"""
        import json, runpy, sys, time
        import prefjax
        t = time.time()
        model = prefjax.load("gemma3-270m")
        tok = model.tokenizer
        strings = json.loads(open({str(tmp_path / "strings.json")!r}, encoding="utf-8").read())
        ids = [tok.encode(s) for s in strings]
        res = {{"ids": ids, "ids_nobos": [tok.encode(s, add_bos=False) for s in strings],
                "decoded": [tok.decode(i) for i in ids],
                "chat": [tok.encode_chat(m) for m in {CHATS!r}],
                "special": [tok.bos_id, tok.pad_id, tok.end_of_turn_id, sorted(tok.eos_ids), tok.vocab_size]}}
        open({str(out)!r}, "w", encoding="utf-8").write(json.dumps(res))
        sys.argv = ["launch/main.py", "--config", "configs/default.py", "--workdir", {str(workdir)!r},
                    "--config.stages=('tasks','activations')", "--config.tasks.n=4",
                    "--config.personas=('default',)", "--config.activations.batch_size=4",
                    "--config.progress=False"]
        try:
            runpy.run_path("launch/main.py", run_name="__main__")
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        assert not bad, bad
        print("child ok", flush=True)
        """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "HF_", "TRANSFORMERS_"))}
    env.update(HOME=str(home), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "child ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert not (home / ".cache" / "prefjax").exists()  # nothing cached under the empty HOME
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["ids"] == _hf_ids(hf, STRINGS, True)
    assert res["ids_nobos"] == _hf_ids(hf, STRINGS, False)
    assert res["decoded"] == [hf.decode(i, skip_special_tokens=True) for i in res["ids"]]
    assert res["chat"] == [list(hf.apply_chat_template(m, chat_template=GEMMA_CHAT_TEMPLATE, tokenize=True,
                                                       add_generation_prompt=True, return_dict=False))
                           for m in CHATS]
    assert res["special"] == [2, 0, 106, [1, 106], 262144]
    # the activations stage finished and stored finite end-of-turn activations of every layer
    from prefjax.store import open_existing

    assert (workdir / "stages" / "activations-default.done").exists()
    store = open_existing(str(workdir / "activations" / "default"))
    for layer in (0, 17):
        acts = np.asarray(store.read(hook=f"blocks.{layer}.hook_resid_post"))
        assert acts.shape[0] == 4 and acts.shape[-1] == 640, acts.shape
        assert np.isfinite(acts).all() and np.abs(acts).max() > 0


# -- merges ---------------------------------------------------------------------------------------
def _reference_merges(tokens):
    """transformers' generate_merges with scores -id, written plainly (slow, for small vocabularies)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    rows = []
    for w, i in vocab.items():
        for k in range(1, len(w)):
            if w[:k] in vocab and w[k:] in vocab:
                rows.append((-i, k, len(w) - k, w[:k], w[k:]))
    rows.sort(key=lambda r: r[:3], reverse=True)
    return [(r[3], r[4]) for r in rows]


def test_merges_by_position_matches_reference():
    rng = random.Random(7)
    alphabet = "ab▁c\nd😀é"
    tokens = list(dict.fromkeys(alphabet))
    while len(tokens) < 600:
        tokens.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))))
    tokens += tokens[5:40]  # duplicates: the last id wins, as in a dict
    vocab = {t: i for i, t in enumerate(tokens)}
    assert _merges_by_position(tokens, vocab) == _reference_merges(tokens)


# -- bad input ------------------------------------------------------------------------------------
def _write_vocab_gguf(path, *, arch="gemma3", tokens=None, scores=None, types=None, model="llama",
                      embd_rows=None, drop=(), merges=None, add_bos=True):
    """A small GGUF with a tokenizer (Gemma-like specials, bytes, a few words) and one embedding."""
    import gguf

    if tokens is None:
        tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "\n", "  "]
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        tokens += ["▁", "h", "i", "hi", "▁hi", "a", "b", "ab", "é"]
    n = len(tokens)
    if types is None:
        types = [3] * 7 + [4, 4] + [6] * 256 + [1] * (n - 265)
    if scores is None:
        scores = [-float(i) for i in range(n)]
    w = gguf.GGUFWriter(str(path), arch)
    if "model" not in drop and model is not None:
        w.add_tokenizer_model(model)
    if "tokens" not in drop:
        w.add_token_list(tokens)
    if "scores" not in drop:
        w.add_token_scores(scores)
    if "token_type" not in drop:
        w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    if merges is not None:
        w.add_token_merges(merges)
    w.add_tensor("token_embd.weight", np.zeros((embd_rows or n, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_synthetic_gguf_builds(tmp_path):
    tok = Tokenizer.from_gguf(_write_vocab_gguf(tmp_path / "ok.gguf"))
    assert tok.encode("hi") == [2, tok.token_to_id("hi")]
    assert tok.encode(" hi", add_bos=False) == [tok.token_to_id("▁hi")]
    assert tok.encode("é€", add_bos=False)[0] == tok.token_to_id("é")  # then € as three byte tokens
    assert tok.decode(tok.encode("hi é€ ab<end_of_turn>")) == "hi é€ ab"
    assert tok.encode("<end_of_turn>\n", add_bos=False) == [6, 7]
    assert tok.chat_template == GEMMA_CHAT_TEMPLATE


@pytest.mark.parametrize("case", [{}, {"add_bos": False}, {"merges": ["a b", "▁ hi", "h i"]}])
def test_synthetic_gguf_equals_transformers(tmp_path, case):
    """Small files exercise what the packaged one does not: merges stored in the file, no bos."""
    from transformers import AutoTokenizer

    path = _write_vocab_gguf(tmp_path / "v.gguf", **case)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = Tokenizer.from_gguf(path)
    assert json.loads(ours.backend.to_str()) == json.loads(hf.backend_tokenizer.to_str())
    for text in ["hi", " hi ab", "é€\n\n<end_of_turn>", "  hi", "<bos>x", ""]:
        assert ours.encode(text) == list(hf(text).input_ids), text


@pytest.mark.parametrize("case, field", [
    ({"drop": ("tokens",)}, "tokenizer.ggml.tokens"),
    ({"scores": [0.0] * 10}, "tokenizer.ggml.scores"),
    ({"types": [1] * 10}, "tokenizer.ggml.token_type"),
    ({"embd_rows": 300}, "token_embd.weight"),
    ({"model": "bert"}, "tokenizer.ggml.model"),
    ({"drop": ("model",)}, "tokenizer.ggml.model"),
    ({"arch": "llama"}, "general.architecture"),
])
def test_bad_tokenizer_metadata_is_named(tmp_path, case, field):
    path = _write_vocab_gguf(tmp_path / "bad.gguf", **case)
    with pytest.raises((GGUFError, TokenizerError)) as err:
        Tokenizer.from_gguf(path)
    msg = str(err.value)
    assert field in msg and str(path) in msg, msg


def test_read_gguf_tokenizer_arrays(tmp_path):
    path = _write_vocab_gguf(tmp_path / "ok.gguf")
    data = read_gguf_tokenizer(path)
    assert data.tokens[:3] == ["<pad>", "<eos>", "<bos>"] and data.tokens[8] == "  "
    assert data.scores.dtype == np.float32 and data.scores[5] == -5.0
    assert data.token_type.dtype == np.int32 and list(data.token_type[:9]) == [3] * 7 + [4, 4]
    assert data.merges is None and data.n_embedding_rows == len(data.tokens)
    assert data.get("bos_token_id") == 2 and data.get("add_bos_token") is True
