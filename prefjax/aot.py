"""Ahead-of-time checks of a run for TPU slices, from a CPU host (no TPU, no weights).

With ``libtpu`` installed, :func:`jax.experimental.topologies.get_topology_desc` gives the devices of a
TPU slice on any machine, and ``jax.jit(f).lower(*ShapeDtypeStructs with shardings).compile()``
compiles for them (the approach of MaxText's ``train_compile.py``). :func:`check_run` does that for
every jitted program a pipeline config would execute, with prefjax's own sharding rules:

* ``activations: prefill+capture`` -- ``Model.run`` with ``hook_resid_post`` captured at the config's
  layers and turn-boundary positions (``activations.batch_size`` x ``task_len``);
* ``choices: prefill`` -- logit-mode elicitation (``Model.run``, last position), or in sample mode
  ``choices: generate prefill`` and ``choices: decode step`` (the KV / recurrent state carried);
* ``steering: steered prefill`` and ``steering: steered decode step`` -- the per-row coefficient
  steering sweep (one row per prompt and a [batch, seq] signed token mask), and
  ``steering: loglik`` (the coherence score: prompt + completion, logits at the completion's positions);
* ``utilities: Thurstonian fit`` -- the L-BFGS solve at ``fit_tasks`` tasks / ``fit_comparisons``
  comparisons, the comparisons sharded over every chip of the slice;
* ``probes: ridge Gram`` and ``probes: ridge projection`` -- the accelerator's two matmuls of the
  decomposition behind the whole alpha path (``X^T X``, then ``V^T X^T``), at the config's training
  split x d_model (one pair per captured layer; process 0 runs them on one chip). The eigendecomposition
  between them runs on the host CPU in float64 and is not compiled (``--programs='probes: ridge path'``
  selects both).

For each it reports the per-chip argument / temp / output memory against the chip's HBM (a program
that does not fit says by how much and names its largest arrays), XLA's cost analysis and a roofline
time: ``max(flops / peak bf16 FLOP/s, bytes / HBM bandwidth)`` per chip (collectives and launch
overheads ignored, so a lower bound). XLA counts a ``scan`` / ``while`` body once; the layer loop is
accounted for by compiling depth variants of the model unrolled (one and two layers of each layer
type: per-layer cost = the difference) and extrapolating to the real depth (``layer_costs=True``).
Loops left counted once are named in each program's ``cost`` column. Then it projects the wall time
of the config's workload on that slice (:func:`workload`).

Every model program is lowered with ``jax.set_mesh`` on a mesh of the slice's devices, so platform-
dependent choices (the Qwen-3.5 MoE experts: ``ragged_dot`` on TPUs, never the GPU-only Triton
kernels) are made for the TPU.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import os
import re
import time
import types
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from prefjax.probes.protocol import run_decompositions
from prefjax.runconfig import RunConfig, resolve_layers

GiB = float(1 << 30)


class AOTError(ValueError):
    """A topology, mesh or config the AOT check cannot serve (raised before any compile)."""


# --------------------------------------------------------------------------------------------
# Chips and slices.

@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (bf16 peak, HBM capacity and bandwidth) of a TPU generation."""

    generation: str
    hbm_gib: float
    peak_tflops: float      # bf16 dense
    hbm_gbps: float         # GB/s (1e9 bytes)
    source: str

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gib * GiB


# Cloud TPU system-architecture pages (docs.cloud.google.com/tpu/docs/<generation>), read 2026-11-30.
# v5e's page gives "16 GB" (HBM2) and 819 GBps; v6e's "32 GB" and 1640 GBps (older revisions 1600);
# v5p's "95 GiB" and 2765 GBps; v4's 32 GiB and 1200 GBps. Capacities are taken as GiB (the chips
# hold 16/32/95 GiB; a little of it is reserved by the runtime).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32.0, 275.0, 1200.0, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16.0, 197.0, 819.0, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95.0, 459.0, 2765.0, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32.0, 918.0, 1640.0, "cloud.google.com/tpu/docs/v6e"),
}

# Accelerator-type names (v5p counts TensorCores: 2 per chip; the others count chips) -> topology.
TOPOLOGY_ALIASES: dict[str, str] = {
    "v5e-1": "v5e:1x1", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8",
    "v5e-64": "v5e:8x8", "v5e-128": "v5e:8x16", "v5e-256": "v5e:16x16",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8",
    "v6e-1": "v6e:1x1", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8",
    "v6e-64": "v6e:8x8", "v6e-128": "v6e:8x16", "v6e-256": "v6e:16x16",
}
_TOPO_RE = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+){1,2})$")


def canonical_topology(name: str) -> str:
    """``"v5e-16"`` -> ``"v5e:4x4"``; a ``<generation>:<shape>`` name is returned as given."""
    name = str(name).strip()
    return TOPOLOGY_ALIASES.get(name, name)


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    name: str
    chip: Chip
    devices: tuple

    @property
    def n_chips(self) -> int:
        return len(self.devices)

    def describe(self) -> str:
        c = self.chip
        return (f"{self.name}: {self.n_chips} x TPU {c.generation} ({c.hbm_gib:g} GiB HBM, "
                f"{c.peak_tflops:g} TFLOP/s bf16, {c.hbm_gbps:g} GB/s; {c.source})")


@functools.lru_cache(maxsize=None)
def tpu_slice(name: str) -> TpuSlice:
    """The devices of TPU slice ``name`` (``"v5e:4x4"``, ``"v5p:2x2x1"``, ``"v6e-64"``, ...), from libtpu."""
    canon = canonical_topology(name)
    m = _TOPO_RE.match(canon)
    known = ", ".join(sorted(CHIPS))
    examples = "v5e:2x2, v5e:4x4, v5p:2x2x1, v5p:2x2x4, v6e:4x4, v6e:8x8 (or v5e-16, v5p-8, v6e-64)"
    if not m or m.group(1) not in CHIPS:
        raise AOTError(f"unknown TPU topology {name!r}: expected '<generation>:<chips per axis>' with "
                       f"generation in {known}, e.g. {examples}")
    # libtpu takes a lock file per process unless told several processes may load it (the compile-only
    # client needs no exclusive TPU).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
        topo = topologies.get_topology_desc(platform="tpu", topology_name=canon)
    except ImportError as e:  # pragma: no cover
        raise AOTError(f"TPU topology {name!r}: jax.experimental.topologies is unavailable ({e})") from e
    except Exception as e:  # libtpu missing, or the shape is not a valid slice of that generation
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "libtpu" in msg.lower() and ("not found" in msg.lower() or "no such" in msg.lower()):
            hint = "install libtpu (pip install libtpu==0.0.42.1, the version jax[tpu]==0.10.2 pins)"
        else:
            hint = f"not a valid {m.group(1)} slice; e.g. {examples}"
        raise AOTError(f"unknown TPU topology {name!r}: {hint} (libtpu: {msg})") from e
    return TpuSlice(canon, CHIPS[m.group(1)], tuple(topo.devices))


