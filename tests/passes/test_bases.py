"""Tests for eecompile.passes.bases: the random basis samplers."""

from __future__ import annotations

import numpy as np
import pytest

from eecompile.passes import bases
from eecompile.passes.bases import (
    block_diag,
    complex_pairs,
    haar_orthogonal,
    invertible,
    ones_orthogonal,
    permutation,
    permutation_matrix,
    scales,
    signs,
)

SIZES = [1, 2, 3, 8, 17, 64]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_orthogonal(q: np.ndarray) -> None:
    n = q.shape[0]
    assert q.shape == (n, n) and q.dtype == np.float64
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(q.T @ q, np.eye(n), atol=1e-12)


# --- permutations -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5, 100])
def test_permutation_is_permutation(n):
    p = permutation(rng(), n)
    assert p.dtype == np.int64 and p.shape == (n,)
    assert np.array_equal(np.sort(p), np.arange(n))


def test_permutation_matrix_convention():
    perm = np.array([2, 0, 3, 1])
    P = permutation_matrix(perm)
    assert P.dtype == np.float64
    for j in range(4):
        assert P[perm[j], j] == 1.0
    assert P.sum() == 4
    x = np.array([10.0, 11.0, 12.0, 13.0])
    np.testing.assert_array_equal(x @ P, x[perm])
    np.testing.assert_array_equal(x @ P, [12.0, 10.0, 13.0, 11.0])
    # batched rows, and the inverse is the transpose
    X = rng().standard_normal((3, 4))
    np.testing.assert_array_equal(X @ P, X[:, perm])
    np.testing.assert_array_equal((X @ P) @ P.T, X)
    np.testing.assert_array_equal(P.T, permutation_matrix(np.argsort(perm)))


def test_permutation_matrix_random():
    perm = permutation(rng(3), 50)
    x = rng(4).standard_normal(50)
    np.testing.assert_array_equal(x @ permutation_matrix(perm), x[perm])


def test_permutation_matrix_rejects_non_permutation():
    with pytest.raises(ValueError):
        permutation_matrix([0, 0, 1])
    with pytest.raises(ValueError):
        permutation_matrix([1, 2, 3])


def test_permutation_uses_rng():
    assert not np.array_equal(permutation(rng(0), 50), permutation(rng(1), 50))


# --- scales and signs ---------------------------------------------------------------------


def test_scales_range_and_dtype():
    s = scales(rng(), 10000)
    assert s.dtype == np.float64 and s.shape == (10000,)
    assert s.min() >= 0.5 and s.max() <= 2.0
    # log-uniform: log2 is uniform on [-1, 1], so mean ~ 0 and both halves populated
    assert abs(np.log2(s).mean()) < 0.05
    assert (s < 1).mean() == pytest.approx(0.5, abs=0.03)


def test_scales_custom_range():
    s = scales(rng(), 1000, low=0.9, high=1.1)
    assert s.min() >= 0.9 and s.max() <= 1.1
    np.testing.assert_array_equal(scales(rng(), 7, low=3.0, high=3.0), np.full(7, 3.0))
    with pytest.raises(ValueError):
        scales(rng(), 3, low=0.0, high=1.0)
    with pytest.raises(ValueError):
        scales(rng(), 3, low=2.0, high=1.0)


def test_scales_signed():
    s = scales(rng(), 10000, signed=True)
    assert np.abs(s).min() >= 0.5 and np.abs(s).max() <= 2.0
    assert (s < 0).mean() == pytest.approx(0.5, abs=0.03)
    assert (scales(rng(), 1000) > 0).all()


def test_signs():
    s = signs(rng(), 10000)
    assert s.dtype == np.float64
    assert set(np.unique(s)) == {-1.0, 1.0}
    assert (s > 0).mean() == pytest.approx(0.5, abs=0.03)


# --- orthogonal -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_haar_orthogonal(n):
    assert_orthogonal(haar_orthogonal(rng(n), n))


def test_haar_determinant_both_signs():
    dets = [np.linalg.det(haar_orthogonal(rng(s), 4)) for s in range(40)]
    assert any(d > 0 for d in dets) and any(d < 0 for d in dets)


