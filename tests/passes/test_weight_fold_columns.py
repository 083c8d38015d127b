"""eecompile.passes.weight_fold._cols_product: the column product of a fold, block by block in place."""

from __future__ import annotations

import numpy as np

from eecompile.passes import weight_fold
from eecompile.passes.basis import AxisBasis, Basis


def test_cols_product_equals_the_axis_basis_product_for_mixed_blocks():
    rng = np.random.default_rng(0)
    q = lambda n: np.linalg.qr(rng.standard_normal((n, n)))[0]  # noqa: E731
    blocks = ([Basis(16, dense=q(16)) for _ in range(5)]
              + [Basis.monomial(rng.permutation(8), rng.uniform(0.5, 2, 8)), Basis.identity(4),
                 Basis(32, dense=q(32))] + [Basis(16, dense=q(16)) for _ in range(3)])
    axis = AxisBasis(tuple(blocks))
    chunk = rng.standard_normal((37, axis.size))
    got = weight_fold._cols_product(axis, chunk)
    assert got.dtype == np.float64 and got.shape == chunk.shape
    assert np.allclose(got, axis.right(chunk, 1), rtol=0, atol=1e-13)


def test_fold_matrix_with_head_blocks_matches_the_dense_reference():
    rng = np.random.default_rng(1)
    q = lambda n: np.linalg.qr(rng.standard_normal((n, n)))[0]  # noqa: E731
    heads = [q(8) for _ in range(6)]
    rows = Basis(24, dense=q(24))
    weight = rng.standard_normal((24, 48)).astype(np.float32)
    folded = weight_fold.fold_matrix(weight, rows, AxisBasis(tuple(Basis(8, dense=h) for h in heads)))
    cols = np.zeros((48, 48))
    for i, h in enumerate(heads):
        cols[8 * i:8 * i + 8, 8 * i:8 * i + 8] = h
    expected = rows.dense.T @ weight.astype(np.float64) @ cols
    assert folded.dtype == np.float32
    assert np.abs(folded - expected).max() <= 1e-6 * np.abs(expected).max()
