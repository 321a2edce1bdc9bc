"""Helpers that run a transformers model, collect the activations prefjax names, and gate parity.

Used by every port's parity test. ``collect(model, input_ids, layers=...)`` registers hooks on the HF
modules that correspond to each TransformerLens point and returns ``(logits, {hook_name: array})``.

The parity gate (project standard). Two float32 implementations of the same model agree only to the
float32 noise floor, which moves when either library changes its rounding, so prefjax is not held to a
fixed gap from transformers-float32. Instead transformers runs a second time in float64 (``float64_copy``
+ ``collect``, which computes *everything* in float64, see ``float64_compute``) and, array by array,

    e_pj = rel_err(prefjax_f32, hf_f64)   <=   max(2 * e_hf, 1e-6),   e_hf = rel_err(hf_f32, hf_f64)

i.e. prefjax's float32 is at most twice as far from the float64 answer as transformers' own float32.
``assert_parity`` applies it and prints a table (with the old float32-vs-float32 figure for information).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import weakref

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

FACTOR = 2.0   # prefjax may be this many times further from float64 than transformers-float32 is
FLOOR = 1e-6   # below this relative error the gate does not look


# ---- transformers in float64 ------------------------------------------------------------------

class _Float64Mode(TorchFunctionMode):
    """Inside this mode float32 means float64. transformers hard-casts to float32 in several places
    that a plain ``model.to(torch.float64)`` does not reach: RMSNorm (``x.float()`` / ``.to(float32)``),
    the RoPE tables (``inv_freq`` built with ``dtype=torch.float``, ``position_ids.float()``), eager
    softmax (``dtype=torch.float32``), the MoE router softmax, DeltaNet's gated norm and its chunked
    delta rule. Every ``dtype=float32`` argument becomes float64 and ``Tensor.float`` becomes
    ``Tensor.double``; any op that still returns a float32 tensor is recorded (``float32_ops``) so the
    caller can refuse a reference that was not really float64."""

    def __init__(self):
        super().__init__()
        self.float32_ops: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.float:
            func = torch.Tensor.double
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        kwargs = {k: (torch.float64 if v is torch.float32 else v) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor) and o.dtype in (torch.float32, torch.float16, torch.bfloat16):
                self.float32_ops.append(getattr(func, "__name__", str(func)))
        return out


@contextlib.contextmanager
def float64_compute():
    """Run torch code with float32 promoted to float64 throughout; raise if some op escaped."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    mode = _Float64Mode()
    try:
        with mode:
            yield mode
    finally:
        torch.set_default_dtype(old)
    if mode.float32_ops:
        raise AssertionError(f"float64 reference computed in lower precision in: {sorted(set(mode.float32_ops))}")


_F64: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def float64_copy(hf_model, cache: bool = True):
    """A float64 copy of ``hf_model`` (same weights, cast exactly), cached per model unless ``cache=False``
    (a large model whose float64 copy is needed once).

    ``.to(float64)`` casts parameters and buffers, but the non-persistent buffers hold float32-rounded
    values (RoPE ``inv_freq``, Gemma's ``embed_scale = sqrt(d)``): those are rebuilt in float64 from the
    config. An unknown non-persistent float buffer is an error (it would silently stay float32-rounded).
    """
    if hf_model in _F64:
        return _F64[hf_model]
    m = copy.deepcopy(hf_model).to(torch.float64).eval()
    if getattr(getattr(m, "config", None), "_experts_implementation", "eager") not in (None, "eager"):
        # torch._grouped_mm (the default MoE kernel) has no float64 kernel: the float64 reference runs
        # the experts with transformers' eager loop (same maths; both exact to float64 rounding).
        m.set_experts_implementation("eager")
    for name, mod in list(m.named_modules()):
        if not mod._non_persistent_buffers_set:
            continue
        if type(mod).__name__.endswith("RotaryEmbedding") and hasattr(mod, "config"):
            with float64_compute():
                fresh = type(mod)(mod.config)
            for b in mod._non_persistent_buffers_set:
                setattr(mod, b, getattr(fresh, b).to(torch.float64))
            for k, v in vars(fresh).items():  # attention_scaling etc. (Python floats)
                if isinstance(v, float):
                    setattr(mod, k, v)
        elif hasattr(mod, "scalar_embed_scale") and "embed_scale" in mod._non_persistent_buffers_set:
            mod.embed_scale = torch.tensor(mod.scalar_embed_scale, dtype=torch.float64)
        else:
            raise AssertionError(f"float64_copy: no rule to rebuild non-persistent buffers of {name} "
                                 f"({type(mod).__name__}: {sorted(mod._non_persistent_buffers_set)})")
    if cache:
        _F64[hf_model] = m
    return m


