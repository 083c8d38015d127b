"""Normalize rewrite: select a fused projection's parts before splitting them into heads.

A fused projection (ModernBERT's ``Wqkv``, many encoders' packed QKV) is often reshaped in one step
``[.., N] -> [.., P, r1, .., rk]`` (P parts: q, k, v; then heads and head width) and the parts are then
selected along P by Slice, Split or Gather (``unbind``), usually followed by a Squeeze. The analysis
follows one head axis per tensor, so the reshape that creates two (parts and heads) cannot be followed.

Selecting along P commutes with that reshape: in row-major order part ``p`` is the contiguous run
``[p·M, (p+1)·M)`` of the flat axis (``M = N / P``). So each selection is rewritten as the same selection
of the flat axis (a Slice or Split with bounds times ``M``) followed by a Reshape of that selection
alone, ``[.., m·M] -> [.., m, r1, .., rk]`` (the P axis dropped for a scalar Gather); a Transpose between the
reshape and the selections (``qkv.transpose(3, 1).unbind(2)``) is applied to each part. The leading axes are
copied by the Reshape's ``0`` entries, so dynamic batch and sequence sizes stay dynamic. The function is
unchanged for every input; the shape rules then see an ordinary split of one part into heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes import dims
from eecompile.passes.graph import ModelGraph
from eecompile.passes.rules import SHAPE_ONLY_OPS


@dataclass(frozen=True)
class _Layout:
    """A Reshape ``[p.., N] -> [p.., P, r..]``: ``axis`` is P's position, ``part`` = N / P."""

    axis: int
    parts: int
    inner: tuple[int, ...]
    part: int


@dataclass(frozen=True)
class _Selection:
    """One consumer's selection along P: runs ``[start, stop)`` per output; ``keep_axis`` False for a scalar Gather."""

    runs: tuple[tuple[int, int], ...]
    keep_axis: bool = True


@dataclass(frozen=True)
class _Use:
    """A selector of the reshaped tensor, reached directly or through a Transpose with ``perm``."""

    node: gs.Node
    selection: _Selection
    perm: tuple[int, ...] | None = None


def select_parts_first(mg: ModelGraph) -> list[str]:
    """Rewrite every part-selecting Reshape in ``mg`` (module docstring); the names of those rewritten."""
    rewritten = []
    outputs = {id(t) for t in mg.graph.outputs}
    for node in mg.nodes:
        if node.op != "Reshape" or id(node.outputs[0]) in outputs or isinstance(node.inputs[0], gs.Constant):
            continue
        layout = _part_layout(mg, node)
        uses = None if layout is None else _uses(mg, node.outputs[0], layout, outputs)
        if not uses:
            continue
        for use in uses:
            _rewrite(mg, node, use, layout)
        rewritten.append(node.name)
    return rewritten


def _uses(mg: ModelGraph, y: gs.Tensor, layout: _Layout, outputs: set[int]) -> list[_Use] | None:
    """Every selection of ``y`` along the part axis (through at most one Transpose); None when some
    consumer does something else."""
    rank = layout.axis + 1 + len(layout.inner)
    uses = []
    for consumer in (c for c in y.outputs if c.op not in SHAPE_ONLY_OPS):
        if consumer.op == "Transpose" and id(consumer.outputs[0]) not in outputs:
            perm = tuple(int(p) for p in consumer.attrs.get("perm", range(rank - 1, -1, -1)))
            moved = [c for c in consumer.outputs[0].outputs if c.op not in SHAPE_ONLY_OPS]
            found = [_selection(mg, c, consumer.outputs[0], perm.index(layout.axis), layout.parts, rank)
                     for c in moved]
            if not moved or any(f is None for f in found):
                return None
            uses += [_Use(c, f, perm) for c, f in zip(moved, found)]
            continue
        found = _selection(mg, consumer, y, layout.axis, layout.parts, rank)
        if found is None:
            return None
        uses.append(_Use(consumer, found))
    return uses


