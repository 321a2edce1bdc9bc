"""The probes, transfer and INLP stages' arithmetic at the paper's shape, timed on the device, projected to
every layer from measured per-layer rates, against the same run's references.

    python bench/bench_probes.py --n 10000 --d 5376 --layers 2 --full-layers 62 --personas 2

What runs is the stage's own code on synthetic activations (a planted linear utility plus noise, float32
like the store's): :func:`prefjax.probes.protocol.probe_layer` per (layer, persona) and for the content
baseline, :func:`prefjax.probes.nested_transfer` and :func:`transfer_matrix` across personas,
:func:`transfer_matrix` across the measured layers, :func:`prefjax.probes.inlp`. The settings are the
paper config's (``configs/paper.py``: raw features, 1se rule, 6 alphas, 5x5 folds, 100 permutations).

Printed (and written to ``$OUT/bench_probes.json``):
* the hardware: the solver device, its float64 matmul rate (8192^2 DGEMM) and read bandwidth (a
  read-only reduction over 4 GiB), one float64 eigh of d x d on the device and on the host (numpy);
* per (layer, persona) seconds (first call, with compiles, and the rest), decompositions made;
* the projection to ``--full-layers`` x personas with its formula;
* references from the same run: c031b3c's arithmetic (one host float64 eigh per training set; its count
  per (layer, persona) from the protocol) projected from the measured host eigh, and the seed stack's
  scikit-learn ``RidgeCV`` (one efficient-LOO fit per layer and persona on the training split, a lighter
  protocol) measured on one layer;
* the bound: the FLOPs a (layer, persona) must do (Gram, eigh ~ 9 d^3, projections, leave-rows-out solves)
  over the measured float64 matmul rate.
* a float64 check: the device result of a small problem against tests/probes_reference.py's refits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import numpy as np  # noqa: E402


def hardware(d: int) -> dict:
    import jax
    import jax.numpy as jnp
    from _timing import median_seconds, read_bandwidth
    from prefjax.probes.cvpath import solver_device
    dev = solver_device()
    out = {"solver_device": str(dev), "backend": jax.default_backend()}
    with jax.enable_x64(True):
        a = jax.device_put(np.random.default_rng(0).normal(size=(8192, 8192)), dev)
        mm = jax.jit(lambda x: x @ x)
        t = median_seconds(lambda: mm(a).block_until_ready(), 5)
        out["fp64_matmul_flops"] = 2 * 8192 ** 3 / t
        g = np.random.default_rng(1).normal(size=(d, d))
        g = jax.device_put(g @ g.T, dev)
        eig = jax.jit(jnp.linalg.eigh)
        out["device_eigh_s"] = median_seconds(lambda: jax.block_until_ready(eig(g)), 2)
        a = g = None
    if jax.default_backend() == "gpu":
        out["read_Bps"] = read_bandwidth(4.0)
    h = np.random.default_rng(2).normal(size=(d, d))
    h = h @ h.T
    t0 = time.perf_counter()
    np.linalg.eigh(h)
    out["host_eigh_s"] = time.perf_counter() - t0
    out["host_threads"] = os.cpu_count()
    return out


def synthetic(n, d, seed):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 64)).astype(np.float32)
    X = (base @ rng.normal(size=(64, d)).astype(np.float32) * 0.3
         + rng.normal(size=(n, d)).astype(np.float32) + rng.normal(size=d).astype(np.float32) * 5)
    return X


def old_decompositions(outer, inner, n_topics) -> int:
    """c031b3c's probes stage, one (layer, persona): nested CV outer*(inner+1) + its unused final inner folds,
    the fixed split (inner + 1 + its final inner) + the saved probe, leave-one-topic-out (inner + 1) per
    topic (BUILD_NOTES / issue 26's count: 113 at 5x5 folds and 11 topics)."""
    return outer * (inner + 1) + inner + (inner + 1 + inner) + 1 + n_topics * (inner + 1)


def _solve_sizes(n, outer, inner, n_topics) -> list[float]:
    """Removed-row counts of one (layer, persona)'s leave-rows-out solves (nested CV, split, LOTO)."""
    m_outer, m_inner = n / outer, n / outer + (n - n / outer) / inner
    m_topic = n / n_topics
    m_topic_inner = m_topic + (n - m_topic) / inner
    return ([m_outer] * (outer + 1) + [m_inner] * (outer * inner + inner)
            + [m_topic] * n_topics + [m_topic_inner] * (n_topics * inner))


def flops_bound(n, d, outer, inner, n_topics, A, P) -> float:
    """FLOPs one (layer, persona) must do with one decomposition: Gram 2nd^2, eigh ~9d^3, Q = ZV 2nd^2, and per
    leave-rows-out solve with m removed rows ~ A*(2m^2 d + m^3/3 + 4 m d P)."""
    return 4 * n * d * d + 9 * d ** 3 + sum(A * (2 * m * m * d + m ** 3 / 3 + 4 * m * d * P)
                                            for m in _solve_sizes(n, outer, inner, n_topics))


def flops_bound_hat(n, d, outer, inner, n_topics, A, P) -> float:
    """The same with the full hat matrices made once (A products 2 n^2 d) and each solve's ``H_MM`` gathered:
    per solve ~ A*(m^3/3 + 4 m d P)."""
    return 4 * n * d * d + 9 * d ** 3 + 2 * A * n * n * d + sum(A * (m ** 3 / 3 + 4 * m * d * P)
                                                                for m in _solve_sizes(n, outer, inner, n_topics))


def check_against_reference() -> float:
    """Max |difference| of nested CV + LOTO on the solver device against float64 refits (small problem)."""
    import probes_reference as ref
    from prefjax.probes import leave_one_topic_out, nested_cv_ridge
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(240, 48)) + 3).astype(np.float32)
    y = X @ rng.normal(size=48) / 7 + rng.normal(size=240)
    topics = np.repeat(np.arange(6), 40)
    kw = dict(alphas=(1.0, 10.0, 100.0, 1e3), outer=5, inner=5, n_perm=10, n_boot=200, seed=0, standardize=False,
              alpha_rule="1se")
    a, b = nested_cv_ridge(X, y, **kw), ref.nested_cv_ridge(X, y, **kw)
    diff = max(abs(a["r"] - b["r"]), float(np.nanmax(np.abs(np.array(a["null"]["values"]) - b["null"]["values"]))))
    lkw = dict(alphas=kw["alphas"], inner=5, seed=0, standardize=False, alpha_rule="1se")
    la, lb = leave_one_topic_out(X, y, topics, **lkw), ref.leave_one_topic_out(X, y, topics, **lkw)
    return max(diff, float(np.max(np.abs(la["predictions"] - lb["predictions"]))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--d", type=int, default=5376)
    ap.add_argument("--layers", type=int, default=2, help="layers measured")
    ap.add_argument("--full-layers", type=int, default=62, help="layers projected to")
    ap.add_argument("--personas", type=int, default=2)
    ap.add_argument("--topics", type=int, default=11)
    ap.add_argument("--n-perm", type=int, default=100)
    ap.add_argument("--inlp-iter", type=int, default=5)
    ap.add_argument("--standardize-too", action="store_true", help="also time one (layer, persona) standardised")
    ap.add_argument("--sklearn", action="store_true", help="time the seed stack's RidgeCV on one layer")
    args = ap.parse_args()

    from prefjax.probes import default_splits, inlp, nested_transfer, transfer_matrix
    from prefjax.probes.cvpath import FactorSet, decomposition_count
    from prefjax.probes.protocol import ProbeProtocol, probe_layer

    out = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "hardware": hardware(args.d)}
    hw = out["hardware"]
    print(json.dumps(hw), flush=True)
    out["float64_check_max_abs_diff"] = check_against_reference()
    print(f"float64 check against refits: max |diff| {out['float64_check_max_abs_diff']:.2e}", flush=True)

    n, d, L, P = args.n, args.d, args.layers, args.personas
    alphas = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
    proto = ProbeProtocol(alphas=alphas, cv_outer=5, cv_inner=5, n_perm=args.n_perm, standardize=False,
                          alpha_rule="1se", seed=0)
    rng = np.random.default_rng(7)
    topics = np.array([f"t{i % args.topics}" for i in rng.permutation(n)])
    _, _, test = default_splits(n, 0)
    X = [[synthetic(n, d, 100 * p + l) for l in range(L)] for p in range(P)]
    w = rng.normal(size=d) / np.sqrt(d)
    Y = [X[p][0] @ w * (1 + 0.2 * p) + rng.normal(size=n) * 3 for p in range(P)]

    per = []
    for p in range(P):
        for l in range(L):
            c0 = decomposition_count()
            lp = probe_layer(X[p][l], Y[p], topics, proto, test)
            per.append({"persona": p, "layer": l, "seconds": lp.seconds, "decompositions": decomposition_count() - c0,
                        "nested_r": lp.nested["r"], "loto_r": lp.loto_r})
            print(f"probe_layer persona {p} layer {l}: {lp.seconds:.2f} s, {per[-1]['decompositions']} decomposition(s), "
                  f"nested r {lp.nested['r']:.3f}", flush=True)
    out["per_layer"] = per
    # same-run reference: the previous path (each downdate rebuilds its H_MM block from the basis rows)
    prev = os.environ.get("PREFJAX_HAT_BYTES")
    os.environ["PREFJAX_HAT_BYTES"] = "0"
    t0 = time.time()
    probe_layer(X[0][min(1, L - 1)], Y[0], topics, proto, test)
    out["probe_layer_rebuilt_blocks_s"] = time.time() - t0
    if prev is None:
        del os.environ["PREFJAX_HAT_BYTES"]
    else:
        os.environ["PREFJAX_HAT_BYTES"] = prev
    print(f"probe_layer, H_MM rebuilt per solve (the previous path): {out['probe_layer_rebuilt_blocks_s']:.2f} s",
          flush=True)
    steady = [r["seconds"] for r in per[1:]] or [per[0]["seconds"]]
    t_lp = float(np.median(steady))
    t0 = time.time()
    probe_layer(X[0][0], Y[0], topics, proto, test)  # the content baseline has the same shape at d_model
    t_base = time.time() - t0

    if args.standardize_too:
        sp = ProbeProtocol(**{**proto.__dict__, "standardize": True})
        c0 = decomposition_count()
        t0 = time.time()
        probe_layer(X[0][0], Y[0], topics, sp, test)
        out["standardized"] = {"seconds": time.time() - t0, "decompositions": decomposition_count() - c0}
        print(f"standardised probe_layer: {out['standardized']}", flush=True)

    splits = default_splits(n, 0)
    t0 = time.time()
    Xs = np.stack([X[p][0] for p in range(P)])
    Ys = np.stack(Y)
    fss = [FactorSet(x, standardize=False) for x in Xs]
    transfer_matrix(Xs, Ys, alphas=alphas, splits=splits, standardize=False, n_boot=0, factors=fss)
    nested_transfer(Xs, Ys, alphas=alphas, outer=5, inner=5, n_perm=args.n_perm, standardize=False,
                    alpha_rule="1se", factors=fss)
    t_persona_transfer = time.time() - t0
    del fss, Xs
    t0 = time.time()
    transfer_matrix(np.stack(X[0]), Y[0], alphas=alphas, splits=splits, standardize=False, seed=0, inner=5,
                    alpha_rule="1se")
    t_layer_transfer = time.time() - t0
    t0 = time.time()
    inlp(X[0][0], Y[0], n_iter=args.inlp_iter, alphas=alphas, splits=splits, topics=topics, seed=0, inner=5,
         alpha_rule="1se")
    t_inlp = time.time() - t0

    FL = args.full_layers
    proj = {"probes_s": t_lp * FL * P + t_base * P,
            "transfer_s": t_persona_transfer + t_layer_transfer * FL / L,
            "inlp_s": t_inlp}
    proj["total_s"] = sum(proj.values())
    out["measured"] = {"probe_layer_s": t_lp, "content_baseline_s": t_base, "persona_transfer_s": t_persona_transfer,
                       f"layer_transfer_{L}_layers_s": t_layer_transfer, "inlp_s": t_inlp}
    out["projection"] = proj
    out["projection_formula"] = (f"probes = probe_layer x {FL} layers x {P} personas + baseline x {P}; transfer = "
                                 f"persona transfer + layer transfer({L}) x {FL}/{L} (one factor per layer; the "
                                 f"[L, L] predictions are small); inlp measured")
    old_count = old_decompositions(5, 5, args.topics)
    ref_old = old_count * hw["host_eigh_s"] * (FL * P + P)
    out["reference_c031b3c_probes_s"] = ref_old
    out["reference_c031b3c_decompositions_per_layer_persona"] = old_count * 2  # with the content baseline's
    bound = flops_bound(n, d, 5, 5, args.topics, len(alphas), args.n_perm + 1) / hw["fp64_matmul_flops"]
    out["bound_probe_layer_s"] = bound
    bound_hat = flops_bound_hat(n, d, 5, 5, args.topics, len(alphas), args.n_perm + 1) / hw["fp64_matmul_flops"]
    out["bound_probe_layer_hat_s"] = bound_hat
    if args.sklearn:
        from sklearn.linear_model import RidgeCV
        tr = np.setdiff1d(np.arange(n), test)
        t0 = time.time()
        RidgeCV(alphas=alphas).fit(X[0][0][tr], Y[0][tr])
        out["sklearn_ridgecv_one_layer_s"] = time.time() - t0
        out["seed_stack_probes_s"] = out["sklearn_ridgecv_one_layer_s"] * FL * P

    print(f"\n{'measure':<40} {'seconds':>10}")
    for k, v in out["measured"].items():
        print(f"{k:<40} {v:10.2f}")
    print(f"{'previous path (H_MM rebuilt per solve)':<40} {out['probe_layer_rebuilt_blocks_s']:10.2f}   "
          f"ratio {out['probe_layer_rebuilt_blocks_s'] / t_lp:.2f}x")
    print(f"{'bound per (layer, persona), fp64 FLOPs':<40} {bound_hat:10.2f}   share {100 * bound_hat / t_lp:.0f}% "
          f"(cached hat matrices; {bound:.2f} s for the rebuilt-block arithmetic)")
    print(f"\nprojected to {FL} layers x {P} personas: probes {proj['probes_s'] / 60:.1f} min, transfer "
          f"{proj['transfer_s'] / 60:.1f} min, INLP {proj['inlp_s'] / 60:.1f} min, total {proj['total_s'] / 60:.1f} min")
    print(f"reference, c031b3c arithmetic ({old_count} host float64 eighs per (layer, persona) and as many for the "
          f"baseline, {hw['host_eigh_s']:.1f} s each on {hw['host_threads']} threads): {ref_old / 3600:.1f} h "
          f"-> ratio {ref_old / proj['probes_s']:.0f}x on the probes stage")
    if args.sklearn:
        print(f"seed stack RidgeCV (one LOO fit per layer and persona, lighter protocol): "
              f"{out['seed_stack_probes_s'] / 60:.1f} min")
    print(f"decompositions per (layer, persona): {per[-1]['decompositions']} (+ {1} per persona for the baseline); "
          f"c031b3c: {old_count} (+ {old_count} per persona)")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_probes.json"), "w") as f:
            json.dump(out, f, indent=2, default=float)


if __name__ == "__main__":
    main()
