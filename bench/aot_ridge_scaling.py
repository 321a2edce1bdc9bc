"""TPU compile cost of the ridge path's programs vs d, from the CPU (libtpu's compiler, no TPU).

One program per process (run it under `/usr/bin/time -v` for the host's peak RSS):

    python bench/aot_ridge_scaling.py --program eigh --d 1024            # the old path: eigh on the chip
    python bench/aot_ridge_scaling.py --program gram --n 6000 --d 5376   # the new path: X^T X only
    python bench/aot_ridge_scaling.py --program project --n 6000 --d 5376

Prints one line: program, topology, n, d, compile seconds, per-chip GiB (arguments + temporaries +
outputs).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--program", choices=["eigh", "gram", "project"], required=True)
    ap.add_argument("--d", type=int, required=True)
    ap.add_argument("--n", type=int, default=0, help="rows of X (default: d, so the eigh is d-square)")
    ap.add_argument("--topology", default="v5e:4x4")
    a = ap.parse_args()
    from prefjax import aot
    from prefjax.probes import ridge as R
    sl = aot.tpu_slice(a.topology)
    one = NamedSharding(Mesh(np.array(sl.devices[:1]), ("one",)), P())
    n, d = (a.n or a.d), a.d
    sds = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=one)
    t0 = time.perf_counter()
    with aot.lowering_context():
        if a.program == "eigh":  # the old decompose's core: eigh of a d-square symmetric matrix
            lowered = jax.jit(lambda g: jnp.linalg.eigh(g)).lower(sds((d, d)))
        elif a.program == "gram":
            lowered = R.gram.lower(sds((n, d)))
        else:
            r = min(n, d)
            lowered = R.project.lower(sds((n, d)), sds((r, r)))
        compiled = lowered.compile()
    dt = time.perf_counter() - t0
    m = compiled.memory_analysis()
    gib = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes) / 2 ** 30
    print(f"RESULT program={a.program} topology={sl.name} n={n} d={d} compile_s={dt:.1f} per_chip_mib={gib * 1024:.1f}",
          flush=True)


if __name__ == "__main__":
    main()
