"""Pass 3 — plan: the strongest basis each space allows, derived from the master key.

Each space root gets a basis of its class from a generator seeded by
HKDF(master key, space name); spaces of one permutation group share the permutation
derived from the group's name. Same key + same model ⇒ same bases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from eecompile.keys import MasterKey, derive_rng
from eecompile.passes import bases
from eecompile.passes.analyze import Analysis
from eecompile.passes.basis import Basis
from eecompile.passes.spaces import PERMUTING, BasisClass, Ref, SpaceTable, is_pair_class, pair_layout

MAX_CONDITION = 4.0
SCALE_RANGE = (0.5, 2.0)


@dataclass
class Plan:
    """Concrete bases per space root, and the block permutation of each kept group order."""

    bases: dict[int, Basis]
    block_orders: list[tuple[tuple[int, ...], np.ndarray]] = field(default_factory=list)
    """``(run of class roots, π)``: block ``j`` of an axis holding the run reads its block ``π(j)``."""


def sample_basis(key: MasterKey, name: str, perm_name: str, cls: BasisClass, size: int) -> Basis:
    """Draw the basis of one space of class ``cls``."""
    rng = derive_rng(key, f"basis:{name}")
    if cls == BasisClass.CLEAR:
        return Basis.identity(size)
    if cls == BasisClass.INVERTIBLE:
        return Basis(size, dense=bases.invertible(rng, size, max_condition=MAX_CONDITION))
    if cls == BasisClass.ORTHOGONAL:
        return Basis(size, dense=bases.haar_orthogonal(rng, size), orthogonal=True)
    if cls == BasisClass.ONES_ORTHOGONAL:
        return Basis(size, dense=bases.ones_orthogonal(rng, size), orthogonal=True)
    if cls in (BasisClass.COMPLEX_HALF, BasisClass.COMPLEX_INTERLEAVED):
        layout = "half" if cls == BasisClass.COMPLEX_HALF else "interleaved"
        if size % 2:
            return Basis.identity(size)
        return Basis(size, dense=bases.complex_pairs(rng, size, layout=layout, low=SCALE_RANGE[0], high=SCALE_RANGE[1]))
    if is_pair_class(cls):
        return _pair_scalars(rng, cls, size)
    perm = bases.permutation(derive_rng(key, f"perm:{perm_name}"), size)
    if cls == BasisClass.PERMUTATION:
        return Basis.monomial(perm)
    if cls == BasisClass.SIGNED_PERMUTATION:
        return Basis.monomial(perm, bases.signs(rng, size))
    signed = cls == BasisClass.MONOMIAL
    return Basis.monomial(perm, bases.scales(rng, size, low=SCALE_RANGE[0], high=SCALE_RANGE[1], signed=signed))


def _pair_scalars(rng: np.random.Generator, cls: BasisClass, size: int) -> Basis:
    """One complex scalar per RoPE frequency pair, drawn from the pair class's family.

    Any angle gives a dense 2×2 scaled rotation per pair; quarter turns, signs and positive
    reals are monomial (a quarter turn by ``i`` maps ``(x_a, x_b)`` to ``(-x_b, x_a)``), so
    per-coordinate gains still fold as permutations.
    """
    layout, unit, angle = pair_layout(cls)
    if size % 2:
        return Basis.identity(size)
    if angle == 0:
        return Basis(size, dense=bases.complex_pairs(rng, size, layout=layout, low=SCALE_RANGE[0],
                                                     high=SCALE_RANGE[1], unit=bool(unit)))
    half = size // 2
    first = np.arange(half) if layout == "half" else np.arange(0, size, 2)
    second = first + half if layout == "half" else first + 1
    modulus = np.ones(half) if unit else bases.scales(rng, half, low=SCALE_RANGE[0], high=SCALE_RANGE[1])
    turns = {1: rng.integers(0, 4, size=half), 2: 2 * rng.integers(0, 2, size=half),
             3: np.zeros(half, dtype=np.int64)}[angle]
    sign = np.where(turns >= 2, -1.0, 1.0) * modulus
    odd = turns % 2 == 1
    perm, scale = np.arange(size), np.ones(size)
    perm[first[odd]], perm[second[odd]] = second[odd], first[odd]
    scale[first] = np.where(odd, -sign, sign)
    scale[second] = sign
    return Basis.monomial(perm, scale)


MAX_REDRAWS = 64


def plan(analysis: Analysis, key: MasterKey) -> Plan:
    """Choose and derive the basis of every space root.

    No protected axis is left in plain coordinates by the draw: where every protected block of a space
    drew the identity (eight groups of two channels under permutations do so once in 256 keys), the
    permutation of its first block that can move is drawn again, from a name derived from the key as
    well, for every space sharing that permutation.
    """
    spaces = analysis.ctx.spaces
    chosen: dict[int, Basis] = {}
    for root in spaces.roots():
        chosen[root] = draw_basis(key, spaces, root, "")
    for attempt in range(1, MAX_REDRAWS + 1):
        offending = [b for b in (_movable_block(spaces, chosen, top) for top in spaces.top_roots()) if b is not None]
        if not offending:
            break
        for block in offending:
            for member in spaces.perm_group(Ref(block)):
                chosen[member] = draw_basis(key, spaces, member, f"#redraw{attempt}")
    orders = []
    for order in analysis.group_orders:
        perm = bases.permutation(derive_rng(key, f"groups:{order.node}"), order.groups)
        orders.extend((run, perm) for run in order.roots)
    return Plan(chosen, orders)


def draw_basis(key: MasterKey, spaces: SpaceTable, root: int, suffix: str = "") -> Basis:
    """The basis of space root ``root`` drawn under its name plus ``suffix`` (a redraw's), its permutation
    under its permutation group's name plus ``suffix``."""
    leaf = spaces.leaves[root]
    perm_root = spaces.perm_root(Ref(root))
    return sample_basis(key, leaf.name + suffix, spaces.leaves[perm_root].name + suffix, leaf.cls, leaf.size)


def _movable_block(spaces: SpaceTable, chosen: dict[int, Basis], top: int) -> int | None:
    """The first block of space ``top`` whose draw could move it, when every protected block drew the identity."""
    blocks = [ref.space for ref in spaces.expand((Ref(top),))]
    protected = [b for b in blocks if spaces.leaves[b].cls != BasisClass.CLEAR]
    if not protected or not all(leaves_coordinates_in_place(chosen[b]) for b in protected):
        return None
    # a permuting class can move but for a one-coordinate permutation (signs and scales move even that one)
    return next((b for b in protected if spaces.leaves[b].cls in PERMUTING
                 and (spaces.leaves[b].size > 1 or spaces.leaves[b].cls != BasisClass.PERMUTATION)), None)


def describe(cls: BasisClass, split: bool = False) -> str:
    """The report's name for a basis class."""
    if cls == BasisClass.INVERTIBLE and split:
        return "block-invertible"
    if cls == BasisClass.POSITIVE_MONOMIAL:
        return "monomial"
    if cls == BasisClass.COMPLEX_INTERLEAVED:
        return "complex-pairs"
    if cls.value.endswith("-interleaved"):
        return cls.value.removesuffix("-interleaved")
    return cls.value


def leaves_coordinates_in_place(basis: Basis) -> bool:
    """True when ``x @ T == x`` (the identity, however it is stored: a dense eye, ``perm == arange`` with unit
    scales)."""
    if basis.dense is not None:
        return bool(np.array_equal(basis.dense, np.eye(basis.size)))
    in_place = basis.perm is None or bool(np.array_equal(basis.perm, np.arange(basis.size)))
    return in_place and (basis.scale is None or bool(np.all(basis.scale == 1.0)))
