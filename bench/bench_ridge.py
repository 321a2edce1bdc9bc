"""Ridge alpha sweep: prefjax (one eigendecomposition per layer, all alphas) vs scikit-learn Ridge refit per
alpha (StandardScaler + Ridge, alpha chosen by eval Pearson r), same data, same splits. Prints both + ratio.

    python bench/bench_ridge.py --n 10000 --d 5376 --layers 5 --alphas 10
"""

import argparse
import time

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from prefjax.probes import evaluate_probe, fit_ridge, pearson, split_indices


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--d", type=int, default=5376)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--alphas", type=int, default=10)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    # low-rank-plus-noise activations (like residual streams), utility on a planted direction per layer
    k = 64
    basis = rng.normal(size=(k, a.d)).astype(np.float32)
    X = np.empty((a.layers, a.n, a.d), np.float32)
    for layer in range(a.layers):
        X[layer] = rng.normal(size=(a.n, k)).astype(np.float32) @ basis + rng.normal(size=(a.n, a.d)).astype(np.float32)
    v = rng.normal(size=a.d).astype(np.float32)
    y = X[-1] @ v / np.sqrt(a.d)
    y = (y - y.mean()) / y.std() + rng.normal(size=a.n)
    alphas = np.logspace(0, 6, a.alphas)
    train, ev, test = split_indices(a.n, [0.6, 0.2, 0.2], 0)
    print(f"data: {a.layers} layers x n={a.n} x d={a.d}, {a.alphas} alphas, train/eval/test {len(train)}/{len(ev)}/{len(test)}")

    t = time.perf_counter()
    probes = fit_ridge(X, y, alphas=alphas, eval_idx=ev, train_idx=train)
    tp = time.perf_counter() - t
    r_p = [evaluate_probe(p, X[layer], y, test)["r"] for layer, p in enumerate(probes)]

    t = time.perf_counter()
    r_s, alpha_s = [], []
    for layer in range(a.layers):
        sc = StandardScaler().fit(X[layer][train])
        xt, xe, xs = (sc.transform(X[layer][idx]) for idx in (train, ev, test))
        fits = [Ridge(alpha=al).fit(xt, y[train]) for al in alphas]
        best = int(np.argmax([pearson(f.predict(xe), y[ev]) for f in fits]))
        r_s.append(pearson(fits[best].predict(xs), y[test]))
        alpha_s.append(alphas[best])
    ts = time.perf_counter() - t

    print(f"{'method':40s} {'time_s':>8s}  test r per layer / chosen alpha")
    print(f"{'prefjax fit_ridge (eigh, all alphas)':40s} {tp:8.2f}  {np.round(r_p, 4).tolist()} "
          f"{[p.alpha for p in probes]}")
    print(f"{'sklearn Ridge refit per alpha':40s} {ts:8.2f}  {np.round(r_s, 4).tolist()} {alpha_s}")
    print(f"ratio sklearn/prefjax: {ts / tp:.1f}x; max |r diff| {np.max(np.abs(np.array(r_p) - r_s)):.2e}")


if __name__ == "__main__":
    main()
