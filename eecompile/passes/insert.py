"""Pass 4 — insert: the basis changes left at the graph boundary become the client shim.

Every graph input and output gets a :class:`BoundaryTransform`: the basis change the
client applies before sending (inputs) or after receiving (outputs). Interior basis
changes are not materialised as nodes: each rule folds its pair ``T · T⁻¹`` directly into
its constants (pass 5), which keeps the graph's topology — and every ONNX Runtime fusion —
exactly as exported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eecompile.passes.analyze import Analysis
from eecompile.passes.annotations import IndexValues, Protected
from eecompile.passes.basis import AxisBasis, Basis
from eecompile.passes.context import FoldContext
from eecompile.passes.plan import Plan, describe


@dataclass
class BoundaryTransform:
    """How the client encrypts one input (or decrypts one output).

    ``kind`` is ``clear`` (sent as is), ``state`` (server-side state passed through
    untouched, e.g. a KV cache), ``axis`` (``x @ T`` along ``axis``, ``heads`` holding one
    basis per index of ``head_axis`` when set) or ``index`` (integer values permuted).
    """

    name: str
    kind: str
    axis: int | None = None
    head_axis: int | None = None
    rank: int | None = None
    basis: str = ""
    heads: list[AxisBasis] = field(default_factory=list)
    index: Basis | None = None

    @property
    def protection(self) -> str:
        """A short description for the report."""
        if self.kind == "axis":
            where = f"axis {self.axis}" + (f", per index of axis {self.head_axis}" if self.head_axis is not None else "")
            if all(h.is_identity for h in self.heads):
                return "clear (identity basis)"
            return f"basis change on {where}" + (f": {self.basis}" if self.basis else "")
        if self.kind == "index":
            return f"permuted index values ({self.index.size} classes)"
        if self.kind == "state":
            return "server-side state (ciphertext, passed through)"
        return "clear"


@dataclass
class BoundarySpec:
    """Transforms for all graph inputs and outputs, in graph order."""

    inputs: list[BoundaryTransform]
    outputs: list[BoundaryTransform]


def boundary_transform(name: str, ann, ctx: FoldContext, state: bool, rank: int | None) -> BoundaryTransform:
    """The client-side transform for one boundary tensor with annotation ``ann``."""
    if state:
        return BoundaryTransform(name, "state")
    if isinstance(ann, IndexValues):
        basis = ctx.basis(ann.ref)
        if basis.is_identity:
            return BoundaryTransform(name, "clear")
        return BoundaryTransform(name, "index", index=basis)
    if isinstance(ann, Protected):
        heads = [ctx.axis_basis(ann)] if ann.head_axis is None else ctx.head_bases(ann)
        if all(h.is_identity for h in heads):
            return BoundaryTransform(name, "clear")
        if rank is None:
            raise ValueError(f"boundary tensor {name} has unknown rank")
        classes = sorted({describe(ctx.spaces.cls(r)) for r in ctx.spaces.expand(ann.refs)})
        return BoundaryTransform(name, "axis", axis=ann.axis, head_axis=ann.head_axis, rank=rank,
                                 basis=", ".join(classes), heads=heads)
    return BoundaryTransform(name, "clear")


def insert(analysis: Analysis, plan: Plan) -> BoundarySpec:
    """Boundary transforms for every graph input and output."""
    ctx = FoldContext(analysis.mg, analysis.ctx.ann, analysis.ctx.spaces, plan.bases)
    mg = analysis.mg
    inputs = [boundary_transform(t.name, ctx.get(t), ctx, t.name in analysis.state_inputs, mg.rank(t))
              for t in mg.graph.inputs]
    outputs = [boundary_transform(t.name, ctx.get(t), ctx, t.name in analysis.state_outputs, mg.rank(t))
               for t in mg.graph.outputs]
    return BoundarySpec(inputs, outputs)
