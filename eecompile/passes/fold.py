"""Pass 5 — fold: absorb every basis change into the neighbouring constants.

Each node's rule rewrites its own constant inputs for the planned bases; pattern
instances fold their subgraphs. After this pass the graph computes ``F'`` on ciphertext.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes.analyze import Analysis
from eecompile.passes.context import FoldContext
from eecompile.passes.plan import Plan
from eecompile.passes.rules import rule_for
from eecompile.passes.weight_fold import FoldScratch


def fold(analysis: Analysis, plan: Plan, progress: bool | None = False) -> FoldContext:
    """Rewrite the constants of ``analysis.mg`` in place; return the fold context used.

    ``progress``: a bar on stderr (weights folded / total, in bytes, with an ETA); None shows it
    when stderr is a terminal.
    """
    ctx = FoldContext(analysis.mg, analysis.ctx.ann, analysis.ctx.spaces, plan.bases, plan.block_orders)
    claimed = {id(n) for inst in analysis.instances for n in inst.nodes}
    work: list[tuple[object, gs.Node | None, int, int]] = []  # (what folds, node, weight bytes, weight count)
    for inst in analysis.instances:
        size, count = _weights(n for node in inst.nodes for n in node.inputs)
        work.append((inst, None, size, count))
    for node in analysis.mg.nodes:
        if id(node) in claimed:
            continue
        rule = rule_for(node)
        if rule is not None:
            size, count = _weights(node.inputs)
            work.append((rule, node, size, count))
    bar = _bar(progress, sum(w[2] for w in work), sum(w[3] for w in work))
    done = 0
    with FoldScratch():  # the products' work buffers are reused from one weight to the next
        for what, node, size, count in work:
            if node is None:
                what.fold(ctx)
            else:
                what.fold(node, ctx)
            if bar is not None:
                done += count
                bar.set_postfix_str(f"{done} tensors", refresh=False)
                bar.update(size)
    if bar is not None:
        bar.close()
    return ctx


def _weights(tensors) -> tuple[int, int]:
    """Bytes and number of the constant inputs (without reading them)."""
    size = count = 0
    for tensor in tensors:
        if isinstance(tensor, gs.Constant) and tensor.dtype is not None:
            try:
                size += int(np.prod(tensor.shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize
            except TypeError:
                continue
            count += 1
    return size, count


def _bar(progress: bool | None, total_bytes: int, total_tensors: int):
    """A tqdm bar on stderr, or None when progress is off (None: on when stderr is a terminal)."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress or not total_bytes:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                desc=f"folding {total_tensors} weights", dynamic_ncols=True, leave=False)
