"""eecompile.passes.bases: the fast factorings give the matrices of the reference construction."""

from __future__ import annotations

import numpy as np

from eecompile.passes import bases


def _householder_haar(g: np.ndarray) -> np.ndarray:
    q, r = np.linalg.qr(g)
    d = np.sign(np.diag(r))
    d[d == 0] = 1.0
    return q * d


def test_cholesky_qr2_is_the_positive_diagonal_qr_factor():
    n = bases.CHOLESKY_QR_MIN + 44
    g = np.random.default_rng(0).standard_normal((n, n))
    q = bases._cholesky_qr2(g)
    assert q is not None
    assert np.abs(q - _householder_haar(g)).max() < 1e-11
    assert np.abs(q.T @ q - np.eye(n)).max() < 1e-12


def test_haar_orthogonal_above_the_threshold_equals_householder_on_the_same_draw():
    n = bases.CHOLESKY_QR_MIN
    q = bases.haar_orthogonal(np.random.default_rng(7), n)
    g = np.random.default_rng(7).standard_normal((n, n))
    assert np.abs(q - _householder_haar(g)).max() < 1e-11


def test_cholesky_qr2_refuses_a_singular_matrix():
    g = np.random.default_rng(1).standard_normal((bases.CHOLESKY_QR_MIN, bases.CHOLESKY_QR_MIN))
    g[:, 1] = g[:, 0]
    assert bases._cholesky_qr2(g) is None
    q = bases.haar_orthogonal  # the public sampler still returns an orthogonal matrix (Householder fallback)
    assert np.allclose(q(np.random.default_rng(2), 300).T @ q(np.random.default_rng(2), 300), np.eye(300))


def test_ones_orthogonal_rank_one_form_equals_the_explicit_reflections():
    n = 300
    m = bases.ones_orthogonal(np.random.default_rng(3), n)
    u = np.full(n, 1.0 / np.sqrt(n))
    v = u.copy()
    v[0] -= 1.0
    h = np.eye(n) - 2.0 * np.outer(v, v) / (v @ v)
    inner = np.eye(n)
    inner[1:, 1:] = bases.haar_orthogonal(np.random.default_rng(3), n - 1)
    assert np.abs(m - h @ inner @ h).max() < 1e-12
    assert np.allclose(m @ np.ones(n), np.ones(n)) and np.allclose(m.T @ m, np.eye(n))