def is_float64(hf_model) -> bool:
    return next(hf_model.parameters()).dtype == torch.float64


def forward_context(hf_model):
    """``float64_compute()`` for a float64 model, nothing for a float32 one; wrap every HF forward."""
    return float64_compute() if is_float64(hf_model) else contextlib.nullcontext()


def to_numpy(t, copy: bool = True) -> np.ndarray:
    """A torch tensor as numpy, float32 or float64 as it is (anything narrower widened to float32).
    ``copy=False`` shares the tensor's memory (for a tensor nothing will write to again)."""
    t = t.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    a = t.cpu().numpy()
    return a.copy() if copy else a


# ---- collection -------------------------------------------------------------------------------

def collect(hf_model, input_ids, *, attention_mask=None, position_ids=None, layers=None, final_norm=None,
            attn_out_module="post_attention_layernorm", attn_out_is_input=False,
            mlp_out_module="post_feedforward_layernorm", mlp_out_is_input=False,
            resid_mid_module="pre_feedforward_layernorm", hidden_states=False):
    """Run ``hf_model`` once and capture every block point plus the final norm.

    ``attn_out_module``/``mlp_out_module`` name the submodule whose *output* (or input, when the
    ``*_is_input`` flag is set) is the branch's contribution; ``resid_mid_module`` names the
    submodule whose *input* is the residual after attention. A float64 model (``float64_copy``) runs
    entirely in float64 and returns float64 arrays. ``hidden_states=True`` also returns HF's
    ``hidden_states`` as a list (a third return value).
    """
    got: dict[str, np.ndarray] = {}
    handles = []
    first = lambda o: o[0] if isinstance(o, tuple) else o

    def grab(name, use_input):
        def fn(mod, inp, out):
            got[name] = to_numpy(inp[0] if use_input else first(out))
        return fn

    for l, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(
            lambda m, i, o, l=l: got.__setitem__(f"blocks.{l}.hook_resid_post", to_numpy(first(o)))))
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs=None, l=l: got.__setitem__(
                f"blocks.{l}.hook_resid_pre", to_numpy(args[0])) if args else None))
        handles.append(_get(layer, attn_out_module).register_forward_hook(
            grab(f"blocks.{l}.hook_attn_out", attn_out_is_input)))
        handles.append(_get(layer, mlp_out_module).register_forward_hook(
            grab(f"blocks.{l}.hook_mlp_out", mlp_out_is_input)))
        handles.append(_get(layer, resid_mid_module).register_forward_hook(
            grab(f"blocks.{l}.hook_resid_mid", True)))
    if final_norm is not None:
        handles.append(final_norm.register_forward_hook(grab("ln_final.hook_normalized", False)))
    try:
        with torch.no_grad(), forward_context(hf_model):
            kw = {}
            if attention_mask is not None:
                kw["attention_mask"] = torch.tensor(np.asarray(attention_mask))
            if position_ids is not None:
                kw["position_ids"] = torch.tensor(np.asarray(position_ids))
            if hidden_states:
                kw["output_hidden_states"] = True
            out = hf_model(torch.tensor(np.asarray(input_ids)), **kw)
    finally:
        for h in handles:
            h.remove()
    logits = to_numpy(out.logits, copy=False)
    if hidden_states:
        return logits, got, [to_numpy(h) for h in out.hidden_states]
    return logits, got


def _get(mod, dotted):
    for part in dotted.split("."):
        mod = getattr(mod, part)
    return mod


def rel_err(a, b) -> float:
    """``max|a - b| / max|b|``, in float64 (one temporary the size of ``a``: logits of a real vocabulary
    are large)."""
    a, b = np.asarray(a), np.asarray(b)
    d = np.subtract(a, b, dtype=np.float64)
    np.abs(d, out=d)
    scale = max(float(b.max()), -float(b.min())) if b.size else 0.0
    return float(d.max() / max(scale, 1e-30))


# ---- the gate ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParityRow:
    name: str
    e_pj: float    # rel_err(prefjax f32, transformers f64)
    e_hf: float    # rel_err(transformers f32, transformers f64)
    bound: float   # max(FACTOR * e_hf, FLOOR)
    e_f32: float   # rel_err(prefjax f32, transformers f32): the old figure, information only

    @property
    def ok(self) -> bool:
        return self.e_pj <= self.bound


