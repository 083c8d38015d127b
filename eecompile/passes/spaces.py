"""Spaces: the sets of (tensor, axis block) pairs that must share one secret basis.

A *leaf space* is a block of coordinates of some protected axis. Leaves are merged with a
union-find that also tracks *duality*: a leaf may be linked to another in its inverse
transposed basis (``T_K = T_Q^{-T}`` for attention keys). A leaf can later be *split* into
a direct sum of smaller leaves (a Reshape into heads, a Split of fused QKV); every member
of its class is split alike. Leaves in one *permutation group* share their permutation
and keep their own scales (BatchNorm in/out, the two operands of ``silu(g) * u``).

Every restriction records the node that caused it and why, so the report can say what
limited each space.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class BasisClass(enum.Enum):
    """The family of matrices a space's basis may be drawn from (strongest first)."""

    INVERTIBLE = "invertible"
    ORTHOGONAL = "orthogonal"
    ONES_ORTHOGONAL = "ones-orthogonal"
    COMPLEX_HALF = "complex-pairs"  # 2x2 scaled rotations on pairs (i, i + n/2)
    COMPLEX_INTERLEAVED = "complex-pairs-interleaved"  # pairs (2i, 2i + 1)
    # Sub-families of complex-pairs (a complex scalar per RoPE frequency pair), named by what
    # the scalar may be: unit modulus and/or an angle that is a quarter turn, 0 or π, or 0.
    PAIR_ROTATIONS_HALF = "pair-rotations"
    PAIR_ROTATIONS_INTERLEAVED = "pair-rotations-interleaved"
    PAIR_SCALED_TURNS_HALF = "pair-scaled-quarter-turns"
    PAIR_SCALED_TURNS_INTERLEAVED = "pair-scaled-quarter-turns-interleaved"
    PAIR_UNITS_HALF = "pair-quarter-turns"  # 1, i, -1 or -i: a signed permutation within each pair
    PAIR_UNITS_INTERLEAVED = "pair-quarter-turns-interleaved"
    PAIR_SCALES_HALF = "pair-scales"  # a nonzero real scalar
    PAIR_SCALES_INTERLEAVED = "pair-scales-interleaved"
    PAIR_SIGNS_HALF = "pair-signs"  # ±1
    PAIR_SIGNS_INTERLEAVED = "pair-signs-interleaved"
    PAIR_POSITIVE_HALF = "pair-positive-scales"
    PAIR_POSITIVE_INTERLEAVED = "pair-positive-scales-interleaved"
    MONOMIAL = "monomial"
    POSITIVE_MONOMIAL = "positive-monomial"
    SIGNED_PERMUTATION = "signed-permutation"
    PERMUTATION = "permutation"
    CLEAR = "clear"


# (dense, metric, positive): metric 0 = any, 1 = orthogonal, 2 = orthogonal and 1-preserving.
_PROPS: dict[BasisClass, tuple[bool, int, bool]] = {
    BasisClass.INVERTIBLE: (True, 0, False),
    BasisClass.ORTHOGONAL: (True, 1, False),
    BasisClass.ONES_ORTHOGONAL: (True, 2, False),
    BasisClass.MONOMIAL: (False, 0, False),
    BasisClass.POSITIVE_MONOMIAL: (False, 0, True),
    BasisClass.SIGNED_PERMUTATION: (False, 1, False),
    BasisClass.PERMUTATION: (False, 1, True),
}
_BY_PROPS = {v: k for k, v in _PROPS.items()}

# Classes acting on RoPE frequency pairs as one complex scalar r·e^{iθ} per pair, as a
# product lattice: modulus (0: any r, 1: r = 1) × angle (0: any θ, 1: a quarter turn, 2: 0 or
# π, 3: 0). (1, 3) is the identity. Each commutes with a RoPE of the same pairing.
_PAIR_NAMES = {(0, 0): "COMPLEX", (1, 0): "PAIR_ROTATIONS", (0, 1): "PAIR_SCALED_TURNS", (1, 1): "PAIR_UNITS",
               (0, 2): "PAIR_SCALES", (1, 2): "PAIR_SIGNS", (0, 3): "PAIR_POSITIVE"}
