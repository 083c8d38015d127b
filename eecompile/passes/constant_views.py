"""Constant views: a tensor computed from one constant by ops that only move or repeat its elements.

DeBERTa's relative-position keys are a constant ``[H, R, d]`` (the relative embeddings times a key
projection, folded at compile time) tiled over the run-time batch and transposed before they meet the
queries: ``Q · Transpose(Tile(C, [B, 1, 1]))``. The product contracts the protected query features with
the constant's ``d`` axis, so the dual basis can be folded into ``C`` itself, head by head, exactly as into
a weight. :func:`constant_view` finds the constant behind such a chain and says, for every axis of the
view, which axis of the constant it reads and whether it repeats it (``i -> i mod n``).

Ops followed: Identity, Transpose, Tile (run-time repeats included), Expand and Unsqueeze. Every tensor
of the chain must be read by the chain alone (or by ops that read only its shape): folding into the
constant changes each of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from eecompile.passes.rules import SHAPE_ONLY_OPS

_MAX_DEPTH = 16


@dataclass(frozen=True)
class ViewAxis:
    """One axis of a view: the constant's axis it reads (None: broadcast, every index reads the same
    element) and whether it repeats that axis (index ``i`` reads ``i mod n``)."""

    source: int | None
    repeats: bool = False


@dataclass(frozen=True)
class ConstantView:
    """``tensor`` read from ``reader.inputs[index]`` (a constant) through element-moving ops only."""

    reader: gs.Node
    index: int
    axes: tuple[ViewAxis, ...]

    @property
    def constant(self) -> gs.Tensor:
        """The constant behind the view."""
        return self.reader.inputs[self.index]


def constant_view(tensor: gs.Tensor, consumer: gs.Node, const_shape: Callable[[gs.Tensor], tuple | None],
                  rank: Callable[[gs.Tensor], int | None],
                  repeats: Callable[[gs.Tensor], list[int | None] | None] = lambda t: None,
                  const: Callable[[gs.Tensor], object] = lambda t: None) -> ConstantView | None:
    """The constant behind ``tensor`` as ``consumer`` reads it, or None when ``tensor`` is not such a view.

    ``const_shape``/``rank`` read shapes; ``repeats`` the known values of a Tile's repeats (None where
    unknown: the axis then counts as repeated); ``const`` the values of small constant inputs (Unsqueeze
    axes of opset 13+).
    """
    return _view(tensor, consumer, const_shape, rank, repeats, const, 0)


def _view(tensor: gs.Tensor, consumer: gs.Node, const_shape, rank, repeats, const, depth: int) -> ConstantView | None:
    if not _read_only_by(tensor, consumer):
        return None
    shape = const_shape(tensor)
    if isinstance(tensor, gs.Constant) and shape is not None:
        return ConstantView(consumer, consumer.inputs.index(tensor), tuple(ViewAxis(a) for a in range(len(shape))))
    return _follow(tensor, const_shape, rank, repeats, const, depth)


def _read_only_by(tensor: gs.Tensor, consumer: gs.Node) -> bool:
    readers = [n for n in tensor.outputs if n.op not in SHAPE_ONLY_OPS]
    return len(readers) == 1 and readers[0] is consumer and consumer.inputs.count(tensor) == 1


def _follow(tensor: gs.Tensor, const_shape, rank, repeats, const, depth: int) -> ConstantView | None:
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is None or depth > _MAX_DEPTH or not producer.inputs:
        return None
    inner = _view(producer.inputs[0], producer, const_shape, rank, repeats, const, depth + 1)
    if inner is None:
        return None
    axes = list(inner.axes)
    if producer.op == "Identity":
        return inner
    if producer.op == "Transpose":
        perm = producer.attrs.get("perm", list(range(len(axes)))[::-1])
        return ConstantView(inner.reader, inner.index, tuple(axes[p] for p in perm))
    if producer.op == "Tile" and len(producer.inputs) == 2:
        counts = repeats(producer.inputs[1]) or [None] * len(axes)
        if len(counts) != len(axes):
            return None
        return ConstantView(inner.reader, inner.index, tuple(
            ViewAxis(ax.source, ax.repeats or (ax.source is not None and count != 1))
            for ax, count in zip(axes, counts)))
    if producer.op == "Expand":
        out_rank, source_shape = rank(tensor), _view_shape(inner, const_shape)
        if out_rank is None or source_shape is None or out_rank < len(axes):
            return None
        lead = out_rank - len(axes)
        kept = [ax if size != 1 else ViewAxis(None) for ax, size in zip(axes, source_shape)]
        return ConstantView(inner.reader, inner.index, tuple([ViewAxis(None)] * lead + kept))
    if producer.op == "Unsqueeze":
        inserted = producer.attrs.get("axes")
        if inserted is None and len(producer.inputs) > 1:
            value = const(producer.inputs[1])
            inserted = None if value is None else [int(a) for a in value.reshape(-1)]
        if inserted is None:
            return None
        out_rank = len(axes) + len(inserted)
        inserted = {int(a) % out_rank for a in inserted}
        source_axes = iter(axes)
        return ConstantView(inner.reader, inner.index, tuple(
            ViewAxis(None) if a in inserted else next(source_axes) for a in range(out_rank)))
    return None


def _view_shape(view: ConstantView, const_shape) -> list[int] | None:
    """Sizes of a view's axes before any repetition (1 on broadcast axes)."""
    shape = const_shape(view.constant)
    if shape is None:
        return None
    return [1 if ax.source is None else int(shape[ax.source]) for ax in view.axes]
