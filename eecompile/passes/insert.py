"""Pass 4 — insert: the basis changes left at the graph boundary become the client shim.

Every graph input and output gets a :class:`BoundaryTransform`: the basis change the
client applies before sending (inputs) or after receiving (outputs). Interior basis
changes are not materialised as nodes: each rule folds its pair ``T · T⁻¹`` directly into
its constants (pass 5), which keeps the graph's topology — and every ONNX Runtime fusion —
exactly as exported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
    ``gain`` (outputs only, flat ``axis`` transforms): a norm's per-coordinate gain folded out of
    the server; decrypting multiplies it in along ``axis`` after the basis change.
    """

    name: str
    kind: str
    axis: int | None = None
    head_axis: int | None = None
    rank: int | None = None
    basis: str = ""
    heads: list[AxisBasis] = field(default_factory=list)
    index: Basis | None = None
    gain: np.ndarray | None = None

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


def with_gain(t: BoundaryTransform, axis: int, gain: np.ndarray, rank: int | None) -> BoundaryTransform:
    """``t`` with a client-side output gain along ``axis`` (a clear output becomes an identity-basis one)."""
    if t.kind == "clear":
        if rank is None:
            raise ValueError(f"boundary tensor {t.name} has unknown rank")
        t = BoundaryTransform(t.name, "axis", axis=axis, rank=rank, heads=[AxisBasis((Basis.identity(gain.size),))])
    if t.kind != "axis" or t.head_axis is not None or t.axis % t.rank != axis % t.rank or t.heads[0].size != gain.size:
        raise ValueError(f"output {t.name}: a folded gain needs a flat transform on axis {axis}")
    t.gain = np.asarray(gain, dtype=np.float64)
    return t


def insert(analysis: Analysis, plan: Plan) -> BoundarySpec:
    """Boundary transforms for every graph input and output (outputs carry the gains folded out of the server)."""
    ctx = FoldContext(analysis.mg, analysis.ctx.ann, analysis.ctx.spaces, plan.bases, plan.block_orders)
    mg = analysis.mg
    inputs = [boundary_transform(t.name, ctx.get(t), ctx, t.name in analysis.state_inputs, mg.rank(t))
              for t in mg.graph.inputs]
    outputs = []
    for t in mg.graph.outputs:
        transform = boundary_transform(t.name, ctx.get(t), ctx, t.name in analysis.state_outputs, mg.rank(t))
        if t.name in analysis.gains.output_gains:
            transform = with_gain(transform, *analysis.gains.output_gains[t.name], mg.rank(t))
        outputs.append(transform)
    return BoundarySpec(inputs, outputs)
