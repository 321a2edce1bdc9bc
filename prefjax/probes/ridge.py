"""Standardised ridge probes: activations -> utilities, the whole alpha grid from one decomposition.

For centred, standardised training activations ``Xs`` [n, d] and centred utilities ``y`` the ridge weights
``w(a) = (Xs^T Xs + a I)^-1 Xs^T y`` (sum-of-squares loss, scikit-learn's alpha) are written as
``w(a) = B @ (c / (lam + a))`` with one eigendecomposition:

* ``d <= n``: ``Xs^T Xs = V diag(lam) V^T``, ``B = V``, ``c = V^T Xs^T y``;
* ``n < d``:  ``Xs Xs^T = U diag(lam) U^T``, ``B = Xs^T U``, ``c = U^T y``.

So every alpha (and every permuted ``y`` of a null) costs a matrix-vector product, never a refit.

Where each part runs: the accelerator forms the Gram matrix (:func:`gram`, one matmul) and the
projections (:func:`project`, one matmul), both float32 at HIGHEST matmul precision; the symmetric
eigendecomposition in between runs on the host in float64 (numpy/LAPACK, :func:`host_eigh`). An eigh
on the accelerator is no cheaper and is costly to compile: for a TPU, libtpu's compile of a float32
eigh grows steeply with the matrix size (BUILD_NOTES, "TPU ahead-of-time checks"; Gemma-3-27B's
5,376-square Gram matrix did not finish in 17 minutes past 15 GB of host memory), while the two matmul
programs compile in seconds at any size and the host eigh is exact to float64.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-1, 7, 17))


def check_finite(name: str, a: np.ndarray) -> np.ndarray:
    """Raise ValueError naming ``name`` and the first bad index if ``a`` holds NaN or inf."""
    a = np.asarray(a)
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name} has a non-finite value at index {tuple(int(b) for b in bad)}")
    return a


def split_indices(n: int, fracs: Sequence[float], seed: int = 0) -> list[np.ndarray]:
    """Random disjoint index sets of the given fractions (the last takes the remainder)."""
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([int(round(f * n)) for f in fracs[:-1]])
    return [np.sort(p) for p in np.split(perm, cuts)]


_HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def gram(xs_NxD):
    """``X^T X`` [D, D] when D <= N, else ``X X^T`` [N, N], for centred, scaled X [N, D]: the accelerator's
    half of the decomposition (one float32 matmul at HIGHEST precision). Jitted; lowered by prefjax.aot."""
    n, d = xs_NxD.shape
    if d <= n:
        return jnp.matmul(xs_NxD.T, xs_NxD, precision=_HIGHEST)
    return jnp.matmul(xs_NxD, xs_NxD.T, precision=_HIGHEST)


@jax.jit
def project(xs_NxD, vecs_RxR):
    """The eigenvectors of :func:`gram` carried to the other side: ``V^T X^T`` [D, N] (the projections)
    when D <= N, else ``X^T U`` [D, N] (the basis). One float32 matmul; lowered by prefjax.aot."""
    n, d = xs_NxD.shape
    if d <= n:
        return jnp.matmul(vecs_RxR.T, xs_NxD.T, precision=_HIGHEST)
    return jnp.matmul(xs_NxD.T, vecs_RxR, precision=_HIGHEST)


def host_eigh(g_RxR) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (clipped at 0) and eigenvectors of a symmetric Gram matrix, in float64 on the host
    (LAPACK's divide-and-conquer ``syevd`` via numpy), ascending."""
    g = np.asarray(g_RxR, np.float64)
    lam, vecs = np.linalg.eigh(0.5 * (g + g.T))
    return np.maximum(lam, 0.0), vecs


def decompose(xs_NxD):
    """Centred, scaled X [N, D] -> (basis, eigenvalues, projections) of X^T X (or X X^T when D > N): one
    eigendecomposition gives ridge solutions for every alpha. :func:`gram` and :func:`project` run on the
    accelerator, the eigendecomposition on the host in float64 (:func:`host_eigh`)."""
    xs = jnp.asarray(xs_NxD, jnp.float32)
    n, d = xs.shape
    lam, vecs = host_eigh(gram(xs))
    v = jnp.asarray(vecs, jnp.float32)
    other = project(xs, v)
    basis, proj = (v, other) if d <= n else (other, v.T)
    return basis, jnp.asarray(lam, jnp.float32), proj