_PAIRS: dict[BasisClass, tuple[str, int, int]] = {
    BasisClass[f"{name}_{layout.upper()}"]: (layout, modulus, angle)
    for (modulus, angle), name in _PAIR_NAMES.items() for layout in ("half", "interleaved")}
_BY_PAIRS = {v: k for k, v in _PAIRS.items()}
# What a non-pair class allows of a complex scalar per pair: a dense basis any scalar, a
# monomial one a scaled quarter turn, an orthogonal one a rotation, a signed permutation a
# quarter turn, a positive monomial a positive real; the rest only 1.
_AS_PAIR = {BasisClass.INVERTIBLE: (0, 0), BasisClass.MONOMIAL: (0, 1), BasisClass.ORTHOGONAL: (1, 0),
            BasisClass.SIGNED_PERMUTATION: (1, 1), BasisClass.POSITIVE_MONOMIAL: (0, 3)}


def is_pair_class(cls: BasisClass) -> bool:
    """Whether the class acts on RoPE frequency pairs (complex, real or sign scalars)."""
    return cls in _PAIRS


def _meet_pairs(a: BasisClass, b: BasisClass) -> BasisClass:
    layout = (_PAIRS.get(a) or _PAIRS[b])[0]
    parts = []
    for cls in (a, b):
        if cls in _PAIRS:
            if _PAIRS[cls][0] != layout:
                return BasisClass.CLEAR
            parts.append(_PAIRS[cls][1:])
        elif cls in _AS_PAIR:
            parts.append(_AS_PAIR[cls])
        else:
            return BasisClass.CLEAR
    modulus, angle = max(parts[0][0], parts[1][0]), max(parts[0][1], parts[1][1])
    return _BY_PAIRS.get((layout, modulus, angle), BasisClass.CLEAR)


def pair_layout(cls: BasisClass) -> tuple[str, int, int] | None:
    """(layout, modulus, angle) of a pair class (see ``_PAIRS``), None for other classes."""
    return _PAIRS.get(cls)


def meet(a: BasisClass, b: BasisClass) -> BasisClass:
    """The largest class contained in both ``a`` and ``b`` (conservative for complex pairs)."""
    if a == b:
        return a
    if BasisClass.CLEAR in (a, b):
        return BasisClass.CLEAR
    if a in _PAIRS or b in _PAIRS:
        return _meet_pairs(a, b)
    dense_a, metric_a, pos_a = _PROPS[a]
    dense_b, metric_b, pos_b = _PROPS[b]
    dense, metric, positive = dense_a and dense_b, max(metric_a, metric_b), pos_a or pos_b
    if positive:
        dense = False
    if not dense and metric == 2:
        metric, positive = 1, True
    if positive and metric >= 1:
        return BasisClass.PERMUTATION
    return _BY_PROPS[(dense, metric, positive)]


def allows_scales(cls: BasisClass) -> bool:
    """Whether a monomial basis of this class carries non-unit scales."""
    return cls in (BasisClass.MONOMIAL, BasisClass.POSITIVE_MONOMIAL)


PERMUTING = frozenset({BasisClass.PERMUTATION, BasisClass.SIGNED_PERMUTATION, BasisClass.MONOMIAL,
                       BasisClass.POSITIVE_MONOMIAL})
"""Classes that take their permutation from their permutation group (every other class fixes its own)."""


@dataclass(frozen=True)
class Ref:
    """A reference to a leaf space, optionally in its dual (inverse-transposed) basis."""

    space: int
    dual: bool = False

    def flipped(self, dual: bool = True) -> "Ref":
        """This reference with its duality toggled when ``dual`` is true."""
        return Ref(self.space, self.dual ^ dual)


@dataclass(frozen=True)
class Limit:
    """What restricted a space: the node, its op type and a human-readable reason."""

    node: str
    op_type: str
    reason: str


