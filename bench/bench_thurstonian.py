"""Thurstonian fit: prefjax (optax L-BFGS, float32, jitted) vs a straightforward scipy L-BFGS-B fit of the
same objective with an analytic gradient (float64), on the same synthetic data. Prints both and the ratio.

    python bench/bench_thurstonian.py [--n_tasks 10000 --n_pairs 60000 --n_samples 5]
"""

import argparse
import time

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_ndtr

from prefjax.utility import ThurstonianFit, fit_thurstonian, make_comparisons


def scipy_fit(d, n, prior_weight=1.0, mu_prior=0.1):
    """NLL + prior_weight * sum(log sigma^2) + mu_prior * sum(mu^2), mean gauge, L-BFGS-B."""
    i, j, wi, wj = d.i, d.j, d.wins_i.astype(float), d.wins_j.astype(float)

    def f(x):
        m, ls = x[:n], x[n:]
        mu = m - m.mean()
        s2i, s2j = np.exp(2 * ls[i]), np.exp(2 * ls[j])
        s = np.sqrt(s2i + s2j)
        z = (mu[i] - mu[j]) / s
        lp, lq = log_ndtr(z), log_ndtr(-z)
        logpdf = -0.5 * z * z - 0.5 * np.log(2 * np.pi)
        dz = -wi * np.exp(logpdf - lp) + wj * np.exp(logpdf - lq)  # d loss / d z
        val = -(wi * lp + wj * lq).sum() + prior_weight * (ls ** 2).sum() + mu_prior * (mu ** 2).sum()
        gmu = np.bincount(i, dz / s, n) - np.bincount(j, dz / s, n) + 2 * mu_prior * mu
        gmu -= gmu.mean()  # through the gauge
        gz = -dz * z / (s * s)
        gls = np.bincount(i, gz * s2i, n) + np.bincount(j, gz * s2j, n) + 2 * prior_weight * ls
        return val, np.concatenate([gmu, gls])

    res = minimize(f, np.zeros(2 * n), jac=True, method="L-BFGS-B", options={"maxiter": 2000})
    mu = res.x[:n] - res.x[:n].mean()
    return ThurstonianFit(mu, np.exp(res.x[n:]), res.fun, res.fun, res.success, res.nit, np.zeros(0, int), 1,
                          None)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n_tasks", type=int, default=10_000)
    ap.add_argument("--n_pairs", type=int, default=60_000)
    ap.add_argument("--n_samples", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    d = make_comparisons(a.n_tasks, a.n_pairs, a.n_samples, 20_000, seed=a.seed)
    n = a.n_tasks
    ev = lambda f: f.heldout(d.test_i, d.test_j, d.test_chose_i)
    oracle = ev(ThurstonianFit(d.mu, d.sigma, 0, 0, True, 0, np.zeros(0, int), 1, None))
    print(f"data: {n} tasks, {a.n_pairs} pairs x {a.n_samples} samples, 20000 held-out single choices")
    print(f"{'fit':44s} {'time_s':>8s} {'iters':>6s} {'acc':>7s} {'logloss':>8s} {'r(mu)':>7s}")
    print(f"{'true utilities':44s} {'':>8s} {'':>6s} {oracle['accuracy']:7.4f} {oracle['log_loss']:8.4f}")
    rows = {}
    for mp in (0.1, 0.0):
        args = (d.i, d.j, d.wins_i, d.wins_j, n)
        _, cold = timed(lambda: fit_thurstonian(*args, mu_prior=mp))
        fj, warm = timed(lambda: fit_thurstonian(*args, mu_prior=mp))
        fs, ts = timed(lambda: scipy_fit(d, n, mu_prior=mp))
        for name, f, t in ((f"prefjax lbfgs mu_prior={mp} (warm; cold {cold:.2f}s)", fj, warm),
                           (f"scipy L-BFGS-B mu_prior={mp}", fs, ts)):
            m = ev(f)
            rows[name] = (t, m)
            print(f"{name:44s} {t:8.2f} {f.iterations:6d} {m['accuracy']:7.4f} {m['log_loss']:8.4f} "
                  f"{np.corrcoef(f.mu, d.mu)[0, 1]:7.4f}")
        print(f"  ratio scipy/prefjax time (mu_prior={mp}): warm {ts / warm:.1f}x, cold {ts / cold:.1f}x")
    fa, ta = timed(lambda: fit_thurstonian(d.i, d.j, d.wins_i, d.wins_j, n, optimizer="adam", max_iter=3000,
                                           learning_rate=0.02))
    fm, tm = timed(lambda: fit_thurstonian(d.i, d.j, d.wins_i, d.wins_j, n, style="mazeika"))
    for name, f, t in (("prefjax adam lr=0.02 (incl. compile)", fa, ta), ("prefjax mazeika-style (incl. compile)", fm, tm)):
        m = ev(f)
        print(f"{name:44s} {t:8.2f} {f.iterations:6d} {m['accuracy']:7.4f} {m['log_loss']:8.4f} "
              f"{np.corrcoef(f.mu, d.mu)[0, 1]:7.4f}")


if __name__ == "__main__":
    main()