@dataclasses.dataclass
class RidgePath:
    """One decomposition of a training set; gives weights (and predictions) for any alpha and any y."""

    mean_D: np.ndarray
    scale_D: np.ndarray
    basis_DxR: jax.Array
    lam_R: jax.Array
    proj_RxN: jax.Array

    @classmethod
    def build(cls, x_NxD, *, standardize: bool = True) -> "RidgePath":
        x = np.asarray(x_NxD, np.float32)
        mean = x.mean(0)
        scale = x.std(0) if standardize else np.ones(x.shape[1], np.float32)
        scale = np.where(scale > 1e-12 * max(1.0, float(np.abs(x).max())), scale, 1.0).astype(np.float32)
        basis, lam, proj = decompose(jnp.asarray((x - mean) / scale))
        return cls(mean, scale, basis, lam, proj)

    def standardize(self, x_NxD) -> jax.Array:
        return (jnp.asarray(x_NxD, jnp.float32) - self.mean_D) / self.scale_D

    def coefs(self, y_NxP) -> jax.Array:
        """``c`` for centred targets; ``y`` may carry a trailing axis of many targets."""
        return self.proj_RxN @ jnp.asarray(y_NxP, jnp.float32)

    def weights(self, c_R, alphas_A) -> jax.Array:
        """Standardised-space weights [D, A] for each alpha."""
        return self.basis_DxR @ (c_R[:, None] / (self.lam_R[:, None] + jnp.asarray(alphas_A)[None, :]))

    def eval_projection(self, x_ExD) -> jax.Array:
        """``Xe_s @ B`` [E, R]: predictions for any alpha are ``this @ (c / (lam + a))``."""
        return self.standardize(x_ExD) @ self.basis_DxR


def _pearson_cols(p_ExK, y_E):
    """Pearson r of each column of ``p`` with ``y``; 0 where a column is constant (no NaN)."""
    p = p_ExK - p_ExK.mean(0)
    y = y_E - y_E.mean()
    den = jnp.sqrt((p ** 2).sum(0) * (y ** 2).sum())
    return jnp.where(den > 0, (p * y[:, None]).sum(0) / jnp.where(den > 0, den, 1.0), 0.0)


