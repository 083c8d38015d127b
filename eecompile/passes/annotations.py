"""What the analysis knows about one tensor: which axis is protected, by which spaces.

* :class:`Protected` — a float tensor whose ``axis`` is expressed in a secret basis. Without
  a head axis the axis is the concatenation (direct sum) of the blocks ``refs``; with a
  ``head_axis``, index ``h`` of that axis uses block ``refs[h]`` for the whole feature axis;
  with ``head_tiled`` the head axis also holds another axis merged in front of the heads
  (``[B, H, S, D] -> [B·H, S, D]``): index ``i`` uses ``refs[i % len(refs)]``.
* :class:`IndexValues` — an integer tensor whose *values* index a permuted space
  (token ids, ArgMax of permuted logits).
* :class:`Squares` — ``x ** 2`` of a protected tensor: only its sum over ``axis`` is
  basis-free, for orthogonal bases (the RMS-norm pattern).

A tensor with no annotation (``None``) is in clear.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from eecompile.passes.spaces import Ref


@dataclass(frozen=True)
class Protected:
    """A tensor whose ``axis`` carries the blocks ``refs`` (see module docstring)."""

    axis: int
    refs: tuple[Ref, ...]
    head_axis: int | None = None
    head_tiled: bool = False

    def moved(self, axis: int, head_axis: int | None = None) -> "Protected":
        """The same protection on other axis positions."""
        return replace(self, axis=axis, head_axis=head_axis, head_tiled=self.head_tiled and head_axis is not None)

    def shifted(self, offset: int) -> "Protected":
        """Axes shifted by ``offset`` (broadcasting to a higher rank)."""
        head = None if self.head_axis is None else self.head_axis + offset
        return Protected(self.axis + offset, self.refs, head, self.head_tiled)


@dataclass(frozen=True)
class IndexValues:
    """An integer tensor whose values are indices into the permuted space ``ref``."""

    ref: Ref


@dataclass(frozen=True)
class Squares:
    """Elementwise squares of a protected tensor; basis-free only after summing over its axis."""

    source: Protected


Annotation = Protected | IndexValues | Squares | None
