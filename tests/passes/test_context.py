"""The fold helpers' products equal the basis algebra's (:mod:`eecompile.passes.basis`)."""

from __future__ import annotations

import numpy as np
import pytest

from eecompile.passes.basis import AxisBasis, Basis
from eecompile.passes.context import FoldAxisBasis


def _blocks(rng):
    dense = lambda n: Basis(n, dense=rng.standard_normal((n, n)))  # noqa: E731
    return (dense(4), Basis.monomial(rng.permutation(3), rng.uniform(1, 2, 3)), Basis.identity(2),
            Basis.monomial(rng.permutation(5)), dense(6))


@pytest.mark.parametrize("pick", [slice(None), slice(0, 1), slice(1, 2), slice(3, 4)])
@pytest.mark.parametrize("transform", ["right", "inverse", "dual"])
def test_fold_axis_basis_matches_axis_basis(pick, transform):
    rng = np.random.default_rng(0)
    blocks = _blocks(rng)[pick]
    plain, fold = AxisBasis(blocks), FoldAxisBasis(blocks)
    if transform != "right":
        plain, fold = getattr(plain, transform)(), getattr(fold, transform)()
    assert isinstance(fold, FoldAxisBasis)
    n = plain.size
    for shape, axis in [((n, 7), 0), ((7, n), 1), ((3, n, 5), 1), ((2, 3, n), -1), ((n,), 0), ((7, 1), 1)]:
        array = rng.standard_normal(shape).astype(np.float32)
        want, got = plain.right(array, axis), fold.right(array, axis)
        assert got.dtype == np.float64 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
