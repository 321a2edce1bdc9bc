"""Tokenizer, chat templates and turn-boundary positions.

``Tokenizer`` wraps a ``tokenizers.Tokenizer`` (the Rust fast tokenizer) plus the checkpoint's
Jinja chat template and its special tokens. It is built from a Hugging Face checkpoint folder
(``tokenizer.json`` + ``tokenizer_config.json`` / ``chat_template.jinja``) or from a GGUF file's
metadata. The GGUF build needs neither transformers nor torch: it reads the vocabulary arrays
(``checkpoints.gguf.read_gguf_tokenizer``) and assembles the same ``tokenizers.Tokenizer`` that
transformers' GGUF conversion produces (Gemma: BPE with byte fallback, merges in vocabulary order,
control tokens special, user-defined tokens plain added tokens; see ``_gemma_backend_from_gguf``).
It takes 1-2 s for Gemma's 262k vocabulary and is not cached on disk.

Encoding matches transformers: ``encode(text)`` equals ``tokenizer(text).input_ids`` (special
tokens added by the tokenizer's post-processor, e.g. ``<bos>`` for Gemma), and
``encode_chat(messages)`` equals ``apply_chat_template(messages, tokenize=True)`` (the rendered
string already starts with ``<bos>``, so nothing is added a second time).

Turn boundaries: ``end_of_turn_index(ids)`` finds the end-of-turn token that closes the last user
turn (for a Gemma prompt rendered with ``add_generation_prompt=True`` that is the ``<end_of_turn>``
just before ``<start_of_turn>model``); ``turn_boundary_positions`` adds the tokens after it.
"""

from __future__ import annotations

import json
import os
import re
from itertools import compress
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["Tokenizer", "char_span_to_token_mask", "GEMMA_CHAT_TEMPLATE", "TokenizerError", "left_pad"]

# Turn terminators and turn openers of common chat formats, most specific first.
END_OF_TURN_CANDIDATES = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<turn|>")
START_OF_TURN_CANDIDATES = ("<start_of_turn>", "<|im_start|>", "<|start_header_id|>", "<|turn>")

# Gemma's chat format, for GGUF files that carry no ``tokenizer.chat_template`` (the packaged
# Gemma-3-270M file has none). Output format: ``<bos>`` then per turn
# ``<start_of_turn>{user|model}\n{content, trimmed}<end_of_turn>\n``; a leading system message is
# folded into the first user turn as ``{system}\n\n``; roles must alternate starting with user;
# the generation prompt is ``<start_of_turn>model\n``.
GEMMA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(prefix='', first=0) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set sys = messages[0]['content'] -%}"
    "{%- if sys is not string -%}"
    "{%- set sys = sys | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{%- set ns.prefix = sys ~ '\n\n' -%}{%- set ns.first = 1 -%}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for m in messages[ns.first:] -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 is even) -%}"
    "{{- raise_exception('Gemma chats must alternate user/assistant turns, starting with user "
    "(after an optional system message)') -}}"
    "{%- endif -%}"
    "{{- '<start_of_turn>' ~ ('model' if m['role'] == 'assistant' else m['role']) ~ '\n' -}}"
    "{%- if loop.first -%}{{- ns.prefix -}}{%- endif -%}"
    "{%- if m['content'] is string -%}{{- m['content'] | trim -}}"
    "{%- else -%}{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] | trim -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<start_of_image>' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<end_of_turn>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TokenizerError(ValueError):
    """A tokenizer folder, template or token sequence that cannot be served."""


def _token_str(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, Mapping):
        return v.get("content")
    return str(v)


