"""PEFT LoRA adapters: read, check against the base model, apply on the fly or merge.

An adapter folder holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``,
``use_rslora``, ...) and ``adapter_model.safetensors`` with tensors named like
``base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight`` (torch layout: ``lora_A`` is
[r, in_features], ``lora_B`` is [out_features, r]). The update of a targeted linear layer is
``W x + scale * B (A x)`` with ``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` under rsLoRA.

Two ways to use one:

* **on the fly** (default): the model keeps its base params untouched and shared; the adapter's
  factors, converted to prefjax layout ``A`` [L, *in_dims, r] and ``B`` [L, r, *out_dims], are put
  under ``params["blocks"]["lora"]`` at run time and each targeted projection adds its low-rank term
  inside the jitted forward. Switching personas (``model.with_adapter(other)``) swaps only the small
  factors; adapters of the same rank and targets reuse the compiled program.
* **merged** (``merge=True``): ``W + scale * (B A)`` is folded into a new copy of the weights.

Refused, each with an error naming the field or tensor: DoRA (``use_dora``), ``bias != "none"``,
``lora_bias``, ``modules_to_save``, per-module rank/alpha patterns, ``fan_in_fan_out``, target modules
prefjax does not know or the model lacks, tensors for layers or modules the model lacks, and any
shape that does not fit the base model (an adapter trained for another base).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prefjax.models.stack import is_split

log = logging.getLogger("prefjax")

# PEFT module name -> prefjax block weight.
MODULES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
           "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_NOT_SUPPORTED_TARGETS = {"embed_tokens", "lm_head", "q_norm", "k_norm", "input_layernorm",
                          "post_attention_layernorm", "norm"}

# adapter_config.json fields that do not change inference (or only describe training).
_CONFIG_IGNORED = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "init_lora_weights", "layers_pattern", "megatron_config",
    "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
    "ensure_weight_tying", "use_qalora",
}
# Fields accepted only at the value given (None/{} = "unset").
_CONFIG_PINNED = {
    "use_dora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False,
    "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None,
    "layer_replication": None, "trainable_token_indices": None, "target_parameters": None,
    "alora_invocation_tokens": None, "velora_config": None, "monteclora_config": None, "use_bdlora": None,
    "arrow_config": None, "kasa_config": None,
}

_NAME_RE = re.compile(r"^base_model\.model\.(?:model\.)?(?:language_model\.)?layers\.(\d+)\."
                      r"(self_attn|mlp)\.([A-Za-z_]+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """An adapter that prefjax cannot apply faithfully to the given base model."""


@dataclasses.dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A LoRA adapter in prefjax layout, checked against one base model config.

    ``factors`` maps a block weight name (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``) to
    ``{"A": [L, *in_dims, r], "B": [L, r, *out_dims], "scale": [L]}`` (layers the adapter skips have
    zero factors and zero scale).
    """

    path: str
    r: int
    alpha: float
    use_rslora: bool
    targets: tuple[str, ...]
    layers: tuple[int, ...]
    factors: dict[str, dict[str, Any]]
    family: str
    on_the_fly: bool = True

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def apply(self, params):
        """Params for the forward: base params plus the factors (no copy of the base weights).

        For a family whose forward has no LoRA path, the merged weights are returned instead.
        """
        if not self.on_the_fly:
            return merge_params(params, self)
        return {**params, "blocks": {**params["blocks"], "lora": self.factors}}

    def __repr__(self):
        return (f"LoraAdapter(path={self.path!r}, r={self.r}, alpha={self.alpha}, rslora={self.use_rslora}, "
                f"targets={self.targets})")


@dataclasses.dataclass(frozen=True)
class MergedAdapter:
    """Marks a model whose weights already have an adapter folded in (``apply`` is the identity)."""

    path: str

    def apply(self, params):
        return params


def _check_config(cfg: dict[str, Any], where: str) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type={cfg.get('peft_type')!r} is not supported (only LORA)")
    for k, v in cfg.items():
        if k in _CONFIG_PINNED:
            want = _CONFIG_PINNED[k]
            unset = v is None or v == {} or v == [] or v is False
            want_unset = want is None or want == {} or want is False
            if not (v == want or (unset and want_unset)):
                what = "DoRA" if k == "use_dora" else k
                raise AdapterError(f"{where}: field {k}={v!r} is not supported ({what}; only {want!r})")
        elif k not in _CONFIG_IGNORED and k not in {"r", "lora_alpha", "target_modules", "use_rslora",
                                                     "layers_to_transform"}:
            raise AdapterError(f"{where}: field {k!r} (= {v!r}) is not handled by prefjax; refusing to ignore it")
    for k in ("r", "lora_alpha", "target_modules"):
        if k not in cfg:
            raise AdapterError(f"{where}: field {k!r} is missing")


