"""Host half of the ridge path: float64 eigh (numpy/LAPACK) of a d-square Gram matrix, timed.

    python bench/host_eigh.py --n 6000 --d 5376
"""
import argparse
import time

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=6000)
ap.add_argument("--d", type=int, default=5376)
a = ap.parse_args()
rng = np.random.default_rng(0)
x = rng.standard_normal((a.n, a.d), dtype=np.float32)
g = (x.T @ x).astype(np.float64) if a.d <= a.n else (x @ x.T).astype(np.float64)
t0 = time.perf_counter()
c0 = time.process_time()
lam, v = np.linalg.eigh(g)
print(f"RESULT host eigh float64 {g.shape[0]}-square: wall {time.perf_counter() - t0:.1f} s, "
      f"cpu {time.process_time() - c0:.1f} s", flush=True)
