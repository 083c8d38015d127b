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
    """The basis of a flat axis: a direct sum of blocks, in order."""

    blocks: tuple[Basis, ...]

    @property
    def size(self) -> int:
        """Total axis size."""
        return sum(b.size for b in self.blocks)

    @property
    def is_identity(self) -> bool:
        """True when every block is the identity."""
        return all(b.is_identity for b in self.blocks)

    def right(self, array: np.ndarray, axis: int = -1) -> np.ndarray:
        """``array @ blockdiag(blocks)`` along ``axis``; a size-1 axis is broadcast first."""
        array = np.asarray(array, dtype=np.float64)
        axis = axis % array.ndim
        if self.is_identity:
            return array
        if array.shape[axis] != self.size:
            shape = list(array.shape)
            shape[axis] = self.size
            array = np.broadcast_to(array, shape)
        parts, offset = [], 0
        for block in self.blocks:
            index = [slice(None)] * array.ndim
            index[axis] = slice(offset, offset + block.size)
            parts.append(block.right(array[tuple(index)], axis))
            offset += block.size
        return np.concatenate(parts, axis=axis)

    def inverse(self) -> "AxisBasis":
        """Blockwise inverse."""
        return AxisBasis(tuple(b.inverse() for b in self.blocks))

    def dual(self) -> "AxisBasis":
        """Blockwise inverse transpose."""
        return AxisBasis(tuple(b.dual() for b in self.blocks))
