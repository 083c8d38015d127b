"""The op-rule interface. One rule per op family; the solver never knows op names."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from eecompile.passes.annotations import Annotation
from eecompile.passes.context import AnalysisContext, FoldContext


class OpRule:
    """How one op family transforms protected axes, and how it folds its constants.

    ``analyze`` reads the input annotations, records constraints on spaces and sets the
    output annotations. ``fold`` rewrites the node's constant inputs for the planned bases.
    ``bind_input`` proposes an annotation for a graph input this node is the first to read.
    """

    op_types: tuple[str, ...] = ()
    domain: str = ""
    keeps_index_values: bool = False
    """The op moves or copies integer values without changing them (Reshape, Squeeze, Slice,
    Cast between integer types): index values pass through it, and a graph input it reads
    is bound by what its consumers read."""

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        """Annotation for graph input ``node.inputs[index]`` (default: clear)."""
        return None

    def keeps_block_order(self, node: gs.Node, ctx: AnalysisContext) -> bool:
        """Whether ``fold`` is right when a tensor of ``node`` has whole blocks moved in its basis (a grouped
        Conv's groups permuted, :mod:`~eecompile.passes.group_orders`): it folds only through whole-axis
        ``AxisBasis`` products, or folds nothing. Default: no."""
        return False

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        """Propagate annotations through ``node`` and record constraints."""
        raise NotImplementedError

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        """Rewrite the node's constants for the planned bases (default: nothing to fold)."""


class Pattern:
    """A multi-node subgraph handled as one unit (RoPE's rotate_half, ...)."""

    name: str = ""

    def match(self, nodes: list[gs.Node], ctx: AnalysisContext) -> list["PatternInstance"]:
        """All non-overlapping instances in the graph."""
        raise NotImplementedError


class PatternInstance:
    """One matched subgraph: analysed when its last node is reached."""

    def __init__(self, nodes: list[gs.Node], anchor: gs.Node) -> None:
        self.nodes = nodes
        self.anchor = anchor

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        """Annotation for graph input ``node.inputs[index]`` that node ``node`` of the subgraph reads first."""
        return None

    def analyze(self, ctx: AnalysisContext) -> None:
        """Propagate annotations through the whole subgraph."""
        raise NotImplementedError

    def fold(self, ctx: FoldContext) -> None:
        """Fold the subgraph's constants (default: none)."""