def test_haar_sign_fix_unbiased_diagonal():
    # Without the sign fix, diag(Q) is biased; with it, E[Q_ii] = 0 under Haar measure.
    diag = np.array([np.diag(haar_orthogonal(rng(s), 3)) for s in range(2000)])
    assert np.abs(diag.mean(axis=0)).max() < 0.06


@pytest.mark.parametrize("n", SIZES)
def test_ones_orthogonal(n):
    q = ones_orthogonal(rng(n), n)
    assert_orthogonal(q)
    one = np.ones(n)
    np.testing.assert_allclose(q @ one, one, atol=1e-12)
    np.testing.assert_allclose(one @ q, one, atol=1e-12)


def test_ones_orthogonal_n1():
    np.testing.assert_array_equal(ones_orthogonal(rng(), 1), [[1.0]])


def test_ones_orthogonal_commutes_with_centering():
    n = 16
    q = ones_orthogonal(rng(), n)
    x = rng(1).standard_normal((5, n))
    center = lambda v: v - v.mean(axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(center(x @ q), center(x) @ q, atol=1e-12)


def test_ones_orthogonal_nontrivial():
    q = ones_orthogonal(rng(), 8)
    assert np.abs(q - np.eye(8)).max() > 0.1


# --- invertible ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("c", [1.0, 2.0, 4.0, 100.0])
def test_invertible_condition_bound(n, c):
    m = invertible(rng(n), n, max_condition=c)
    assert m.shape == (n, n) and m.dtype == np.float64
    sv = np.linalg.svd(m, compute_uv=False)
    assert sv.max() / sv.min() <= c * (1 + 1e-9)
    assert sv.max() <= np.sqrt(c) * (1 + 1e-9)
    assert sv.min() >= (1 / np.sqrt(c)) * (1 - 1e-9)


def test_invertible_default_and_not_orthogonal():
    m = invertible(rng(), 32)
    assert np.linalg.cond(m) <= 4.0 * (1 + 1e-9)
    assert np.abs(m @ m.T - np.eye(32)).max() > 0.1


def test_invertible_condition_one_is_orthogonal():
    assert_orthogonal(invertible(rng(), 8, max_condition=1.0))


def test_invertible_rejects_bad_condition():
    with pytest.raises(ValueError):
        invertible(rng(), 4, max_condition=0.5)


# --- complex pairs ------------------------------------------------------------------------


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def rope_tables(seq, n, seed=0):
    """cos/sin tables of shape (seq, n), built as concat(c, c) like HF RoPE."""
    h = n // 2
    inv_freq = 1.0 / (10000.0 ** (np.arange(h) / h))
    ang = np.arange(seq)[:, None] * inv_freq[None, :]
    ang = ang + rng(seed).uniform(0, 2 * np.pi, size=(1, h))  # arbitrary angles too
    return np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)


@pytest.mark.parametrize("n", [2, 4, 8, 64])
@pytest.mark.parametrize("unit", [False, True])
def test_complex_pairs_commutes_with_rope(n, unit):
    t = complex_pairs(rng(n), n, layout="half", unit=unit)
    cos, sin = rope_tables(7, n)
    x = rng(100).standard_normal((3, 7, n))
    np.testing.assert_allclose(rope(x @ t, cos, sin), rope(x, cos, sin) @ t, atol=1e-12)


