"""Resize and Pad: ops that move pixels (or tokens) and leave the feature axis alone.

* ``Resize`` along axes other than the protected one samples or interpolates each channel with
  weights that do not depend on the channel, so it commutes with **any** basis of the channel
  axis. A protected axis that is resized, or cropped by ``tf_crop_and_resize`` (which also fills
  with ``extrapolation_value``), is cleared.
* ``Pad`` along other axes: ``reflect``, ``edge`` and ``wrap`` copy existing values (any basis);
  ``constant`` fills with one value in every channel — 0 keeps any basis, another value only
  bases that map ones to ones (``v·1·T = v·1``). Padding the protected axis itself with a
  constant appends channels holding the fill value: they are a clear block of a direct sum
  (``[x·T, v]``), and a negative pad crops whole blocks; reflecting or repeating channels mixes
  them and clears the axis.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes import dims
from eecompile.passes.annotations import Annotation, Protected
from eecompile.passes.context import AnalysisContext
from eecompile.passes.rules import register
from eecompile.passes.rules.base import OpRule
from eecompile.passes.rules.elementwise import bind_through
from eecompile.passes.rules.shape import take_blocks
from eecompile.passes.spaces import BasisClass


def _optional(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


def _listed_axes(node: gs.Node, ctx: AnalysisContext, rank: int, index: int) -> list[int] | None:
    """The axes an op's per-axis inputs refer to: its ``axes`` attribute or input, else all."""
    if "axes" in node.attrs:
        return [int(a) % rank for a in node.attrs["axes"]]
    tensor = _optional(node, index)
    if tensor is None:
        return list(range(rank))
    value = ctx.const(tensor)
    return None if value is None else [int(a) % rank for a in np.atleast_1d(value)]


MAX_PARTIAL_DEPTH = 24


def partial_array(ctx: AnalysisContext, tensor: gs.Tensor, depth: int = 0) -> np.ndarray | None:
    """A small integer tensor's elements where they are known (an object array, ``None`` where computed).

    Follows what torch's legacy ``F.pad`` lowering writes for run-time pads — Concat of constants and
    shape values, ``ConstantOfShape``, Reshape, Slice with any step (the reversed pad pairs), Transpose,
    Cast, Unsqueeze/Squeeze — so the pads of the axes that are constant are read even when those of the
    spatial axes depend on the run-time image size. Elsewhere a 1-D tensor's values come from
    :meth:`AnalysisContext.partial_values`; otherwise None.
    """
    value = ctx.const(tensor)
    if value is not None:
        return np.asarray(value).astype(object) if np.asarray(value).dtype.kind in "iub" else None
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if node is None or depth > MAX_PARTIAL_DEPTH:
        return None
    sub = [partial_array(ctx, t, depth + 1) if t.name else None for t in node.inputs]
    try:
        if node.op in ("Cast", "Identity") and sub[0] is not None:
            return sub[0]
        if node.op == "Concat" and all(x is not None for x in sub):
            return np.concatenate(sub, axis=int(node.attrs.get("axis", 0)))
        if node.op == "ConstantOfShape" and sub[0] is not None:
            shape = [int(d) for d in sub[0]] if all(d is not None for d in sub[0]) else None
            fill = node.attrs.get("value")
            fill = 0 if fill is None else int(np.asarray(fill.values if hasattr(fill, "values") else fill).reshape(-1)[0])
            return None if shape is None else np.full(shape, fill, dtype=object)
        if node.op == "Reshape" and sub[0] is not None and sub[1] is not None and None not in list(sub[1]):
            return sub[0].reshape([int(d) for d in sub[1]])
        if node.op == "Transpose" and sub[0] is not None:
            return np.transpose(sub[0], node.attrs.get("perm"))
        if node.op == "Slice" and sub[0] is not None and all(x is not None for x in sub[1:3]):
            rank = sub[0].ndim
            axes = sub[3] if len(sub) > 3 and sub[3] is not None else range(len(sub[1]))
            steps = sub[4] if len(sub) > 4 and sub[4] is not None else [1] * len(sub[1])
            index = [slice(None)] * rank
            for a, lo, hi, st in zip(axes, sub[1], sub[2], steps):
                if None in (a, lo, hi, st):
                    return None
                index[int(a) % rank] = slice(int(lo), int(hi), int(st))
            return sub[0][tuple(index)]
    except (ValueError, TypeError, IndexError):
        return None
    values = ctx.partial_values(tensor)
    return None if values is None else np.array(values, dtype=object)


