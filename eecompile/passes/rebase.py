"""The ``rebase`` policy: a dense re-basing MatMul where an op binds a space to a permutation.

Some spaces are bound to a (signed, scaled) permutation by an op whose constants cannot be folded
away: a norm gain that feeds the residual stream itself (post-LN BERT, CLIP-vision's
``pre_layrnorm``), a nonlinearity at the origin of the stream (Whisper's GELU stem). DESIGN §1: the
stream can still take a dense basis if extra work is inserted. This pass inserts ``y = x · I``
(a d×d MatMul by the identity) right after the binding op, where the protected axis is last, and
rewires every consumer to ``y``; the analysis then runs again: ``y`` starts a fresh space, the binding
op's own space ends at the MatMul, and a gain right before it folds into it (``diag(g)``). The model
computes the same function; the server runs one more d×d MatMul per inserted point, which
``eecompile bench`` measures. The default policy inserts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes.analyze import Analysis, analyze
from eecompile.passes.annotations import Protected
from eecompile.passes.graph import ModelGraph
from eecompile.passes.options import POLICIES
from eecompile.passes.spaces import BasisClass, Ref

REBASE_CLASSES = frozenset({BasisClass.PERMUTATION, BasisClass.SIGNED_PERMUTATION, BasisClass.MONOMIAL,
                            BasisClass.POSITIVE_MONOMIAL})
"""Weak classes a re-basing MatMul lifts (pair classes and clear spaces are left alone)."""
MAX_ROUNDS = 4


@dataclass(frozen=True)
class RebasePoint:
    """Where a re-basing MatMul goes: after ``tensor`` (protected on its last axis, ``size`` wide)."""

    tensor: str
    binding_node: str
    binding_op: str
    size: int
    space: int


def binding_limit(analysis: Analysis, root: int):
    """The limit that set the space's current class (the op binding it), or None."""
    leaf = analysis.ctx.spaces.root_leaf(Ref(root))
    for cls, limit in reversed(leaf.limits):
        if cls == leaf.cls:
            return limit
    return None


def _roots(analysis: Analysis, ann) -> tuple | None:
    ctx = analysis.ctx
    if not isinstance(ann, Protected) or ann.head_axis is not None or ann.head_tiled:
        return None
    return tuple(ctx.spaces.find(r) for r in ctx.blocks(ann))


MIXING_OPS = frozenset({"Add", "Sub", "Sum"})
NORM_OPS = frozenset({"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
                      "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"})


def _lifts_something(analysis: Analysis, tensor: gs.Tensor, roots: tuple, budget: int = 256) -> bool:
    """Whether the space goes on past ``tensor`` into ops that bring in other activations or normalise
    (a residual stream), rather than only into scalings and moves before a linear layer (an MLP's GELU):
    only then does a fresh space after ``tensor`` hide more than the permuted tensor shows already."""
    ctx = analysis.ctx
    stack, seen = [tensor], set()
    while stack and len(seen) < budget:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        for consumer in t.outputs:
            if consumer.op in NORM_OPS:
                return True
            if consumer.op in MIXING_OPS and any(i is not t and i.name and not isinstance(i, gs.Constant)
                                                 and ctx.get(i) is not None for i in consumer.inputs):
                return True
            stack.extend(o for o in consumer.outputs if _roots(analysis, ctx.get(o)) == roots)
    return False


def _point_after(analysis: Analysis, node: gs.Node, roots: tuple) -> gs.Tensor | None:
    """The first tensor from ``node``'s outputs, along single consumers that keep its space, whose
    protected axis is last (the binding op itself, or a Transpose after it)."""
    ctx = analysis.ctx
    for out in node.outputs:
        tensor, steps = out, 0
        while tensor is not None and _roots(analysis, ctx.get(tensor)) == roots and steps < 8:
            rank = ctx.rank(tensor)
            if rank is not None and ctx.get(tensor).axis == rank - 1:
                return tensor if _lifts_something(analysis, tensor, roots) else None
            users = [c for c in tensor.outputs if c.op not in ("Shape", "Size")]
            tensor = users[0].outputs[0] if len(users) == 1 and users[0].outputs else None
            steps += 1
    return None


