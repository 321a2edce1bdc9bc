"""A Bradley-Terry probe: a linear score of activations trained directly on pairwise choices."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prefjax.probes.ridge import RidgeProbe, check_finite


@functools.partial(jax.jit, static_argnames=("max_iter",))
def _fit(xs_NxD, i, j, w_i, w_j, l2, max_iter: int):
    """Minimise mean BT log-loss + l2 |w|^2 with optax L-BFGS, inside one while_loop."""
    total = jnp.sum(w_i + w_j)

    def fun(w):
        s = xs_NxD @ w
        d = s[i] - s[j]
        nll = -jnp.sum(w_i * jax.nn.log_sigmoid(d) + w_j * jax.nn.log_sigmoid(-d))
        return nll / total + l2 * jnp.sum(w * w)

    opt = optax.lbfgs()
    vg = jax.value_and_grad(fun)
    w0 = jnp.zeros(xs_NxD.shape[1], jnp.float32)
    f0, g0 = vg(w0)

    def body(c):
        w, st, f, g, it, _ = c
        upd, st = opt.update(g, st, w, value=f, grad=g, value_fn=fun)
        w = optax.apply_updates(w, upd)
        f_new, g_new = vg(w)
        done = (optax.tree.norm(g_new) <= 1e-5 * optax.tree.norm(g0)) | (jnp.abs(f - f_new) <= 1e-8 * f_new)
        return w, st, f_new, g_new, it + 1, done

    c = (w0, opt.init(w0), f0, g0, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    w, _, f, _, it, done = jax.lax.while_loop(lambda c: (c[4] < max_iter) & ~c[5], body, c)
    return w, f, it, done


def fit_bt_probe(X, i, j, wins_i, wins_j, *, l2: float = 1e-3, max_iter: int = 500) -> RidgeProbe:
    """Fit ``P(i over j) = sigmoid(s_i - s_j)``, ``s = standardise(X) @ w``, on win counts.

    Args:
      X: activations [n, d] of all tasks that appear in ``i``/``j``.
      i, j, wins_i, wins_j: comparisons as for :func:`prefjax.utility.fit_thurstonian`.
      l2: weight of ``|w|^2`` added to the mean log-loss.

    Returns a probe (``kind="bt"``; ``alpha`` holds ``l2``) whose ``predict`` gives the BT score and whose
    ``direction`` is the unit score direction in raw activation space. ``probe.info`` has the final loss,
    iterations and convergence flag.
    """
    X = check_finite("X", np.asarray(X, np.float32))
    if X.ndim != 2:
        raise ValueError(f"X must be [n, d], got {X.shape}")
    n = X.shape[0]
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    w_i = check_finite("wins_i", np.asarray(wins_i, np.float32))
    w_j = check_finite("wins_j", np.asarray(wins_j, np.float32))
    if not (len(i) == len(j) == len(w_i) == len(w_j)):
        raise ValueError(f"mismatched lengths: i={len(i)} j={len(j)} wins_i={len(w_i)} wins_j={len(w_j)}")
    if len(i) == 0 or (w_i.sum() + w_j.sum()) <= 0:
        raise ValueError("empty comparison set")
    for name, a in (("i", i), ("j", j)):
        if a.min() < 0 or a.max() >= n:
            raise ValueError(f"{name} holds an index outside 0..{n - 1}")
    mean = X.mean(0)
    scale = X.std(0)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    w, f, it, done = _fit(jnp.asarray((X - mean) / scale), i, j, w_i, w_j, jnp.float32(l2), max_iter)
    probe = RidgeProbe(mean, scale, np.asarray(w), 0.0, float(l2), np.asarray([l2]), np.zeros(1), kind="bt")
    probe.info = {"loss": float(f), "iterations": int(it), "converged": bool(done)}
    return probe
