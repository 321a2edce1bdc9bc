"""The ridge path's split (issue 17): the accelerator forms X^T X (or X X^T) and the projections, the host
runs the eigendecomposition in float64. Against a float64 numpy solve of the ridge normal equations the
path is at least as accurate as the former all-float32 path (eigh on the accelerator), for both shapes
(d <= n: eigh of X^T X; n < d: eigh of X X^T), over the alpha grid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefjax.probes import RidgePath
from prefjax.probes import ridge as R


def _data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 20))  # low-rank signal + small noise + an offset: an ill-conditioned Gram matrix
    X = (z @ rng.normal(size=(20, d)) + 0.05 * rng.normal(size=(n, d)) + 3.0).astype(np.float32)
    y = X[:, :5].astype(np.float64).sum(1) + rng.normal(size=n)
    return X, y


def _float32_eigh_path(xs):
    """The former ``decompose``: everything in float32 on the accelerator, eigh included."""
    n, d = xs.shape
    if d <= n:
        lam, v = jnp.linalg.eigh(xs.T @ xs)
        return v, jnp.maximum(lam, 0.0), v.T @ xs.T
    lam, u = jnp.linalg.eigh(xs @ xs.T)
    return xs.T @ u, jnp.maximum(lam, 0.0), u.T


def _rel_err(basis, lam, proj, yc, alphas, ref):
    c = np.asarray(proj, np.float64) @ yc
    w = np.asarray(basis, np.float64) @ (c[:, None] / (np.asarray(lam, np.float64)[:, None] + alphas[None]))
    return np.linalg.norm(w - ref, axis=0) / np.linalg.norm(ref, axis=0)


@pytest.mark.parametrize("n,d", [(400, 120), (80, 300)])
def test_path_matches_float64_reference_at_least_as_well_as_float32_eigh(n, d):
    X, y = _data(n, d)
    path = RidgePath.build(X)
    xs64 = (X.astype(np.float64) - path.mean_D) / path.scale_D
    yc = y - y.mean()
    alphas = np.logspace(-1, 5, 7)
    ref = np.stack([np.linalg.solve(xs64.T @ xs64 + a * np.eye(d), xs64.T @ yc) for a in alphas], 1)
    new = _rel_err(path.basis_DxR, path.lam_R, path.proj_RxN, yc, alphas, ref)
    old = _rel_err(*_float32_eigh_path(jnp.asarray(((X - path.mean_D) / path.scale_D).astype(np.float32))),
                   yc, alphas, ref)
    assert np.all(new <= old * 1.01 + 1e-7), (new, old)
    assert new.max() < 5e-3, new
    # same shapes and dtypes as before: basis [D, R], eigenvalues [R] ascending and >= 0, projections [R, N]
    r = min(n, d)
    assert path.basis_DxR.shape == (d, r) and path.lam_R.shape == (r,) and path.proj_RxN.shape == (r, n)
    assert all(a.dtype == jnp.float32 for a in (path.basis_DxR, path.lam_R, path.proj_RxN))
    lam = np.asarray(path.lam_R)
    assert np.all(lam >= 0) and np.all(np.diff(lam) >= 0)


def test_accelerator_programs_are_matmuls_only():
    """What prefjax.aot compiles for the accelerator: no eigendecomposition left in either program."""
    xs = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    for lowered in (R.gram.lower(xs), R.project.lower(xs, jax.ShapeDtypeStruct((32, 32), jnp.float32))):
        text = lowered.as_text()
        assert "dot_general" in text and "eig" not in text.lower() and "syevd" not in text.lower()
    assert R.gram.lower(xs).out_info.shape == (32, 32)
    wide = jax.ShapeDtypeStruct((16, 32), jnp.float32)
    assert R.gram.lower(wide).out_info.shape == (16, 16)
    assert R.project.lower(wide, jax.ShapeDtypeStruct((16, 16), jnp.float32)).out_info.shape == (32, 16)