def _compile_template(source: str):
    """Compile a chat template in a sandbox, with the helpers transformers exposes to templates."""
    import datetime

    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A fast tokenizer with its chat template and special-token ids.

    Build with ``from_dir``, ``maybe_from_dir`` or ``from_gguf``; the constructor takes a
    ``tokenizers.Tokenizer`` whose post-processor already adds what ``encode(add_bos=True)`` should.
    """

    def __init__(self, backend, *, chat_template: str | None = None,
                 special_tokens: Mapping[str, str | None] | None = None,
                 extra_eos_ids: Iterable[int] = (), source: str = ""):
        self.backend = backend
        self.chat_template = chat_template
        self.source = source
        st = dict(special_tokens or {})
        self.special_tokens = {k: _token_str(st.get(k)) for k in _SPECIAL_KEYS}
        self.bos_token = self.special_tokens["bos_token"]
        self.eos_token = self.special_tokens["eos_token"]
        self.bos_id = self._id_or_none(self.bos_token)
        eos_id = self._id_or_none(self.eos_token)
        pad_id = self._id_or_none(self.special_tokens["pad_token"])
        self.pad_id: int = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.end_of_turn_token = self._pick(END_OF_TURN_CANDIDATES)
        self.end_of_turn_id = self._id_or_none(self.end_of_turn_token)
        self.start_of_turn_token = self._pick(START_OF_TURN_CANDIDATES)
        self.start_of_turn_id = self._id_or_none(self.start_of_turn_token)
        eos = {i for i in (eos_id, self.end_of_turn_id) if i is not None}
        eos.update(int(i) for i in extra_eos_ids)
        self.eos_ids: frozenset[int] = frozenset(eos)
        self._template = None

    # -- construction -------------------------------------------------------------------------
    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def _pick(self, candidates: Sequence[str]) -> str | None:
        present = [c for c in candidates if self.backend.token_to_id(c) is not None]
        if self.chat_template:
            in_template = [c for c in present if c in self.chat_template]
            if in_template:
                return in_template[0]
        return present[0] if present else None

    @classmethod
    def maybe_from_dir(cls, path: str | Path) -> "Tokenizer | None":
        """``from_dir(path)`` when ``path/tokenizer.json`` exists, else None."""
        return cls.from_dir(path) if (Path(path) / "tokenizer.json").is_file() else None

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load an HF checkpoint folder: ``tokenizer.json`` (required), ``tokenizer_config.json``,
        ``chat_template.jinja`` (preferred over the config's ``chat_template``),
        ``special_tokens_map.json`` and ``generation_config.json`` (extra eos ids), all optional.

        As transformers does, an explicit ``add_bos_token``/``add_eos_token`` in the config (or a
        tokenizer.json without a post-processor) rebuilds the post-processor from those flags.
        """
        from tokenizers import Tokenizer as _Backend
        from tokenizers import processors

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        backend = _Backend.from_file(str(tj))

        def read_json(name):
            p = path / name
            if not p.is_file():
                return {}
            try:
                return json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{p}: invalid JSON ({e})") from e

        cfg = read_json("tokenizer_config.json")
        stm = read_json("special_tokens_map.json")
        special = {k: _token_str(cfg.get(k, stm.get(k))) for k in _SPECIAL_KEYS}

        template = None
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        else:
            ct = cfg.get("chat_template")
            if isinstance(ct, list):  # named templates: take "default"
                named = {t.get("name"): t.get("template") for t in ct}
                ct = named.get("default")
            template = ct

        if "add_bos_token" in cfg or "add_eos_token" in cfg or backend.post_processor is None:
            add_bos, add_eos = bool(cfg.get("add_bos_token", False)), bool(cfg.get("add_eos_token", False))
            bos, eos = special["bos_token"], special["eos_token"]
            add_bos = add_bos and bos is not None and backend.token_to_id(bos) is not None
            add_eos = add_eos and eos is not None and backend.token_to_id(eos) is not None
            single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
            pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"]
                                           + ([f"{eos}:1"] if add_eos else []))
            toks = ([(bos, backend.token_to_id(bos))] if add_bos else []) + \
                   ([(eos, backend.token_to_id(eos))] if add_eos else [])
            backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                   special_tokens=toks)

        gen = read_json("generation_config.json")
        extra = gen.get("eos_token_id", [])
        extra = [extra] if isinstance(extra, int) else list(extra or [])
        return cls(backend, chat_template=template, special_tokens=special, extra_eos_ids=extra,
                   source=str(path))

    @classmethod
    def from_gguf(cls, path: str | Path | None = None) -> "Tokenizer":
        """Build from a GGUF file's tokenizer metadata (``None``: the packaged Gemma-3-270M).

        Builds the same ``tokenizers.Tokenizer`` as transformers' GGUF conversion
        (``AutoTokenizer.from_pretrained(dir, gguf_file=name)``), directly from the metadata and
        without importing transformers (see ``_gemma_backend_from_gguf``); 1-2 s for Gemma's
        262k vocabulary, so nothing is cached. Only SentencePiece vocabularies
        (``tokenizer.ggml.model == "llama"``) of Gemma architectures are supported; anything else
        raises TokenizerError naming the field. The chat template is ``tokenizer.chat_template``
        from the metadata; a Gemma GGUF without one gets ``GEMMA_CHAT_TEMPLATE``.
        """
        from prefjax.checkpoints.gguf import read_gguf_tokenizer

        data = read_gguf_tokenizer(path)
        backend, special = _gemma_backend_from_gguf(data)
        template = data.metadata.get("tokenizer.chat_template")
        if not isinstance(template, str):
            template = None
        if template is None and backend.token_to_id("<start_of_turn>") is not None \
                and backend.token_to_id("<end_of_turn>") is not None:
            template = GEMMA_CHAT_TEMPLATE
        return cls(backend, chat_template=template, special_tokens=special, source=str(data.path))

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` (atomic per file)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = {k: v for k, v in self.special_tokens.items() if v is not None}
        eot_extra = sorted(self.eos_ids)
        files = {"tokenizer.json": self.backend.to_str(),
                 "tokenizer_config.json": json.dumps(cfg, indent=1),
                 "generation_config.json": json.dumps({"eos_token_id": eot_extra})}
        if self.chat_template:
            files["chat_template.jinja"] = self.chat_template
        # tokenizer_config.json last: its presence marks the folder complete.
        for name in sorted(files, key=lambda n: n == "tokenizer_config.json"):
            tmp = path / f".{name}.tmp{os.getpid()}"
            tmp.write_text(files[name], encoding="utf-8")
            os.replace(tmp, path / name)

    # -- encoding -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary including added tokens."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_bos`` adds the tokenizer's special tokens (transformers'
        ``add_special_tokens=True``: ``<bos>`` for Gemma/Llama, nothing for Qwen)."""
        return list(self.backend.encode(text, add_special_tokens=add_bos).ids)

    def encode_with_offsets(self, text: str, add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and per-token ``(start, end)`` character offsets into ``text``.

        Special tokens added by the post-processor get ``(0, 0)``; byte-fallback pieces of one
        character all carry that character's span. To locate a span of a chat prompt, render it
        with ``chat`` and call this with ``add_bos=False`` (the rendered string holds ``<bos>``).
        """
        enc = self.backend.encode(text, add_special_tokens=add_bos)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (numpy arrays accepted)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------
    def chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
             **template_kwargs) -> str:
        """Render ``messages`` (``[{"role", "content"}, ...]``) with the checkpoint's chat template.

        The template sees ``messages``, ``add_generation_prompt``, the special tokens
        (``bos_token`` ...), ``raise_exception`` and ``strftime_now``, as in transformers.
        """
        if not self.chat_template:
            raise TokenizerError(f"tokenizer from {self.source or '?'} has no chat template")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m:
                raise TokenizerError(f"message {i} must be a dict with 'role' and 'content'; got {m!r}")
        ctx = {k: v for k, v in self.special_tokens.items() if v is not None}
        ctx.update(template_kwargs)
        return self._template.render(messages=[dict(m) for m in messages],
                                     add_generation_prompt=add_generation_prompt, **ctx)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **template_kwargs) -> list[int]:
        """``encode(chat(messages))`` without adding special tokens again (no doubled ``<bos>``)."""
        return self.encode(self.chat(messages, add_generation_prompt, **template_kwargs), add_bos=False)

    # -- turn boundaries ----------------------------------------------------------------------
    def _turn_role(self, ids: np.ndarray, eot_index: int, prev_eot: int) -> str | None:
        """Role of the turn closed by the end-of-turn token at ``eot_index`` (None if unknown)."""
        if self.start_of_turn_id is None:
            return None
        starts = np.nonzero(ids[prev_eot + 1:eot_index] == self.start_of_turn_id)[0]
        if starts.size == 0:
            return None
        s = prev_eot + 1 + int(starts[-1])
        head = self.decode(ids[s + 1:min(s + 4, eot_index)], skip_special_tokens=False)
        m = re.match(r"\s*([A-Za-z_]+)", head)
        return m.group(1).lower() if m else None

    def end_of_turn_index(self, ids: Sequence[int] | np.ndarray, which: str = "last_user") -> int:
        """Index in ``ids`` of an end-of-turn token.

        ``which="last_user"``: the one closing the last user turn (found from the role after the
        turn opener, e.g. ``<start_of_turn>user``; when the format has no opener, the last one).
        ``which="last"``: the last end-of-turn token. Raises TokenizerError when there is none.
        """
        if self.end_of_turn_id is None:
            raise TokenizerError(f"tokenizer from {self.source or '?'} has no end-of-turn token "
                                 f"(looked for {END_OF_TURN_CANDIDATES})")
        arr = np.asarray(ids).reshape(-1)
        hits = np.nonzero(arr == self.end_of_turn_id)[0]
        if hits.size == 0:
            raise TokenizerError(
                f"sequence of {arr.size} tokens has no end-of-turn token {self.end_of_turn_token!r} "
                f"(id {self.end_of_turn_id}); was it rendered with the chat template?")
        if which == "last":
            return int(hits[-1])
        if which != "last_user":
            raise ValueError(f"which must be 'last_user' or 'last'; got {which!r}")
        if self.start_of_turn_id is None:
            return int(hits[-1])
        prevs = [-1] + [int(h) for h in hits[:-1]]
        for h, p in zip(hits[::-1], prevs[::-1]):
            if self._turn_role(arr, int(h), p) == "user":
                return int(h)
        raise TokenizerError(f"no end-of-turn token closes a user turn in this sequence of {arr.size} tokens")

    def turn_boundary_positions(self, ids: Sequence[int] | np.ndarray, n_after: int = 0,
                                which: str = "last_user") -> list[int]:
        """The end-of-turn index and the ``n_after`` indices after it.

        For a Gemma prompt rendered with a generation prompt, ``n_after=4`` covers
        ``<end_of_turn>``, ``\\n``, ``<start_of_turn>``, ``model``, ``\\n``.
        """
        k = self.end_of_turn_index(ids, which=which)
        n = len(np.asarray(ids).reshape(-1))
        if k + n_after >= n:
            raise TokenizerError(f"end-of-turn token at {k} has only {n - 1 - k} tokens after it; "
                                 f"asked for n_after={n_after}")
        return list(range(k, k + n_after + 1))

    # -- batching -----------------------------------------------------------------------------
    def batch_encode(self, texts_or_ids: Sequence[str | Sequence[int]], pad: str = "left",
                     add_bos: bool = True, pad_to_multiple_of: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Encode (strings) or take (id lists) a batch and pad it with ``pad_id``.

        Returns ``(ids_BxT int32, attention_mask_BxT int32)``; ``pad`` is ``"left"`` (for
        generation: the last column is every row's last token) or ``"right"``.
        """
        if pad not in ("left", "right"):
            raise ValueError(f"pad must be 'left' or 'right'; got {pad!r}")
        rows = [self.encode(x, add_bos=add_bos) if isinstance(x, str) else [int(i) for i in x]
                for x in texts_or_ids]
        if not rows:
            raise ValueError("batch_encode needs at least one sequence")
        ids_BxT, valid_BxT = left_pad(rows, self.pad_id, multiple=pad_to_multiple_of, right=pad == "right")
        return ids_BxT, valid_BxT.astype(np.int32)

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab={self.vocab_size}, bos={self.bos_id}, "
                f"eot={self.end_of_turn_token!r}, eos={sorted(self.eos_ids)}, pad={self.pad_id}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")


# -- GGUF -> tokenizers.Tokenizer ---------------------------------------------------------------
# Architectures whose SentencePiece ("llama") GGUF vocabulary transformers builds as a Gemma tokenizer.
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
# The names GemmaTokenizer always registers as special tokens (its constructor defaults).
_GEMMA_DEFAULT_SPECIALS = ("<bos>", "<eos>", "<unk>", "<pad>", "<mask>")
# llama.cpp token types (``tokenizer.ggml.token_type``).
_CONTROL, _USER_DEFINED = 3, 4
# GGUF id keys of the special tokens, by the name ``Tokenizer`` gives them.
_GGUF_SPECIAL_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                     "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}


def _merges_by_position(tokens: Sequence[str], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary whose file order is its merge order (Gemma).

    Every split ``w = a + b`` of a vocabulary token with both halves in the vocabulary is a merge;
    merges are ranked by the id of ``w`` (earlier first), then by the longer left half first. This
    is the order transformers' ``generate_merges`` gives with the scores ``-id``.

    The ~1.2M candidate halves of Gemma's vocabulary are looked up with numpy: a polynomial hash
    (mod 2**64, length folded in) of every half is matched against the tokens' hashes, and each
    match is then checked character by character, so the result is exact. Should two vocabulary
    tokens share a hash, a plain dictionary lookup of every half is used instead.
    """
    order = list(tokens) if len(vocab) == len(tokens) else sorted(vocab, key=vocab.__getitem__)
    lens = np.fromiter(map(len, order), np.int64, len(order))
    starts = np.concatenate([[0], np.cumsum(lens)])
    cps = np.frombuffer("".join(order).encode("utf-32-le"), np.uint32).astype(np.uint64) + np.uint64(1)
    big, step = np.uint64(0x9E3779B97F4A7C15), np.uint64(0x100000001B3)  # odd: invertible mod 2**64
    inv = pow(int(step), -1, 2 ** 64)
    with np.errstate(over="ignore"):
        pw = np.ones(cps.size + 1, np.uint64)
        pw[1:] = np.cumprod(np.full(cps.size, step, np.uint64))
        ipw = np.ones(cps.size + 1, np.uint64)
        ipw[1:] = np.cumprod(np.full(cps.size, np.uint64(inv), np.uint64))
        acc = np.zeros(cps.size + 1, np.uint64)
        np.cumsum(cps * pw[:-1], out=acc[1:])

        def key(x, y):  # hash of the characters [x, y) of the concatenation, as if they began at 0
            return (acc[y] - acc[x]) * ipw[x] + (y - x).astype(np.uint64) * big

        tok_keys = key(starts[:-1], starts[1:])
        sort = np.argsort(tok_keys, kind="stable")
        sorted_keys = tok_keys[sort]
        if np.any(sorted_keys[1:] == sorted_keys[:-1]):  # two tokens share a hash: look up plainly
            lefts = [w[:k] for w in order for k in range(len(w) - 1, 0, -1)]
            rights = [w[k:] for w in order for k in range(len(w) - 1, 0, -1)]
            has = vocab.__contains__
            keep = np.fromiter(map(has, lefts), bool, len(lefts))
            keep &= np.fromiter(map(has, rights), bool, len(rights))
            return list(zip(compress(lefts, keep), compress(rights, keep)))

        def find(keys):  # index into ``order`` of the token with each key, or -1
            at = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
            return np.where(sorted_keys[at] == keys, sort[at], -1)

        n_split = np.maximum(lens - 1, 0)
        word = np.repeat(np.arange(len(order)), n_split)            # the token each split cuts
        first = np.repeat(np.cumsum(n_split) - n_split, n_split)
        cut = np.repeat(n_split, n_split) - (np.arange(word.size) - first)  # L-1 .. 1 per token
        x = starts[word]
        left = find(key(x, x + cut))
        hit = left >= 0
        word, cut, left, x = word[hit], cut[hit], left[hit], x[hit]
        right = find(key(x + cut, starts[word + 1]))
    hit = right >= 0
    word, cut, left, right = word[hit], cut[hit], left[hit], right[hit]
    # exact check of every match: lengths, then the characters of left + right against the token
    good = (lens[left] == cut) & (lens[right] == lens[word] - cut)
    span = np.where(good, lens[word], 0)
    owner = np.repeat(np.arange(word.size), span)
    pos = np.arange(owner.size) - np.repeat(np.cumsum(span) - span, span)
    from_left = pos < cut[owner]
    src = np.where(from_left, starts[left[owner]] + pos, starts[right[owner]] + pos - cut[owner])
    same = cps[src] == cps[starts[word[owner]] + pos]
    good &= np.bincount(owner, weights=~same, minlength=word.size) == 0
    get = order.__getitem__
    return list(zip(map(get, left[good].tolist()), map(get, right[good].tolist())))


def _gemma_backend_from_gguf(data):
    """``(tokenizers.Tokenizer, special token strings)`` for a Gemma GGUF, as transformers 5 builds it.

    What transformers' GGUF conversion (``integrations/gguf/gguf_tokenizer_mapping.py``:
    ``gemma_tokenizer`` + ``add_gguf_special_tokens``, then ``GemmaTokenizer`` /
    ``TokenizersBackend``) produces, reproduced here:

    * vocabulary: the tokens in id order, except that a token made only of whitespace containing a
      space (``"  "``) is respelled as that many ``"\u2581"``;
    * model: BPE with ``byte_fallback``, ``fuse_unk``, ``unk_token="<unk>"``; merges from
      ``tokenizer.ggml.merges`` when present, else derived from the vocabulary in file order
      (``_merges_by_position``; Gemma's scores do not follow its merge order);
    * normalizer ``Replace(" ", "\u2581")`` (no dummy prefix: ``add_space_prefix`` is not used),
      pre-tokenizer ``Split(" ", merged_with_previous)``, decoder ``Replace("\u2581", " ")`` +
      ``ByteFallback`` + ``Fuse``;
    * added tokens: every CONTROL token (type 3) special, the tokens named by the bos/eos/unk/pad
      ids and GemmaTokenizer's defaults (``<bos> <eos> <unk> <pad> <mask>``) special, every
      USER_DEFINED token (type 4) that is in the vocabulary as spelled in the file a plain
      (non-special) added token; none normalized;
    * post-processor: ``TemplateProcessing`` adding the bos token when ``tokenizer.ggml.add_bos_token``
      (default True) and the eos token when ``add_eos_token`` (default False).
    """
    from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as _Backend
    from tokenizers.models import BPE

    path, md = data.path, data.metadata
    kind = md.get("tokenizer.ggml.model")
    arch = md.get("general.architecture")
    if kind != "llama":
        raise TokenizerError(
            f"{path}: metadata field 'tokenizer.ggml.model' is {'missing' if kind is None else repr(kind)}; "
            "prefjax builds tokenizers only "
            f"for 'llama' (SentencePiece) vocabularies of the architectures {_GEMMA_ARCHITECTURES}")
    if arch not in _GEMMA_ARCHITECTURES:
        raise TokenizerError(
            f"{path}: metadata field 'general.architecture' is {arch!r}; prefjax builds 'llama' "
            f"(SentencePiece) GGUF tokenizers only for {_GEMMA_ARCHITECTURES}")

    tokens = data.tokens
    n = len(tokens)
    spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    if data.merges is not None:
        merges = []
        for k, m in enumerate(data.merges):
            pair = tuple(m.split(" "))
            if len(pair) != 2:
                raise TokenizerError(f"{path}: metadata field 'tokenizer.ggml.merges' entry {k} is {m!r}, "
                                     "not two tokens separated by one space")
            merges.append(pair)
    else:
        merges = _merges_by_position(spelled, vocab)
    backend = _Backend(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True,
                           dropout=None))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])

    special: dict[str, str | None] = {}
    for name, key in _GGUF_SPECIAL_IDS.items():
        i = md.get(key)
        if i is None:
            special[name] = None
            continue
        if not isinstance(i, int) or not 0 <= i < n:
            raise TokenizerError(f"{path}: metadata field {key!r} is {i!r}, not a token id below {n}")
        special[name] = tokens[i]

    types = data.token_type
    control = [] if types is None else [tokens[i] for i in np.nonzero(types == _CONTROL)[0]]
    named = list(_GEMMA_DEFAULT_SPECIALS) + [t for t in special.values() if t is not None]
    seen = set(control)
    control += [t for t in dict.fromkeys(named) if t not in seen]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if types is not None:
        added = set(control)  # the vocabulary with its added tokens, without asking the backend (slow)
        user = [tokens[i] for i in np.nonzero(types == _USER_DEFINED)[0]
                if tokens[i] in vocab or tokens[i] in added]
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", True)) and special["bos_token"] is not None
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False)) and special["eos_token"] is not None
    bos, eos = special["bos_token"], special["eos_token"]
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    ids = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    backend.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                           special_tokens=ids)
    return backend, special


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, *, width: int | None = None, multiple: int = 1,
             rows: int | None = None, row_multiple: int = 1, right: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Token-id rows left-padded into one block: ``(ids [B, T] int32, valid [B, T] bool)``.

    Row ``r`` holds ``seqs[r]`` in its last ``len(seqs[r])`` columns (``valid`` True there) and
    ``pad_id`` before; an empty sequence gives a row of padding. ``T`` is ``width`` when given, else
    the longest sequence (at least 1), rounded up to a multiple of ``multiple``; a sequence longer
    than ``T`` raises ValueError naming its row. ``B`` is ``rows`` when given (at least
    ``len(seqs)``, the extra rows all padding), else ``len(seqs)``, rounded up to a multiple of
    ``row_multiple``. ``right=True`` puts each sequence in its first columns instead (right padding,
    for tokens that continue a prefix cache).

    Per-token values that go with the sequences (steering masks, weights) land where ``valid`` is
    True, in row order: ``vals = np.zeros(ids.shape); vals[valid] = np.concatenate(per_seq_values)``.
    """
    lens = [len(s) for s in seqs]
    m = max(1, int(multiple))
    t = max(max(lens, default=0), 1) if width is None else int(width)
    t = -(-t // m) * m
    if rows is not None and int(rows) < len(seqs):
        raise ValueError(f"rows={rows} is fewer than the {len(seqs)} sequences")
    b = len(seqs) if rows is None else int(rows)
    rm = max(1, int(row_multiple))
    b = -(-b // rm) * rm
    ids = np.full((b, t), pad_id, np.int32)
    valid = np.zeros((b, t), bool)
    for r, (s, n) in enumerate(zip(seqs, lens)):
        if n > t:
            raise ValueError(f"row {r}: sequence of {n} tokens is longer than the padded width {t}")
        if n:
            sl = slice(0, n) if right else slice(t - n, t)
            ids[r, sl], valid[r, sl] = s, True
    return ids, valid


def char_span_to_token_mask(offsets: Sequence[tuple[int, int]], start: int, end: int, seq_len: int,
                            pad: str = "right") -> np.ndarray:
    """Boolean ``[seq_len]`` mask of the tokens whose character span overlaps ``[start, end)``.

    ``offsets`` come from ``Tokenizer.encode_with_offsets``; zero-width tokens (added specials) are
    never selected. With ``pad="left"`` the tokens sit at the end of the row, as ``batch_encode``
    places them.
    """
    n = len(offsets)
    if n > seq_len:
        raise ValueError(f"{n} tokens do not fit seq_len={seq_len}")
    if not 0 <= start <= end:
        raise ValueError(f"bad character span [{start}, {end})")
    off = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
    hit = (off[:, 0] < end) & (off[:, 1] > start) & (off[:, 1] > off[:, 0])
    mask = np.zeros(seq_len, dtype=bool)
    shift = seq_len - n if pad == "left" else 0
    mask[shift:shift + n] = hit
    return mask