def _targets(target_modules, where: str, model_modules: set[str], family: str) -> tuple[str, ...]:
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return tuple(MODULES[m] for m in MODULES if MODULES[m] in model_modules)
        raise AdapterError(f"{where}: target_modules={target_modules!r} (a regex) is not supported; "
                           "list the module names (e.g. ['q_proj', 'v_proj']) or use 'all-linear'")
    out = []
    for entry in target_modules:
        leaf = str(entry).split(".")[-1]
        if leaf in _NOT_SUPPORTED_TARGETS:
            raise AdapterError(f"{where}: target_modules entry {entry!r} is not supported (prefjax applies LoRA "
                               f"to the attention and MLP projections only: {sorted(MODULES)})")
        if leaf not in MODULES:
            raise AdapterError(f"{where}: target_modules entry {entry!r} is unknown: the {family} model has no "
                               f"such module (its LoRA-able modules: {sorted(MODULES)})")
        if MODULES[leaf] not in model_modules:
            raise AdapterError(f"{where}: target_modules entry {entry!r}: the {family} model lacks this module")
        out.append(MODULES[leaf])
    return tuple(dict.fromkeys(out))


def _split_dims(shape: tuple[int, ...], in_features: int) -> int:
    """Index splitting a prefjax weight shape into (in_dims, out_dims) with prod(in_dims) == in_features."""
    for i in range(1, len(shape)):
        if int(np.prod(shape[:i])) == in_features:
            return i
    return -1


def load_adapter(path, family, cfg, *, dtype=jnp.float32) -> LoraAdapter:
    """Read a PEFT LoRA folder and convert it to prefjax layout for ``family``/``cfg``.

    Everything is checked on the host before any array reaches a device; raises :class:`AdapterError`
    naming the bad field or tensor.
    """
    folder = Path(path)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} has no adapter_config.json (is it a PEFT LoRA adapter folder?)")
    try:
        acfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: invalid JSON ({e})") from None
    where = str(cfg_path)
    _check_config(acfg, where)
    r = int(acfg["r"])
    alpha = float(acfg["lora_alpha"])
    rslora = bool(acfg.get("use_rslora", False))
    if r <= 0:
        raise AdapterError(f"{where}: r={r} must be positive")
    shapes = family.param_shapes(cfg)
    model_modules = {m for m in MODULES.values() if f"blocks/{m}" in shapes}
    targets = _targets(acfg["target_modules"], where, model_modules, family.name)
    n = cfg.n_layers
    ltt = acfg.get("layers_to_transform")
    if ltt is None:
        layers = tuple(range(n))
    else:
        layers = tuple(sorted({int(x) for x in ([ltt] if isinstance(ltt, int) else ltt)}))
        if not layers:
            raise AdapterError(f"{where}: layers_to_transform is empty")
        bad = [l for l in layers if not 0 <= l < n]
        if bad:
            raise AdapterError(f"{where}: layers_to_transform names layer(s) {bad}; the model has 0..{n - 1}")

    st_path = folder / "adapter_model.safetensors"
    if not st_path.exists():
        alt = " (only adapter_model.bin, a pickle; convert it to safetensors)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{folder} has no adapter_model.safetensors{alt}")
    from safetensors.numpy import load_file
    tensors = load_file(str(st_path))
    wstr = str(st_path)

    found: dict[tuple[str, int, str], np.ndarray] = {}
    for name, arr in tensors.items():
        m = _NAME_RE.match(name)
        if not m:
            raise AdapterError(f"{wstr}: tensor {name!r} is not a LoRA factor prefjax can apply "
                               "(expected base_model.model.model.layers.<l>.<self_attn|mlp>.<module>.lora_<A|B>.weight)")
        l, _, module, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in MODULES:
            raise AdapterError(f"{wstr}: tensor {name!r} targets module {module!r}, which the {family.name} "
                               "model lacks")
        if MODULES[module] not in targets:
            raise AdapterError(f"{wstr}: tensor {name!r} targets {module!r}, which is not in target_modules")
        if not 0 <= l < n:
            raise AdapterError(f"{wstr}: tensor {name!r} names layer {l}; the model has layers 0..{n - 1} "
                               "(an adapter for another base model?)")
        if l not in layers:
            raise AdapterError(f"{wstr}: tensor {name!r} names layer {l}, not in layers_to_transform {list(layers)}")
        found[(MODULES[module], l, ab)] = arr

    factors: dict[str, dict[str, Any]] = {}
    inv = {v: k for k, v in MODULES.items()}
    for t in targets:
        wshape = tuple(shapes[f"blocks/{t}"][0][1:])
        a_list, b_list, s_list = [], [], []
        for l in range(n):
            if l not in layers:
                continue
            for ab in "AB":
                if (t, l, ab) not in found:
                    raise AdapterError(f"{wstr}: tensor for layer {l} {inv[t]}.lora_{ab} is missing")
        for l in range(n):
            if l in layers:
                a, b = found[(t, l, "A")], found[(t, l, "B")]
                tn = f"layers.{l}.{inv[t]}"
                if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
                    raise AdapterError(f"{wstr}: {tn}.lora_A has shape {a.shape} and lora_B {b.shape}; "
                                       f"expected [r={r}, in] and [out, r={r}]")
                split = _split_dims(wshape, a.shape[1])
                out_f = int(np.prod(wshape[split:])) if split > 0 else -1
                if split < 0 or b.shape[0] != out_f:
                    raise AdapterError(
                        f"{wstr}: tensors {tn}.lora_A {a.shape} / lora_B {b.shape} do not fit the base weight "
                        f"{inv[t]} (prefjax shape {wshape}, in dims then out dims) -- an adapter for another "
                        "base model?")
                in_dims, out_dims = wshape[:split], wshape[split:]
                a_list.append(a.astype(np.float32).T.reshape(*in_dims, r))
                b_list.append(b.astype(np.float32).T.reshape(r, *out_dims))
                s_list.append(np.float32(alpha / math.sqrt(r) if rslora else alpha / r))
            else:  # a layer the adapter skips: zero factors (filled in below once the split is known)
                a_list.append(None)
                b_list.append(None)
                s_list.append(np.float32(0.0))
                continue
            last_split = split
        for i, a in enumerate(a_list):
            if a is None:
                a_list[i] = np.zeros((*wshape[:last_split], r), np.float32)
                b_list[i] = np.zeros((r, *wshape[last_split:]), np.float32)
        factors[t] = {"A": jnp.asarray(np.stack(a_list), dtype), "B": jnp.asarray(np.stack(b_list), dtype),
                      "scale": jnp.asarray(np.stack(s_list), jnp.float32)}
    return LoraAdapter(path=str(folder), r=r, alpha=alpha, use_rslora=rslora, targets=targets, layers=layers,
                       factors=factors, family=family.name, on_the_fly=family.supports_lora)