@dataclasses.dataclass
class RidgeProbe:
    """A linear probe ``pred = ((x - mean) / scale) @ w_std + intercept``.

    ``alpha`` is the chosen regularisation, ``eval_r`` the eval-split Pearson r for each of ``alphas``.
    """

    mean_D: np.ndarray
    scale_D: np.ndarray
    w_std_D: np.ndarray
    intercept: float
    alpha: float
    alphas: np.ndarray
    eval_r: np.ndarray
    kind: str = "ridge"

    def predict(self, x_NxD) -> np.ndarray:
        x = check_finite("X", x_NxD)
        if x.shape[-1] != self.mean_D.shape[0]:
            raise ValueError(f"X has d={x.shape[-1]}, probe expects d={self.mean_D.shape[0]}")
        return ((x - self.mean_D) / self.scale_D) @ self.w_std_D + self.intercept

    @property
    def direction(self) -> np.ndarray:
        """Unit vector in raw activation space (``w_std / scale``, normalised), for steering."""
        w = self.w_std_D.astype(np.float64) / self.scale_D
        nrm = np.linalg.norm(w)
        return (w / nrm if nrm > 0 else w).astype(np.float32)

    def save(self, folder: str, **cfg: Any) -> None:
        """Write ``folder/cfg.json`` (alpha + whatever is passed: hook_name, layer, position, mean_resid_norm,
        persona, metrics, ...) and ``folder/probe.safetensors``."""
        from safetensors.numpy import save_file
        os.makedirs(folder, exist_ok=True)
        meta = {"kind": self.kind, "alpha": float(self.alpha), "intercept": float(self.intercept),
                "d_model": int(self.mean_D.shape[0]), **cfg}
        text = json.dumps(meta, indent=2, default=_json_default)
        tensors = {"mean": self.mean_D, "scale": self.scale_D, "w_std": self.w_std_D,
                   "direction": self.direction, "alphas": np.asarray(self.alphas, np.float64),
                   "eval_r": np.asarray(self.eval_r, np.float64)}
        tmp = os.path.join(folder, ".probe.safetensors.tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp)
        os.replace(tmp, os.path.join(folder, "probe.safetensors"))
        with open(os.path.join(folder, ".cfg.json.tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(folder, ".cfg.json.tmp"), os.path.join(folder, "cfg.json"))

    @classmethod
    def load(cls, folder: str) -> "RidgeProbe":
        """Inverse of :meth:`save`; the cfg dict is attached as ``probe.cfg``."""
        from safetensors.numpy import load_file
        with open(os.path.join(folder, "cfg.json")) as f:
            meta = json.load(f)
        t = load_file(os.path.join(folder, "probe.safetensors"))
        probe = cls(t["mean"], t["scale"], t["w_std"], meta["intercept"], meta["alpha"], t["alphas"],
                    t["eval_r"], meta.get("kind", "ridge"))
        probe.cfg = meta
        return probe


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cfg value of type {type(o).__name__} is not JSON-serialisable")


def _fit_one(x_NxD, y_N, train_idx, eval_idx, alphas, standardize, select):
    path = RidgePath.build(x_NxD[train_idx], standardize=standardize)
    y_mean = float(y_N[train_idx].mean())
    c = path.coefs(y_N[train_idx] - y_mean)
    alphas_A = jnp.asarray(alphas, jnp.float32)
    preds_ExA = path.eval_projection(x_NxD[eval_idx]) @ (c[:, None] / (path.lam_R[:, None] + alphas_A[None]))
    y_eval = jnp.asarray(y_N[eval_idx], jnp.float32)
    r_A = np.asarray(_pearson_cols(preds_ExA, y_eval))
    if select == "r":
        best = int(np.argmax(r_A))
    else:
        best = int(np.argmin(np.asarray(((preds_ExA + y_mean - y_eval[:, None]) ** 2).mean(0))))
    w = np.asarray(path.weights(c, alphas_A[best:best + 1])[:, 0])
    return RidgeProbe(path.mean_D, path.scale_D, w, y_mean, float(alphas[best]), np.asarray(alphas), r_A)


def fit_ridge_at(x_NxD, y, alpha: float, train_idx, *, alphas: Sequence[float] | None = None, cv_r=None,
                 standardize: bool = True) -> RidgeProbe:
    """A ridge probe fitted on ``train_idx`` at a given ``alpha`` (chosen elsewhere, e.g. by
    :func:`prefjax.probes.nulls.nested_cv_ridge` on the same training tasks). ``alphas`` / ``cv_r`` (the
    grid and the cross-validated r at each grid alpha) are kept as the probe's ``alphas`` / ``eval_r``
    metadata; by default the one alpha and NaN."""
    x = check_finite("X", np.asarray(x_NxD))
    y = check_finite("y", np.asarray(y, np.float64))
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"X must be [n, d] and y [n] with the same n; got {x.shape} and {y.shape}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be positive and finite, got {alpha}")
    train_idx = np.asarray(train_idx, np.int64)
    if len(train_idx) < 2:
        raise ValueError(f"need >= 2 training tasks, got {len(train_idx)}")
    path = RidgePath.build(x[train_idx], standardize=standardize)
    y_mean = float(y[train_idx].mean())
    c = path.coefs(y[train_idx] - y_mean)
    w = np.asarray(path.weights(c, jnp.asarray([alpha], jnp.float32))[:, 0])
    grid = np.asarray([alpha] if alphas is None else alphas, np.float64)
    r = np.full(grid.shape, np.nan) if cv_r is None else np.asarray(cv_r, np.float64)
    if r.shape != grid.shape:
        raise ValueError(f"cv_r has shape {r.shape}; the alpha grid has {grid.shape}")
    return RidgeProbe(path.mean_D, path.scale_D, w, y_mean, float(alpha), grid, r)


def fit_ridge(X, y, *, alphas: Sequence[float] = DEFAULT_ALPHAS, eval_idx=None, train_idx=None,
              eval_frac: float = 0.2, seed: int = 0, standardize: bool = True, select: str = "r"):
    """Standardised ridge from activations to utilities, alpha chosen by eval-split Pearson r.

    Args:
      X: activations [n, d] (one layer) or [L, n, d] (many layers; one probe per layer is returned).
      y: utilities [n].
      alphas: grid (sum-of-squares loss on standardised features, as scikit-learn's ``Ridge(alpha)``).
      eval_idx: tasks used to choose alpha (default: a random ``eval_frac`` of the tasks, under ``seed``).
      train_idx: tasks used to fit (default: every task not in ``eval_idx``). Held-out test tasks should be
        in neither; evaluate them with :func:`evaluate_probe`.
      standardize: divide features by their training std (False: centre only).
      select: choose alpha by eval Pearson ``"r"`` (default; scale-free) or eval ``"mse"`` (calibrated
        predictions, e.g. for a +-1 classifier thresholded at 0).

    Returns a :class:`RidgeProbe` (or a list of them for [L, n, d] input), fitted on ``train_idx``.
    """
    X = np.asarray(X)
    y = check_finite("y", np.asarray(y, np.float64))
    if X.ndim not in (2, 3):
        raise ValueError(f"X must be [n, d] or [L, n, d], got shape {X.shape}")
    n = X.shape[-2]
    if y.shape != (n,):
        raise ValueError(f"y has shape {y.shape}, but X has n={n} tasks")
    if select not in ("r", "mse"):
        raise ValueError(f"select must be 'r' or 'mse', got {select!r}")
    alphas = np.asarray(alphas, np.float64)
    if alphas.ndim != 1 or alphas.size == 0 or np.any(alphas <= 0):
        raise ValueError("alphas must be a non-empty 1-D array of positive values")
    if eval_idx is None:
        eval_idx = split_indices(n, [eval_frac, 1 - eval_frac], seed)[0]
    eval_idx = np.asarray(eval_idx, np.int64)
    if train_idx is None:
        train_idx = np.setdiff1d(np.arange(n), eval_idx)
    train_idx = np.asarray(train_idx, np.int64)
    if len(train_idx) < 2 or len(eval_idx) < 3:
        raise ValueError(f"need >= 2 train and >= 3 eval tasks, got {len(train_idx)} and {len(eval_idx)}")
    if np.intersect1d(train_idx, eval_idx).size:
        raise ValueError("train_idx and eval_idx overlap")
    layers = X if X.ndim == 3 else X[None]
    probes = []
    for layer, x in enumerate(layers):
        check_finite(f"X[{layer}]" if X.ndim == 3 else "X", x)
        probes.append(_fit_one(x, y, train_idx, eval_idx, alphas, standardize, select))
    return probes if X.ndim == 3 else probes[0]