class ResizeRule(OpRule):
    """Resize (opset 10+): any basis on an axis that is not resized."""

    op_types = ("Resize", "Upsample")

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        y = node.outputs[0]
        if x is None:
            ctx.set(y, None)
            return
        rank = ctx.rank(node.inputs[0])
        if not isinstance(x, Protected) or rank is None:
            ctx.clear_all(node, "resize of a non-feature tensor", node.inputs[:1])
            return
        kept = [a for a in (x.axis, x.head_axis) if a is not None]
        crop = node.attrs.get("coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize"
        if crop or not all(self._unscaled(node, ctx, a, rank) for a in kept):
            ctx.clear_all(node, "resize along the protected axis (or tf_crop_and_resize)", node.inputs[:1])
            return
        ctx.set(y, x)

    @staticmethod
    def _unscaled(node: gs.Node, ctx: AnalysisContext, axis: int, rank: int) -> bool:
        """Whether ``axis`` keeps its size and coordinates (scale exactly 1)."""
        if node.op == "Upsample":
            scales = ctx.const(_optional(node, 1)) if _optional(node, 1) is not None else node.attrs.get("scales")
            return scales is not None and float(np.atleast_1d(scales)[axis]) == 1.0
        axes = _listed_axes(node, ctx, rank, 4)
        if axes is None:
            return False
        if axis not in axes:
            return True
        i = axes.index(axis)
        scales = _optional(node, 2)
        value = ctx.const(scales) if scales is not None else None
        if value is not None and value.size:
            return float(value.reshape(-1)[i]) == 1.0
        sizes = _optional(node, 3)
        target = ctx.dim_values(sizes) if sizes is not None else None
        din = ctx.shape(node.inputs[0])
        policy = node.attrs.get("keep_aspect_ratio_policy", "stretch")
        return (target is not None and din is not None and i < len(target) and policy == "stretch"
                and dims.equal(target[i], din[axis]))


class PadRule(OpRule):
    """Pad (opset 2+): the fill and the padded axes decide what survives (see module docstring)."""

    op_types = ("Pad",)

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        """A graph input padded before its first op (a stem Conv's ``same`` padding) takes what that op binds,
        when the proposed axis is not padded."""
        rank = ctx.rank(node.inputs[0])
        if index != 0 or rank is None:
            return None
        found = bind_through(node, ctx)
        pads = self._pads(node, ctx, rank)
        if not isinstance(found, Protected) or pads is None or pads.get(found.axis, (0, 0)) != (0, 0):
            return None
        return found

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:  # noqa: C901 - one branch per case
        x = ctx.get(node.inputs[0])
        y = node.outputs[0]
        if x is None:
            ctx.set(y, None)
            return
        rank = ctx.rank(node.inputs[0])
        if not isinstance(x, Protected) or rank is None:
            ctx.clear_all(node, "pad of a non-feature tensor", node.inputs[:1])
            return
        pads = self._pads(node, ctx, rank)
        mode = node.attrs.get("mode", "constant")
        value = self._fill(node, ctx)
        if pads is None or None in pads[x.axis] or (x.head_axis is not None and pads[x.head_axis] != (0, 0)):
            ctx.clear_all(node, "pad of the protected axis with computed pads, or of a head axis", node.inputs[:1])
            return
        others = [p for a, p in pads.items() if a != x.axis]
        elsewhere = any(p != (0, 0) for p in others)
        if mode == "constant" and elsewhere and value != 0.0:
            if value is None:
                ctx.clear_all(node, "constant pad with a computed fill value", node.inputs[:1])
                return
            ctx.restrict(x, BasisClass.ONES_ORTHOGONAL, node,
                         f"padding with {value:g} writes it into every channel: only bases that map ones to ones keep it")
        before, after = pads[x.axis]
        if (before, after) == (0, 0):
            ctx.set(y, x)
            return
        if mode != "constant" or x.head_axis is not None:
            ctx.clear_all(node, f"{mode} pad of the protected axis mixes its coordinates", node.inputs[:1])
            return
        total = ctx.axis_size(x)
        lo, hi = max(0, -before), total - max(0, -after)
        if hi <= lo:
            ctx.clear_all(node, "pad crops the protected axis away", node.inputs[:1])
            return
        kept = take_blocks(ctx, x.refs, lo, hi)
        refs = [self._fill_block(node, ctx, before, "before")] if before > 0 else []
        refs.extend(kept)
        if after > 0:
            refs.append(self._fill_block(node, ctx, after, "after"))
        ctx.set(y, Protected(x.axis, tuple(refs)))

    @staticmethod
    def _fill_block(node: gs.Node, ctx: AnalysisContext, size: int, where: str):
        ref = ctx.spaces.new(f"{node.name}:{node.outputs[0].name}/pad_{where}", size, node.name)
        ctx.spaces.clear(ref, ctx.limit(node, "padded channels hold the fill value (clear part of a direct sum)"))
        return ref

    @staticmethod
    def _pads(node: gs.Node, ctx: AnalysisContext, rank: int) -> dict[int, tuple[int | None, int | None]] | None:
        """Per axis (begin, end), None where computed at run time; unlisted axes are (0, 0)."""
        if "pads" in node.attrs:  # opset < 11
            values: list | None = [int(v) for v in node.attrs["pads"]]
            axes: list[int] | None = list(range(rank))
        else:
            found = partial_array(ctx, node.inputs[1])
            values = None if found is None or found.ndim != 1 else [None if v is None else int(v) for v in found]
            axes = _listed_axes(node, ctx, rank, 3)
        if values is None or axes is None or len(values) != 2 * len(axes):
            return None
        out = {a: (0, 0) for a in range(rank)}
        for i, a in enumerate(axes):
            out[a] = (values[i], values[i + len(axes)])
        return out

    @staticmethod
    def _fill(node: gs.Node, ctx: AnalysisContext) -> float | None:
        """The constant fill value (0 when absent), None when computed."""
        if "value" in node.attrs:
            return float(node.attrs["value"])
        tensor = _optional(node, 2)
        if tensor is None:
            return 0.0
        value = ctx.const(tensor)
        return None if value is None or value.size != 1 else float(value.reshape(-1)[0])


register(ResizeRule())
register(PadRule())