def slice_mesh(sl: TpuSlice, shape: Mapping[str, int]):
    """A prefjax mesh (axes :data:`prefjax.sharding.MESH_AXES`) over the slice's chips, laid out along
    the torus by ``mesh_utils.create_device_mesh``. Errors name the topology and the mesh."""
    from jax.sharding import Mesh

    from prefjax.sharding import MESH_AXES
    shape = {str(k): int(v) for k, v in dict(shape).items()}
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise AOTError(f"mesh {shape} for topology {sl.name}: unknown axes {unknown}; known: {MESH_AXES}")
    if any(v < 1 for v in shape.values()):
        raise AOTError(f"mesh {shape} for topology {sl.name}: axis sizes must be >= 1")
    dims = tuple(shape.get(a, 1) for a in MESH_AXES)
    size = int(np.prod(dims))
    if size != sl.n_chips:
        raise AOTError(f"mesh {shape} has {size} devices but topology {sl.name} has {sl.n_chips} chips; "
                       f"give a mesh whose axis sizes multiply to {sl.n_chips}")
    try:
        from jax.experimental import mesh_utils
        devs = mesh_utils.create_device_mesh(dims, list(sl.devices), allow_split_physical_axes=True)
    except Exception:
        devs = np.array(sl.devices).reshape(dims)
    return Mesh(devs, MESH_AXES)


def mesh_shape(mesh) -> dict[str, int]:
    return {a: int(s) for a, s in mesh.shape.items() if s > 1}


# --------------------------------------------------------------------------------------------
# Shapes with shardings.

def _sds(shape, dtype, sharding):
    import jax
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype, sharding=sharding)


def per_chip_bytes(s) -> int:
    """Bytes one chip holds of a ShapeDtypeStruct (its shard)."""
    shard = s.sharding.shard_shape(s.shape) if s.sharding is not None else s.shape
    return int(np.prod(shard, dtype=np.int64)) * np.dtype(s.dtype).itemsize


def divisibility_problems(named: Mapping[str, tuple], mesh, rules=None) -> list[str]:
    """For ``{name: (shape, logical axes)}``: every dimension the rules shard over mesh axes of size > 1
    that it does not divide (``prefjax.sharding.spec_for`` would replicate it)."""
    from prefjax.sharding import DEFAULT_RULES
    table = dict(rules or DEFAULT_RULES)
    out = []
    for name, (shape, axes) in named.items():
        used: set[str] = set()
        for dim, (size, ax) in enumerate(zip(shape, axes)):
            if not ax:
                continue
            mesh_axes = tuple(a for a in table.get(ax, ()) if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
            if not mesh_axes:
                continue
            n = int(np.prod([mesh.shape[a] for a in mesh_axes]))
            if size % n:
                out.append(f"{name} {tuple(shape)}: dim {dim} ({ax}={size}) does not divide over "
                           f"{'x'.join(mesh_axes)}={n}")
            else:
                used.update(mesh_axes)
    return out


def param_structs(fam, mcfg, dtype, mesh, *, strict: bool = True, where: str = ""):
    """The model's parameters as ShapeDtypeStructs sharded by prefjax's rules (``jax.eval_shape`` of the
    family's init, so dtypes are what a load would give). ``strict``: a parameter dimension that a
    mesh axis does not divide is an error naming the array (the run would replicate it)."""
    import jax

    from prefjax.sharding import named
    shapes = fam.param_shapes(mcfg)
    if strict:
        bad = divisibility_problems({f"params/{k}": v for k, v in shapes.items()}, mesh)
        if bad:
            raise AOTError(f"{where}mesh {mesh_shape(mesh)} does not divide {len(bad)} parameter array(s), "
                           f"which the run would replicate on every chip: " + "; ".join(bad[:6])
                           + (" ..." if len(bad) > 6 else "") + "; choose mesh axes that divide them "
                           "(or allow replication with strict=False / --allow_replicated)")
    abstract = jax.eval_shape(lambda k: fam.init_params(mcfg, k, dtype), jax.random.PRNGKey(0))

    def one(path, leaf):
        key = "/".join(str(getattr(p, "key", p)) for p in path)
        shape, axes = shapes[key]
        return _sds(leaf.shape, leaf.dtype, named(shape, axes, mesh))

    return jax.tree_util.tree_map_with_path(one, abstract)


# --------------------------------------------------------------------------------------------
# Compiling and measuring one program.

_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
              "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_HLO_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\][^ ]*\s+([\w\-]+)\(")


def largest_hlo_buffers(hlo_text: str, k: int = 3) -> list[tuple[str, float]]:
    """The ``k`` largest instruction results in optimized HLO (parameters excluded): ``(desc, bytes)``.
    A heuristic view of what dominates the temp memory."""
    seen = {}
    for line in hlo_text.splitlines():
        m = _HLO_INSTR.match(line)
        if not m or m.group(4) in ("parameter", "get-tuple-element", "bitcast", "tuple", "constant"):
            continue
        name, ty, dims, op = m.groups()
        if ty not in _HLO_BYTES:
            continue
        shape = tuple(int(d) for d in dims.split(",") if d)
        nbytes = float(np.prod(shape, dtype=np.float64)) * _HLO_BYTES[ty]
        desc = f"{ty}[{','.join(map(str, shape))}] ({op})"
        if nbytes > seen.get(desc, 0):
            seen[desc] = nbytes
    return sorted(seen.items(), key=lambda kv: -kv[1])[:k]


@dataclasses.dataclass
class ProgramResult:
    """What compiling one program gave. Bytes are per chip; ``flops``/``bytes_accessed`` per chip and
    per call (after the layer-loop correction when ``cost_method`` says so)."""

    name: str
    status: str = "ok"                       # ok | does not fit | failed
    error: str | None = None
    compile_s: float = 0.0
    argument_bytes: float = 0.0
    output_bytes: float = 0.0
    temp_bytes: float = 0.0
    alias_bytes: float = 0.0
    hbm_bytes: float = 0.0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    cost_method: str = ""
    roofline_s: float = 0.0
    calls: float = 0.0                       # how often the config's workload runs it
    tokens: int = 0                          # tokens processed per call (prefill: B*T; decode: B)
    kind: str = ""                           # prefill | decode | stats
    stage: str = ""
    largest_args: list = dataclasses.field(default_factory=list)
    largest_temps: list = dataclasses.field(default_factory=list)
    hlo_ops: set = dataclasses.field(default_factory=set)
    notes: list = dataclasses.field(default_factory=list)

    @property
    def peak_bytes(self) -> float:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def fits(self) -> bool:
        return self.status != "failed" and self.peak_bytes <= self.hbm_bytes

    @property
    def headroom(self) -> float:
        return 1.0 - self.peak_bytes / self.hbm_bytes if self.hbm_bytes else float("nan")

    @property
    def tok_per_s(self) -> float | None:
        if not self.tokens or not self.roofline_s:
            return None
        return self.tokens / self.roofline_s

    @property
    def total_s(self) -> float:
        return self.calls * self.roofline_s

    def overflow_text(self) -> str:
        over = (self.peak_bytes - self.hbm_bytes) / GiB
        args = ", ".join(f"{n} {b / GiB:.2f} GiB" for n, b in self.largest_args[:3])
        temps = ", ".join(f"{d} {b / GiB:.2f} GiB" for d, b in self.largest_temps[:3])
        return (f"{self.name}: needs {self.peak_bytes / GiB:.2f} GiB per chip, {over:.2f} GiB over the "
                f"{self.hbm_bytes / GiB:g} GiB HBM (arguments {self.argument_bytes / GiB:.2f}, temp "
                f"{self.temp_bytes / GiB:.2f}, output {self.output_bytes / GiB:.2f}); largest arguments: {args}"
                + (f"; largest temporaries or outputs: {temps}" if temps else ""))


