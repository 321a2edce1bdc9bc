"""Exact cross-validated ridge from one eigendecomposition: every fold, every alpha, every label column.

The probes protocol (nested cross-validation, leave-one-topic-out, the fixed split, shuffle nulls,
transfer, INLP) fits ridge probes on many training sets that are one set of rows with some rows
removed. Refitting each costs one ``d^3`` decomposition (5,376^3 at Gemma-3-27B); here one
decomposition of a factor set serves them all, exactly:

For rows ``S`` (``n`` of them) with features ``Z = (X_S - m) / s`` (centred on ``S``; ``s`` = 1 for raw
features) and ridge with an unpenalised intercept, ``Z^T Z = V diag(lam) V^T`` and ``Q = Z V``. The fit on
``S`` at penalty ``a`` has hat matrix ``H = J / n + Q diag(g) Q^T`` with ``g = 1 / (lam + a)``. The fit on
``S`` without the rows ``R`` (any subset) follows from the leave-group-out identity of penalised least
squares: with full-fit residuals ``e`` and ``x = (I - H_RR)^-1 e_R``,

* weights  ``theta_{-R} = g * (Q^T (y - ybar)) - g * (Q_R^T x)``  (coordinates in the basis ``V``),
* intercept ``b_{-R} = ybar - sum(x) / n``,

which is exactly the ridge fit with its intercept (i.e. its centring) recomputed on ``S \\ R``. So for raw
features one decomposition of all tasks gives every training set of the protocol (outer folds, inner
folds, held-out topics, the split) with no refit; the removed rows' labels cancel exactly (the downdated
fit does not depend on them). For standardised features the scale of a training set depends on its rows,
so :class:`FactorSet` decomposes each *outer* training set (its own mean and scale, as a refit would)
and removes the inner folds from it: inner folds are centred on their own rows but keep the outer
training set's scale (as scikit-learn's ``RidgeCV`` on standardised data does).

Precision and device: float64 throughout (``jax.enable_x64``), on the first GPU where there is one
(cuSOLVER ``syevd``), else on the host CPU (LAPACK through XLA). On a TPU host the factorisation runs on
the host CPU in float64 (TPUs have no float64 eigensolver); the activations are float32 either way.
``n < d`` uses the dual (``Z Z^T``, ``n x n``) and keeps the nonzero spectrum.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

from prefjax.probes.ridge import RidgeProbe, check_finite

__all__ = ["RidgeFactor", "FactorSet", "Fit", "fit_probe", "fit_rows", "fold_predictions", "predict_rows",
           "probe_parts", "solver_device", "decomposition_count", "row_bucket", "hat_cache_limit"]

_COUNT = {"decompositions": 0}


def decomposition_count() -> int:
    """How many eigendecompositions :class:`RidgeFactor` has made in this process (tests count per call)."""
    return _COUNT["decompositions"]


def solver_device():
    """The device the float64 factorisations run on: the first GPU if any, else the host CPU (a TPU host
    included: TPUs have no float64 eigensolver)."""
    if jax.default_backend() == "gpu":
        return jax.local_devices()[0]
    return jax.local_devices(backend="cpu")[0]


def _host_array(x) -> np.ndarray:
    """Activations as sent to the solver: float64 input kept (e.g. INLP's projected features), anything
    else as float32 (the stored activations' precision; half the transfer of float64)."""
    x = np.asarray(x)
    return x if x.dtype == np.float64 else x.astype(np.float32)


@dataclasses.dataclass
class Fit:
    """A ridge fit on a factor's rows minus some removed rows, for every alpha and label column:
    ``theta_AxRxP`` (weights in the factor's basis) and ``b_AxP`` (intercepts, in the factor's centred
    coordinates)."""
    theta_AxRxP: jax.Array
    b_AxP: jax.Array


def row_bucket(m: int) -> int:
    """The padded length for ``m`` removed (or predicted) rows: a multiple of 8 up to 64, above that ``m``
    rounded up to an eighth of its octave (at most 12.5% padding). Folds and held-out topics come in many
    sizes; padding to buckets keeps the leave-rows-out programs to a few per run (one per bucket) instead
    of one per distinct size."""
    m = int(m)
    if m <= 64:
        return max(8, -(-m // 8) * 8)
    step = 1 << (m.bit_length() - 4)
    return -(-m // step) * step


def _padded(idx, m_pad: int) -> tuple[np.ndarray, np.ndarray]:
    """``idx`` padded to ``m_pad`` with row 0, and the mask [m_pad] (1 on real rows, 0 on padding)."""
    idx = np.asarray(idx, np.int64)
    out = np.zeros(m_pad, np.int64)
    out[:len(idx)] = idx
    mask = np.zeros(m_pad, np.float64)
    mask[:len(idx)] = 1.0
    return out, mask


def _solve_removed(h_AxMxM, q_MxR, y_MxP, mask_M, theta_AxRxP, g_AxR, ybar_P, n):
    """The fit without the (real) rows of ``q_MxR`` / ``y_MxP`` from the fit on every row: ``x = (I -
    H_MM)^-1 e_M`` by a Cholesky factorisation (``I - H_MM`` is positive definite for a proper subset of the
    rows and alpha > 0), then the weights and intercept corrected. Padding rows (``mask_M`` 0) get an
    identity block and a zero residual, so their ``x`` is exactly 0 and they change nothing."""
    q_MxR = q_MxR * mask_M[:, None]
    e_AxMxP = (y_MxP[None] - ybar_P - jnp.einsum("mr,arp->amp", q_MxR, theta_AxRxP)) * mask_M[None, :, None]
    h_AxMxM = h_AxMxM * (mask_M[:, None] * mask_M[None, :])[None]
    m = q_MxR.shape[0]
    c_AxMxM = jnp.linalg.cholesky(jnp.eye(m)[None] - h_AxMxM)
    x_AxMxP = jax.scipy.linalg.cho_solve((c_AxMxM, True), e_AxMxP)
    theta = theta_AxRxP - g_AxR[:, :, None] * jnp.einsum("mr,amp->arp", q_MxR, x_AxMxP)
    return theta, ybar_P[None] - x_AxMxP.sum(1) / n


@jax.jit
def _downdate(q_NxR, y_NxP, rem_M, mask_M, theta_AxRxP, g_AxR, ybar_P, n):
    """Leave-rows-out fit with ``H_MM`` rebuilt from the removed rows' basis rows (``2 m^2 r`` per alpha).
    ``rem_M`` padded to a :func:`row_bucket` length: one program per bucket."""
    q_MxR = q_NxR[rem_M]
    w_AxMxR = q_MxR[None] * jnp.sqrt(g_AxR)[:, None, :]
    h_AxMxM = 1.0 / n + jnp.einsum("amr,akr->amk", w_AxMxR, w_AxMxR)
    return _solve_removed(h_AxMxM, q_MxR, y_NxP[rem_M], mask_M, theta_AxRxP, g_AxR, ybar_P, n)


@jax.jit
def _downdate_hat(hat_AxNxN, q_NxR, y_NxP, rem_M, mask_M, theta_AxRxP, g_AxR, ybar_P, n):
    """:func:`_downdate` with ``H_MM`` gathered from the factor's full hat matrices (one per alpha, made once)
    instead of rebuilt: the ``2 m^2 r`` product per alpha, the bulk of a solve with many removed rows,
    becomes a gather. Same arithmetic otherwise."""
    h_AxMxM = hat_AxNxN[:, rem_M[:, None], rem_M[None, :]]
    return _solve_removed(h_AxMxM, q_NxR[rem_M], y_NxP[rem_M], mask_M, theta_AxRxP, g_AxR, ybar_P, n)


@jax.jit
def _predict_rows(q_NxR, rows_M, b_AxP, theta_AxRxP):
    """Predictions [A, M, P] for the factor's own rows ``rows_M`` (padded to a bucket; the caller slices)."""
    return b_AxP[:, None, :] + jnp.einsum("mr,arp->amp", q_NxR[rows_M], theta_AxRxP)


@jax.jit
def _hat(q_NxR, g_AxR, n):
    """The full-fit hat matrices ``J / n + Q diag(g_a) Q^T`` [A, N, N] (intercept included)."""
    return 1.0 / n + jnp.einsum("nr,ar,kr->ank", q_NxR, g_AxR, q_NxR)


def hat_cache_limit() -> int:
    """Bytes the full hat matrices of one factor may take (``PREFJAX_HAT_BYTES`` overrides; 0 turns the cache
    off): on a GPU a quarter of the memory the allocator reports free (at most 16 GiB), on the host 2 GiB."""
    env = os.environ.get("PREFJAX_HAT_BYTES")
    if env is not None:
        return int(float(env))
    dev = solver_device()
    if dev.platform == "gpu":
        try:
            st = dev.memory_stats() or {}
            free = int(st.get("bytes_limit", 0)) - int(st.get("bytes_in_use", 0))
        except Exception:  # noqa: BLE001 - no allocator statistics: stay on the uncached path
            return 0
        return int(min(16 * 2**30, max(free, 0) // 4))
    return 2 * 2**30


class RidgeFactor:
    """One float64 eigendecomposition of rows ``rows`` of ``X`` (centred on those rows, scaled when
    ``standardize``); see the module docstring for what it serves.

    Leave-rows-out fits need ``H_MM`` (the full fit's hat matrix on the removed rows) per alpha. When the
    full hat matrices of an alpha grid fit in :func:`hat_cache_limit`, they are made once per grid (``A``
    products ``n x r x n``) and every later downdate gathers its block; otherwise each downdate rebuilds its
    block from the basis rows. ``hat_builds`` counts the grids made (tests check both paths agree)."""

    def __init__(self, X_NxD: np.ndarray, rows, *, standardize: bool):
        rows = np.asarray(rows, np.int64)
        if len(rows) < 3:
            raise ValueError(f"a ridge factor needs >= 3 rows, got {len(rows)}")
        self.rows = rows
        self.n = int(len(rows))
        self.local = {int(r): k for k, r in enumerate(rows)}
        self.dev = solver_device()
        with jax.enable_x64(True):
            x = jax.device_put(_host_array(X_NxD[rows]), self.dev).astype(jnp.float64)
            mean = x.mean(0)
            if standardize:
                sd = x.std(0)
                scale = jnp.where(sd > 1e-12 * jnp.maximum(1.0, jnp.abs(x).max()), sd, 1.0)
            else:
                scale = jnp.ones_like(mean)
            z = (x - mean) / scale
            n, d = z.shape
            if d <= n:
                lam, v = jnp.linalg.eigh(z.T @ z)
                lam = jnp.maximum(lam, 0.0)
                q = z @ v
            else:
                lam_n, u = jnp.linalg.eigh(z @ z.T)
                keep = np.asarray(lam_n) > max(float(lam_n[-1]), 0.0) * 1e-12 * n
                lam = lam_n[keep]
                u = u[:, keep]
                root = jnp.sqrt(lam)
                q = u * root[None, :]
                v = (z.T @ u) / root[None, :]
            _COUNT["decompositions"] += 1
            self.mean_D, self.scale_D = mean, scale
            self.V_DxR, self.lam_R, self.Q_NxR = v, lam, q
        self._hat_cache: dict[bytes, jax.Array] = {}
        self.hat_builds = 0

    def _hat_for(self, a_A: np.ndarray, g_AxR):
        """The full hat matrices for the alphas ``a_A``, or None (rebuild each block instead). A grid of >= 2
        alphas is made once and kept (one grid at a time) when it fits :func:`hat_cache_limit`; alphas that
        are all in the kept grid (a final fit at the chosen alpha) are served from it; any other request
        takes the uncached path."""
        if self._hat_cache:
            (key, hat), = self._hat_cache.items()
            grid = np.frombuffer(key, np.float64)
            pos = [np.flatnonzero(grid == a) for a in a_A]
            if all(len(p_) for p_ in pos):
                idx = np.array([p_[0] for p_ in pos])
                return hat if np.array_equal(idx, np.arange(len(grid))) else hat[jnp.asarray(idx)]
        if len(a_A) < 2 or len(a_A) * self.n * self.n * 8 > hat_cache_limit():
            return None
        self._hat_cache = {a_A.tobytes(): _hat(self.Q_NxR, g_AxR, float(self.n))}
        self.hat_builds += 1
        return self._hat_cache[a_A.tobytes()]

    # ----------------------------------------------------------------------------------------------
    def to_local(self, rows) -> np.ndarray:
        """Positions of global ``rows`` among this factor's rows (KeyError names a row it lacks)."""
        try:
            return np.asarray([self.local[int(r)] for r in rows], np.int64)
        except KeyError as e:
            raise KeyError(f"row {e.args[0]} is not among this factor's {self.n} rows") from None

    def fit(self, Y_NxP, alphas, removed_local=None) -> Fit:
        """The ridge fit on this factor's rows without ``removed_local`` (positions; None = none), at every
        alpha, for every column of ``Y_NxP`` (targets on this factor's rows, in its row order)."""
        with jax.enable_x64(True):
            Y = jax.device_put(np.asarray(Y_NxP, np.float64), self.dev)
            a_np = np.asarray(alphas, np.float64)
            a_A = jnp.asarray(a_np)
            g_AxR = 1.0 / (self.lam_R[None, :] + a_A[:, None])
            ybar_P = Y.mean(0)
            t_RxP = self.Q_NxR.T @ (Y - ybar_P)
            theta = g_AxR[:, :, None] * t_RxP[None]
            if removed_local is None or len(removed_local) == 0:
                return Fit(theta, jnp.broadcast_to(ybar_P, (len(alphas),) + ybar_P.shape))
            rem, mask = _padded(removed_local, row_bucket(len(removed_local)))
            args = (self.Q_NxR, Y, jnp.asarray(rem), jnp.asarray(mask), theta, g_AxR, ybar_P, float(self.n))
            hat = self._hat_for(a_np, g_AxR)
            theta, b = _downdate(*args) if hat is None else _downdate_hat(hat, *args)
            return Fit(theta, b)

    def predict_local(self, fit: Fit, local_rows) -> np.ndarray:
        """Predictions [A, m, P] (float64, host) for this factor's own rows at ``local_rows``."""
        m = len(local_rows)
        rows, _ = _padded(local_rows, row_bucket(m))
        with jax.enable_x64(True):
            return np.asarray(_predict_rows(self.Q_NxR, jnp.asarray(rows), fit.b_AxP, fit.theta_AxRxP))[:, :m]

    def project(self, X_ExD) -> jax.Array:
        """``((X - mean) / scale) @ V`` [E, R] for any rows (e.g. another persona's or layer's activations)."""
        with jax.enable_x64(True):
            x = jax.device_put(_host_array(X_ExD), self.dev).astype(jnp.float64)
            return ((x - self.mean_D) / self.scale_D) @ self.V_DxR

    def predict_projected(self, fit: Fit, proj_ExR) -> np.ndarray:
        """Predictions [A, E, P] for rows already carried into the basis by :meth:`project`."""
        with jax.enable_x64(True):
            return np.asarray(fit.b_AxP[:, None, :] + jnp.einsum("er,arp->aep", proj_ExR, fit.theta_AxRxP))

    def predict(self, fit: Fit, X_ExD) -> np.ndarray:
        """Predictions [A, E, P] for any rows of activations."""
        return self.predict_projected(fit, self.project(X_ExD))

    def weights(self, fit: Fit, a: int, p: int = 0) -> np.ndarray:
        """Weights [D] in this factor's scaled space for alpha index ``a`` and label column ``p``."""
        with jax.enable_x64(True):
            return np.array(self.V_DxR @ fit.theta_AxRxP[a, :, p])

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.mean_D)

    @property
    def scale(self) -> np.ndarray:
        return np.asarray(self.scale_D)


class FactorSet:
    """The factorisations one matrix ``X`` [n, d] needs, made once and shared.

    ``view(train_rows)`` returns ``(factor, removed_local)`` such that ``factor.fit(Y[factor.rows],
    alphas, removed_local)`` is the ridge fit on exactly ``train_rows``: for raw features one factor of
    every row serves every training set; with ``standardize`` each distinct outer training set gets its
    own factor (its own scale, as a refit would), cached by its rows. ``inner_view(train_rows, fold_rows)``
    is the fit on ``train_rows`` without ``fold_rows``, from the factor of ``train_rows`` (inner folds keep
    that scale). ``decompositions`` counts what this set made."""

    def __init__(self, X_NxD, *, standardize: bool):
        self.X = np.asarray(X_NxD)
        if self.X.ndim != 2:
            raise ValueError(f"X must be [n, d], got shape {self.X.shape}")
        check_finite("X", self.X)
        self.n = self.X.shape[0]
        self.standardize = bool(standardize)
        self._cache: dict[bytes, RidgeFactor] = {}
        self.decompositions = 0

    def factor_for(self, rows) -> RidgeFactor:
        """The factor of ``rows`` (every row when features are raw)."""
        rows = np.sort(np.asarray(rows, np.int64)) if self.standardize else np.arange(self.n)
        key = rows.tobytes()
        if key not in self._cache:
            self._cache[key] = RidgeFactor(self.X, rows, standardize=self.standardize)
            self.decompositions += 1
        return self._cache[key]

    @property
    def hat_builds(self) -> int:
        """Full hat-matrix grids made by this set's factors (0 when every downdate rebuilt its block)."""
        return sum(f.hat_builds for f in self._cache.values())

    def view(self, train_rows, extra_removed=()) -> tuple[RidgeFactor, np.ndarray]:
        """(factor, removed positions) for the fit on ``train_rows`` minus ``extra_removed``."""
        train_rows = np.asarray(train_rows, np.int64)
        f = self.factor_for(train_rows)
        keep = np.zeros(f.n, bool)
        keep[f.to_local(train_rows)] = True
        if len(extra_removed):
            keep[f.to_local(extra_removed)] = False
        return f, np.flatnonzero(~keep)


def fold_predictions(fs: FactorSet, train_rows, Y_NxP, fold_ids, alphas) -> list[np.ndarray]:
    """Inner cross-validation on ``train_rows``: for each fold id ``f`` of ``fold_ids`` ([len(train_rows)]),
    predictions [A, m_f, P] for ``train_rows[fold_ids == f]`` from the fit on the other training rows,
    every alpha and every column of ``Y_NxP`` (targets on all ``n`` rows of the set's ``X``)."""
    train_rows = np.asarray(train_rows, np.int64)
    f0 = fs.factor_for(train_rows)
    Yf = np.asarray(Y_NxP, np.float64)[f0.rows]
    out = []
    for f in range(int(np.max(fold_ids)) + 1):
        held = train_rows[np.asarray(fold_ids) == f]
        factor, removed = fs.view(train_rows, held)
        fit = factor.fit(Yf, alphas, removed)
        out.append(factor.predict_local(fit, factor.to_local(held)))
    return out


def fit_rows(fs: FactorSet, train_rows, Y_NxP, alphas) -> tuple[RidgeFactor, Fit]:
    """The fit on exactly ``train_rows`` (every alpha, every column of ``Y_NxP`` over all rows)."""
    factor, removed = fs.view(train_rows)
    return factor, factor.fit(np.asarray(Y_NxP, np.float64)[factor.rows], alphas, removed)


def predict_rows(fs: FactorSet, factor: RidgeFactor, fit: Fit, rows) -> np.ndarray:
    """Predictions [A, m, P] for rows of the set's own ``X`` (from the basis when the factor holds them)."""
    rows = np.asarray(rows, np.int64)
    if all(int(r) in factor.local for r in rows):
        return factor.predict_local(fit, factor.to_local(rows))
    return factor.predict(fit, fs.X[rows])


def probe_parts(fs: FactorSet, factor: RidgeFactor, fit: Fit, train_rows, a: int, p: int = 0):
    """(mean [D], scale [D], w_std [D], intercept) of the fit at alpha index ``a``, column ``p``, written
    like a refit on ``train_rows`` would be (mean = the training rows' mean, intercept at that mean)."""
    w = factor.weights(fit, a, p)
    scale = factor.scale
    m_train = fs.X[np.asarray(train_rows, np.int64)].astype(np.float64).mean(0)
    b = float(np.asarray(fit.b_AxP)[a, p]) + float(((m_train - factor.mean) / scale) @ w)
    return m_train, scale, w, b


def fit_probe(fs: FactorSet, y, alpha: float, train_rows, *, alphas: Sequence[float] | None = None,
              cv_r=None) -> RidgeProbe:
    """The ridge probe fitted on ``train_rows`` at ``alpha`` from the set's factorisation (what
    :func:`prefjax.probes.ridge.fit_ridge_at` gives by a refit): mean and intercept those of the training
    rows, weights and scale stored float32. ``alphas`` / ``cv_r``: the grid and the cross-validated r at
    each grid alpha, kept as metadata."""
    y = check_finite("y", np.asarray(y, np.float64))
    if y.shape != (fs.n,):
        raise ValueError(f"y has shape {y.shape}; the factor set has {fs.n} rows")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be positive and finite, got {alpha}")
    factor, fit = fit_rows(fs, train_rows, y[:, None], [float(alpha)])
    mean, scale, w, b = probe_parts(fs, factor, fit, train_rows, 0)
    grid = np.asarray([alpha] if alphas is None else alphas, np.float64)
    r = np.full(grid.shape, np.nan) if cv_r is None else np.asarray(cv_r, np.float64)
    if r.shape != grid.shape:
        raise ValueError(f"cv_r has shape {r.shape}; the alpha grid has {grid.shape}")
    return RidgeProbe(mean.astype(np.float32), scale.astype(np.float32), w.astype(np.float32), b, float(alpha),
                      grid, r)