def rebase_points(analysis: Analysis) -> list[RebasePoint]:
    """Where the rebase policy would insert a re-basing MatMul in this analysed graph.

    Every norm whose gain is bound (see :func:`eecompile.passes.rules.norms.settle_gains`), and for every
    other space of a permutation-type class the op that set that class, when its output carries the space
    on into a norm or a sum with other activations (a residual stream, see :func:`_lifts_something`).
    """
    ctx, mg = analysis.ctx, analysis.mg
    by_name = {n.name: n for n in mg.nodes}
    points: dict[str, RebasePoint] = {}

    def add(node: gs.Node, tensor: gs.Tensor, root: int) -> None:
        ann = ctx.get(tensor)
        if tensor.name not in points and isinstance(ann, Protected):
            points[tensor.name] = RebasePoint(tensor.name, node.name, node.op, ctx.axis_size(ann), root)

    for norm, *_ in analysis.gains.binding:
        node = by_name.get(norm)
        ann = ctx.get(node.outputs[0]) if node is not None else None
        roots = _roots(analysis, ann)
        if roots:
            add(node, node.outputs[0], roots[0].space)
    bound = {p.binding_node for p in points.values()}
    for root in ctx.spaces.top_roots():
        if ctx.spaces.leaves[root].cls not in REBASE_CLASSES:
            continue
        limit = binding_limit(analysis, root)
        node = by_name.get(limit.node) if limit is not None else None
        if node is None or node.name in bound:
            continue
        for out in node.outputs:
            roots = _roots(analysis, ctx.get(out))
            if roots and any(r.space == root for r in roots):
                tensor = _point_after(analysis, node, roots)
                if tensor is not None:
                    add(node, tensor, root)
                break
    return list(points.values())


def insert_rebases(mg: ModelGraph, points: list[RebasePoint]) -> list[str]:
    """Insert ``x · I`` after each point's tensor and rewire its consumers; returns the new node names."""
    tensors = mg.graph.tensors()
    names = []
    for point in points:
        x = tensors[point.tensor]
        consumers = list(x.outputs)
        dtype = np.dtype(x.dtype) if x.dtype is not None else np.float32
        weight = gs.Constant(f"{point.binding_node}/rebase_weight", np.zeros(0, dtype))
        mg.set_values(weight, np.eye(point.size, dtype=dtype))
        y = gs.Variable(f"{point.tensor}_rebased", dtype=x.dtype, shape=x.shape)
        node = gs.Node("MatMul", f"{point.binding_node}/rebase", inputs=[x, weight], outputs=[y])
        for consumer in consumers:
            for i, t in enumerate(consumer.inputs):
                if t is x:
                    consumer.inputs[i] = y
        mg.graph.nodes.append(node)
        names.append(node.name)
    mg.refresh()
    return names


def analyze_with_policy(mg: ModelGraph, policy: str = "default") -> Analysis:
    """Analyse ``mg``; under ``rebase``, insert re-basing MatMuls and analyse again until none helps.

    The gains folded in one round (graph outputs' client gains among them) carry over to the next, and the
    report's policies name the policy, the points and their cost.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
    analysis = analyze(mg)
    if policy == "default":
        return analysis
    inserted: list[tuple[RebasePoint, str]] = []
    for _ in range(MAX_ROUNDS):
        points = rebase_points(analysis)
        if not points:
            break
        names = insert_rebases(mg, points)
        inserted.extend(zip(points, names))
        previous = analysis.gains
        analysis = analyze(mg)
        analysis.gains.folded[:0] = previous.folded
        analysis.gains.output_gains = {**previous.output_gains, **analysis.gains.output_gains}
    if inserted:
        where = ", ".join(f"{p.binding_op} '{p.binding_node}' ({p.size}×{p.size})" for p, _ in inserted)
        analysis.policies.append(f"policy rebase: {len(inserted)} dense re-basing MatMul(s) inserted (one d×d "
                                 f"MatMul per point, measured by `eecompile bench`) after the ops binding their "
                                 f"spaces: {where}")
    else:
        analysis.policies.append("policy rebase: no space is bound where a re-basing MatMul would lift it; "
                                 "nothing inserted")
    return analysis
