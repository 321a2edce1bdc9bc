"""Ahead-of-time check of a run for a TPU slice, from any machine (no TPU, no weights; needs libtpu).

    python launch/aot.py --config configs/default.py:gemma3-27b --topology v5e:4x4
    python launch/aot.py --config configs/steering.py:qwen35-122b-a10b --topology v5p-32 --mesh fsdp=2,expert=8

Compiles every jitted program the config's run would execute (prefill + capture, the decode step, the
steered variants, the Thurstonian fit at 1e6 tasks / 1e7 comparisons, the ridge path) for the slice,
on the mesh given by ``--mesh``, else the preset of ``configs/tpu_meshes.py``, else the config's own
``mesh`` block (when it spans the slice), and prints per program: status, per-chip memory against
the chip's HBM, a roofline time and the projected wall time of the config's workload. Exits 1 when a
program fails to compile or does not fit. Config fields are overridden as in launch/main.py, e.g.
``--config.tasks.n=10000 --config.choices.mode=sample --config.choices.samples=5``.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
# The host compiles only: keep JAX's runtime on the CPU (libtpu still serves the TPU compiler), and let
# several processes load libtpu at once.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: v5e:2x2, v5e:4x4, v5p:2x2x1, v6e:8x8, v5e-16, v5p-32, ...")
_MESH = flags.DEFINE_string("mesh", None, "Mesh as axis=size pairs, e.g. 'fsdp=2,expert=8' (axes: data, fsdp, "
                            "tensor, expert); default: the preset for the model and slice, else the config's mesh.")
_TASK_LEN = flags.DEFINE_integer("task_len", 256, "Padded length of a single-task prompt (activations).")
_PAIR_LEN = flags.DEFINE_integer("pair_len", 512, "Padded length of a pair prompt (choices, steering).")
_PROGRAMS = flags.DEFINE_list("programs", None, "Only these programs (names as printed, e.g. "
                              "'activations: prefill+capture').")
_LAYER_COSTS = flags.DEFINE_bool("layer_costs", True, "Correct the cost of the layer scan with unrolled 1- and "
                                 "2-layer variants (more compiles); off: the scan body is counted once.")
_ALLOW_REPLICATED = flags.DEFINE_bool("allow_replicated", False, "Accept parameter dimensions a mesh axis does "
                                      "not divide (the run replicates them) instead of failing.")
_FIT_TASKS = flags.DEFINE_integer("fit_tasks", 10 ** 6, "Tasks of the Thurstonian fit compiled.")
_FIT_COMPARISONS = flags.DEFINE_integer("fit_comparisons", 10 ** 7, "Comparisons of the Thurstonian fit compiled.")
flags.mark_flag_as_required("topology")


def parse_mesh(text: str | None) -> dict | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise app.UsageError(f"--mesh {text!r}: expected axis=size pairs such as 'fsdp=2,expert=8'")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = int(v)
        except ValueError:
            raise app.UsageError(f"--mesh {text!r}: size {v!r} of axis {k.strip()!r} is not an integer") from None
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from configs.tpu_meshes import tpu_mesh
    from prefjax import aot
    cfg = _CONFIG.value
    try:
        sl = aot.tpu_slice(_TOPOLOGY.value)
        mesh = parse_mesh(_MESH.value)
        if mesh is None:
            name = str(cfg.model.name)
            mesh = tpu_mesh(name, sl.name)
            if mesh is not None:
                print(f"mesh: preset for {name} on {sl.name}: {mesh}", flush=True)
            elif int(_product(cfg.mesh)) != sl.n_chips:
                mesh = tpu_mesh(name, sl.name, sl.n_chips)
                print(f"mesh: no preset for {name} on {sl.name}; using {mesh}", flush=True)
        report = aot.check_run(cfg, sl.name, mesh=mesh, task_len=_TASK_LEN.value, pair_len=_PAIR_LEN.value,
                               programs=_PROGRAMS.value, layer_costs=_LAYER_COSTS.value,
                               strict=not _ALLOW_REPLICATED.value, fit_tasks=_FIT_TASKS.value,
                               fit_comparisons=_FIT_COMPARISONS.value,
                               log=lambda s: print(s, flush=True))
    except aot.AOTError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(report.format(), flush=True)
    return 0 if report.ok else 1


def _product(mesh_cfg) -> int:
    n = 1
    for a in ("data", "fsdp", "tensor", "expert"):
        n *= int(mesh_cfg.get(a, 1) or 1)
    return n


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
