"""Pass 3 — plan: the strongest basis each space allows, derived from the master key.

Each space root gets a basis of its class from a generator seeded by
HKDF(master key, space name); spaces of one permutation group share the permutation
derived from the group's name. Same key + same model ⇒ same bases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eecompile.keys import MasterKey, derive_rng
from eecompile.passes import bases
from eecompile.passes.analyze import Analysis
from eecompile.passes.basis import Basis
from eecompile.passes.spaces import BasisClass, Ref

MAX_CONDITION = 4.0
SCALE_RANGE = (0.5, 2.0)


@dataclass
class Plan:
    """Concrete bases per space root."""

    bases: dict[int, Basis]


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
    perm = bases.permutation(derive_rng(key, f"perm:{perm_name}"), size)
    if cls == BasisClass.PERMUTATION:
        return Basis.monomial(perm)
    if cls == BasisClass.SIGNED_PERMUTATION:
        return Basis.monomial(perm, bases.signs(rng, size))
    signed = cls == BasisClass.MONOMIAL
    return Basis.monomial(perm, bases.scales(rng, size, low=SCALE_RANGE[0], high=SCALE_RANGE[1], signed=signed))


def plan(analysis: Analysis, key: MasterKey) -> Plan:
    """Choose and derive the basis of every space root."""
    spaces = analysis.ctx.spaces
    chosen: dict[int, Basis] = {}
    for root in spaces.roots():
        leaf = spaces.leaves[root]
        perm_root = spaces.perm_root(Ref(root))
        chosen[root] = sample_basis(key, leaf.name, spaces.leaves[perm_root].name, leaf.cls, leaf.size)
    return Plan(chosen)


def describe(cls: BasisClass, split: bool = False) -> str:
    """The report's name for a basis class."""
    if cls == BasisClass.INVERTIBLE and split:
        return "block-invertible"
    if cls == BasisClass.POSITIVE_MONOMIAL:
        return "monomial"
    if cls == BasisClass.COMPLEX_INTERLEAVED:
        return "complex-pairs"
    return cls.value


def identity_check(basis: Basis) -> bool:
    """True when the basis is the identity matrix."""
    return basis.is_identity or (basis.dense is not None and np.array_equal(basis.dense, np.eye(basis.size)))
