"""The fold's arithmetic on weights: ``R^T · W · C`` for the planned bases, in float64 chunks.

Every dense product of the fold goes through :func:`dense_product` (the scale sweep records them there).
:func:`fold_matrix` folds a 2-D weight on both sides in bounded memory, in the weight's memory order, into one
result of the weight's dtype; :class:`FoldAxisBasis` is the block-diagonal product the other constants use;
:class:`FoldScratch` keeps the float64 work buffers from one weight's fold to the next during the fold pass.
"""

from __future__ import annotations

import numpy as np

from eecompile.passes.basis import AxisBasis, Basis
from eecompile.passes.precision import BFLOAT16, store_as


class FoldAxisBasis(AxisBasis):
    """:class:`~eecompile.passes.basis.AxisBasis` whose product writes each block straight into one result.

    The same products (float64, one BLAS call per dense block, a gather per monomial block), without the
    per-block copies and the final concatenation, so a fold holds the weight and its result and nothing
    else: two arrays of the weight's float64 size. Its inverse and dual are of this class too.
    """

    def right(self, array: np.ndarray, axis: int = -1) -> np.ndarray:
        """``array @ blockdiag(blocks)`` along ``axis`` (float64); a size-1 axis is broadcast first."""
        if self.is_identity:
            return np.asarray(array, dtype=np.float64)
        array, axis = self.operand(array, axis)
        if len(self.blocks) == 1:
            return block_right(self.blocks[0], array, axis)
        out = np.empty(array.shape, np.float64)
        for target, source, block in self.sources():
            into, read = [slice(None)] * array.ndim, [slice(None)] * array.ndim
            into[axis], read[axis] = target, source
            block_right(block, array[tuple(read)], axis, out[tuple(into)])
        return out