def parity_rows(pj: dict, hf32: dict, hf64: dict, names=None, select=None) -> list[ParityRow]:
    """One ``ParityRow`` per array name (default: every key of ``pj``, in order). ``select`` (any numpy
    index, e.g. a boolean [batch, seq] mask of real tokens or ``np.s_[:, 6:]``) picks the compared
    entries of every array."""
    names = list(pj) if names is None else list(names)
    missing = [n for n in names if n not in pj or n not in hf32 or n not in hf64]
    assert not missing, f"arrays missing from prefjax / hf32 / hf64: {missing}"
    pick = (lambda a: np.asarray(a)) if select is None else (lambda a: np.asarray(a)[select])
    rows = []
    for n in names:
        a, r32, r64 = pick(pj[n]), pick(hf32[n]), pick(hf64[n])
        assert a.shape == r32.shape == r64.shape, (n, a.shape, r32.shape, r64.shape)
        assert r64.dtype == np.float64, f"{n}: the float64 reference is {r64.dtype}"
        e_hf = rel_err(r32, r64)
        rows.append(ParityRow(n, rel_err(a, r64), e_hf, max(FACTOR * e_hf, FLOOR), rel_err(a, r32)))
    return rows


def format_rows(rows, title="") -> str:
    head = f"{'array':<32} {'e_pj':>10} {'e_hf':>10} {'bound':>10} {'e_f32(info)':>12}"
    lines = [title, head] if title else [head]
    for r in rows:
        lines.append(f"{r.name:<32} {r.e_pj:10.3e} {r.e_hf:10.3e} {r.bound:10.3e} {r.e_f32:12.3e}"
                     + ("" if r.ok else "   <-- FAIL"))
    return "\n".join(lines)


def assert_parity(pj: dict, hf32: dict, hf64: dict, names=None, select=None, label="") -> list[ParityRow]:
    """The parity gate: every array must satisfy e_pj <= max(2 * e_hf, 1e-6) (see the module doc).

    ``pj``/``hf32``/``hf64`` map names (``"logits"``, hook names, ...) to arrays from prefjax (float32),
    transformers float32 and transformers float64. Returns the rows; on failure raises AssertionError
    with a table of the failing arrays (and the worst passing ones by e_pj / bound)."""
    rows = parity_rows(pj, hf32, hf64, names, select)
    if os.environ.get("PARITY_REPORT"):  # PARITY_REPORT=1 pytest -s: every gate prints its closest arrays
        ratios = [r.e_pj / r.e_hf for r in rows if r.e_hf > 0]
        gmean = float(np.exp(np.mean(np.log(ratios)))) if ratios else float("nan")
        print("\n" + format_rows(sorted(rows, key=lambda r: r.e_pj / r.bound, reverse=True)[:3],
                                 f"parity {label or ''} ({len(rows)} arrays, geometric mean e_pj/e_hf "
                                 f"{gmean:.2f}), closest to the bound:"))
    bad = [r for r in rows if not r.ok]
    if bad:
        near = sorted((r for r in rows if r.ok), key=lambda r: r.e_pj / r.bound, reverse=True)[:3]
        raise AssertionError(
            f"parity gate{' (' + label + ')' if label else ''}: {len(bad)} of {len(rows)} arrays have "
            f"e_pj > max({FACTOR:g} * e_hf, {FLOOR:g})\n"
            + format_rows(bad + near, "failing first, then the closest passing:"))
    return rows


def worst(rows) -> ParityRow:
    """The row closest to its bound."""
    return max(rows, key=lambda r: r.e_pj / r.bound)


# ---- perturbations (to prove a gate can fail) --------------------------------------------------

def perturbed(model, path: str, layer: int | None = 0, rel: float = 1e-4):
    """``model`` (a prefjax Model) with one tensor scaled by ``1 + rel``: ``params[a][b]`` for
    ``path = "a/b"``, only its ``layer`` slice when the tensor is stacked over layers."""
    params = dict(model.params)
    keys = path.split("/")
    node = params
    for k in keys[:-1]:
        node[k] = dict(node[k])
        node = node[k]
    w = node[keys[-1]]
    node[keys[-1]] = w * (1 + rel) if layer is None else w.at[layer].multiply(1 + rel)
    return dataclasses.replace(model, params=params)


def perturbed_adapter(src, dst, tensor: str, rel: float = 1e-4):
    """Copy the PEFT adapter folder ``src`` to ``dst`` with tensor ``tensor`` scaled by ``1 + rel``."""
    import shutil
    from pathlib import Path

    from safetensors.numpy import load_file, save_file
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    t = load_file(str(src / "adapter_model.safetensors"))
    assert tensor in t, sorted(t)
    t[tensor] = (t[tensor] * np.float32(1 + rel)).astype(t[tensor].dtype)
    save_file(t, str(dst / "adapter_model.safetensors"))
    return dst
