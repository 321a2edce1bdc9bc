"""Text embeddings from a decoder used as an embedder (Qwen3-Embedding): the content baseline.

Qwen3-Embedding's documented recipe, reproduced here:

* queries carry an instruction: ``"Instruct: {task}\\nQuery:{text}"`` (no space after ``Query:``);
  documents are embedded as they are;
* every sequence ends with ``<|endoftext|>`` (the released tokenizer's post-processor appends it;
  older tokenizers did not, and the official snippet appended it by hand -- we append it when the
  tokenizer did not), truncated so the total length is at most ``max_length``;
* the batch is left-padded and the embedding is the final-normed hidden state (``last_hidden_state``
  of ``Qwen3Model``, prefjax's ``ln_final.hook_normalized``) of the last real token, which under
  left padding is the last column; then L2-normalised. ``dim`` keeps the first ``dim`` components
  before normalising (Matryoshka truncation, which the model card supports).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from prefjax.hooks import FINAL_HOOK
from prefjax.tokenize import left_pad

EOD_TOKEN = "<|endoftext|>"


def format_query(text: str, instruction: str | None) -> str:
    """``"Instruct: {instruction}\\nQuery:{text}"``, or ``text`` unchanged when ``instruction`` is None."""
    return text if instruction is None else f"Instruct: {instruction}\nQuery:{text}"


def _eod_id(model, tokenizer) -> int:
    if tokenizer is not None and hasattr(tokenizer, "token_to_id"):
        i = tokenizer.token_to_id(EOD_TOKEN)
        if i is not None:
            return int(i)
    eos = getattr(model.config, "eos_ids", ())
    if eos:
        return int(eos[-1] if len(eos) > 1 else eos[0])
    raise ValueError(f"cannot tell the {EOD_TOKEN} id: the tokenizer lacks it and the config has no eos id")


def tokenize_for_embedding(model, texts: Sequence[str], *, instruction: str | None = None,
                           max_length: int = 8192, tokenizer=None) -> list[list[int]]:
    """Token ids per text, each ending with exactly one ``<|endoftext|>`` and at most ``max_length`` long."""
    tok = tokenizer if tokenizer is not None else model.tokenizer
    if tok is None:
        raise ValueError(f"model {model.source!r} has no tokenizer; pass tokenizer= or use embed_token_ids")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2; got {max_length}")
    eod = _eod_id(model, tok)
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
        ids = list(tok.encode(format_query(t, instruction), add_bos=True))
        if ids and ids[-1] == eod:
            ids = ids[:-1]
        out.append(ids[: max_length - 1] + [eod])
    return out


def embed_token_ids(model, ids: Sequence[Sequence[int]], *, batch_size: int = 16, dim: int | None = None,
                    pad_id: int | None = None, length_multiple: int = 16) -> np.ndarray:
    """Last-token-pooled, L2-normalised embeddings [n, d] of pre-tokenised sequences.

    Sequences are sorted by length, left-padded to a multiple of ``length_multiple`` (so few shapes
    are compiled) and run ``batch_size`` at a time; the output keeps the input order.
    """
    n = len(ids)
    d = model.d_model if dim is None else int(dim)
    if dim is not None and not 0 < d <= model.d_model:
        raise ValueError(f"dim={dim} must be in 1..{model.d_model}")
    if n == 0:
        return np.zeros((0, d), np.float32)
    rows = [list(map(int, r)) for r in ids]
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"sequence {i} is empty")
    if pad_id is None:
        pad_id = getattr(model.config, "pad_id", None)
        pad_id = 0 if pad_id is None else int(pad_id)
    order = np.argsort([len(r) for r in rows], kind="stable")
    out = np.zeros((n, d), np.float32)
    from prefjax.progress import progress
    starts = range(0, n, batch_size)
    for s in progress(starts, total=len(starts), desc="embed"):
        idx = order[s:s + batch_size]
        chunk = [rows[i] for i in idx]
        b = batch_size  # constant batch shape: fill the last batch with copies of its first row
        toks, valid = left_pad(chunk + [chunk[0]] * (b - len(chunk)), pad_id, multiple=length_multiple)
        mask, t = valid.astype(np.int32), toks.shape[1]
        _, cache = model.run(toks, attention_mask=mask, capture=(FINAL_HOOK,),
                             positions=np.full((b, 1), t - 1, np.int32), logits=False)
        h = np.asarray(cache[FINAL_HOOK], np.float32)[: len(chunk), 0, :d]
        out[idx] = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
    return out


def embed_texts(model, texts: Sequence[str], *, instruction: str | None = None, batch_size: int = 16,
                max_length: int = 8192, dim: int | None = None, tokenizer=None) -> np.ndarray:
    """Embed ``texts`` as Qwen3-Embedding does; returns float32 [n, d] unit vectors.

    ``instruction`` (a one-sentence task description) marks the texts as queries; leave it None for
    documents. ``tokenizer`` overrides ``model.tokenizer`` (anything with ``encode(text, add_bos)``
    and ``token_to_id``). Cosine similarity of two outputs is their dot product.
    """
    ids = tokenize_for_embedding(model, texts, instruction=instruction, max_length=max_length,
                                 tokenizer=tokenizer)
    pad = getattr(tokenizer if tokenizer is not None else model.tokenizer, "pad_id", None)
    return embed_token_ids(model, ids, batch_size=batch_size, dim=dim, pad_id=pad)