def dense_product(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a @ b`` in float64 (into ``out`` when given): every dense product of the fold goes through here."""
    return np.matmul(a, b, out=out)


def block_right(basis: Basis, array: np.ndarray, axis: int, out: np.ndarray | None = None) -> np.ndarray:
    """``array @ T`` contracting ``axis`` for one basis, written into ``out`` (a new float64 array when None)."""
    if out is None:
        out = np.empty(array.shape, np.float64)
    if basis.dense is not None:
        if axis == array.ndim - 1:
            dense_product(array, basis.dense, out)
        elif array.ndim == 2:
            dense_product(basis.dense.T, array, out)
        else:
            np.moveaxis(out, axis, -1)[...] = dense_product(np.moveaxis(array, axis, -1), basis.dense)
        return out
    if basis.perm is not None:
        np.take(array, basis.perm, axis=axis, out=out, mode="clip")
    else:
        out[...] = array
    if basis.scale is not None:
        shape = [1] * array.ndim
        shape[axis] = basis.size
        out *= basis.scale.reshape(shape)
    return out


FOLD_CHUNK_BYTES = 64 << 20
"""Largest float64 chunk of a weight :func:`fold_matrix` works on at once."""


class FoldScratch:
    """float64 work buffers of :func:`fold_matrix`, kept from one weight's fold to the next.

    A fresh buffer of a chunk's size is new memory: the kernel maps and zeroes its pages on first touch,
    which costs a third to a half of the product written into it on this class of machine. Within
    ``with FoldScratch():`` (the fold pass) each slot keeps one buffer, grown to the largest chunk asked
    for (at most :data:`FOLD_CHUNK_BYTES` per slot for chunked folds) and dropped on exit; outside it every
    request is a fresh array.
    """

    active: "FoldScratch | None" = None

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def __enter__(self) -> "FoldScratch":
        self._outer, FoldScratch.active = FoldScratch.active, self
        return self

    def __exit__(self, *exc) -> None:
        FoldScratch.active = self._outer
        self._buffers.clear()

    def get(self, slot: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float64 array of ``shape`` backed by ``slot``'s buffer (its previous contents are dead)."""
        count = int(np.prod(shape, dtype=np.int64))
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.size < count:
            buffer = self._buffers[slot] = np.empty(count, np.float64)
        return buffer[:count].reshape(shape)


def _work(slot: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float64 work array for ``slot``: the active :class:`FoldScratch`'s buffer, else a new array."""
    pool = FoldScratch.active
    return pool.get(slot, shape) if pool is not None else np.empty(shape, np.float64)


def fold_matrix(weight: np.ndarray, rows: AxisBasis | Basis | None, cols: AxisBasis | Basis | None,
                dtype=None, chunk_bytes: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """``R^T · W · C`` for a 2-D weight: ``rows`` contracts axis 0 and ``cols`` axis 1 (as ``rows.right(W, 0)``
    then ``cols.right(·, 1)``), None or the identity leaving that axis alone.

    The products are float64, done on chunks of at most ``chunk_bytes`` of output rows (or of output columns,
    when only the rows mix: a wide LM head, an MLP's up projection), a dense row block accumulated over chunks
    of its input rows; a transposed weight (the view a deferred Transpose reads) is folded as ``C^T W^T R``
    in its own memory order. Each chunk is rounded straight into one result of ``dtype`` (the weight's by
    default; ``out`` when given). So a fold holds the weight, its result and a few chunks (``chunk_bytes``,
    default :data:`FOLD_CHUNK_BYTES`; reused across folds inside a :class:`FoldScratch`), never a float64
    copy of either.
    """
    chunk_bytes = FOLD_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ValueError("fold_matrix folds 2-D weights")
    n_rows, n_cols = weight.shape
    rows, cols = _as_axis(rows), _as_axis(cols)
    if rows is not None and rows.size != n_rows or cols is not None and cols.size != n_cols:
        raise ValueError(f"bases of sizes {rows and rows.size}, {cols and cols.size} do not fit a weight of shape "
                         f"{weight.shape}")
    if out is None:
        out = np.empty(weight.shape, np.dtype(dtype) if dtype is not None else weight.dtype)
    if not weight.flags.c_contiguous and weight.T.flags.c_contiguous:  # a transposed view (a deferred Transpose):
        fold_matrix(weight.T, cols, rows, chunk_bytes=chunk_bytes, out=out.T)  # read it in its memory order
        return out
    if rows is not None and any(b.dense is not None for b in rows.blocks) \
            and (cols is None or all(b.dense is None for b in cols.blocks)):
        return _fold_column_chunks(weight, rows, cols, out, chunk_bytes)
    step = max(1, int(chunk_bytes) // (8 * max(n_cols, 1)))
    for start, pieces in _row_chunks(rows, n_rows, step):
        stop = pieces[-1][0] + pieces[-1][3]
        chunk = _work("chunk", (stop - start, n_cols))
        for offset, size, c0, c1, dense, index, scale in pieces:  # output rows offset+c0 : offset+c1
            target = chunk[offset + c0 - start:offset + c1 - start]
            source = weight[offset:offset + size]
            if dense is not None and c1 - c0 == size and size <= step:
                dense_product(dense.T, _widened(source), target)
            elif dense is not None:  # a slice of a large block: accumulated over its input rows
                target[...] = 0.0
                for k0 in range(0, size, step):
                    k1 = min(k0 + step, size)
                    target += dense_product(dense[k0:k1, c0:c1].T, _widened(source[k0:k1]))
            else:
                target[...] = source[index[c0:c1] if index is not None else slice(c0, c1)]
                if scale is not None:
                    target *= scale[c0:c1, None]
        if cols is not None:
            chunk = _cols_product(cols, chunk)
        _store(out[start:stop], chunk)
    return out


STORE_ROWS = 16
"""Rows of a chunk written at a time into a result whose rows are strided (a transposed result)."""


def _store(target: np.ndarray, chunk: np.ndarray) -> None:
    """``target[...] = chunk``, rounded once to the target's dtype. A target whose last axis is strided (the
    transpose of a C-order result) is written :data:`STORE_ROWS` rows at a time, so that every row of the
    result receives whole cache lines rather than one element per line."""
    if target.dtype == BFLOAT16:
        chunk = store_as(chunk, BFLOAT16)
    if target.ndim != 2 or target.strides[-1] == target.itemsize or target.shape[0] <= STORE_ROWS:
        target[...] = chunk
        return
    for i in range(0, target.shape[0], STORE_ROWS):
        target[i:i + STORE_ROWS] = chunk[i:i + STORE_ROWS]


def _widened(source: np.ndarray) -> np.ndarray:
    """``source`` as float64, in the ``source`` work buffer (no new memory inside a :class:`FoldScratch`)."""
    if source.dtype == np.float64:
        return source
    wide = _work("source", source.shape)
    wide[...] = source
    return wide


def _fold_column_chunks(weight: np.ndarray, rows: FoldAxisBasis, cols: FoldAxisBasis | None, out: np.ndarray,
                        chunk_bytes: int) -> np.ndarray:
    """``R^T · W · C`` for ``cols`` without dense blocks (a gather and a scale), chunk by chunk of output columns.

    Each chunk gathers its columns of the weight (C order, contiguous rows), multiplies the dense row blocks
    over the whole input row range (so nothing is accumulated) and is rounded into its columns of ``out``.
    """
    n_rows, n_cols = weight.shape
    step = max(1, int(chunk_bytes) // (8 * max(n_rows, 1)))
    column_runs = list(_row_runs(cols, n_cols))
    for start in range(0, n_cols, step):
        stop = min(start + step, n_cols)
        chunk = _work("chunk", (n_rows, stop - start))
        for offset, size, _, index, scale in column_runs:  # output columns offset : offset + size
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo >= hi:
                continue
            target = chunk[:, lo - start:hi - start]
            if index is None:
                target[...] = weight[:, lo:hi]
            else:
                target[...] = np.take(weight, index[lo - offset:hi - offset] + offset, axis=1)
            if scale is not None:
                target *= scale[lo - offset:hi - offset]
        result = _work("result", chunk.shape)
        for offset, size, dense, index, scale in _row_runs(rows, n_rows):
            source, target = chunk[offset:offset + size], result[offset:offset + size]
            if dense is not None:
                dense_product(dense.T, source, target)
            else:
                target[...] = source[index] if index is not None else source
                if scale is not None:
                    target *= scale[:, None]
        _store(out[:, start:stop], result)
    return out


def _cols_product(cols: AxisBasis, chunk: np.ndarray) -> np.ndarray:
    """``chunk @ blockdiag(cols)`` (float64) into a work array (:func:`_work`), the blocks written in place: a
    run of equal-size dense blocks (attention heads) as one batched product over strided views, a large block
    as one product, monomial blocks as a gather and a scale; no slice copies and no concatenation."""
    result = _work("result", chunk.shape)
    rows = chunk.shape[0]
    blocks, offset, i = list(cols.blocks), 0, 0
    while i < len(blocks):
        block = blocks[i]
        j = i + 1
        if block.dense is not None:
            while j < len(blocks) and blocks[j].dense is not None and blocks[j].size == block.size:
                j += 1
        width = block.size * (j - i)
        if j - i > 1:
            shape = (rows, j - i, block.size)
            source = chunk[:, offset:offset + width].reshape(shape).transpose(1, 0, 2)
            target = result[:, offset:offset + width].reshape(shape).transpose(1, 0, 2)
            dense_product(source, np.stack([b.dense for b in blocks[i:j]]), target)
        else:
            block_right(block, chunk[:, offset:offset + width], 1, result[:, offset:offset + width])
        offset += width
        i = j
    return result


def _row_chunks(rows: AxisBasis | None, n_rows: int, step: int):
    """``(first row, pieces)`` per chunk of at most ``step`` output rows (more only for one dense block that
    fits no smaller chunk): pieces ``(offset, size, c0, c1, dense, index, scale)`` of the runs of
    :func:`_row_runs`, small blocks packed together so that the column product runs on whole chunks."""
    pieces: list[tuple] = []
    filled = 0
    for offset, size, dense, index, scale in _row_runs(rows, n_rows):
        for c0 in range(0, size, step):
            c1 = min(c0 + step, size)
            if pieces and filled + (c1 - c0) > step:
                yield pieces[0][0] + pieces[0][2], pieces
                pieces, filled = [], 0
            pieces.append((offset, size, c0, c1, dense, index, scale))
            filled += c1 - c0
    if pieces:
        yield pieces[0][0] + pieces[0][2], pieces


def _row_runs(rows: AxisBasis | None, n_rows: int):
    """``(offset, size, dense, index, scale)`` per dense block of ``rows`` and per run of consecutive monomial
    or identity blocks (one gather for the run: ``index`` into the run's rows, None for in place)."""
    if rows is None:
        yield 0, n_rows, None, None, None
        return
    run: list[tuple[int, Basis]] = []

    def flush():
        if not run:
            return None
        start = run[0][0]
        size = sum(b.size for _, b in run)
        moved = any(b.perm is not None for _, b in run)
        scaled = any(b.scale is not None for _, b in run)
        index = np.concatenate([(b.perm if b.perm is not None else np.arange(b.size)) + (o - start)
                                for o, b in run]) if moved else None
        scale = np.concatenate([b.scale if b.scale is not None else np.ones(b.size) for _, b in run]) \
            if scaled else None
        run.clear()
        return start, size, None, index, scale

    offset = 0
    for block in rows.blocks:
        if block.dense is not None:
            done = flush()
            if done is not None:
                yield done
            yield offset, block.size, block.dense, None, None
        else:
            run.append((offset, block))
        offset += block.size
    done = flush()
    if done is not None:
        yield done


def _as_axis(basis: AxisBasis | Basis | None) -> FoldAxisBasis | None:
    """A :class:`FoldAxisBasis` of ``basis``, None for no basis or the identity."""
    if basis is None:
        return None
    blocks = basis.blocks if isinstance(basis, AxisBasis) else (basis,)
    if all(b.is_identity for b in blocks):
        return None
    return FoldAxisBasis(tuple(blocks))
