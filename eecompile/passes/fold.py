"""Pass 5 — fold: absorb every basis change into the neighbouring constants.

Each node's rule rewrites its own constant inputs for the planned bases; pattern
instances fold their subgraphs. After this pass the graph computes ``F'`` on ciphertext.
"""

from __future__ import annotations

from eecompile.passes.analyze import Analysis
from eecompile.passes.context import FoldContext
from eecompile.passes.plan import Plan
from eecompile.passes.rules import rule_for


def fold(analysis: Analysis, plan: Plan) -> FoldContext:
    """Rewrite the constants of ``analysis.mg`` in place; return the fold context used."""
    ctx = FoldContext(analysis.mg, analysis.ctx.ann, analysis.ctx.spaces, plan.bases)
    claimed = {id(n) for inst in analysis.instances for n in inst.nodes}
    for inst in analysis.instances:
        inst.fold(ctx)
    for node in analysis.mg.nodes:
        if id(node) in claimed:
            continue
        rule = rule_for(node)
        if rule is not None:
            rule.fold(node, ctx)
    return ctx
