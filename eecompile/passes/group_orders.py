"""Group orders: a grouped Conv's groups permuted as whole blocks (DESIGN §1: a permutation of groups).

A grouped Conv with ``g`` groups splits its input channels into ``g`` blocks and its output channels into
``g`` blocks, each its own space. Permuting the groups moves whole blocks: encrypted input block ``j`` is
plaintext block ``π(j)`` in its own basis, the filters of group ``π(j)`` become group ``j``, and the output
blocks move by the same ``π``. The Conv offers such an order (:func:`offer`); it is kept only where every op
on those blocks can take moved blocks:

* every tensor carrying a block of an offered run carries the whole run, contiguous and in order, on a
  feature axis without heads, and is not a graph input or output (the client moves no blocks);
* every node reading or writing such a tensor has a rule whose ``keeps_block_order`` says its fold works
  on a whole-axis basis with moved blocks (Conv, elementwise functions, pooling, sums of activations);
* no block shares its permutation with a block at another position.

Otherwise the groups stay in place (the basis is what it was without the offer). The plan draws ``π`` from
the key; :meth:`~eecompile.passes.context.FoldContext.axis_basis` applies it to every axis basis holding a
run (``AxisBasis.order``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from eecompile.passes.annotations import IndexValues, Protected, Squares
from eecompile.passes.spaces import BasisClass, Ref, is_pair_class


@dataclass
class GroupOrder:
    """One grouped Conv's offer: runs of ``g`` equal blocks (its input's, its output's) moved alike."""

    node: str
    runs: list[tuple[int, ...]]
    roots: list[tuple[int, ...]] = field(default_factory=list)
    """The runs' class roots, once :func:`settle` kept the offer."""

    @property
    def groups(self) -> int:
        """How many blocks each run has."""
        return len(self.runs[0])


def offer(ctx, node: gs.Node, runs: list[tuple[Ref, ...]]) -> None:
    """Record that ``node`` would permute the blocks of ``runs`` (its input's and its output's) alike."""
    if len({len(r) for r in runs}) == 1 and len(runs[0]) > 1:
        ctx.spaces.group_orders.append(GroupOrder(node.name, [tuple(r.space for r in run) for run in runs]))


def settle(ctx, nodes: list[gs.Node], claimed: set[int], graph_io: set[str]) -> list[GroupOrder]:
    """The offers every op on their blocks can take (see the module docstring), with their class roots."""
    from eecompile.passes.rules import SHAPE_ONLY_OPS, rule_for

    spaces = ctx.spaces
    kept = []
    for order in spaces.group_orders:
        roots = [tuple(spaces.find(Ref(i)).space for i in run) for run in order.runs]
        if not _blocks_fit(spaces, roots):
            continue
        carriers = _carriers(ctx, roots)
        if carriers is None or carriers & graph_io:
            continue
        touching = [n for n in nodes if n.op not in SHAPE_ONLY_OPS
                    and any(t.name in carriers for t in [*n.inputs, *n.outputs])]
        if any(id(n) in claimed or rule_for(n) is None or not rule_for(n).keeps_block_order(n, ctx)
               for n in touching):
            continue
        if not _permutations_in_position(spaces, roots):
            continue
        order.roots = roots
        kept.append(order)
    return kept


def _blocks_fit(spaces, roots: list[tuple[int, ...]]) -> bool:
    leaves = [leaf for run in roots for leaf in run]
    if len(set(leaves)) != len(leaves):
        return False
    for run in roots:
        sizes = {spaces.leaves[leaf].size for leaf in run}
        if len(sizes) != 1 or any(spaces.leaves[leaf].children for leaf in run):
            return False
        if any(spaces.leaves[leaf].cls == BasisClass.CLEAR or is_pair_class(spaces.leaves[leaf].cls) for leaf in run):
            return False
    return True


def _carriers(ctx, roots: list[tuple[int, ...]]) -> set[str] | None:
    """Names of the tensors carrying a block of the runs, or None when one carries a run other than whole."""
    spaces = ctx.spaces
    members = {leaf for run in roots for leaf in run}
    carriers = set()
    for name, ann in ctx.ann.items():
        if isinstance(ann, (IndexValues, Squares)):
            refs = (ann.ref,) if isinstance(ann, IndexValues) else ann.source.refs
            if members & {r.space for r in spaces.expand(tuple(refs))}:
                return None
            continue
        if not isinstance(ann, Protected):
            continue
        leaves = [r.space for r in spaces.expand(ann.refs)]
        if not members & set(leaves):
            continue
        if ann.head_axis is not None:
            return None
        for run in roots:
            if set(run) & set(leaves) and not _contains_run(leaves, run):
                return None
        carriers.add(name)
    return carriers


def _contains_run(leaves: list[int], run: tuple[int, ...]) -> bool:
    n = len(run)
    return any(tuple(leaves[i:i + n]) == run for i in range(len(leaves) - n + 1))


def _permutations_in_position(spaces, roots: list[tuple[int, ...]]) -> bool:
    """Every block's permutation group holds only blocks at its own position in the runs."""
    for position in range(len(roots[0])):
        allowed = {run[position] for run in roots}
        for leaf in allowed:
            if not set(spaces.perm_group(Ref(leaf))) <= allowed:
                return False
    return True


def orders_of(expanded: list[int], kept: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> tuple[int, ...] | None:
    """The block order of an axis whose blocks are the class roots ``expanded``: each kept run found in it,
    contiguous, has its blocks moved by its permutation; None when no run is in it."""
    order = list(range(len(expanded)))
    moved = False
    for run, perm in kept:
        n = len(run)
        for start in range(len(expanded) - n + 1):
            if tuple(expanded[start:start + n]) == run:
                for j in range(n):
                    order[start + j] = start + int(perm[j])
                moved = True
                break
    return tuple(order) if moved else None