@jax.jit
def _merge_jit(blocks, factors):
    out = dict(blocks)
    for t, f in factors.items():
        w = blocks[t]
        nl, r = f["A"].shape[0], f["A"].shape[-1]
        a = f["A"].reshape(nl, -1, r).astype(jnp.float32)
        b = f["B"].reshape(nl, r, -1).astype(jnp.float32)
        delta = jnp.einsum("lir,lro->lio", a, b) * f["scale"][:, None, None]
        out[t] = (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)
    return out


def merge_params(params, adapter: LoraAdapter):
    """New params with ``W + scale * (B A)`` folded into every targeted weight (others shared)."""
    return {**params, "blocks": _merge_jit(params["blocks"], adapter.factors)}


def attach_adapter(model, adapter, *, merge: bool = False):
    """A copy of ``model`` with ``adapter`` (a PEFT folder or a :class:`LoraAdapter`) attached.

    On the fly (default) the copy shares the base params; ``merge=True`` gives a copy with merged
    weights. An on-the-fly adapter already attached is replaced (personas switch without reloading
    the base); ``adapter=None`` returns the base model. A model with an adapter merged into its
    weights cannot take another one (load the base again).
    """
    if isinstance(model.adapter, MergedAdapter):
        raise AdapterError(f"model {model.source!r} already has adapter {model.adapter.path!r} merged into its "
                           "weights; load the base model again to apply another adapter")
    base = dataclasses.replace(model, adapter=None)
    if adapter is None:
        return base
    if isinstance(adapter, LoraAdapter):
        ad = adapter
        if ad.family != model.family.name:
            raise AdapterError(f"adapter {ad.path!r} was prepared for family {ad.family!r}, "
                               f"not {model.family.name!r}")
        shapes = model.family.param_shapes(model.config)
        for t, f in ad.factors.items():
            w = shapes[f"blocks/{t}"][0]
            if f["A"].shape[0] != w[0] or f["A"].shape[1:-1] + f["B"].shape[2:] != w[1:]:
                raise AdapterError(f"adapter {ad.path!r}: factors for {t!r} do not fit weight shape {w}")
    else:
        ad = load_adapter(adapter, model.family, model.config, dtype=model.dtype)
    if (merge or not ad.on_the_fly) and is_split(model.params):
        raise AdapterError(f"model {model.source!r}: its block weights are split per layer (Model.split_layers); "
                           f"merge adapter {ad.path!r} before splitting, or attach it on the fly")
    if merge:
        merged = merge_params(model.params, ad)
        return dataclasses.replace(model, params=merged, adapter=MergedAdapter(ad.path))
    if not ad.on_the_fly:
        log.warning("family %s has no on-the-fly LoRA path; adapter %s is merged at every run",
                    model.family.name, ad.path)
    return dataclasses.replace(model, adapter=ad)