def _cost(compiled) -> tuple[float, float]:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    ca = ca or {}
    return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def _hlo_ops(text: str) -> set[str]:
    ops = set()
    for op in ("ragged-dot", "tpu_custom_call", "all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "custom-call"):
        if op in text:
            ops.add(op)
    return ops


_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


_MLIR_TENSOR = re.compile(r"tensor<((?:\d+x)+)(f32|bf16|f16|f64|i32|i64|i8|i1|ui32|ui8)>")
_MLIR_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "i32": 4, "i64": 8, "i8": 1, "i1": 1, "ui32": 4, "ui8": 1}


def largest_lowered_values(lowered, k: int = 3) -> list[tuple[str, float]]:
    """The ``k`` largest values in a lowered (not yet partitioned) program, at their global size: what
    dominates a program that libtpu refused for memory, where no compiled HLO exists to read."""
    if lowered is None:
        return []
    try:
        text = lowered.as_text()
    except Exception:
        return []
    seen = {}
    for dims, ty in _MLIR_TENSOR.findall(text):
        shape = tuple(int(d) for d in dims.rstrip("x").split("x"))
        seen[f"{ty}[{','.join(map(str, shape))}] (whole, before sharding)"] = \
            float(np.prod(shape, dtype=np.float64)) * _MLIR_BYTES[ty]
    return sorted(seen.items(), key=lambda kv: -kv[1])[:k]


def lowering_context():
    """Lower at JAX's default matmul precision, as ``launch/main.py`` runs (a test session's
    ``jax_default_matmul_precision="highest"`` would otherwise reach the TPU compiler: libtpu 0.0.42.1
    refuses a bf16 ``ragged_dot`` at HIGHEST precision, 'Mosaic failed to compile TPU kernel: Bad lhs
    type')."""
    import jax
    return jax.default_matmul_precision("default")


def roofline(flops: float, nbytes: float, chip: Chip) -> float:
    """Seconds per chip at peak: ``max(flops / bf16 peak, bytes / HBM bandwidth)``."""
    return max(flops / (chip.peak_tflops * 1e12), nbytes / (chip.hbm_gbps * 1e9))


def compile_program(name: str, lower: Callable[[], Any], chip: Chip, *, args_named: Mapping[str, Any] = (),
                    log=None) -> tuple[ProgramResult, Any]:
    """Lower and compile one program; fill memory and raw cost (no loop correction)."""
    res = ProgramResult(name=name, hbm_bytes=chip.hbm_bytes)
    t0 = time.perf_counter()
    lowered = None
    try:
        with lowering_context():
            lowered = lower()
            compiled = lowered.compile()
    except AOTError:
        raise
    except Exception as e:  # a compile failure is a result, not a crash of the whole check
        text = str(e).strip()
        res.compile_s = time.perf_counter() - t0
        oom = _OOM.search(text)
        if oom:  # libtpu refuses a program whose temporaries exceed HBM: that is "does not fit"
            res.status = "does not fit"
            res.temp_bytes = float(oom.group(1)) * GiB
            res.largest_temps = largest_lowered_values(lowered)
            res.notes.append(f"libtpu: {text.splitlines()[0][:300]}")
            if log:
                log(f"  {name}: does not fit ({res.temp_bytes / GiB:.2f} GiB of temporaries)")
        else:
            res.status, res.error = "failed", f"{type(e).__name__}: {text.splitlines()[0][:400] if text else ''}"
            if log:
                log(f"  {name}: FAILED after {res.compile_s:.0f} s: {res.error}")
        return res, None
    res.compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    res.argument_bytes = float(mem.argument_size_in_bytes)
    res.output_bytes = float(mem.output_size_in_bytes)
    res.temp_bytes = float(mem.temp_size_in_bytes)
    res.alias_bytes = float(mem.alias_size_in_bytes)
    res.flops, res.bytes_accessed = _cost(compiled)
    res.cost_method = "as compiled"
    res.roofline_s = roofline(res.flops, res.bytes_accessed, chip)
    res.largest_args = sorted(((n, float(per_chip_bytes(s))) for n, s in dict(args_named).items()),
                              key=lambda kv: -kv[1])[:5]
    text = compiled.as_text() or ""
    res.hlo_ops = _hlo_ops(text)
    if res.peak_bytes > res.hbm_bytes:
        res.status = "does not fit"
        res.largest_temps = largest_hlo_buffers(text)
    if log:
        log(f"  {name}: compiled in {res.compile_s:.0f} s, {res.peak_bytes / GiB:.2f} GiB per chip")
    return res, compiled


# --------------------------------------------------------------------------------------------
# The model programs.

def depth_variant(mcfg, layer_types: Sequence[str]):
    """``mcfg`` with the given layers only (same widths): the unrolled variants the layer-loop cost
    correction compiles."""
    n = len(layer_types)
    kw = {"n_layers": n}
    if hasattr(mcfg, "layer_types"):
        kw["layer_types"] = tuple(layer_types)
    if hasattr(mcfg, "name"):  # never equal to a real config: jit caches traces by config
        kw["name"] = f"{mcfg.name}/aot-depth-{n}"
    return dataclasses.replace(mcfg, **kw)


def layer_groups(mcfg) -> dict[str, int]:
    """How many layers of each type (one type, "layer", for families without ``layer_types``)."""
    if hasattr(mcfg, "layer_types"):
        return dict(collections.Counter(mcfg.layer_types))
    return {"layer": mcfg.n_layers}


