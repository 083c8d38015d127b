"""Concrete bases and the one folding primitive: multiplying a tensor by a basis along an axis.

A :class:`Basis` is the identity, a dense matrix, or a monomial matrix stored as a
permutation and scales (``T[perm[j], j] = scale[j]``), so that permutations of a
50 000-entry vocabulary never become dense matrices. Every fold in the compiler is a
composition of :meth:`Basis.right` along some axis with a basis, its inverse or its dual
(the inverse transpose).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Basis:
    """A change of basis ``x -> x @ T`` on an axis of size ``size``."""

    size: int
    dense: np.ndarray | None = None
    perm: np.ndarray | None = None
    scale: np.ndarray | None = None
    orthogonal: bool = False  # a dense orthogonal matrix: its dual is itself, its inverse its transpose

    @staticmethod
    def identity(size: int) -> "Basis":
        """The identity basis."""
        return Basis(size)

    @staticmethod
    def monomial(perm: np.ndarray, scale: np.ndarray | None = None) -> "Basis":
        """The monomial basis with ``(x @ T)[j] = x[perm[j]] * scale[j]``."""
        return Basis(len(perm), perm=np.asarray(perm, dtype=np.int64),
                     scale=None if scale is None else np.asarray(scale, dtype=np.float64))

    @property
    def is_identity(self) -> bool:
        """True for the identity basis."""
        return self.dense is None and self.perm is None and self.scale is None

    def right(self, array: np.ndarray, axis: int = -1) -> np.ndarray:
        """``array @ T`` contracting ``axis`` (float64 result)."""
        array = np.asarray(array, dtype=np.float64)
        if self.is_identity:
            return array
        axis = axis % array.ndim
        if self.dense is not None:
            moved = np.moveaxis(array, axis, -1) @ self.dense
            return np.moveaxis(moved, -1, axis)
        out = np.take(array, self.perm, axis=axis) if self.perm is not None else array
        if self.scale is not None:
            shape = [1] * array.ndim
            shape[axis] = self.size
            out = out * self.scale.reshape(shape)
        return out

    def inverse(self) -> "Basis":
        """``T^{-1}`` (computed once)."""
        return self._inverse

    @cached_property
    def _inverse(self) -> "Basis":
        if self.is_identity:
            return self
        if self.dense is not None:
            if self.orthogonal:
                return Basis(self.size, dense=np.ascontiguousarray(self.dense.T), orthogonal=True)
            return Basis(self.size, dense=np.linalg.inv(self.dense))
        perm = self.perm if self.perm is not None else np.arange(self.size)
        inv = np.argsort(perm)
        scale = None if self.scale is None else 1.0 / self.scale[inv]
        return Basis(self.size, perm=inv, scale=scale)

    def dual(self) -> "Basis":
        """``T^{-T}``, the basis of the contracted partner (attention keys, folded inputs); computed once."""
        return self._dual

    @cached_property
    def _dual(self) -> "Basis":
        if self.is_identity or self.orthogonal:
            return self
        if self.dense is not None:
            return Basis(self.size, dense=np.ascontiguousarray(self.inverse().dense.T))
        return Basis(self.size, perm=self.perm, scale=None if self.scale is None else 1.0 / self.scale)

    def matrix(self) -> np.ndarray:
        """The dense ``size x size`` matrix (only for small bases)."""
        return self.right(np.eye(self.size))

    def index_map(self) -> np.ndarray:
        """For a permutation basis, ``perm`` with ``(x @ T)[j] = x[perm[j]]``."""
        return self.perm if self.perm is not None else np.arange(self.size)


@dataclass(frozen=True)
class AxisBasis:
    """The basis of a flat axis: a direct sum of blocks, in order, or with whole blocks moved.

    Without ``order`` block ``j`` of the result is block ``j`` of the input times ``blocks[j]``. With it
    (a permutation of the block positions; blocks it moves have equal sizes) block ``j`` of the result is
    block ``order[j]`` of the input times ``blocks[j]``: a grouped Conv's groups permuted
    (:mod:`~eecompile.passes.group_orders`).
    """

    blocks: tuple[Basis, ...]
    order: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        """Total axis size."""
        return sum(b.size for b in self.blocks)

    @property
    def moves_blocks(self) -> bool:
        """True when ``order`` moves a block."""
        return self.order is not None and any(i != j for j, i in enumerate(self.order))

    @property
    def is_identity(self) -> bool:
        """True when every block is the identity and none moves."""
        return all(b.is_identity for b in self.blocks) and not self.moves_blocks

    def sources(self) -> list[tuple[slice, slice, Basis]]:
        """``(result slice, input slice, block)`` per block position."""
        offsets = np.concatenate([[0], np.cumsum([b.size for b in self.blocks])]).astype(int)
        order = self.order or tuple(range(len(self.blocks)))
        return [(slice(int(offsets[j]), int(offsets[j + 1])), slice(int(offsets[i]), int(offsets[i + 1])), block)
                for j, (i, block) in enumerate(zip(order, self.blocks))]

    def operand(self, array: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
        """``(array, axis)`` as :meth:`right` multiplies them: float64, ``axis`` non-negative, a size-1 axis
        broadcast to the basis' size."""
        array = np.asarray(array, dtype=np.float64)
        axis = axis % array.ndim
        if array.shape[axis] != self.size:
            shape = list(array.shape)
            shape[axis] = self.size
            array = np.broadcast_to(array, shape)
        return array, axis

    def right(self, array: np.ndarray, axis: int = -1) -> np.ndarray:
        """``array @ T`` along ``axis`` (block ``j`` of the result: block ``order[j]`` times ``blocks[j]``); a
        size-1 axis is broadcast first."""
        if self.is_identity:
            return np.asarray(array, dtype=np.float64)
        array, axis = self.operand(array, axis)
        parts = []
        for _, source, block in self.sources():
            index = [slice(None)] * array.ndim
            index[axis] = source
            parts.append(block.right(array[tuple(index)], axis))
        return np.concatenate(parts, axis=axis)

    def _moved(self, blocks: tuple[Basis, ...], order: tuple[int, ...] | None) -> "AxisBasis":
        return type(self)(blocks, order)

    def inverse(self) -> "AxisBasis":
        """``T^{-1}``: block ``i`` of the result is block ``order^{-1}[i]`` times that block's inverse."""
        if self.order is None:
            return self._moved(tuple(b.inverse() for b in self.blocks), None)
        back = [0] * len(self.order)
        for j, i in enumerate(self.order):
            back[i] = j
        return self._moved(tuple(self.blocks[back[i]].inverse() for i in range(len(back))), tuple(back))

    def dual(self) -> "AxisBasis":
        """``T^{-T}``: the same order, each block's inverse transpose."""
        return self._moved(tuple(b.dual() for b in self.blocks), self.order)