@dataclass
class Leaf:
    """One leaf space as created (before unions)."""

    name: str
    size: int
    origin: str
    parent: int
    parity: bool = False
    cls: BasisClass = BasisClass.INVERTIBLE
    limits: list[tuple[BasisClass, Limit]] = field(default_factory=list)
    children: tuple[int, ...] = ()
    perm_parent: int = -1
    tensors: list[str] = field(default_factory=list)
    split_by: Limit | None = None


class SpaceTable:
    """Union-find over leaf spaces with duality parity, splitting and permutation groups."""

    def __init__(self) -> None:
        self.leaves: list[Leaf] = []
        self.current: tuple[str, str] = ("", "")  # (node, op) being analysed, for split records
        self.group_orders: list = []  # grouped Convs' offers to move whole blocks (passes/group_orders.py)

    # -- creation and lookup -------------------------------------------------------------
    def new(self, name: str, size: int, origin: str = "") -> Ref:
        """Create a fresh leaf space of ``size`` coordinates and return a reference to it."""
        index = len(self.leaves)
        self.leaves.append(Leaf(name=name, size=size, origin=origin, parent=index, perm_parent=index))
        return Ref(index)

    def find(self, ref: Ref) -> Ref:
        """The class root of ``ref`` with the accumulated duality."""
        index, parity = ref.space, ref.dual
        while self.leaves[index].parent != index:
            parity ^= self.leaves[index].parity
            index = self.leaves[index].parent
        return Ref(index, parity)

    def size(self, ref: Ref) -> int:
        """Number of coordinates of the space."""
        return self.leaves[ref.space].size

    def root_leaf(self, ref: Ref) -> Leaf:
        """The leaf record of the class root of ``ref``."""
        return self.leaves[self.find(ref).space]

    def cls(self, ref: Ref) -> BasisClass:
        """Current basis class of the space (of its blocks, for a split space)."""
        return self.root_leaf(ref).cls

    def expand(self, refs: tuple[Ref, ...]) -> tuple[Ref, ...]:
        """Replace every split space in ``refs`` by its children, recursively, as roots."""
        out: list[Ref] = []
        for ref in refs:
            root = self.find(ref)
            leaf = self.leaves[root.space]
            if leaf.children:
                out.extend(self.expand(tuple(Ref(c, root.dual) for c in leaf.children)))
            else:
                out.append(root)
        return tuple(out)

    def perm_root(self, ref: Ref) -> int:
        """Root of the permutation group of the space's class root."""
        index = self.find(ref).space
        while self.leaves[index].perm_parent != index:
            index = self.leaves[index].perm_parent
        return index

    def perm_group(self, ref: Ref) -> list[int]:
        """All class roots that share a permutation with ``ref``."""
        root = self.perm_root(ref)
        return [
            i for i, leaf in enumerate(self.leaves)
            if leaf.parent == i and not leaf.children and self.perm_root(Ref(i)) == root
        ]

    # -- constraints ---------------------------------------------------------------------
    def restrict(self, ref: Ref, cls: BasisClass, limit: Limit) -> None:
        """Intersect the space's class with ``cls``, recording ``limit`` if it narrowed."""
        root = self.find(ref)
        leaf = self.leaves[root.space]
        if leaf.children:
            for child in leaf.children:
                self.restrict(Ref(child), cls, limit)
            return
        new = meet(leaf.cls, cls)
        if new != leaf.cls:
            leaf.cls = new
            leaf.limits.append((new, limit))

    def clear(self, ref: Ref, limit: Limit) -> None:
        """Force the space to the identity basis."""
        self.restrict(ref, BasisClass.CLEAR, limit)

    def union(self, a: Ref, b: Ref, limit: Limit) -> None:
        """Require ``a`` and ``b`` to carry the same basis (respecting duality)."""
        ra, rb = self.find(a), self.find(b)
        if ra.space == rb.space:
            if ra.dual != rb.dual:  # T = T^{-T}: only orthogonal bases are self-dual
                self.restrict(ra, BasisClass.ORTHOGONAL, limit)
            return
        la, lb = self.leaves[ra.space], self.leaves[rb.space]
        if la.size != lb.size:
            self.clear(ra, limit)
            self.clear(rb, limit)
            return
        ca, cb = self.child_sizes(ra), self.child_sizes(rb)
        if ca and not cb:
            self.split(rb, ca)
        elif cb and not ca:
            self.split(ra, cb)
        elif ca and cb and ca != cb:
            self.clear(ra, limit)
            self.clear(rb, limit)
            return
        # keep the older leaf as root so names and derivations are stable
        self._perm_union(ra.space, rb.space)  # before re-parenting: perm_root follows class roots
        root, child = (ra, rb) if ra.space < rb.space else (rb, ra)
        lroot, lchild = self.leaves[root.space], self.leaves[child.space]
        lchild.parent = root.space
        lchild.parity = root.dual ^ child.dual
        merged = meet(lroot.cls, lchild.cls)
        if merged != lroot.cls:
            lroot.limits.append((merged, next((lim for c, lim in reversed(lchild.limits) if c == merged), limit)))
        elif merged != lchild.cls and lchild.limits:
            pass
        lroot.limits.extend(lim for lim in lchild.limits if lim not in lroot.limits)
        lroot.cls = merged
        lroot.tensors.extend(t for t in lchild.tensors if t not in lroot.tensors)
        if lroot.children:
            for c_root, c_child in zip(lroot.children, lchild.children):
                self.union(Ref(c_root), Ref(c_child, lchild.parity), limit)

    def link_permutation(self, a: Ref, b: Ref, limit: Limit) -> None:
        """Require ``a`` and ``b`` to be monomial with one shared permutation."""
        for ref in (a, b):
            self.restrict(ref, BasisClass.MONOMIAL, limit)
        ca, cb = self.child_sizes(a), self.child_sizes(b)
        if ca or cb:  # split spaces: block i of one shares its permutation with block i of the other
            if ca and not cb and not is_pair_class(self.cls(b)):
                self.split(b, ca)
            elif cb and not ca and not is_pair_class(self.cls(a)):
                self.split(a, cb)
            if self.child_sizes(a) == self.child_sizes(b):
                for x, y in zip(self.root_leaf(a).children, self.root_leaf(b).children):
                    self.link_permutation(Ref(x), Ref(y), limit)
                return
        if ca or cb or is_pair_class(self.cls(a)) or is_pair_class(self.cls(b)):
            self.clear(a, limit)
            self.clear(b, limit)
            return
        self._perm_union(self.find(a).space, self.find(b).space)

    def settle_permutation_groups(self) -> list[str]:
        """Clear every permutation group that holds a space whose class cannot take the group's permutation.

        Members of a group share one drawn permutation; a member that became clear (an op without a rule,
        say) or took a per-pair class fixes its own, so the others cannot be permuted either. Returns the
        names of the spaces cleared. Called once the analysis has set every class.
        """
        groups: dict[int, list[int]] = {}
        for root in self.roots():
            groups.setdefault(self.perm_root(Ref(root)), []).append(root)
        cleared = []
        for members in groups.values():
            fixed = [m for m in members if self.leaves[m].cls not in PERMUTING]
            if not fixed or len(members) < 2:
                continue
            culprit = self.leaves[fixed[0]]
            why = culprit.limits[-1][1] if culprit.limits else Limit("", "", "")
            limit = Limit(why.node, why.op_type, f"shares its permutation with {culprit.name}, which cannot be "
                                                 f"permuted ({why.reason or culprit.cls.value})")
            for m in members:
                if self.leaves[m].cls != BasisClass.CLEAR:
                    self.clear(Ref(m), limit)
                    cleared.append(self.leaves[m].name)
        return cleared

    def _perm_union(self, a: int, b: int) -> None:
        pa, pb = self.perm_root(Ref(a)), self.perm_root(Ref(b))
        if pa != pb:
            lo, hi = min(pa, pb), max(pa, pb)
            self.leaves[hi].perm_parent = lo

    def child_sizes(self, ref: Ref) -> tuple[int, ...]:
        """Sizes of the children of a split space, or () if it is not split."""
        leaf = self.root_leaf(ref)
        return tuple(self.leaves[c].size for c in leaf.children)

    def split(self, ref: Ref, sizes: tuple[int, ...]) -> tuple[Ref, ...]:
        """Split the space into a direct sum of blocks of ``sizes``; return the block refs.

        A space that is already split the same way returns its existing children; one split
        differently becomes clear. The spaces sharing its permutation are split alike, block ``i``
        of each sharing one permutation.
        """
        root = self.find(ref)
        leaf = self.leaves[root.space]
        if sum(sizes) != leaf.size:
            raise ValueError(f"cannot split space {leaf.name} of size {leaf.size} into {sizes}")
        if leaf.children:
            if self.child_sizes(root) != tuple(sizes):
                self.clear(root, Limit("", "", f"incompatible block structures {self.child_sizes(root)} vs {sizes}"))
                return tuple(self._clear_children(root, sizes))
            return tuple(Ref(c, root.dual) for c in leaf.children)
        if len(sizes) == 1:
            return (root,)
        group = self.perm_group(root)
        children = self._make_children(root.space, sizes)
        for member in group:
            if member != root.space:
                for child, twin in zip(children, self._make_children(member, sizes)):
                    self._perm_union(child, twin)
        return tuple(Ref(c, root.dual) for c in children)

    def _make_children(self, space: int, sizes: tuple[int, ...]) -> list[int]:
        """Split the (unsplit) class root ``space`` into fresh blocks that inherit its class and limits."""
        leaf = self.leaves[space]
        children = []
        for i, size in enumerate(sizes):
            child = self.new(f"{leaf.name}/{i}", size, leaf.origin)
            self.leaves[child.space].cls = leaf.cls
            self.leaves[child.space].limits = list(leaf.limits)
            children.append(child.space)
        leaf.children = tuple(children)
        leaf.split_by = Limit(self.current[0], self.current[1],
                              f"split into {len(sizes)} blocks (e.g. attention heads): the basis is block-diagonal")
        return children

    def _clear_children(self, root: Ref, sizes: tuple[int, ...]) -> list[Ref]:
        out = []
        for size in sizes:
            fresh = self.new(f"{self.leaves[root.space].name}/clear", size)
            self.clear(fresh, Limit("", "", "incompatible block structures"))
            out.append(fresh)
        return out

    def refine(self, refs: tuple[Ref, ...], cuts: list[int]) -> tuple[Ref, ...]:
        """Split blocks of a flat axis (``refs`` in order) so each cut offset is a block boundary."""
        refs = self.expand(refs)
        cuts = [int(c) for c in cuts]  # sizes stay Python ints whatever the caller computed them with
        out: list[Ref] = []
        offset = 0
        for ref in refs:
            size = self.size(ref)
            inner = sorted({c - offset for c in cuts if offset < c < offset + size})
            if inner:
                bounds = [0, *inner, size]
                parts = tuple(b - a for a, b in zip(bounds, bounds[1:]))
                out.extend(self.expand(self.split(ref, parts)))
            else:
                out.append(ref)
            offset += size
        return tuple(out)

    def roots(self) -> list[int]:
        """Indices of all class roots that are not split (the spaces that get a basis)."""
        return [i for i, leaf in enumerate(self.leaves) if leaf.parent == i and not leaf.children]

    def top_roots(self) -> list[int]:
        """Class roots that are not children of a split (the spaces a report lists)."""
        child_set = {c for leaf in self.leaves for c in leaf.children}
        return [i for i, leaf in enumerate(self.leaves) if leaf.parent == i and i not in child_set]

    def note_tensor(self, ref: Ref, tensor: str) -> None:
        """Remember that ``tensor`` carries this space (for the report)."""
        leaf = self.root_leaf(ref)
        if tensor not in leaf.tensors:
            leaf.tensors.append(tensor)
