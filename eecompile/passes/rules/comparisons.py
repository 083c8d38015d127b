"""Comparisons of index values (token ids) with constants or with each other.

Token ids reach the server permuted, ``ids' = π(ids)``. ``Equal(ids, c)`` is exact on
ciphertext against the permuted constant, ``Equal(π(ids), π(c)) = Equal(ids, c)``, because
``π`` is a bijection — RoBERTa's position ids ``cumsum(input_ids != pad)`` and CLIP's
``input_ids == eos`` pooling read that way. Two index tensors of one permutation compare
equal exactly as in clear. An order comparison (``Less``, ``Greater``, ...) is exact only when
its result does not depend on the id at all (``ids < 0``, ``ids >= vocab``); any other one
clears the ids.

The result is a boolean mask in clear, the same on the server as in plaintext: it shows where
the compared token (pad, eos) stands — what an attention mask shows — not which tokens the
others are.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes.annotations import Annotation, IndexValues
from eecompile.passes.context import AnalysisContext, FoldContext
from eecompile.passes.rules import register, rule_for
from eecompile.passes.rules.base import OpRule

_ORDER = {"Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal, "GreaterOrEqual": np.greater_equal}


def _invariant(op: str, value: np.ndarray, size: int, ids_first: bool) -> bool:
    """Whether ``op(ids, value)`` (or ``op(value, ids)``) is the same for every id in ``[0, size)``.

    The comparison is monotone in the id, so agreeing at the first and the last id is enough.
    """
    compare = _ORDER[op]
    ends = [compare(i, value) if ids_first else compare(value, i) for i in (0, size - 1)]
    return bool(np.array_equal(ends[0], ends[1]))


class CompareRule(OpRule):
    """Equal / Less / Greater / LessOrEqual / GreaterOrEqual with index values on one or both sides."""

    op_types = ("Equal", *_ORDER)
    accepts_index = True

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        """A graph input compared first and looked up later (RoBERTa's position ids before the embedding)
        takes the annotation its next consumer would give it."""
        tensor = node.inputs[index]
        for consumer in tensor.outputs:
            rule = rule_for(consumer)
            if consumer is node or rule is None or isinstance(rule, CompareRule):
                continue
            ann = rule.bind_input(consumer, consumer.inputs.index(tensor), ctx)
            if isinstance(ann, IndexValues):
                return ann
        return None

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        a_t, b_t = node.inputs[:2]
        y = node.outputs[0]
        a, b = ctx.get(a_t), ctx.get(b_t)
        ctx.set(y, None)  # the mask is the same as in plaintext
        if a is None and b is None:
            return
        if not all(ann is None or isinstance(ann, IndexValues) for ann in (a, b)):
            ctx.clear_all(node, "comparison of protected values")
            return
        if isinstance(a, IndexValues) and isinstance(b, IndexValues):
            if node.op == "Equal" and ctx.spaces.size(a.ref) == ctx.spaces.size(b.ref):
                ctx.spaces.union(a.ref, b.ref, ctx.limit(node, "ids compared for equality share one permutation"))
            else:
                ctx.clear_all(node, "order comparison of two permuted id tensors")
            return
        ids, other = (a, b_t) if isinstance(a, IndexValues) else (b, a_t)
        value = ctx.const(other)
        size = ctx.spaces.size(ids.ref)
        if value is None or value.dtype.kind not in "iu":
            ctx.clear(ids, node, "ids compared with a computed or non-integer value")
        elif node.op != "Equal" and not _invariant(node.op, value, size, ids is a):
            ctx.clear(ids, node, f"{node.op} compares the order of ids, which a permutation does not keep")

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        if node.op != "Equal":
            return
        for index in (0, 1):
            ids = ctx.get(node.inputs[1 - index])
            value = ctx.const(node.inputs[index])
            if not isinstance(ids, IndexValues) or value is None or ctx.get(node.inputs[index]) is not None:
                continue
            basis = ctx.basis(ids.ref)
            if basis.is_identity:
                continue
            table = basis.inverse().index_map()  # what the client applies to ids (runtime.client._apply)
            inside = (value >= 0) & (value < len(table))
            permuted = np.where(inside, table[np.clip(value, 0, len(table) - 1)], value).astype(value.dtype)
            tensor = node.inputs[index]  # a fresh constant: the exporter may share the pad id with an Add
            fresh = gs.Constant(f"{tensor.name}_{node.name}_ids", permuted)
            node.inputs[index] = fresh
            ctx.mg.set_values(fresh, permuted)


register(CompareRule())