class ModelPrograms:
    """Builds the lowered model programs of a run for one model on one mesh."""

    def __init__(self, fam, mcfg, dtype, mesh, *, strict: bool = True, where: str = ""):
        import jax.numpy as jnp

        self.fam, self.mcfg, self.mesh = fam, mcfg, mesh
        self.dtype = jnp.dtype(dtype)
        self.strict, self.where = strict, where
        self._params: dict = {}
        self.notes: list[str] = []
        param_structs(fam, mcfg, self.dtype, mesh, strict=strict, where=where)  # check divisibility now

    # ---- inputs
    def params(self, mcfg):
        if mcfg not in self._params:
            self._params[mcfg] = param_structs(self.fam, mcfg, self.dtype, self.mesh, strict=False)
        return self._params[mcfg]

    def batch_multiple(self) -> int:
        from prefjax.sharding import batch_multiple
        return batch_multiple(self.mesh)

    def rows(self, shape, dtype):
        """[batch, ...] input sharded over the batch axes (replicated when the batch does not divide,
        as ``Model.run`` does)."""
        from prefjax.sharding import batch_sharding
        return _sds(shape, dtype, batch_sharding(self.mesh, len(shape), shape[0]))

    def replicated(self, shape, dtype):
        from jax.sharding import NamedSharding, PartitionSpec as P
        return _sds(shape, dtype, NamedSharding(self.mesh, P()))

    def state(self, mcfg, batch: int, max_len: int):
        """Decode state (KV cache, DeltaNet windows and recurrent state) sharded along its batch axis."""
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        from prefjax.sharding import batch_axes
        abstract = jax.eval_shape(lambda: self.fam.init_state(mcfg, batch, max_len, self.dtype))
        data = batch_axes(self.mesh)
        n = self.batch_multiple()

        def one(a):
            parts = [None] * a.ndim
            ax = 1 if a.ndim >= 2 and a.shape[1] == batch and a.shape[0] != batch else 0
            if data and a.ndim and a.shape[ax] == batch and batch % n == 0:
                parts[ax] = data if len(data) > 1 else data[0]
            return _sds(a.shape, a.dtype, NamedSharding(self.mesh, P(*parts)))

        return jax.tree_util.tree_map(one, abstract)

    def steer(self, mcfg, batch: int, seq: int, layer: int):
        """The steering intervention of the sweep (per-row coefficients, a signed [batch, seq] token mask)
        as ShapeDtypeStructs: rows sharded like the batch, layer indices and direction replicated."""
        import jax

        from prefjax.steering import SteerSpec, spec_intervention
        spec = SteerSpec(layer=int(layer), direction=np.ones(mcfg.d_model, np.float32),
                         coef=np.zeros(batch, np.float32), scale=1.0, tokens=np.zeros((batch, seq), np.float32))
        iv = spec_intervention(spec, types.SimpleNamespace(config=mcfg), batch=batch, seq=seq)
        leaves, tree = jax.tree_util.tree_flatten(iv)
        if len(leaves) != 4:  # (layers_K, unit_D, coef_B, mask_BxS), see prefjax.steering._apply
            raise AOTError(f"unexpected steering intervention with {len(leaves)} arrays")
        lay, unit, coef, mask = leaves
        out = [self.replicated(lay.shape, lay.dtype), self.replicated(unit.shape, unit.dtype),
               self.rows(coef.shape, coef.dtype), self.rows(mask.shape, mask.dtype)]
        return jax.tree_util.tree_unflatten(tree, out)

    # ---- programs: each returns (lowered, named args)
    def forward(self, mcfg, *, batch: int, seq: int, k_pos: int | None, capture: Sequence[int] = (),
                steer_layer: int | None = None, logits: bool = True, unroll: bool = False):
        """``Model.run``'s program (``prefjax.model._run_jit``)."""
        import jax.numpy as jnp

        from prefjax import hooks as H
        from prefjax import model as model_mod
        from prefjax.sharding import mesh_context
        params = self.params(mcfg)
        tokens = self.rows((batch, seq), jnp.int32)
        valid = self.rows((batch, seq), jnp.bool_)
        pos = None if k_pos is None else self.rows((batch, k_pos), jnp.int32)
        spec = H.CaptureSpec.from_names([H.hook_name(l, "hook_resid_post") for l in capture], mcfg.n_layers)
        iv = None if steer_layer is None else self.steer(mcfg, batch, seq, steer_layer)
        with mesh_context(self.mesh):
            lowered = model_mod._run_jit.lower(params, tokens, valid, pos, iv, family=self.fam, cfg=mcfg,
                                               spec=spec, unroll=unroll, want_logits=logits)
        return lowered, {**_named_params(params), "tokens": tokens}

    def _gen_static(self, mcfg, n_new, greedy, top_k, use_top_p):
        from prefjax import hooks as H
        return dict(family=self.fam, cfg=mcfg, spec=H.CaptureSpec.from_names((), mcfg.n_layers),
                    n_new=int(n_new), greedy=bool(greedy), top_k=0 if greedy else int(top_k),
                    use_top_p=bool(use_top_p), state_dtype=self.dtype, mesh=self.mesh)

    def _sampling_args(self, batch, n_stop):
        import jax.numpy as jnp
        return (self.rows((batch, 2), jnp.uint32), self.replicated((), jnp.float32),
                self.replicated((), jnp.float32), self.replicated((n_stop,), jnp.int32))

    def generate_prefill(self, mcfg, *, batch: int, seq: int, n_new: int, greedy=False, top_k=0, use_top_p=False,
                         steer_layer=None, n_stop: int = 2, unroll: bool = False):
        """``generate``'s prefill (``prefjax.generation._python_prefill``: prompt -> decode state)."""
        import jax.numpy as jnp

        from prefjax import generation as G
        from prefjax.sharding import mesh_context
        params = self.params(mcfg)
        tokens, valid = self.rows((batch, seq), jnp.int32), self.rows((batch, seq), jnp.bool_)
        keys, temp, top_p, stop = self._sampling_args(batch, n_stop)
        iv = None if steer_layer is None else self.steer(mcfg, batch, seq, steer_layer)
        with mesh_context(self.mesh), _unrolled_generation(unroll):
            lowered = G._python_prefill.lower(params, tokens, valid, keys, temp, top_p, stop, iv,
                                              **_no_prefix(G._python_prefill),
                                              **self._gen_static(mcfg, n_new, greedy, top_k, use_top_p))
        return lowered, {**_named_params(params), "tokens": tokens}

    def decode_step(self, mcfg, *, batch: int, prompt_len: int, n_new: int, greedy=False, top_k=0,
                    use_top_p=False, steer_layer=None, n_stop: int = 2, unroll: bool = False):
        """One decode step against the KV / recurrent state (``prefjax.generation._python_step``; the
        TPU run's while loop has this step as its body)."""
        import jax.numpy as jnp

        from prefjax import generation as G
        from prefjax.sharding import mesh_context
        params = self.params(mcfg)
        state = self.state(mcfg, batch, prompt_len + n_new)
        out = self.rows((batch, n_new), jnp.int32)
        fin, prev = self.rows((batch,), jnp.bool_), self.rows((batch,), jnp.int32)
        i, p = self.replicated((), jnp.int32), self.replicated((), jnp.int32)
        keys, temp, top_p, stop = self._sampling_args(batch, n_stop)
        iv = None if steer_layer is None else self.steer(mcfg, batch, prompt_len, steer_layer)
        with mesh_context(self.mesh), _unrolled_generation(unroll):
            lowered = G._python_step.lower(params, state, out, {}, fin, prev, i, p, keys, temp, top_p, stop, iv,
                                           **self._gen_static(mcfg, n_new, greedy, top_k, use_top_p))
        named = {**_named_params(params), **{f"state/{k}": v for k, v in _flat(state).items()}}
        return lowered, named


