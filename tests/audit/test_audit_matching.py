"""Row matching under an unknown basis (the core of weight matching and the linking attack)."""

from __future__ import annotations

import numpy as np
import pytest

from eecompile.audit.matching import match_rows, procrustes


def _table(rng, V=300, d=24):
    return rng.standard_normal((V, d)) @ np.diag(np.linspace(2.0, 0.3, d))


@pytest.mark.parametrize("kind", ["orthogonal", "monomial", "invertible"])
def test_exact_relation_is_recovered(kind):
    rng = np.random.default_rng(0)
    B = _table(rng)
    V, d = B.shape
    perm = rng.permutation(V)
    if kind == "orthogonal":
        T = np.linalg.qr(rng.standard_normal((d, d)))[0]
    elif kind == "monomial":
        T = np.eye(d)[rng.permutation(d)] * np.exp(rng.uniform(-1, 1, d))
    else:
        T = rng.standard_normal((d, d))
    A = B[perm] @ T
    m = match_rows(A, B)
    assert np.mean(m.perm == perm) == 1.0
    assert np.allclose(m.transform, T, atol=1e-6)
    assert m.residual < 1e-8


def test_noise_degrades_then_fails():
    rng = np.random.default_rng(1)
    B = _table(rng)
    perm = rng.permutation(len(B))
    Q = np.linalg.qr(rng.standard_normal((B.shape[1],) * 2))[0]
    A = B[perm] @ Q
    small = match_rows(A, B + 0.02 * B.std() * rng.standard_normal(B.shape))
    unrelated = match_rows(A, _table(rng))
    assert np.mean(small.perm == perm) > 0.95
    assert np.mean(unrelated.perm == perm) < 0.1


def test_procrustes_is_orthogonal():
    rng = np.random.default_rng(2)
    X, Y = rng.standard_normal((50, 6)), rng.standard_normal((50, 6))
    T = procrustes(X, Y)
    assert np.allclose(T.T @ T, np.eye(6), atol=1e-10)