def _part_layout(mg: ModelGraph, node: gs.Node) -> _Layout | None:
    """The layout when ``node`` splits only the last axis into ``[P, r..]`` with P > 1 and static sizes.

    One unknown size among ``[P, r..]`` (shape inference that could not evaluate the target) is what the
    element count leaves for it: the leading axes are equal, so ``P·r1·..·rk = N``."""
    din, dout = mg.shape(node.inputs[0]), mg.shape(node.outputs[0])
    if din is None or dout is None or len(dout) < len(din) + 2 or not din:
        return None
    axis = len(din) - 1
    if not all(dims.equal(a, b) for a, b in zip(din[:axis], dout[:axis])):
        return None
    sizes = [dims.as_int(d) for d in dout[axis:]]
    total = dims.as_int(din[axis])
    if total is None or sizes.count(None) > 1 or any(s is not None and s < 1 for s in sizes):
        return None
    if None in sizes:
        known = math.prod(s for s in sizes if s is not None)
        if total % known:
            return None
        sizes[sizes.index(None)] = total // known
    if math.prod(sizes) != total or sizes[0] < 2:
        return None
    return _Layout(axis, sizes[0], tuple(sizes[1:]), total // sizes[0])


def _const_ints(mg: ModelGraph, tensor: gs.Tensor | None) -> list[int] | None:
    value = mg.const(tensor) if tensor is not None and tensor.name else None
    return None if value is None else [int(v) for v in np.atleast_1d(value)]


def _selection(mg: ModelGraph, node: gs.Node, y: gs.Tensor, axis: int, parts: int, rank: int) -> _Selection | None:
    """What ``node`` selects from ``y`` (rank ``rank``) along ``axis`` of ``parts`` entries; None when it is not a
    plain selection there."""
    if not node.inputs or node.inputs[0] is not y or any(t is y for t in node.inputs[1:]):
        return None
    if node.op == "Slice":
        return _slice_selection(mg, node, axis, parts, rank)
    if node.op == "Split":
        if int(node.attrs.get("axis", 0)) % rank != axis:
            return None
        sizes = _const_ints(mg, node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
        sizes = sizes or (list(node.attrs["split"]) if "split" in node.attrs else None)
        if sizes is None:
            count = len(node.outputs)
            sizes = [parts // count] * count if parts % count == 0 else None
        if sizes is None or sum(sizes) != parts or len(sizes) != len(node.outputs) or min(sizes) < 1:
            return None
        bounds = np.cumsum([0] + sizes)
        return _Selection(tuple((int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])))
    if node.op == "Gather":
        index = mg.const(node.inputs[1])
        if int(node.attrs.get("axis", 0)) % rank != axis or index is None or index.ndim != 0:
            return None
        p = int(index) % parts if -parts <= int(index) < parts else None
        return None if p is None else _Selection(((p, p + 1),), keep_axis=False)
    return None


def _slice_selection(mg: ModelGraph, node: gs.Node, axis: int, parts: int, rank: int) -> _Selection | None:
    starts, ends = _const_ints(mg, node.inputs[1]), _const_ints(mg, node.inputs[2])
    axes = _const_ints(mg, node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    steps = _const_ints(mg, node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else None
    axes = axes if axes is not None else (list(range(len(starts))) if starts is not None else None)
    if starts is None or ends is None or axes is None or len(starts) != 1 or len(ends) != 1 or len(axes) != 1:
        return None
    if axes[0] % rank != axis or (steps is not None and steps != [1]):
        return None
    start, stop = (min(max(v + parts if v < 0 else v, 0), parts) for v in (starts[0], ends[0]))
    return _Selection(((start, stop),)) if stop > start else None


def _ints(name: str, values: list[int]) -> gs.Constant:
    return gs.Constant(name, np.asarray(values, dtype=np.int64))


def _rewrite(mg: ModelGraph, reshape: gs.Node, use: _Use, layout: _Layout) -> None:
    """Replace ``use.node`` by the same selection of the flat axis, one Reshape per output (and the Transpose
    the selection was reached through)."""
    x, consumer, selection, m = reshape.inputs[0], use.node, use.selection, layout.part
    base = consumer.name
    pieces = [gs.Variable(f"{base}_flat{i}", dtype=x.dtype) for i in range(len(selection.runs))]
    if consumer.op == "Split":
        sizes = [(b - a) * m for a, b in selection.runs]
        if mg.opset_imports.get("", 13) >= 13:
            split = gs.Node("Split", f"{base}_flat", {"axis": layout.axis}, [x, _ints(f"{base}_sizes", sizes)], pieces)
        else:
            split = gs.Node("Split", f"{base}_flat", {"axis": layout.axis, "split": sizes}, [x], pieces)
        mg.graph.nodes.append(split)
    else:
        (a, b), = selection.runs
        mg.graph.nodes.append(gs.Node("Slice", f"{base}_flat", inputs=[
            x, _ints(f"{base}_start", [a * m]), _ints(f"{base}_stop", [b * m]), _ints(f"{base}_axis", [layout.axis])],
            outputs=pieces))
    outs = list(consumer.outputs)
    consumer.outputs.clear()
    consumer.inputs.clear()
    perm = use.perm
    if perm is not None and not selection.keep_axis:  # the part axis is gone: the others keep their order
        perm = tuple(p - (p > layout.axis) for p in perm if p != layout.axis)
    for i, ((a, b), piece, out) in enumerate(zip(selection.runs, pieces, outs)):
        target = [0] * layout.axis + ([b - a] if selection.keep_axis else []) + list(layout.inner)
        part = out if perm is None else gs.Variable(f"{base}_part{i}_out", dtype=x.dtype)
        mg.graph.nodes.append(gs.Node("Reshape", f"{base}_part{i}", inputs=[piece, _ints(f"{base}_shape{i}", target)],
                                      outputs=[part]))
        if perm is not None:
            mg.graph.nodes.append(gs.Node("Transpose", f"{base}_part{i}_transpose", {"perm": list(perm)}, [part], [out]))
