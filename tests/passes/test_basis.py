"""eecompile.passes.basis: concrete bases (identity, dense, monomial) and block-diagonal axis bases.

Every fold in the compiler is ``Basis.right`` (``x @ T`` along an axis) with a basis, its inverse
or its dual, so each is checked against the explicit matrix product.
"""

from __future__ import annotations

import numpy as np
import pytest

from eecompile.passes.basis import AxisBasis, Basis


def _blockdiag(*mats: np.ndarray) -> np.ndarray:
    n = sum(m.shape[0] for m in mats)
    out = np.zeros((n, n))
    offset = 0
    for m in mats:
        k = m.shape[0]
        out[offset:offset + k, offset:offset + k] = m
        offset += k
    return out


def _monomial_matrix(perm: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """``T[perm[j], j] = scale[j]``: the documented convention, built by hand."""
    n = len(perm)
    m = np.zeros((n, n))
    m[perm, np.arange(n)] = 1.0 if scale is None else scale
    return m


def _bases(rng: np.random.Generator, n: int) -> dict[str, tuple[Basis, np.ndarray]]:
    dense = rng.standard_normal((n, n)) + n * np.eye(n)
    perm = rng.permutation(n)
    scale = rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n)
    return {
        "identity": (Basis.identity(n), np.eye(n)),
        "dense": (Basis(n, dense=dense), dense),
        "permutation": (Basis.monomial(perm), _monomial_matrix(perm, None)),
        "monomial": (Basis.monomial(perm, scale), _monomial_matrix(perm, scale)),
    }


KINDS = ["identity", "dense", "permutation", "monomial"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_right_is_the_matrix_product_along_the_axis(kind, axis, rng):
    n = 5
    basis, matrix = _bases(rng, n)[kind]
    shape = [3, 4, 2]
    shape[axis] = n
    x = rng.standard_normal(shape)
    expected = np.moveaxis(np.moveaxis(x, axis, -1) @ matrix, -1, axis)
    got = basis.right(x, axis)
    assert got.shape == x.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_matrix_matches_the_convention(kind, rng):
    basis, matrix = _bases(rng, 6)[kind]
    np.testing.assert_allclose(basis.matrix(), matrix, atol=1e-12)


def test_monomial_convention_on_a_vector():
    """``(x @ T)[j] = x[perm[j]] * scale[j]``."""
    basis = Basis.monomial(np.array([2, 0, 1]), np.array([10.0, -1.0, 0.5]))
    np.testing.assert_array_equal(basis.right(np.array([1.0, 2.0, 3.0])), [30.0, -1.0, 1.0])
    assert list(basis.index_map()) == [2, 0, 1]


@pytest.mark.parametrize("kind", KINDS)
def test_inverse_and_dual_are_inv_and_inv_transpose(kind, rng):
    basis, matrix = _bases(rng, 6)[kind]
    inv = np.linalg.inv(matrix)
    np.testing.assert_allclose(basis.inverse().matrix(), inv, atol=1e-10)
    np.testing.assert_allclose(basis.dual().matrix(), inv.T, atol=1e-10)
    x = rng.standard_normal((3, 6))
    np.testing.assert_allclose(basis.inverse().right(basis.right(x)), x, atol=1e-10)
    # the dual pairing: <x T, y T^{-T}> = <x, y>, what attention keys rely on
    y = rng.standard_normal((4, 6))
    np.testing.assert_allclose(basis.right(x) @ basis.dual().right(y).T, x @ y.T, atol=1e-10)


@pytest.mark.parametrize("kind", ["dense", "monomial"])
def test_dual_differs_from_inverse_unless_orthogonal(kind, rng):
    basis, _ = _bases(rng, 6)[kind]
    assert not np.allclose(basis.dual().matrix(), basis.inverse().matrix())


def test_dual_of_permutation_is_itself():
    """A permutation is orthogonal: its inverse transpose is the permutation itself."""
    basis = Basis.monomial(np.array([3, 1, 0, 2]))
    np.testing.assert_array_equal(basis.dual().matrix(), basis.matrix())
    np.testing.assert_array_equal(basis.inverse().matrix(), basis.matrix().T)


def test_identity_flags(rng):
    assert Basis.identity(4).is_identity
    assert Basis.identity(4).inverse().is_identity and Basis.identity(4).dual().is_identity
    assert not Basis.monomial(np.arange(4)).is_identity  # an explicit permutation is not flagged
    x = rng.standard_normal((2, 4)).astype(np.float32)
    out = Basis.identity(4).right(x)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, x)


