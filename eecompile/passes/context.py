"""State shared by the op rules: annotations during analysis, bases during folding."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes import dims
from eecompile.passes.annotations import Annotation, IndexValues, Protected, Squares
from eecompile.passes.basis import AxisBasis, Basis
from eecompile.passes.graph import ModelGraph
from eecompile.passes.group_orders import orders_of
from eecompile.passes.precision import numpy_dtype, store_as
from eecompile.passes.spaces import BasisClass, Limit, Ref, SpaceTable
from eecompile.passes.weight_fold import FoldAxisBasis


class AnalysisContext:
    """What an op rule sees while the analysis walks the graph."""

    def __init__(self, mg: ModelGraph, spaces: SpaceTable | None = None) -> None:
        self.mg = mg
        self.spaces = spaces or SpaceTable()
        self.ann: dict[str, Annotation] = {}
        self.shape_overrides: dict[str, list] = {}

    # -- lookups -------------------------------------------------------------------------
    def get(self, tensor: gs.Tensor | None) -> Annotation:
        """The annotation of a tensor (None: clear, constant, or missing)."""
        if tensor is None or not tensor.name:
            return None
        return self.ann.get(tensor.name)

    def set(self, tensor: gs.Tensor, ann: Annotation) -> None:
        """Record the annotation of an output tensor."""
        if not tensor.name:
            return
        if ann is None:
            self.ann.pop(tensor.name, None)
            return
        self.ann[tensor.name] = ann
        for ref in self.refs_of(ann):
            self.spaces.note_tensor(ref, tensor.name)

    def const(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        """Value of a constant input, else None (reads the values: use const_shape for weights)."""
        return self.mg.const(tensor)

    def const_shape(self, tensor: gs.Tensor | None) -> tuple[int, ...] | None:
        """Shape of a constant input without reading it, else None."""
        return self.mg.const_shape(tensor)

    def shape(self, tensor: gs.Tensor) -> list | None:
        """Shape of a tensor (ints, symbols or None), None when unknown."""
        if tensor.name in self.shape_overrides:
            return self.shape_overrides[tensor.name]
        return self.mg.shape(tensor)

    def partial_values(self, tensor: gs.Tensor) -> list[int | None] | None:
        """Element values of a small 1-D integer tensor where they are constant (shape tensors)."""
        values = self.dim_values(tensor)
        return None if values is None else [dims.as_int(v) for v in values]

    def rank(self, tensor: gs.Tensor) -> int | None:
        """Rank of a tensor (completed shapes included), None when unknown."""
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def dim_values(self, tensor: gs.Tensor, depth: int = 0) -> list | None:
        """Element values of a 1-D shape tensor as symbolic dims (sympy; None where unknown).

        Follows the run-time shape arithmetic exporters emit — Shape (with start/end),
        Gather, Slice, Concat, Unsqueeze/Squeeze/Reshape/Cast, and Add/Sub/Mul/Div — so a
        Reshape target ``Concat(Shape(x)[0:1], Shape(m)[1:2], [-1], [16])`` reads
        ``[batch, sequence, -1, 16]`` when shape inference has left ``unk__N``.
        """
        value = self.const(tensor)
        if value is not None:
            if value.dtype.kind not in "iu" or value.ndim > 1:
                return None
            return [dims.expr(int(v)) for v in np.atleast_1d(value)]
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None or depth > 32:
            return None
        op, ins = producer.op, producer.inputs
        if op == "Shape":
            shape = self.shape(ins[0])
            if shape is None:
                return None
            start, end = producer.attrs.get("start", 0), producer.attrs.get("end", len(shape))
            return [dims.expr(d) for d in shape[slice(start, end)]]
        if op in ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze"):
            return self.dim_values(ins[0], depth + 1)
        if op == "Concat":
            out: list = []
            for part in ins:
                values = self.dim_values(part, depth + 1)
                if values is None:
                    shape = self.shape(part)
                    if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
                        return None
                    values = [None] * shape[0]
                out.extend(values)
            return out
        if op in ("Gather", "Slice"):
            data = self.dim_values(ins[0], depth + 1)
            if data is None:
                return None
            if op == "Gather":
                index = self.const(ins[1])
                if index is None:
                    return None
                return [data[int(i)] for i in np.atleast_1d(index)]
            starts, ends = self.const(ins[1]), self.const(ins[2])
            steps = self.const(ins[4]) if len(ins) > 4 and ins[4].name else None
            if starts is None or ends is None:
                return None
            step = 1 if steps is None else int(np.atleast_1d(steps)[0])
            return data[slice(int(np.atleast_1d(starts)[0]), int(np.atleast_1d(ends)[0]), step)]
        if op in ("Add", "Sub", "Mul", "Div", "Equal", "Where"):
            parts = [self.dim_values(t, depth + 1) for t in ins[:3 if op == "Where" else 2]]
            if any(p is None for p in parts):
                return None
            width = max(len(p) for p in parts)
            parts = [p * width if len(p) == 1 else p for p in parts]
            return [_arith(op, *xs) for xs in zip(*parts)]
        return None

    @staticmethod
    def limit(node: gs.Node, reason: str) -> Limit:
        """A limit record naming ``node``."""
        return Limit(node.name, node.op, reason)

    # -- spaces --------------------------------------------------------------------------
    def fresh(self, node: gs.Node, tensor: gs.Tensor, axis: int, size: int) -> Protected:
        """A new protected annotation with one fresh space on ``axis``."""
        ref = self.spaces.new(f"{node.name or node.op}:{tensor.name}", size, node.name)
        return Protected(axis, (ref,))

    def blocks(self, prot: Protected) -> tuple[Ref, ...]:
        """The current (split-resolved) blocks of a flat protected axis."""
        return self.spaces.expand(prot.refs)

    def head_refs(self, prot: Protected) -> tuple[Ref, ...]:
        """Per-head references of a headed annotation, roots resolved (not expanded)."""
        return tuple(self.spaces.find(r) for r in prot.refs)

    def refs_of(self, ann: Annotation) -> tuple[Ref, ...]:
        """Every space reference an annotation mentions."""
        if isinstance(ann, Protected):
            return ann.refs
        if isinstance(ann, IndexValues):
            return (ann.ref,)
        if isinstance(ann, Squares):
            return ann.source.refs
        return ()

    def restrict(self, ann: Annotation, cls: BasisClass, node: gs.Node, reason: str) -> None:
        """Restrict every space of ``ann`` to ``cls``."""
        for ref in self.refs_of(ann):
            self.spaces.restrict(ref, cls, self.limit(node, reason))

    def clear(self, ann: Annotation, node: gs.Node, reason: str) -> None:
        """Force every space of ``ann`` to clear."""
        self.restrict(ann, BasisClass.CLEAR, node, reason)

    def clear_all(self, node: gs.Node, reason: str, tensors: Iterable[gs.Tensor] | None = None) -> None:
        """Clear the spaces of all (or the given) inputs of ``node``; outputs become clear."""
        for tensor in node.inputs if tensors is None else tensors:
            self.clear(self.get(tensor), node, reason)
        for out in node.outputs:
            self.set(out, None)

    def unify(self, a: Protected, b: Protected, node: gs.Node, reason: str) -> bool:
        """Require two annotations on the same axis layout to share their bases."""
        limit = self.limit(node, reason)
        if (a.head_axis is None) != (b.head_axis is None) or a.head_tiled != b.head_tiled:
            return False
        if a.head_axis is not None:
            if len(a.refs) != len(b.refs):
                return False
            for ra, rb in zip(a.refs, b.refs):
                self.spaces.union(ra, rb, limit)
            return True
        cuts_a, cuts_b = self.cuts(a), self.cuts(b)
        if cuts_a[-1] != cuts_b[-1]:
            return False
        cuts = sorted(set(cuts_a) | set(cuts_b))
        ra = self.spaces.refine(a.refs, cuts)
        rb = self.spaces.refine(b.refs, cuts)
        for x, y in zip(ra, rb):
            self.spaces.union(x, y, limit)
        return True

    def cuts(self, prot: Protected) -> list[int]:
        """Cumulative block boundaries of a flat protected axis."""
        out, offset = [], 0
        for ref in self.blocks(prot):
            offset += self.spaces.size(ref)
            out.append(offset)
        return out

    def axis_size(self, prot: Protected) -> int:
        """Size of the protected feature axis."""
        if prot.head_axis is not None:
            return self.spaces.size(prot.refs[0])
        return sum(self.spaces.size(r) for r in self.blocks(prot))


class FoldContext:
    """What an op rule sees while folding: annotations and the planned bases."""

    def __init__(self, mg: ModelGraph, ann: dict[str, Annotation], spaces: SpaceTable,
                 bases: dict[int, Basis], block_orders=()) -> None:
        self.mg = mg
        self.ann = ann
        self.spaces = spaces
        self.bases = bases
        self.block_orders: list[tuple[tuple[int, ...], np.ndarray]] = list(block_orders)
        self._dual_cache: dict[int, Basis] = {}

    def get(self, tensor: gs.Tensor | None) -> Annotation:
        """The annotation of a tensor."""
        if tensor is None or not tensor.name:
            return None
        return self.ann.get(tensor.name)

    def const(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        """Value of a constant input, else None."""
        return self.mg.const(tensor)

    def const_shape(self, tensor: gs.Tensor | None) -> tuple[int, ...] | None:
        """Shape of a constant input without reading it, else None."""
        return self.mg.const_shape(tensor)

    def basis(self, ref: Ref) -> Basis:
        """The concrete basis of one (unsplit) space reference."""
        root = self.spaces.find(ref)
        leaf = self.spaces.leaves[root.space]
        if leaf.children:
            raise ValueError("basis() of a split space; use axis_basis")
        base = self.bases[root.space]
        if not root.dual:
            return base
        if root.space not in self._dual_cache:
            self._dual_cache[root.space] = base.dual()
        return self._dual_cache[root.space]

    def axis_basis(self, prot: Protected | Iterable[Ref]) -> AxisBasis:
        """The basis of a flat axis: its blocks in order, whole blocks moved where a grouped Conv's groups are
        permuted (products into one preallocated array, see :class:`FoldAxisBasis`)."""
        refs = prot.refs if isinstance(prot, Protected) else tuple(prot)
        expanded = self.spaces.expand(refs)
        blocks = tuple(self.basis(r) for r in expanded)
        order = orders_of([r.space for r in expanded], self.block_orders) if self.block_orders else None
        if order is None:
            return FoldAxisBasis(blocks)
        return FoldAxisBasis(tuple(blocks[i] for i in order), order)

    def head_bases(self, prot: Protected) -> list[AxisBasis]:
        """Per-head bases of a headed annotation."""
        return [self.axis_basis((r,)) for r in prot.refs]

    def set_const(self, node: gs.Node, index: int, value: np.ndarray) -> None:
        """Replace constant input ``index`` of ``node`` with ``value`` (its dtype kept).

        Folds compute in float64; the result is rounded once into the constant's own type (float16 and
        bfloat16 weights stay float16 and bfloat16: :func:`~eecompile.passes.precision.store_as`)."""
        tensor = node.inputs[index]
        dtype = numpy_dtype(tensor.dtype) if tensor.dtype is not None else np.asarray(tensor.values).dtype
        self.mg.set_values(tensor, store_as(value, dtype))


def _arith(op: str, x, y, z=None):
    """One element of shape arithmetic on symbolic dims (None when unknown or not exact)."""
    if op == "Where":
        cond = dims.as_int(x)
        return None if cond is None else (y if cond else z)
    if x is None or y is None:
        return None
    if op == "Equal":
        return dims.expr(1 if dims.equal(x, y) else 0) if dims.equal(x, y) or (x.is_Integer and y.is_Integer) else None
    if op == "Add":
        return x + y
    if op == "Sub":
        return x - y
    if op == "Mul":
        return x * y
    return dims.quotient(x, y)


def apply_on_axis(ctx: FoldContext, array: np.ndarray, prot: Protected, rank: int,
                  transform: str = "right") -> np.ndarray:
    """Express a broadcastable constant in the basis of ``prot`` (output coordinates of rank ``rank``).

    ``transform`` is ``right`` (c @ T), ``inverse`` (c @ T^-1), ``dual`` (c @ T^-T) or ``perm``
    (only the permutation of a monomial basis: a per-coordinate gain of a monomial space). The
    constant is broadcast along the protected (and head) axis when needed.
    """
    array = np.asarray(array, dtype=np.float64)
    original_ndim = array.ndim
    return _compact(_apply_on_axis(ctx, array.reshape((1,) * (rank - array.ndim) + array.shape), prot, transform),
                    original_ndim)


def _compact(array: np.ndarray, ndim: int) -> np.ndarray:
    """Drop leading singleton axes down to ``ndim`` (a folded 1-D bias stays 1-D, keeping ORT fusions)."""
    while array.ndim > max(ndim, 1) and array.shape[0] == 1:
        array = array[0]
    return array


def _apply_on_axis(ctx: FoldContext, array: np.ndarray, prot: Protected, transform: str) -> np.ndarray:
    pick = {"right": lambda b: b, "inverse": lambda b: b.inverse(), "dual": lambda b: b.dual(),
            "perm": lambda b: FoldAxisBasis(tuple(_perm_only(x) for x in b.blocks))}[transform]
    if prot.head_axis is None:
        return pick(ctx.axis_basis(prot)).right(array, prot.axis)
    if prot.head_tiled:
        raise ValueError("a constant cannot be folded along a head axis merged with another axis")
    heads = len(prot.refs)
    shape = list(array.shape)
    shape[prot.head_axis] = heads
    array = np.broadcast_to(array, shape)
    parts = []
    for h, basis in enumerate(ctx.head_bases(prot)):
        part = np.take(array, [h], axis=prot.head_axis)
        parts.append(pick(basis).right(part, prot.axis))
    return np.concatenate(parts, axis=prot.head_axis)


def _perm_only(basis: Basis) -> Basis:
    if basis.dense is not None:
        raise ValueError("a per-coordinate constant needs a monomial basis")
    return Basis(basis.size, perm=basis.perm)
