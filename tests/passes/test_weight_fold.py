"""eecompile.passes.weight_fold: the fold helpers' products equal the basis algebra's (:mod:`eecompile.passes.basis`)."""

from __future__ import annotations

import numpy as np
import pytest

from eecompile.passes.basis import AxisBasis, Basis
from eecompile.passes.precision import BFLOAT16, store_as
from eecompile.passes.weight_fold import FoldAxisBasis, fold_matrix


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


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 8 * 7 * 3, 8 * 7])  # whole blocks; 3 rows; 1 row per chunk
@pytest.mark.parametrize("sides", ["rows", "cols", "both", "wide"])  # wide: mixing rows, permuted columns
@pytest.mark.parametrize("dtype", [np.float32, np.float16, BFLOAT16])
@pytest.mark.parametrize("layout", ["C", "transposed"])  # transposed: the view a deferred Transpose reads
def test_fold_matrix_equals_the_two_products(chunk_bytes, sides, dtype, layout):
    """R^T W C chunk by chunk equals rows.right(W, 0) then cols.right(·, 1), rounded once to the weight's dtype,
    whatever the weight's memory order; the result is C order."""
    rng = np.random.default_rng(1)
    rows = AxisBasis(_blocks(rng)) if sides in ("rows", "both", "wide") else None
    n = 20
    cols = AxisBasis((Basis(7, dense=rng.standard_normal((7, 7))),)) if sides in ("cols", "both") else None
    if sides == "wide":
        cols = AxisBasis((Basis.monomial(rng.permutation(4), rng.uniform(1, 2, 4)), Basis.monomial(rng.permutation(3))))
    weight = rng.standard_normal((n, 7)).astype(dtype)
    if layout == "transposed":
        weight = np.ascontiguousarray(weight.T).T
        assert not weight.flags.c_contiguous
    want = weight.astype(np.float64)
    if rows is not None:
        want = rows.right(want, 0)
    if cols is not None:
        want = cols.right(want, 1)
    got = fold_matrix(weight, rows, cols, chunk_bytes=chunk_bytes)
    assert got.dtype == dtype and got.shape == weight.shape and got.flags.c_contiguous
    if chunk_bytes > 1 << 20:  # whole blocks: the very same products, rounded once
        np.testing.assert_array_equal(got.astype(np.float64), store_as(want, dtype).astype(np.float64))
    else:  # accumulated over chunks: float64 sums in another order, then the one rounding
        eps = 2.0 ** -7 if dtype == BFLOAT16 else np.finfo(dtype).eps
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=eps * 4, atol=0)


def test_fold_matrix_takes_one_basis_and_refuses_a_misfit():
    rng = np.random.default_rng(2)
    basis = Basis.monomial(rng.permutation(6), rng.uniform(1, 2, 6))
    weight = rng.standard_normal((6, 3)).astype(np.float32)
    np.testing.assert_array_equal(fold_matrix(weight, basis, None), basis.right(weight, 0).astype(np.float32))
    np.testing.assert_array_equal(fold_matrix(weight, None, Basis.identity(3)), weight)
    with pytest.raises(ValueError, match="do not fit"):
        fold_matrix(weight, None, basis)


def test_fold_matrix_holds_no_float64_copy_of_the_weight():
    """Peak allocation of a two-sided dense fold: the result (the weight's dtype) plus a few chunks, far below
    the two float64 copies (4x the float32 weight) the unchunked products hold."""
    import tracemalloc

    rng = np.random.default_rng(3)
    n, chunk = 1024, 1 << 20
    q = lambda: Basis(n, dense=np.linalg.qr(rng.standard_normal((n, n)))[0], orthogonal=True)  # noqa: E731
    rows, cols = AxisBasis((q(),)), AxisBasis((q(),))
    weight = rng.standard_normal((n, n)).astype(np.float32)
    tracemalloc.start()
    got = fold_matrix(weight, rows, cols, chunk_bytes=chunk)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak <= weight.nbytes + 6 * chunk, f"peak {peak / 2**20:.1f} MiB for a {weight.nbytes / 2**20:.0f} MiB weight"
    want = cols.right(rows.right(weight, 0), 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_work_buffers_are_reused_inside_a_fold_scratch_and_never_returned():
    """Inside a FoldScratch the float64 chunks live in one buffer per slot, reused by the next fold; every result
    is its own array (a later fold does not overwrite an earlier result), equal to the fold without the pool."""
    from eecompile.passes.weight_fold import FoldScratch

    rng = np.random.default_rng(4)
    rows = AxisBasis(_blocks(rng))
    cols = AxisBasis((Basis(7, dense=rng.standard_normal((7, 7))),))
    weights = [rng.standard_normal((20, 7)).astype(np.float32) for _ in range(3)]
    weights[1] = np.ascontiguousarray(weights[1].T).T  # a transposed view takes the other paths
    plain = [fold_matrix(w, rows, cols, chunk_bytes=8 * 7 * 3) for w in weights]
    with FoldScratch() as pool:
        pooled = [fold_matrix(w, rows, cols, chunk_bytes=8 * 7 * 3) for w in weights]
        buffers = {slot: id(b) for slot, b in pool._buffers.items()}
        again = fold_matrix(weights[0], rows, cols, chunk_bytes=8 * 7 * 3)
        assert {slot: id(b) for slot, b in pool._buffers.items()} == buffers, "the same buffers serve the next fold"
        assert {"chunk", "result"} <= set(buffers)
        for result in pooled:
            assert not any(np.shares_memory(result, b) for b in pool._buffers.values())
    assert FoldScratch.active is None and not pool._buffers
    for want, got in zip(plain, pooled):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(again, plain[0])


@pytest.mark.parametrize("dtype", [np.float32, BFLOAT16])
def test_a_strided_result_is_written_in_row_blocks_exactly(dtype):
    """_store into the transpose of a C-order result (more rows than one block) writes every element, rounded
    once."""
    from eecompile.passes.weight_fold import STORE_ROWS, _store

    rng = np.random.default_rng(5)
    result = np.zeros((50, 3 * STORE_ROWS + 5), dtype)
    chunk = rng.standard_normal((3 * STORE_ROWS + 5, 50))
    _store(result.T, chunk)
    np.testing.assert_array_equal(result.T.astype(np.float64), store_as(chunk, dtype).astype(np.float64))