def test_complex_pairs_commutes_with_rope_random_tables():
    n = 16
    t = complex_pairs(rng(), n)
    c = rng(1).uniform(-3, 3, size=n // 2)  # any values, not only cos/sin of an angle
    s = rng(2).uniform(-3, 3, size=n // 2)
    cos, sin = np.concatenate([c, c]), np.concatenate([s, s])
    x = rng(3).standard_normal((5, n))
    np.testing.assert_allclose(rope(x @ t, cos, sin), rope(x, cos, sin) @ t, atol=1e-12)


def test_complex_pairs_interleaved_commutes_with_interleaved_rope():
    n = 12
    t = complex_pairs(rng(), n, layout="interleaved")
    ang = rng(1).uniform(0, 2 * np.pi, size=n // 2)
    cos, sin = np.repeat(np.cos(ang), 2), np.repeat(np.sin(ang), 2)

    def rotate_every_two(x):
        out = np.empty_like(x)
        out[..., 0::2] = -x[..., 1::2]
        out[..., 1::2] = x[..., 0::2]
        return out

    x = rng(2).standard_normal((4, n))
    r = lambda v: v * cos + rotate_every_two(v) * sin  # noqa: E731
    np.testing.assert_allclose(r(x @ t), r(x) @ t, atol=1e-12)


def test_complex_pairs_half_does_not_commute_with_interleaved_layout():
    # sanity: the commutation is a property of matching pairings, not of any T
    n = 8
    t = complex_pairs(rng(), n, layout="interleaved")
    cos, sin = rope_tables(3, n)
    x = rng(1).standard_normal((3, n))
    assert np.abs(rope(x @ t, cos, sin) - rope(x, cos, sin) @ t).max() > 1e-3


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_complex_pairs_convention(layout):
    n = 6
    t = complex_pairs(rng(), n, layout=layout)
    pairs = [(i, i + 3) for i in range(3)] if layout == "half" else [(0, 1), (2, 3), (4, 5)]
    mask = np.zeros((n, n), bool)
    for a, b in pairs:
        # (x @ T)_a = x_a·rc − x_b·rs ; (x @ T)_b = x_a·rs + x_b·rc
        rc, rs = t[a, a], t[a, b]
        assert t[b, b] == rc and t[b, a] == -rs
        r = np.hypot(rc, rs)
        assert 0.5 <= r <= 2.0
        x = np.zeros(n)
        x[a], x[b] = 1.5, -0.25
        y = x @ t
        z = complex(1.5, -0.25) * complex(rc, rs)
        assert y[a] == pytest.approx(z.real) and y[b] == pytest.approx(z.imag)
        mask[np.ix_([a, b], [a, b])] = True
    assert (t[~mask] == 0).all()


def _is_complex_pairs_form(m, layout):
    n = m.shape[0]
    h = n // 2
    a = np.arange(h) if layout == "half" else 2 * np.arange(h)
    b = a + h if layout == "half" else a + 1
    rebuilt = np.zeros_like(m)
    rebuilt[a, a] = m[a, a]
    rebuilt[b, b] = m[a, a]
    rebuilt[a, b] = m[a, b]
    rebuilt[b, a] = -m[a, b]
    return np.allclose(m, rebuilt, atol=1e-12)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_complex_pairs_dual_closure(layout):
    n = 16
    t = complex_pairs(rng(), n, layout=layout)
    assert _is_complex_pairs_form(t, layout)
    dual = np.linalg.inv(t).T
    assert _is_complex_pairs_form(dual, layout)
    # r -> 1/r with the same angle
    h = n // 2
    a = np.arange(h) if layout == "half" else 2 * np.arange(h)
    b = a + h if layout == "half" else a + 1
    r = np.hypot(t[a, a], t[a, b])
    rd = np.hypot(dual[a, a], dual[a, b])
    np.testing.assert_allclose(r * rd, 1.0, atol=1e-12)
    np.testing.assert_allclose(
        np.arctan2(dual[a, b], dual[a, a]), np.arctan2(t[a, b], t[a, a]), atol=1e-12
    )
    # and the dual also commutes with RoPE (half layout)
    if layout == "half":
        cos, sin = rope_tables(5, n)
        x = rng(9).standard_normal((5, n))
        np.testing.assert_allclose(rope(x @ dual, cos, sin), rope(x, cos, sin) @ dual, atol=1e-12)


def test_complex_pairs_unit_is_orthogonal():
    t = complex_pairs(rng(), 10, unit=True)
    assert_orthogonal(t)
    np.testing.assert_allclose(np.linalg.inv(t).T, t, atol=1e-12)


def test_complex_pairs_magnitude_range():
    t = complex_pairs(rng(), 2000, low=0.8, high=1.25)
    h = 1000
    r = np.hypot(t[np.arange(h), np.arange(h)], t[np.arange(h), np.arange(h) + h])
    assert r.min() >= 0.8 - 1e-12 and r.max() <= 1.25 + 1e-12


def test_complex_pairs_bad_args():
    with pytest.raises(ValueError):
        complex_pairs(rng(), 7)
    with pytest.raises(ValueError):
        complex_pairs(rng(), 8, layout="sideways")


# --- block_diag -----------------------------------------------------------------------------


def test_block_diag():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[5.0]])
    c = np.array([[6.0, 7.0, 8.0]])
    m = block_diag([a, b, c])
    assert m.dtype == np.float64
    expected = np.array(
        [
            [1, 2, 0, 0, 0, 0],
            [3, 4, 0, 0, 0, 0],
            [0, 0, 5, 0, 0, 0],
            [0, 0, 0, 6, 7, 8],
        ],
        dtype=np.float64,
    )
    np.testing.assert_array_equal(m, expected)
    assert block_diag([]).shape == (0, 0)


def test_block_diag_of_orthogonals_is_orthogonal():
    r = rng()
    assert_orthogonal(block_diag([haar_orthogonal(r, 3), haar_orthogonal(r, 5), signs(r, 1)[None]]))


def test_block_diag_int_blocks_become_float():
    assert block_diag([np.eye(2, dtype=np.int64)]).dtype == np.float64


# --- determinism --------------------------------------------------------------------------

SAMPLERS = {
    "permutation": lambda g: permutation(g, 33),
    "scales": lambda g: scales(g, 33, signed=True),
    "signs": lambda g: signs(g, 33),
    "haar_orthogonal": lambda g: haar_orthogonal(g, 9),
    "ones_orthogonal": lambda g: ones_orthogonal(g, 9),
    "invertible": lambda g: invertible(g, 9),
    "complex_pairs_half": lambda g: complex_pairs(g, 10),
    "complex_pairs_interleaved": lambda g: complex_pairs(g, 10, layout="interleaved"),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_deterministic_given_seed(name):
    f = SAMPLERS[name]
    a, b = f(rng(42)), f(rng(42))
    assert a.tobytes() == b.tobytes() and a.dtype == b.dtype
    assert not np.array_equal(a, f(rng(43)))
    if name != "permutation":
        assert a.dtype == np.float64


def test_deterministic_from_derived_key():
    from eecompile.keys import MasterKey, derive_rng

    key = MasterKey(bytes(range(32)))
    a = invertible(derive_rng(key, "layer3.mlp"), 16)
    b = invertible(derive_rng(key, "layer3.mlp"), 16)
    c = invertible(derive_rng(key, "layer4.mlp"), 16)
    assert a.tobytes() == b.tobytes()
    assert not np.allclose(a, c)


def test_public_names():
    for name in bases.__all__:
        assert callable(getattr(bases, name))
        assert getattr(bases, name).__doc__


@pytest.mark.parametrize("name", [c.value for c in __import__("eecompile.passes.spaces", fromlist=["x"]).BasisClass
                                  if c.value.startswith(("pair-", "complex-pairs"))])
def test_pair_bases_commute_with_rope(name):
    """Every pair class's basis commutes with RoPE of its layout; quarter turns and signs are orthogonal."""
    from eecompile.passes.plan import _pair_scalars
    from eecompile.passes.spaces import BasisClass

    n, rng = 12, np.random.default_rng(3)
    theta = rng.uniform(0, 2 * np.pi, n // 2)
    layout = "interleaved" if name.endswith("interleaved") else "half"
    a, b = (np.arange(n // 2), np.arange(n // 2) + n // 2) if layout == "half" else (np.arange(0, n, 2), np.arange(1, n, 2))

    def rope(x):
        out = x.copy()
        out[..., a] = x[..., a] * np.cos(theta) - x[..., b] * np.sin(theta)
        out[..., b] = x[..., a] * np.sin(theta) + x[..., b] * np.cos(theta)
        return out

    T = _pair_scalars(np.random.default_rng(0), BasisClass(name), n).right(np.eye(n))
    x = rng.standard_normal((4, n))
    assert np.allclose(rope(x @ T), rope(x) @ T)
    assert not np.allclose(T, np.eye(n))
    if name.startswith(("pair-rotations", "pair-quarter-turns", "pair-signs")):
        assert np.allclose(T @ T.T, np.eye(n))