def test_monomial_stores_no_dense_matrix():
    basis = Basis.monomial(np.arange(50_000)[::-1])
    assert basis.dense is None and basis.perm.dtype == np.int64


# -- AxisBasis -----------------------------------------------------------------------------


def test_axis_basis_is_block_diagonal(rng):
    bases = _bases(rng, 3)
    blocks = (bases["dense"][0], bases["monomial"][0], Basis.identity(2), bases["permutation"][0])
    ab = AxisBasis(blocks)
    assert ab.size == 3 + 3 + 2 + 3
    full = _blockdiag(bases["dense"][1], bases["monomial"][1], np.eye(2), bases["permutation"][1])
    x = rng.standard_normal((2, ab.size, 4))
    np.testing.assert_allclose(ab.right(x, 1), np.einsum("aib,ij->ajb", x, full), atol=1e-12)
    np.testing.assert_allclose(ab.inverse().right(x, 1), np.einsum("aib,ij->ajb", x, np.linalg.inv(full)),
                               atol=1e-10)
    np.testing.assert_allclose(ab.dual().right(x, 1), np.einsum("aib,ij->ajb", x, np.linalg.inv(full).T),
                               atol=1e-10)


def test_axis_basis_broadcasts_a_size_one_axis(rng):
    """A per-row constant (size 1 on the axis) is broadcast before the change: ``c·1·T``."""
    dense = rng.standard_normal((3, 3)) + 3 * np.eye(3)
    ab = AxisBasis((Basis(3, dense=dense), Basis.monomial(np.array([1, 0]), np.array([2.0, -3.0]))))
    full = _blockdiag(dense, _monomial_matrix(np.array([1, 0]), np.array([2.0, -3.0])))
    c = np.array([[1.5], [-2.0]])  # shape (2, 1): one scalar per row
    got = ab.right(c, 1)
    assert got.shape == (2, 5)
    np.testing.assert_allclose(got, np.broadcast_to(c, (2, 5)) @ full, atol=1e-12)
    assert not np.allclose(got, np.broadcast_to(c, (2, 5)))  # the scalar really became a vector


def test_axis_basis_identity(rng):
    ab = AxisBasis((Basis.identity(2), Basis.identity(3)))
    assert ab.is_identity and ab.size == 5
    x = rng.standard_normal((4, 5))
    np.testing.assert_array_equal(ab.right(x), x)
    assert not AxisBasis((Basis.identity(2), Basis.monomial(np.array([1, 0])))).is_identity


def test_axis_basis_with_moved_blocks_matches_its_matrix():
    """Block j of the result is block order[j] of the input times blocks[j]; inverse and dual agree with the
    dense matrix, FoldAxisBasis computes the same products."""
    from eecompile.passes.weight_fold import FoldAxisBasis

    rng = np.random.default_rng(3)
    blocks = tuple(Basis(2, dense=rng.standard_normal((2, 2)) + 2 * np.eye(2)) for _ in range(3)) + (Basis(3),)
    order = (2, 0, 1, 3)
    for cls in (AxisBasis, FoldAxisBasis):
        basis = cls(blocks, order)
        assert basis.moves_blocks and not basis.is_identity
        T = basis.right(np.eye(9), 1)
        x = rng.standard_normal((4, 9))
        y = basis.right(x, 1)
        np.testing.assert_allclose(y[:, 0:2], x[:, 4:6] @ blocks[0].dense)  # block 0 reads input block 2
        np.testing.assert_allclose(y, x @ T)
        np.testing.assert_allclose(basis.inverse().right(np.eye(9), 1), np.linalg.inv(T), atol=1e-12)
        np.testing.assert_allclose(basis.dual().right(np.eye(9), 1), np.linalg.inv(T).T, atol=1e-12)
        assert type(basis.inverse()) is cls and type(basis.dual()) is cls
    assert not AxisBasis(blocks, (0, 1, 2, 3)).moves_blocks


def test_orders_of_moves_each_kept_run_where_it_lies():
    from eecompile.passes.group_orders import orders_of

    kept = [((5, 6, 7), np.array([1, 2, 0]))]
    assert orders_of([9, 5, 6, 7], kept) == (0, 2, 3, 1)
    assert orders_of([5, 7, 6], kept) is None  # not the run in order: nothing moves