@contextlib.contextmanager
def _unrolled_generation(unroll: bool):
    """``generate``'s programs pick the layer loop with :func:`prefjax.model.auto_unroll` (a scan off GPUs),
    which has no argument; the depth variants of the layer-cost correction need it unrolled (XLA costs
    a scan body once whatever the depth), so it is switched for their lowering only. The variants have
    configs of their own, so their traces never meet the real program's in jit's cache."""
    from prefjax import generation as G
    if not unroll:
        yield
        return
    old = G.auto_unroll
    G.auto_unroll = lambda: True
    try:
        yield
    finally:
        G.auto_unroll = old


def _no_prefix(fn) -> dict[str, None]:
    """``None`` for the optional shared-prompt-prefix arguments of generate's programs, where the
    program has them (a prefix KV cache is an optimisation of some runs; the AOT check compiles the
    plain prompt)."""
    import inspect
    try:
        names = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {n: None for n in ("prefix_state", "rows_B") if n in names}


def _flat(tree) -> dict[str, Any]:
    import jax
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(getattr(p, "key", p)) for p in path)] = leaf
    return out


def _named_params(params) -> dict[str, Any]:
    return {f"params/{k}": v for k, v in _flat(params).items()}


def layer_corrected_cost(build: Callable[[Any, bool], Any], mcfg, chip: Chip, log=None) -> tuple[float, float, str]:
    """Per-call (flops, bytes) of the whole layer stack from depth variants compiled unrolled
    (``build(variant, True)``): one layer of the first type ``a`` and, for each type ``t``, the two
    layers ``[a, t]``; per-layer cost of ``t`` = ``[a, t]`` minus ``[a]``, fixed cost = ``[a]`` minus a
    layer of ``a``; total = fixed + sum over types of count x per-layer (types + 1 compiles)."""
    groups = layer_groups(mcfg)
    kinds = list(groups)
    a = kinds[0]
    with lowering_context():
        base = _cost(build(depth_variant(mcfg, [a]), True).compile())
    per = {}
    for t in kinds:
        with lowering_context():
            two = _cost(build(depth_variant(mcfg, [a, t]), True).compile())
        per[t] = (max(two[0] - base[0], 0.0), max(two[1] - base[1], 0.0))
    fixed = (max(base[0] - per[a][0], 0.0), max(base[1] - per[a][1], 0.0))
    flops = fixed[0] + sum(groups[t] * per[t][0] for t in kinds)
    nbytes = fixed[1] + sum(groups[t] * per[t][1] for t in kinds)
    desc = "layers extrapolated from unrolled 1- and 2-layer variants (" + ", ".join(
        f"{groups[t]} x {t}" for t in kinds) + ")"
    return flops, nbytes, desc


# --------------------------------------------------------------------------------------------
# The statistics programs.

def lower_thurstonian(sl: TpuSlice, n_tasks: int, n_comparisons: int):
    """``prefjax.utility.thurstonian.solve_program`` (L-BFGS to convergence in one while loop) with the
    comparisons sharded over every chip (a 1-D ``data`` mesh), tasks replicated."""
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from prefjax.utility import thurstonian as T
    mesh = Mesh(np.array(sl.devices), ("data",))
    n_dev = sl.n_chips
    rows = T.comparison_bucket(int(n_comparisons), n_dev)
    shard, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    cols = (_sds((rows,), jnp.int32, shard), _sds((rows,), jnp.int32, shard),
            _sds((rows,), jnp.float32, shard), _sds((rows,), jnp.float32, shard))
    extra = (_sds((n_tasks,), jnp.bool_, rep), _sds((), jnp.float32, rep))
    params0 = {"m": _sds((n_tasks,), jnp.float32, rep), "log_sigma": _sds((n_tasks,), jnp.float32, rep)}
    cfg = T.ThurstonianConfig()
    numeric = {k: _sds((), jnp.float32, rep) for k in T._NUMERIC}
    static = dataclasses.replace(cfg, **{k: 0.0 for k in T._NUMERIC})
    lowered = T.solve_program.lower(params0, cols + extra, numeric, cfg=static)
    named = {"comparisons i": cols[0], "comparisons j": cols[1], "wins_i": cols[2], "wins_j": cols[3],
             "mu": params0["m"], "log_sigma": params0["log_sigma"]}
    return lowered, named, rows, cfg.max_iter


def lower_ridge(sl: TpuSlice, n: int, d: int, part: str = "gram"):
    """The accelerator's part of ``prefjax.probes.ridge.decompose`` (one decomposition per captured layer
    gives the whole alpha path) on one chip, in float32, as process 0 runs it: ``part="gram"`` lowers
    ``ridge.gram`` (``X^T X``, or ``X X^T`` when d > n), ``part="project"`` lowers ``ridge.project``
    (the host's eigenvectors carried back: ``V^T X^T`` or ``X^T U``). The ``min(n, d)``-square
    eigendecomposition between them runs on the host in float64 (numpy/LAPACK): nothing to compile."""
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from prefjax.probes import ridge as R
    one = NamedSharding(Mesh(np.array(sl.devices[:1]), ("one",)), P())
    x = _sds((n, d), jnp.float32, one)
    if part == "gram":
        return R.gram.lower(x), {"X (train split)": x}
    if part == "project":
        r = min(n, d)
        v = _sds((r, r), jnp.float32, one)
        return R.project.lower(x, v), {"X (train split)": x, "eigenvectors (from the host)": v}
    raise ValueError(f"part must be 'gram' or 'project', got {part!r}")


# --------------------------------------------------------------------------------------------
# The run.

@dataclasses.dataclass
class Workload:
    """How many calls of each program the config's stages make (one host; see :func:`workload`)."""

    counts: dict[str, float]
    assumptions: list[str]


