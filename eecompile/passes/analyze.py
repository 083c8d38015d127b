"""Pass 2 — analyze: a dataflow over the graph, driven by the op-rule registry.

Walks the nodes in topological order; each rule reads its inputs' annotations, records
constraints on spaces (with the node and reason) and annotates its outputs. Graph inputs
are annotated by the first rule that reads them. An op without a rule clears the spaces
it touches and is reported; it never produces a wrong model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from eecompile.passes.annotations import IndexValues, Protected, Squares
from eecompile.passes.context import AnalysisContext
from eecompile.passes.graph import ModelGraph
from eecompile.passes.shape_completion import complete_shapes
from eecompile.passes import group_orders
from eecompile.passes.rules import SHAPE_ONLY_OPS, PatternInstance, patterns, rule_for
from eecompile.passes.rules.norms import GainFolds, settle_gains
from eecompile.passes.spaces import BasisClass, Limit

STATE_INPUT = re.compile(r"(^|[._/])past(_key_values\b|_key\b|_value\b|[._/]\d)", re.IGNORECASE)
POSITION_INPUT = re.compile(r"(^|[._/])(position_ids|positions?|cache_position|pos_ids)$", re.IGNORECASE)
"""Position ids stay clear: they are public by design, and a server that generates computes them itself."""
STATE_OUTPUT = re.compile(r"(^|[._/])present(_key_values\b|_key\b|_value\b|[._/]\d|[._/]key\b|[._/]value\b)",
                          re.IGNORECASE)


@dataclass
class UnsupportedOp:
    """A node whose op has no rule and that touched non-constant float data."""

    node: str
    op_type: str
    domain: str


@dataclass
class Analysis:
    """Result of the analysis pass."""

    mg: ModelGraph
    ctx: AnalysisContext
    instances: list[PatternInstance]
    unsupported: list[UnsupportedOp] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)
    state_inputs: list[str] = field(default_factory=list)
    state_outputs: list[str] = field(default_factory=list)
    gains: GainFolds = field(default_factory=GainFolds)
    group_orders: list = field(default_factory=list)
    """Grouped Convs whose groups the plan permutes (:mod:`~eecompile.passes.group_orders`)."""


def analyze(mg: ModelGraph) -> Analysis:
    """Annotate every tensor and build the constrained spaces of ``mg``."""
    ctx = AnalysisContext(mg)
    complete_shapes(ctx)
    graph_inputs = {t.name for t in mg.graph.inputs}
    bound: set[str] = set()
    claimed: dict[int, PatternInstance] = {}
    instances: list[PatternInstance] = []
    nodes = mg.nodes
    for pattern in patterns():
        for inst in pattern.match(nodes, ctx):
            if any(id(n) in claimed for n in inst.nodes):
                continue
            instances.append(inst)
            for n in inst.nodes:
                claimed[id(n)] = inst
    result = Analysis(mg, ctx, instances)
    for node in nodes:
        ctx.spaces.current = (node.name, node.op)
        inst = claimed.get(id(node))
        rule = None if inst else rule_for(node)
        for index, tensor in enumerate(node.inputs):
            if node.op in SHAPE_ONLY_OPS:
                break  # reads no values: leaves the input for a later consumer to bind
            if tensor.name in graph_inputs and tensor.name not in bound:
                bound.add(tensor.name)
                ann = inst.bind_input(node, index, ctx) if inst is not None else _bind(node, index, rule, ctx)
                if isinstance(ann, IndexValues) and POSITION_INPUT.search(tensor.name):
                    ctx.spaces.clear(ann.ref, ctx.limit(node, "position ids are public: the server computes "
                                                             "them when it generates"))
                    ann = None
                ctx.set(tensor, ann)
        if inst is not None:
            if node is inst.anchor:
                inst.analyze(ctx)
            continue
        _coerce_inputs(node, ctx, rule)
        if rule is None:
            _no_rule(node, ctx, result)
            continue
        if _pass_index_values(node, ctx, rule):
            continue
        rule.analyze(node, ctx)
    for tensor in mg.graph.outputs:
        ann = ctx.get(tensor)
        if isinstance(ann, Protected) and ann.head_tiled:
            ctx.clear(ann, _fake(tensor), "a head axis merged with another axis cannot leave the graph")
            ctx.set(tensor, None)
        if isinstance(ann, Squares):
            ctx.restrict(ann, BasisClass.PERMUTATION, _fake(tensor), "squares leave the graph")
            ctx.set(tensor, ann.source)
    result.gains = settle_gains(ctx, mg.graph.outputs, nodes)  # deferred norm gains: folded or bound
    result.state_inputs = [t.name for t in mg.graph.inputs if STATE_INPUT.search(t.name)]
    result.state_outputs = [t.name for t in mg.graph.outputs if STATE_OUTPUT.search(t.name)]
    _tie_vocabulary(result)
    ctx.spaces.settle_permutation_groups()  # a group with a clear (or per-pair) member cannot be permuted
    graph_io = {t.name for t in [*mg.graph.inputs, *mg.graph.outputs]}
    result.group_orders = group_orders.settle(ctx, nodes, set(claimed), graph_io)
    return result


def _bind(node: gs.Node, index: int, rule, ctx: AnalysisContext, depth: int = 0):
    """The annotation of graph input ``node.inputs[index]``, proposed by the first rule reading it.

    An op that keeps index values (``input_ids.view(-1, S)`` before the embedding Gather)
    proposes what its consumers would bind its output to.
    """
    if rule is None:
        return None
    ann = rule.bind_input(node, index, ctx)
    if ann is not None or not rule.keeps_index_values or index != 0 or depth > 8:
        return ann
    if not node.outputs or node.outputs[0].dtype is None or ctx.mg.is_float(node.outputs[0]):
        return None
    out = node.outputs[0]
    for consumer in out.outputs:
        found = _bind(consumer, consumer.inputs.index(out), rule_for(consumer), ctx, depth + 1)
        if isinstance(found, IndexValues):
            return found
    return None


def _pass_index_values(node: gs.Node, ctx: AnalysisContext, rule) -> bool:
    """Index values through an op that only moves them: the output carries the same ids."""
    if not rule.keeps_index_values or not node.inputs:
        return False
    ann = ctx.get(node.inputs[0])
    if not isinstance(ann, IndexValues):
        return False
    out = node.outputs[0]
    if out.dtype is None or ctx.mg.is_float(out):
        ctx.clear(ann, node, "index values used by an op that cannot read permuted ids")
        ctx.ann.pop(node.inputs[0].name, None)
        ctx.set(out, None)
    else:
        ctx.set(out, ann)
    for extra in node.outputs[1:]:
        ctx.set(extra, None)
    return True


def _fake(tensor: gs.Tensor) -> gs.Node:
    return gs.Node(op="GraphOutput", name=f"output:{tensor.name}")


def _coerce_inputs(node: gs.Node, ctx: AnalysisContext, rule) -> None:
    """Index values and squares reaching a rule that does not take them lose their protection."""
    for tensor in node.inputs:
        ann = ctx.get(tensor)
        if node.op in SHAPE_ONLY_OPS:
            return
        if isinstance(ann, IndexValues) and not (getattr(rule, "accepts_index", False)
                                                 or (tensor is node.inputs[0] and getattr(rule, "keeps_index_values", False))):
            ctx.clear(ann, node, "index values used by an op that cannot read permuted ids")
            ctx.ann.pop(tensor.name, None)
        elif isinstance(ann, Squares) and node.op not in ("ReduceMean", "ReduceSum"):
            ctx.restrict(ann, BasisClass.PERMUTATION, node, "squares used other than summed")
            ctx.ann[tensor.name] = ann.source


def _no_rule(node: gs.Node, ctx: AnalysisContext, result: Analysis) -> None:
    touched = [t for t in node.inputs if t.name and ctx.get(t) is not None]
    if node.op not in SHAPE_ONLY_OPS:
        data_inputs = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant) and ctx.mg.is_float(t)]
        if touched or data_inputs:
            result.unsupported.append(UnsupportedOp(node.name, node.op, node.domain or "ai.onnx"))
        ctx.clear_all(node, f"no rule for op {node.domain + '::' if node.domain else ''}{node.op}")
    else:
        for out in node.outputs:
            ctx.set(out, None)


def _tie_vocabulary(result: Analysis) -> None:
    """Token ids in and vocabulary logits out share one permutation (generated ids feed back)."""
    ctx = result.ctx
    ids = [ctx.get(t) for t in result.mg.graph.inputs]
    ids = [a for a in ids if isinstance(a, IndexValues)]
    for tensor in result.mg.graph.outputs:
        ann = ctx.get(tensor)
        if isinstance(ann, IndexValues):  # generated ids (in-graph ArgMax/TopK) must feed back as input ids
            for index in ids:
                if ctx.spaces.size(index.ref) == ctx.spaces.size(ann.ref):
                    ctx.spaces.union(index.ref, ann.ref, Limit(f"output:{tensor.name}", "Output",
                                     "generated ids share the token-id permutation so they feed back"))
                    result.policies.append(f"vocabulary tie: output '{tensor.name}' uses the token-id permutation")
                    break
            continue
        if not isinstance(ann, Protected) or ann.head_axis is not None:
            continue
        blocks = ctx.blocks(ann)
        rank = ctx.rank(tensor)
        if len(blocks) != 1 or rank is None or ann.axis != rank - 1:
            continue
        for index in ids:
            if ctx.spaces.size(index.ref) == ctx.spaces.size(blocks[0]):
                ctx.spaces.union(index.ref, blocks[0], Limit(f"output:{tensor.name}", "Output",
                                 "vocabulary logits share the token-id permutation so generated ids feed back"))
                result.policies.append(
                    f"vocabulary tie: output '{tensor.name}' uses the token-id permutation")
                break
