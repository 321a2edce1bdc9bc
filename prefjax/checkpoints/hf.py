"""Hugging Face checkpoint directories -> sharded prefjax parameters.

Each model family declares ``param_shapes(cfg)`` (prefjax name -> shape, logical axes),
``hf_names(cfg, has)`` (prefjax name -> HF tensor name template with ``{l}`` for the layer, or an
:class:`HFMulti` of several tensors, and a host transform to prefjax's layout) and ``layer_rows``
(which HF layers a stacked parameter holds). :func:`load_params` builds every parameter with
``jax.make_array_from_callback``: each device shard is filled from a memory-mapped read of the
layers it holds, so no host ever holds the whole model, and nothing is cast or truncated silently.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from prefjax.sharding import DEFAULT_RULES, named

_FLOAT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class TensorSource(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...


class CheckpointError(ValueError):
    """A checkpoint that does not match what the model config says."""


# Fields every transformers config.json may carry that change nothing in a forward pass.
HF_COMMON_FIELDS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "attention_dropout", "_name_or_path", "output_hidden_states",
    "output_attentions", "return_dict", "id2label", "label2id", "problem_type", "is_encoder_decoder",
    "chunk_size_feed_forward", "tokenizer_class", "pruned_heads", "finetuning_task",
    "task_specific_params", "prefix", "sep_token_id", "decoder_start_token_id", "add_cross_attention",
    "tf_legacy_loss", "use_return_dict", "torchscript", "is_decoder", "cross_attention_hidden_size",
    "max_length", "min_length", "unk_token_id", "tie_word_embeddings",
})


def check_hf_fields(hf: dict[str, Any], *, handled, pinned: dict[str, Any] | None = None, ignored=(),
                    source: str, port: str) -> None:
    """Refuse every config field that is neither read by the port (``handled``), harmless
    (:data:`HF_COMMON_FIELDS` or ``ignored``), nor at the one value the port implements (``pinned``;
    None counts as False). The error names the file, the field and its value."""
    pinned = pinned or {}
    for k, v in hf.items():
        if k in pinned:
            ok = pinned[k]
            if v != ok and not (v is None and ok is False):
                raise ValueError(f"{source}: field {k}={v!r} is not supported by the prefjax {port} port "
                                 f"(only {ok!r})")
        elif k not in handled and k not in HF_COMMON_FIELDS and k not in ignored:
            raise ValueError(f"{source}: config field {k!r} (= {v!r}) is not handled by the prefjax {port} "
                             "port; refusing to ignore it")


def resolve_dtype(dtype) -> Any:
    """Map a user dtype (string or jnp dtype) to a floating jnp dtype the ports can hold."""
    if dtype is None:
        return None
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _FLOAT_DTYPES:
        raise TypeError(f"dtype {name!r} cannot hold model weights; use one of {sorted(_FLOAT_DTYPES)}")
    return _FLOAT_DTYPES[name]


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{Path(folder)} has no config.json (is it a Hugging Face checkpoint?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def find_prefix(src: TensorSource, probe: str, prefixes) -> str:
    """Return the prefix (replacing the leading ``model.`` of ``probe``) under which weights live."""
    have = set(src.names())
    for p in prefixes:
        if p + probe[len("model."):] in have:
            return p
    raise CheckpointError(f"no tensor named like {probe!r} under any of the prefixes {list(prefixes)}")


@dataclasses.dataclass(frozen=True)
class HFMulti:
    """One prefjax row built from several HF tensors: ``combine([arrays in names order])`` (e.g. the
    per-expert weights ``save_pretrained`` writes, stacked into one [experts, ...] row)."""

    names: tuple[str, ...]
    combine: Callable


EMBED_TENSOR = "model.embed_tokens.weight"  # every family's embedding; finds the checkpoint's prefix


def load_params(family, cfg, src: TensorSource, *, dtype=None, mesh=None, rules=DEFAULT_RULES,
                where: str = "checkpoint", extra_skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load every parameter of ``family`` (a :class:`prefjax.models.family.Family`) from ``src`` onto ``mesh``.

    The family declares ``param_shapes(cfg)`` (a leading ``layers`` axis marks a stacked parameter),
    ``hf_names(cfg, has)`` (per parameter: an HF name template with ``{l}`` for the HF layer, or an
    :class:`HFMulti`, plus a host transform; ``has(template)`` says whether the checkpoint holds a
    tensor, for families whose names depend on how the checkpoint was written) and
    ``layer_rows(cfg, path)`` (the HF layer of each row of a stacked parameter: every layer, or a
    subset such as Qwen-3.5's attention layers). Every tensor's presence and shape is checked before
    any array is built. Raises :class:`CheckpointError` naming the tensor (and ``where``) when one is
    missing, has the wrong shape, or when the checkpoint holds tensors the port would silently ignore.
    Each device shard reads only the rows it holds.
    """
    available = set(src.names())
    prefix = find_prefix(src, EMBED_TENSOR, family.hf_prefixes)

    def hf(template: str, l: int | None = None) -> str:
        t = prefix + template[len("model."):] if template.startswith("model.") else template
        return t.format(l=l) if l is not None else t

    shapes = family.param_shapes(cfg)
    names = family.hf_names(cfg, lambda template: hf(template, 0) in available)
    if dtype is None:
        emb_dtype = np.dtype(src.get(hf(EMBED_TENSOR)).dtype)
        dtype = resolve_dtype(emb_dtype.name if emb_dtype.name in _FLOAT_DTYPES else "float32")

    def row_names(entry, l):
        return [hf(t, l) for t in entry.names] if isinstance(entry, HFMulti) else [hf(entry, l)]

    def build(entry, transform, arrays):
        a = entry.combine(arrays) if isinstance(entry, HFMulti) else arrays[0]
        return a if transform is None else transform(a)

    # Validate every tensor's presence and shape before any compute.
    plan: dict[str, tuple[Any, Callable | None, list[list[str]], bool]] = {}
    consumed: set[str] = set()
    for path, (shape, axes) in shapes.items():
        if path not in names:
            raise CheckpointError(f"{family.name}: no HF name for parameter {path}")
        entry, transform = names[path]
        stacked = bool(axes) and axes[0] == "layers"
        rows = family.layer_rows(cfg, path) if stacked else (None,)
        target = tuple(shape[1:]) if stacked else tuple(shape)
        row_tensors = [row_names(entry, l) for l in rows]
        for tns in row_tensors:
            for tn in tns:
                if tn not in available:
                    raise CheckpointError(f"{where}: tensor {tn!r} (for {path}) is missing")
            got = [jax.ShapeDtypeStruct(tuple(src.shape(tn)), jnp.float32) for tn in tns]
            want = tuple(jax.eval_shape(lambda *xs: build(entry, transform, list(xs)), *got).shape)
            if want != target:
                raise CheckpointError(f"{where}: tensor(s) {tns[:2]} of shape {[g.shape for g in got[:2]]} give "
                                      f"{want} for {path}; the config implies {target}")
            consumed.update(tns)
        plan[path] = (entry, transform, row_tensors, stacked)

    skip = tuple(family.hf_skip_prefixes) + tuple(extra_skip)
    leftovers = sorted(t for t in available if t not in consumed and not t.startswith(skip))
    if leftovers:
        raise CheckpointError(f"{where}: {len(leftovers)} tensor(s) the {family.name} port would ignore, "
                              f"e.g. {leftovers[:5]}; refusing to load silently")

    def host(entry, transform, tensor_names):
        return build(entry, transform, [np.asarray(src.get(tn)) for tn in tensor_names])

    flat: dict[str, Any] = {}
    for path, (entry, transform, row_tensors, stacked) in plan.items():
        shape, axes = shapes[path]
        sharding = named(shape, axes, mesh, rules) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        if stacked:
            def cb(index, entry=entry, transform=transform, row_tensors=row_tensors):
                rows = range(len(row_tensors))[index[0]]
                return np.stack([np.asarray(host(entry, transform, row_tensors[r])[index[1:]]).astype(dtype)
                                 for r in rows])
        else:
            def cb(index, entry=entry, transform=transform, row_tensors=row_tensors):
                return np.asarray(host(entry, transform, row_tensors[0])[index]).astype(dtype)
        flat[path] = jax.make_array_from_callback(shape, sharding, cb)
    return nest_paths(flat)


def assign_path(tree: dict, path: str, value) -> None:
    """Set ``tree[a][b] = value`` for ``path = "a/b"``, creating the inner dicts."""
    parts = path.split("/")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
    tree[parts[-1]] = value


def nest_paths(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a/b": x, "c": y}`` -> ``{"a": {"b": x}, "c": y}`` (keys in order)."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        assign_path(out, path, value)
    return out


def get_path(tree, path: str):
    """``tree[a][b]`` for ``path = "a/b"``."""
    for part in path.split("/"):
        tree = tree[part]
    return tree