def _n_pairs(cfg: RunConfig, n: int) -> int:
    degree = int(cfg.choices.degree or 6)
    rounds = int(cfg.choices.active_rounds or 0)
    per_round = int(cfg.choices.pairs_per_round or max(n // 2, 1))
    degree = min(degree, max(n - 1, 1))
    return int(math.ceil(n * degree / 2)) + rounds * per_round


@dataclasses.dataclass
class RunShapes:
    n_tasks: int
    personas: int
    layers: list
    acts_batch: int
    choices_batch: int
    task_len: int
    pair_len: int
    n_after: int
    mode: str
    samples: int
    orders: int
    choice_new: int
    top_p: float
    temperature: float
    steer_rows: int
    steer_coefs: int
    steer_new: int
    pairs: int
    rounds: int


def run_shapes(cfg, mcfg, task_len: int, pair_len: int, batch_multiple: int) -> RunShapes:
    """The run's shapes (tasks, layers, batches, token counts) from a pipeline config."""
    cfg = RunConfig.from_config(cfg)
    n = cfg.tasks.n
    personas = len(cfg.personas)
    stages = cfg.stages
    layers = resolve_layers(cfg.activations.layers, mcfg.n_layers) if "activations" in stages else []
    mode = cfg.choices.mode
    n_pairs = cfg.steering.n_pairs
    steer_rows = 2 * min(n_pairs, max(n // 2, 1)) if "steering" in stages else 0
    return RunShapes(
        n_tasks=n, personas=personas, layers=list(layers),
        acts_batch=cfg.activations.batch_size,
        # generate pads a chunk to a multiple of the batch split (prefjax.generation.generate)
        choices_batch=cfg.choices.batch_size, task_len=int(task_len), pair_len=int(pair_len),
        n_after=cfg.activations.n_after, mode=mode,
        samples=1 if mode == "logit" else cfg.choices.samples,
        orders=2 if cfg.choices.orders == "both" else 1,
        choice_new=cfg.choices.max_new_tokens, top_p=cfg.choices.top_p,
        temperature=cfg.choices.temperature,
        steer_rows=steer_rows, steer_coefs=len(cfg.steering.coefs),
        steer_new=int(cfg.steering.generate_tokens or 0), pairs=_n_pairs(cfg, n),
        rounds=int(cfg.choices.active_rounds or 0))


def workload(shapes: RunShapes, *, fit_rows: int, fit_iters: int, n_topics: int = 10,
             stages: Sequence[str] = (), standardize: bool = True, outer: int = 5, inlp_iter: int = 5) -> Workload:
    """Calls per program for the config (upper bounds where the run may stop early); the probes, transfer and
    INLP stages' host work (float64 decompositions) is stated in the assumptions with its count."""
    s = shapes
    c: dict[str, float] = {}
    a = [f"{s.n_tasks} tasks, {s.personas} persona(s); task prompts {s.task_len} tokens, pair prompts "
         f"{s.pair_len} tokens (padded lengths; set --task_len / --pair_len)"]
    if "choices" in stages:
        prompts = s.pairs * s.orders * s.samples
        batches = s.personas * math.ceil(prompts / s.choices_batch)
        a.append(f"choices: {s.pairs} pairs per persona (d-regular start + active rounds) x {s.orders} orders"
                 + (f" x {s.samples} samples" if s.mode != "logit" else "") + f", batches of {s.choices_batch}")
        if s.mode == "logit":
            c["choices: prefill"] = batches
        else:
            c["choices: generate prefill"] = batches
            c["choices: decode step"] = batches * max(s.choice_new - 1, 0)
            a.append(f"choices: every sample decodes all {s.choice_new} new tokens (no early stop)")
    if s.layers:
        c["activations: prefill+capture"] = s.personas * math.ceil(s.n_tasks / s.acts_batch)
    if s.steer_rows:
        sweeps = 2 * s.steer_coefs  # probe and random direction
        c["steering: steered prefill"] = sweeps * (2 if s.steer_new else 1)
        a.append(f"steering: {s.steer_rows} rows x {s.steer_coefs} coefficients x 2 directions"
                 + (f", {s.steer_new} greedy tokens each (generate's prefill timed as the steered prefill)"
                    if s.steer_new else ""))
        if s.steer_new:
            c["steering: steered decode step"] = sweeps * max(s.steer_new - 1, 0)
            c["steering: loglik"] = sweeps
    if "utilities" in stages:
        refits = s.personas * (s.rounds + 2)  # the learner refits after every round, the stage once more
        comparisons = s.pairs * s.orders
        c["utilities: Thurstonian fit"] = refits * fit_iters * min(1.0, comparisons / max(fit_rows, 1))
        a.append(f"utilities: {fit_iters} L-BFGS iterations per fit (the cap), time scaled from the compiled "
                 f"size by comparisons ({comparisons} per persona)")
    if "probes" in stages and s.layers:
        dec = run_decompositions(n_layers=len(s.layers), personas=s.personas, standardize=standardize,
                                 outer=outer, n_topics=n_topics, inlp_iter=inlp_iter)
        a.append(f"probes + transfer + INLP: host work, not chip programs: {sum(dec.values())} float64 "
                 f"decompositions ({dec['probes']} probes, {dec['transfer']} transfer, {dec['inlp']} INLP; "
                 f"prefjax.probes.protocol.run_decompositions) with their leave-rows-out solves, on the host CPU of "
                 "a TPU run (no float64 eigensolver on the chip; on a GPU they run on the GPU). The ridge Gram and "
                 "projection programs below are fit_ridge's (the experiments), 0 calls from these stages; "
                 "measured rates: bench/bench_probes.py, BUILD_NOTES")
    a.append("not projected: patching, pref_shift, truefalse (small next to the above)")
    return Workload(c, a)


@dataclasses.dataclass
class RunReport:
    topology: TpuSlice
    mesh: dict
    model: str
    dtype: str
    results: list
    workload: Workload | None
    warnings: list

    @property
    def ok(self) -> bool:
        return all(r.status == "ok" for r in self.results)

    def result(self, name: str) -> ProgramResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no program {name!r}; have {[r.name for r in self.results]}")

    def total_hours(self) -> float:
        return sum(r.total_s for r in self.results if r.ok) / 3600.0

    def prefill_tok_s(self) -> float | None:
        for name in ("activations: prefill+capture", "choices: prefill", "choices: generate prefill",
                     "steering: steered prefill"):
            r = next((x for x in self.results if x.name == name and x.ok), None)
            if r is not None and r.tok_per_s:
                return r.tok_per_s
        return None

    def decode_tok_s(self) -> float | None:
        for name in ("choices: decode step", "steering: steered decode step"):
            r = next((x for x in self.results if x.name == name and x.ok), None)
            if r is not None and r.tok_per_s:
                return r.tok_per_s
        return None

    def format(self) -> str:
        c = self.topology.chip
        lines = [f"topology {self.topology.describe()}",
                 f"model {self.model} ({self.dtype}), mesh {self.mesh or {'data': 1}}", ""]
        head = (f"{'program':34} {'status':12} {'compile':>7} {'args':>6} {'temp':>6} {'out':>6} "
                f"{'peak / HBM GiB':>17} {'TFLOP':>8} {'GB':>8} {'roofline':>9} {'calls':>9} {'total':>9}  cost")
        lines += [head, "-" * len(head)]
        for r in self.results:
            if r.status == "failed":
                lines.append(f"{r.name:34} {'FAILED':12} {r.compile_s:6.0f}s  {r.error}")
                continue
            peak = f"{r.peak_bytes / GiB:.2f}/{c.hbm_gib:g} ({100 * r.peak_bytes / r.hbm_bytes:.0f}%)"
            lines.append(
                f"{r.name:34} {r.status:12} {r.compile_s:6.0f}s {r.argument_bytes / GiB:6.2f} {r.temp_bytes / GiB:6.2f} "
                f"{r.output_bytes / GiB:6.2f} {peak:>17} {r.flops / 1e12:8.3f} {r.bytes_accessed / 1e9:8.2f} "
                f"{_fmt_s(r.roofline_s):>9} {r.calls:9.3g} {_fmt_s(r.total_s):>9}  {r.cost_method}")
        for r in self.results:
            if r.status == "does not fit":
                lines.append("does not fit: " + r.overflow_text())
            for n in r.notes:
                lines.append(f"note ({r.name}): {n}")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        pre, dec = self.prefill_tok_s(), self.decode_tok_s()
        lines.append("")
        lines.append("roofline per chip: max(flops / peak bf16, bytes / HBM bandwidth); collectives ignored")
        lines.append(f"projected prefill {_fmt_rate(pre)} tok/s, decode {_fmt_rate(dec)} tok/s (whole slice)")
        if self.workload is not None:
            for a in self.workload.assumptions:
                lines.append(f"assumption: {a}")
            by_stage = collections.defaultdict(float)
            for r in self.results:
                if r.ok:
                    by_stage[r.name.split(":")[0]] += r.total_s
            parts = ", ".join(f"{k} {v / 3600:.3g} h" for k, v in by_stage.items() if v > 0)
            lines.append(f"projected workload: {self.total_hours():.3g} h on {self.topology.name} ({parts})")
        lines.append("all programs compile and fit" if self.ok else "NOT all programs compile and fit")
        return "\n".join(lines)


def _fmt_s(s: float) -> str:
    if s <= 0:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f}us"
    if s < 1:
        return f"{s * 1e3:.1f}ms"
    if s < 3600:
        return f"{s:.1f}s"
    return f"{s / 3600:.2f}h"


def _fmt_rate(x):
    return "-" if x is None else f"{x:,.0f}"


PROGRAMS = ("activations: prefill+capture", "choices: prefill", "choices: generate prefill", "choices: decode step",
            "steering: steered prefill", "steering: steered decode step", "steering: loglik",
            "utilities: Thurstonian fit", "probes: ridge Gram", "probes: ridge projection")
RIDGE_PROGRAMS = ("probes: ridge Gram", "probes: ridge projection")
# names that select several programs (the ridge path's eigh left the accelerator, splitting its program in two)
PROGRAM_ALIASES = {"probes: ridge path": RIDGE_PROGRAMS}


def resolve_mesh(cfg, sl: TpuSlice, mesh: Mapping[str, int] | None) -> dict[str, int]:
    """``mesh`` if given, else the config's ``mesh`` block when it spans the slice; errors name both."""
    if mesh is not None:
        return {k: int(v) for k, v in dict(mesh).items()}
    shape = RunConfig.from_config(cfg).mesh_shape()
    size = int(np.prod(list(shape.values())))
    if size != sl.n_chips:
        raise AOTError(f"the config's mesh {({k: v for k, v in shape.items() if v > 1}) or {'data': 1}} has {size} "
                       f"devices but topology {sl.name} has {sl.n_chips} chips; pass a mesh for the slice "
                       "(--mesh fsdp=16, or a preset in configs/tpu_meshes.py)")
    return shape


def check_run(cfg, topology: str, *, mesh: Mapping[str, int] | None = None, task_len: int = 256,
              pair_len: int = 512, programs: Sequence[str] | None = None, layer_costs: bool = True,
              strict: bool = True, fit_tasks: int = 10 ** 6, fit_comparisons: int = 10 ** 7,
              log: Callable[[str], None] | None = print) -> RunReport:
    """Compile every program of the run ``cfg`` (a pipeline config: ``model.preset``, ``model.dtype``,
    batch sizes, stages) for TPU slice ``topology`` on ``mesh`` (default: the config's) and measure
    each; see the module docstring. ``programs`` restricts to some of :data:`PROGRAMS`;
    ``layer_costs=False`` skips the depth-variant compiles (costs then count one layer);
    ``strict=False`` lets parameter dimensions that a mesh axis does not divide be replicated."""
    import jax.numpy as jnp

    from prefjax.checkpoints.hf import resolve_dtype
    from prefjax.models import family_for_preset
    cfg = RunConfig.from_config(cfg)
    sl = tpu_slice(topology)
    shape = resolve_mesh(cfg, sl, mesh)
    m = slice_mesh(sl, shape)
    preset = cfg.model.preset or cfg.model.name
    fam = family_for_preset(preset)
    mcfg = fam.presets[preset]
    dtype = resolve_dtype(cfg.model.dtype or "float32") or jnp.float32
    where = f"topology {sl.name}: "
    mp = ModelPrograms(fam, mcfg, dtype, m, strict=strict, where=where)
    stages = cfg.stages
    rs = run_shapes(cfg, mcfg, task_len, pair_len, mp.batch_multiple())
    fit_rows = None
    warnings: list[str] = []
    wanted = set(programs) if programs else None
    if wanted:
        wanted = set().union(*(PROGRAM_ALIASES.get(p, (p,)) for p in wanted))
        unknown = sorted(wanted - set(PROGRAMS))
        if unknown:
            raise AOTError(f"unknown programs {unknown}; known: {list(PROGRAMS)}")
    bm = mp.batch_multiple()

    def round_batch(b):  # generate pads each chunk to a multiple of the batch split
        return -(-b // bm) * bm

    def check_rows(name, b):
        if b % bm:
            warnings.append(f"{name}: batch {b} does not divide over the batch axes ({bm} ways) of mesh "
                            f"{mesh_shape(m)} on {sl.name}; Model.run replicates it (every chip runs all {b} rows)")

    specs: list[tuple[str, str, str, int, Callable]] = []  # (name, stage, kind, tokens, build(mcfg, unroll))
    mid = mcfg.n_layers // 2
    if rs.layers:
        b, t, k = rs.acts_batch, rs.task_len, rs.n_after + 1
        check_rows("activations", b)
        specs.append(("activations: prefill+capture", "activations", "prefill", b * t,
                      lambda c, u, b=b, t=t, k=k: mp.forward(c, batch=b, seq=t, k_pos=k, unroll=u,
                                                             capture=rs.layers if c is mcfg else range(c.n_layers))))
    if "choices" in stages:
        if rs.mode == "logit":
            b, t = rs.choices_batch, rs.pair_len
            check_rows("choices", b)
            specs.append(("choices: prefill", "choices", "prefill", b * t,
                          lambda c, u, b=b, t=t: mp.forward(c, batch=b, seq=t, k_pos=1, unroll=u)))
        else:
            b, t = round_batch(rs.choices_batch), rs.pair_len
            kw = dict(n_new=rs.choice_new, greedy=rs.temperature == 0.0, use_top_p=rs.top_p < 1.0)
            specs.append(("choices: generate prefill", "choices", "prefill", b * t,
                          lambda c, u, b=b, t=t, kw=kw: mp.generate_prefill(c, batch=b, seq=t, unroll=u, **kw)))
            specs.append(("choices: decode step", "choices", "decode", b,
                          lambda c, u, b=b, t=t, kw=kw: mp.decode_step(c, batch=b, prompt_len=t, unroll=u, **kw)))
    if rs.steer_rows:
        b, t = rs.steer_rows, rs.pair_len
        check_rows("steering", b)
        lay = lambda c: mid if c is mcfg else 0
        specs.append(("steering: steered prefill", "steering", "prefill", b * t,
                      lambda c, u, b=b, t=t: mp.forward(c, batch=b, seq=t, k_pos=1, steer_layer=lay(c), unroll=u)))
        if rs.steer_new:
            bg = round_batch(b)
            specs.append(("steering: steered decode step", "steering", "decode", bg,
                          lambda c, u, b=bg, t=t: mp.decode_step(c, batch=b, prompt_len=t, n_new=rs.steer_new,
                                                                 greedy=True, steer_layer=lay(c), unroll=u)))
            tl = t + rs.steer_new
            # completion_loglik asks for logits only where they score a completion token
            specs.append(("steering: loglik", "steering", "prefill", b * tl,
                          lambda c, u, b=b, t=tl, k=rs.steer_new: mp.forward(c, batch=b, seq=t, k_pos=k, unroll=u)))

    results: list[ProgramResult] = []
    if log:
        log(f"AOT check: {preset} ({jnp.dtype(dtype).name}) on {sl.describe()}, mesh {mesh_shape(m) or {'data': 1}}")
    for name, stage, kind, tokens, build in specs:
        if wanted is not None and name not in wanted:
            continue
        lowered_named = {}

        def lower(build=build):
            lowered, named = build(mcfg, False)
            lowered_named.update(named)
            return lowered

        res, compiled = compile_program(name, lower, sl.chip, log=log)
        if lowered_named:
            res.largest_args = sorted(((n, float(per_chip_bytes(s))) for n, s in lowered_named.items()),
                                      key=lambda kv: -kv[1])[:5]
        if compiled is None and res.status == "does not fit":  # refused by libtpu: arguments from the inputs
            res.argument_bytes = float(sum(per_chip_bytes(s) for s in lowered_named.values()))
        if compiled is not None:
            raw_flops = res.flops
            res.cost_method = "layer loop counted once (layer_costs=False)"
            if layer_costs:
                try:
                    f, nb, desc = layer_corrected_cost(lambda c, u, build=build: build(c, u)[0], mcfg, sl.chip, log)
                    res.flops, res.bytes_accessed, res.cost_method = f, nb, desc
                except Exception as e:  # keep the as-compiled cost, say why
                    res.notes.append(f"layer-cost variants failed ({type(e).__name__}: {str(e)[:200]}); "
                                     "cost counts the layer loop once")
            res.roofline_s = roofline(res.flops, res.bytes_accessed, sl.chip)
            if fam.name == "qwen35" and getattr(mcfg, "is_moe", False) and kind in ("prefill", "decode"):
                _check_moe(res, raw_flops, mcfg, tokens, m)
        res.stage, res.kind, res.tokens = stage, kind, tokens
        results.append(res)

    if "utilities" in stages and (wanted is None or "utilities: Thurstonian fit" in wanted):
        box = {}

        def lower_fit():
            lowered, named, rows, iters = lower_thurstonian(sl, fit_tasks, fit_comparisons)
            box.update(named=named, rows=rows, iters=iters)
            return lowered

        res, compiled = compile_program("utilities: Thurstonian fit", lower_fit, sl.chip, log=log)
        if compiled is not None:
            fit_rows = box["rows"]
            res.largest_args = sorted(((n, float(per_chip_bytes(s))) for n, s in box["named"].items()),
                                      key=lambda kv: -kv[1])[:5]
            res.cost_method = (f"one L-BFGS iteration ({fit_tasks:.0e} tasks, {fit_comparisons:.0e} comparisons "
                               f"padded to {fit_rows}); while loops counted once")
        res.stage, res.kind = "utilities", "stats"
        results.append(res)
    n_train = max(int(round(0.6 * rs.n_tasks)), 2)
    r_eig = min(n_train, mcfg.d_model)
    ridge_parts = {"probes: ridge Gram": ("gram", f"{'X^T X' if mcfg.d_model <= n_train else 'X X^T'} of the "
                                                 f"{n_train} x {mcfg.d_model} train split (float32, HIGHEST, one chip)"),
                   "probes: ridge projection": ("project", f"{'V^T X^T' if mcfg.d_model <= n_train else 'X^T U'}, "
                                                       f"V the {r_eig}-square eigenvectors (float32, HIGHEST, one chip)")}
    for name, (part, method) in ridge_parts.items():
        if not ("probes" in stages and rs.layers and (wanted is None or name in wanted)):
            continue
        box = {}

        def lower_r(part=part, box=box):
            lowered, named = lower_ridge(sl, n_train, mcfg.d_model, part)
            box.update(named)
            return lowered

        res, compiled = compile_program(name, lower_r, sl.chip, log=log)
        if compiled is not None:
            res.largest_args = sorted(((n, float(per_chip_bytes(s))) for n, s in box.items()), key=lambda kv: -kv[1])
            res.cost_method = method
            if part == "gram":
                res.notes.append(f"the {r_eig}-square eigendecomposition between the Gram and projection programs "
                                 "runs on the host CPU in float64 (numpy/LAPACK), not on the chip: not compiled, "
                                 "not in the roofline")
        res.stage, res.kind = "probes", "stats"
        results.append(res)

    from prefjax.tasks.pool import TOPICS
    rc = cfg  # already the typed config (above)
    wl = workload(rs, fit_rows=fit_rows or fit_comparisons, fit_iters=500, n_topics=len(TOPICS), stages=stages,
                  standardize=rc.probes.standardize, outer=rc.probes.cv_outer, inlp_iter=rc.inlp.n_iter)
    for r in results:
        r.calls = float(wl.counts.get(r.name, 0.0))
    return RunReport(topology=sl, mesh=mesh_shape(m), model=preset, dtype=jnp.dtype(dtype).name, results=results,
                     workload=wl, warnings=warnings)


def _check_moe(res: ProgramResult, raw_flops: float, mcfg, tokens: int, mesh) -> None:
    """The routed experts must run as grouped matmuls: ``ragged_dot``, which the TPU compiler keeps as its
    native grouped-matmul kernel (``ragged-dot`` in the optimized HLO; a dense all-experts einsum, or a
    ragged_dot expanded to one, has none). The flops are compared with one dense all-experts layer (every
    gathered token through every local expert) for the record: XLA costs the program with one layer of
    the scan, so with many tokens per chip a dense path would exceed it (with few, as in a decode step,
    the unembedding dominates and the comparison says nothing)."""
    from prefjax.sharding import batch_multiple
    sizes = {a: int(s) for a, s in mesh.shape.items()}
    local_tokens = tokens / max(batch_multiple(mesh), 1) * sizes.get("expert", 1)  # gathered over experts
    e_local = mcfg.n_experts / sizes.get("expert", 1)
    f_local = mcfg.d_expert / (sizes.get("tensor", 1) if mcfg.d_expert % sizes.get("tensor", 1) == 0 else 1)
    dense = 6.0 * local_tokens * e_local * mcfg.d_model * f_local
    if "ragged-dot" not in res.hlo_ops:
        res.status = "failed"
        res.error = "MoE experts did not compile to grouped matmuls (no ragged-dot in the optimized HLO)"
        return
    res.notes.append(f"MoE experts: ragged_dot (grouped matmul) in the compiled program; {raw_flops / 1e12:.3g} "
                     f"TFLOP per chip with one layer counted, vs {dense / 1e12:.3g} TFLOP for one dense "
                     "all-experts layer")
