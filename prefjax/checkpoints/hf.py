"""Hugging Face checkpoint directories -> sharded prefjax parameters.

Each model family declares ``param_shapes(cfg)`` (prefjax name -> shape, logical axes) and
``hf_names(cfg)`` (prefjax name -> HF tensor name template with ``{l}`` for the layer, and a host
transform to prefjax's layout). :func:`load_params` builds every parameter with
``jax.make_array_from_callback``: each device shard is filled from a memory-mapped read of the
layers it holds, so no host ever holds the whole model, and nothing is cast or truncated silently.
"""

from __future__ import annotations

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


def load_params(family, cfg, src: TensorSource, *, dtype=None, mesh=None, rules=DEFAULT_RULES,
                where: str = "checkpoint", extra_skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load every parameter of ``family`` (a model module) from ``src`` onto ``mesh``.

    Raises :class:`CheckpointError` naming the tensor (and ``where``) when one is missing, has the
    wrong shape, or when the checkpoint holds tensors the port would silently ignore.
    """
    if hasattr(family, "load_params"):  # families whose layers are not uniform (Qwen-3.5) load themselves
        return family.load_params(cfg, src, dtype=dtype, mesh=mesh, rules=rules, where=where, extra_skip=extra_skip)
    shapes = family.param_shapes(cfg)
    names = family.hf_names(cfg)
    prefix = find_prefix(src, names["embed"][0], family.HF_PREFIXES)
    n = cfg.n_layers
    consumed: set[str] = set()
    available = set(src.names())
    if dtype is None:
        emb_dtype = np.dtype(src.get(prefix + names["embed"][0][len("model."):]).dtype)
        dtype = resolve_dtype(emb_dtype.name if emb_dtype.name in _FLOAT_DTYPES else "float32")

    def hf(template: str, l: int | None = None) -> str:
        t = template if not template.startswith("model.") else prefix + template[len("model."):]
        return t.format(l=l) if l is not None else t

    # Validate every tensor's presence and shape before any compute.
    plan: dict[str, tuple[list[str], Callable | None, tuple[int, ...]]] = {}
    for path, (shape, axes) in shapes.items():
        if path not in names:
            raise CheckpointError(f"{family.FAMILY}: no HF name for parameter {path}")
        template, transform = names[path]
        stacked = axes[0] == "layers"
        tensor_names = [hf(template, l) for l in range(n)] if stacked else [hf(template)]
        target = tuple(shape[1:]) if stacked else tuple(shape)
        for tn in tensor_names:
            if tn not in available:
                raise CheckpointError(f"{where}: tensor {tn!r} (for {path}) is missing")
            got = tuple(src.shape(tn))
            want = tuple(jax.eval_shape(transform, jax.ShapeDtypeStruct(got, jnp.float32)).shape) \
                if transform is not None else got
            if want != target:
                raise CheckpointError(f"{where}: tensor {tn!r} has shape {got}, which gives {want} for {path}; "
                                      f"the config implies {target}")
        consumed.update(tensor_names)
        plan[path] = (tensor_names, transform, shape)

    leftovers = [t for t in available if t not in consumed
                 and not any(t.startswith(s) for s in family.HF_SKIP_PREFIXES + tuple(extra_skip))]
    if leftovers:
        raise CheckpointError(f"{where}: {len(leftovers)} tensor(s) the {family.FAMILY} port would ignore, "
                              f"e.g. {leftovers[:5]}; refusing to load silently")

    out: dict[str, Any] = {}
    for path, (tensor_names, transform, shape) in plan.items():
        axes = shapes[path][1]
        sharding = named(shape, axes, mesh, rules) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        stacked = axes[0] == "layers"

        def host(tn, transform=transform):
            a = np.asarray(src.get(tn))
            return a if transform is None else transform(a)

        if stacked:
            def cb(index, tensor_names=tensor_names, host=host):
                rows = range(len(tensor_names))[index[0]]
                return np.stack([np.asarray(host(tensor_names[l])[index[1:]]).astype(dtype) for l in rows])
        else:
            def cb(index, tn=tensor_names[0], host=host):
                return np.asarray(host(tn)[index]).astype(dtype)
        arr = jax.make_array_from_callback(shape, sharding, cb)
        assign_path(out, path, arr)
    return out


def assign_path(tree: dict, path: str, value):
    parts = path.split("/")
    for p in parts[:-1]:
        tree = tree.setdefault(p, {})
    tree[parts[-1]] = value
