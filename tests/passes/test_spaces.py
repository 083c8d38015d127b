"""eecompile.passes.spaces: the basis-class lattice and the space table (union-find with duality,
splitting into blocks, permutation groups, and the record of what restricted each space)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from eecompile.keys import MasterKey
from eecompile.passes.plan import sample_basis
from eecompile.passes.spaces import BasisClass, Limit, Ref, SpaceTable, allows_scales, meet, pair_layout

C = BasisClass
ALL = list(BasisClass)
L = Limit("node", "Op", "reason")
KEY = MasterKey(bytes(range(7, 39)))


# -- the lattice -----------------------------------------------------------------------------


@pytest.mark.parametrize("a,b", list(itertools.product(ALL, ALL)))
def test_meet_is_commutative(a, b):
    assert meet(a, b) == meet(b, a)


@pytest.mark.parametrize("a", ALL)
def test_meet_is_idempotent_with_top_and_bottom(a):
    assert meet(a, a) == a
    assert meet(a, C.INVERTIBLE) == a  # invertible is the top: any basis at all
    assert meet(a, C.CLEAR) == C.CLEAR  # clear (identity) is the bottom


def test_meet_is_associative():
    bad = [(a, b, c) for a, b, c in itertools.product(ALL, ALL, ALL)
           if meet(meet(a, b), c) != meet(a, meet(b, c))]
    assert not bad


@pytest.mark.parametrize("a,b,expected", [
    (C.ORTHOGONAL, C.MONOMIAL, C.SIGNED_PERMUTATION),
    (C.ONES_ORTHOGONAL, C.MONOMIAL, C.PERMUTATION),
    (C.ONES_ORTHOGONAL, C.SIGNED_PERMUTATION, C.PERMUTATION),
    (C.ORTHOGONAL, C.ONES_ORTHOGONAL, C.ONES_ORTHOGONAL),
    (C.ORTHOGONAL, C.POSITIVE_MONOMIAL, C.PERMUTATION),
    (C.MONOMIAL, C.POSITIVE_MONOMIAL, C.POSITIVE_MONOMIAL),
    (C.SIGNED_PERMUTATION, C.POSITIVE_MONOMIAL, C.PERMUTATION),
    (C.MONOMIAL, C.SIGNED_PERMUTATION, C.SIGNED_PERMUTATION),
    (C.INVERTIBLE, C.PERMUTATION, C.PERMUTATION),
    (C.COMPLEX_HALF, C.INVERTIBLE, C.COMPLEX_HALF),
    (C.COMPLEX_INTERLEAVED, C.INVERTIBLE, C.COMPLEX_INTERLEAVED),
    (C.COMPLEX_HALF, C.PERMUTATION, C.CLEAR),
    (C.COMPLEX_HALF, C.ORTHOGONAL, C.PAIR_ROTATIONS_HALF),
    (C.COMPLEX_HALF, C.COMPLEX_INTERLEAVED, C.CLEAR),
    (C.PERMUTATION, C.CLEAR, C.CLEAR),
    (C.ORTHOGONAL, C.CLEAR, C.CLEAR),
])
def test_meet_values(a, b, expected):
    assert meet(a, b) == expected


def test_allows_scales():
    assert allows_scales(C.MONOMIAL) and allows_scales(C.POSITIVE_MONOMIAL)
    assert not any(allows_scales(c) for c in (C.PERMUTATION, C.SIGNED_PERMUTATION, C.ORTHOGONAL, C.CLEAR))


# The lattice against the matrices it names: membership predicates for each family.
N = 8


def _monomial_entries(m: np.ndarray) -> np.ndarray | None:
    nz = np.abs(m) > 1e-12
    if not (nz.sum(0) == 1).all() or not (nz.sum(1) == 1).all():
        return None
    return m[nz]


def _pair_ops(layout: str) -> tuple[np.ndarray, np.ndarray]:
    h = N // 2
    a = np.arange(h) if layout == "half" else 2 * np.arange(h)
    b = a + h if layout == "half" else a + 1
    j = np.zeros((N, N))
    j[a, b], j[b, a] = 1.0, -1.0
    d = np.zeros((N, N))
    d[a, a] = d[b, b] = np.arange(1, h + 1)
    return j, d


def _member(m: np.ndarray, cls: BasisClass) -> bool:
    eye = np.eye(N)
    orth = np.allclose(m @ m.T, eye, atol=1e-9)
    entries = _monomial_entries(m)
    if cls == C.INVERTIBLE:
        return abs(np.linalg.det(m)) > 1e-9
    if cls == C.ORTHOGONAL:
        return orth
    if cls == C.ONES_ORTHOGONAL:
        return orth and np.allclose(np.ones(N) @ m, np.ones(N))
    if pair_layout(cls) is not None:  # a complex scalar per pair: commutes with the pair's rotation
        layout, unit, angle = pair_layout(cls)
        j, d = _pair_ops(layout)
        ok = np.allclose(m @ j, j @ m) and np.allclose(m @ d, d @ m) and abs(np.linalg.det(m)) > 1e-9
        if unit:
            ok = ok and orth
        if angle >= 1:
            ok = ok and entries is not None
        if angle >= 2:
            ok = ok and np.allclose(m, np.diag(np.diag(m)))
        if angle == 3:
            ok = ok and bool((np.diag(m) > 0).all())
        return ok
    if cls == C.MONOMIAL:
        return entries is not None
    if cls == C.POSITIVE_MONOMIAL:
        return entries is not None and bool((entries > 0).all())
    if cls == C.SIGNED_PERMUTATION:
        return entries is not None and np.allclose(np.abs(entries), 1)
    if cls == C.PERMUTATION:
        return entries is not None and np.allclose(entries, 1)
    return np.array_equal(m, eye)


def _sample(cls: BasisClass, name: str = "s") -> np.ndarray:
    return sample_basis(KEY, name, name, cls, N).matrix()


@pytest.mark.parametrize("a,b", [(a, b) for a, b in itertools.product(ALL, ALL) if a.value <= b.value])
def test_meet_samples_belong_to_both_classes(a, b):
    """A basis drawn from ``meet(a, b)`` is a valid basis for both ``a`` and ``b`` (soundness)."""
    m = _sample(meet(a, b), f"{a.value}^{b.value}")
    assert _member(m, a) and _member(m, b)


@pytest.mark.parametrize("a,b", [(a, b) for a, b in itertools.product(ALL, ALL) if a != b])
def test_lattice_order_is_matrix_inclusion(a, b):
    """A generic sample of ``a`` lies in ``b`` exactly when the lattice puts ``a`` below ``b``
    (so no meet is weaker than it must be, except the documented complex-pair cases)."""
    below = meet(a, b) == a
    assert _member(_sample(a, "generic"), b) == below


# -- the space table -------------------------------------------------------------------------


def test_new_find_size():
    t = SpaceTable()
    a, b = t.new("a", 4), t.new("b", 6)
    assert t.find(a) == a and t.find(b) == b and t.find(a.flipped()) == Ref(a.space, True)
    assert (t.size(a), t.size(b)) == (4, 6)
    assert t.cls(a) == C.INVERTIBLE
    assert sorted(t.roots()) == [a.space, b.space]


def test_restriction_records_a_limit():
    t = SpaceTable()
    a = t.new("a", 4)
    relu = Limit("relu_1", "Relu", "Relu commutes only with positive monomials")
    t.restrict(a, C.POSITIVE_MONOMIAL, relu)
    assert t.cls(a) == C.POSITIVE_MONOMIAL
    assert t.root_leaf(a).limits == [(C.POSITIVE_MONOMIAL, relu)]
    t.restrict(a, C.MONOMIAL, L)  # weaker than what it has: no narrowing, nothing recorded
    assert t.root_leaf(a).limits == [(C.POSITIVE_MONOMIAL, relu)]
    soft = Limit("softmax", "Softmax", "permutation only")
    t.restrict(a, C.ORTHOGONAL, soft)
    assert t.cls(a) == C.PERMUTATION and t.root_leaf(a).limits[-1] == (C.PERMUTATION, soft)
    t.clear(a, L)
    assert t.cls(a) == C.CLEAR and t.root_leaf(a).limits[-1] == (C.CLEAR, L)


def test_union_merges_class_tensors_and_limits():
    t = SpaceTable()
    a, b = t.new("a", 4), t.new("b", 4)
    t.note_tensor(a, "ta")
    t.note_tensor(b, "tb")
    relu = Limit("relu", "Relu", "r")
    t.restrict(b, C.POSITIVE_MONOMIAL, relu)
    t.restrict(a, C.ORTHOGONAL, L)
    t.union(b, a, Limit("add", "Add", "same space"))
    assert t.find(a) == t.find(b) == Ref(a.space)  # the older leaf stays the root
    assert t.cls(a) == t.cls(b) == C.PERMUTATION
    assert set(t.root_leaf(b).tensors) == {"ta", "tb"}
    assert (C.POSITIVE_MONOMIAL, relu) in t.root_leaf(a).limits
    assert t.roots() == [a.space]


def test_union_of_different_sizes_clears_both():
    t = SpaceTable()
    a, b = t.new("a", 4), t.new("b", 5)
    t.union(a, b, L)
    assert t.cls(a) == t.cls(b) == C.CLEAR
    assert t.find(a) != t.find(b)


def test_dual_union_keeps_parity():
    t = SpaceTable()
    q, k, k2 = t.new("q", 4), t.new("k", 4), t.new("k2", 4)
    t.union(q, k.flipped(), L)  # T_K = T_Q^{-T}
    assert t.find(k).space == t.find(q).space
    assert t.find(k).dual != t.find(q).dual
    t.union(k, k2, L)
    assert t.find(k2).dual == t.find(k).dual != t.find(q).dual
    assert t.cls(q) == C.INVERTIBLE  # consistent parities: no restriction


def test_self_dual_union_forces_orthogonal():
    t = SpaceTable()
    a, b = t.new("a", 4), t.new("b", 4)
    t.union(a, b.flipped(), L)
    assert t.cls(a) == C.INVERTIBLE
    why = Limit("mm", "MatMul", "x and its dual")
    t.union(a, b, why)  # now T = T^{-T}: only orthogonal bases qualify
    assert t.cls(a) == C.ORTHOGONAL and t.root_leaf(a).limits[-1] == (C.ORTHOGONAL, why)
    c = t.new("c", 3)
    t.union(c, c.flipped(), L)
    assert t.cls(c) == C.ORTHOGONAL


def test_split_and_expand():
    t = SpaceTable()
    a = t.new("a", 6)
    t.restrict(a, C.MONOMIAL, L)
    parts = t.split(a, (2, 4))
    assert [t.size(p) for p in parts] == [2, 4]
    assert t.child_sizes(a) == (2, 4)
    assert t.expand((a,)) == tuple(t.find(p) for p in parts)
    assert all(t.cls(p) == C.MONOMIAL for p in parts)  # children inherit the class
    assert t.split(a, (2, 4)) == parts  # idempotent
    assert a.space not in t.roots() and all(p.space in t.roots() for p in parts)
    assert a.space in t.top_roots() and not any(p.space in t.top_roots() for p in parts)
    t.restrict(a, C.PERMUTATION, L)  # a restriction of the whole reaches every block
    assert all(t.cls(p) == C.PERMUTATION for p in parts)
    with pytest.raises(ValueError):
        t.split(a, (3, 4))


def test_split_with_a_single_part_is_a_no_op():
    t = SpaceTable()
    a = t.new("a", 5)
    assert t.split(a, (5,)) == (a,)
    assert t.child_sizes(a) == ()


def test_resplitting_differently_clears():
    t = SpaceTable()
    a = t.new("a", 6)
    t.split(a, (3, 3))
    parts = t.split(a, (2, 4))
    assert [t.size(p) for p in parts] == [2, 4]
    assert all(t.cls(p) == C.CLEAR for p in parts)
    assert all(t.cls(p) == C.CLEAR for p in t.expand((a,)))


def test_union_of_a_split_and_an_unsplit_space_splits_both_alike():
    t = SpaceTable()
    a, b = t.new("a", 6), t.new("b", 6)
    pa = t.split(a, (2, 4))
    t.union(b, a.flipped(), L)
    assert t.child_sizes(b) == (2, 4)
    pb = t.expand((b,))
    for x, y in zip(pa, pb):
        assert t.find(x).space == t.find(y).space
        assert t.find(x).dual != t.find(y).dual  # the duality reaches every block
    t.restrict(pb[0], C.PERMUTATION, L)
    assert t.cls(pa[0]) == C.PERMUTATION and t.cls(pa[1]) == C.INVERTIBLE


def test_union_of_incompatible_splits_clears():
    t = SpaceTable()
    a, b = t.new("a", 6), t.new("b", 6)
    t.split(a, (3, 3))
    t.split(b, (2, 4))
    t.union(a, b, L)
    assert all(t.cls(r) == C.CLEAR for r in t.expand((a, b)))


def test_refine_cuts_blocks_at_offsets():
    t = SpaceTable()
    a, b = t.new("a", 3), t.new("b", 3)
    blocks = t.refine((a, b), [1, 3, 6])
    assert [t.size(r) for r in blocks] == [1, 2, 3]
    assert t.child_sizes(a) == (1, 2) and t.child_sizes(b) == ()
    assert t.refine((a, b), [3]) == t.expand((a, b))  # already a boundary: nothing new
    c = t.new("c", 8)
    assert [t.size(r) for r in t.refine((c,), [2, 4, 6, 8])] == [2, 2, 2, 2]


def test_refine_with_numpy_cuts_keeps_python_int_sizes():
    """Cuts a rule computed with numpy (``np.cumsum`` of a Split's sizes) give blocks whose sizes the
    report can write as JSON."""
    t = SpaceTable()
    a = t.new("a", 6)
    blocks = t.refine((a,), list(np.cumsum(np.array([2, 4]))))
    assert [type(t.size(r)) for r in blocks] == [int, int] and t.child_sizes(a) == (2, 4)


def test_link_permutation_restricts_to_monomial_and_shares_the_perm_root():
    t = SpaceTable()
    a, b, other = t.new("a", 4), t.new("b", 4), t.new("other", 4)
    t.restrict(b, C.ORTHOGONAL, L)
    why = Limit("bn", "BatchNormalization", "shared permutation")
    t.link_permutation(a, b, why)
    assert t.cls(a) == C.MONOMIAL
    assert t.cls(b) == C.SIGNED_PERMUTATION
    assert t.root_leaf(a).limits[-1] == (C.MONOMIAL, why)
    assert t.find(a) != t.find(b)  # two spaces (own scales), one permutation
    assert t.perm_root(a) == t.perm_root(b) != t.perm_root(other)
    assert sorted(t.perm_group(a)) == sorted([a.space, b.space])


def test_linked_spaces_split_alike():
    """Splitting a space that shares its permutation splits its partners alike, block by block
    (a SwiGLU hidden axis whose down projection is quantised in blocks along K)."""
    t = SpaceTable()
    a, b, other = t.new("a", 4), t.new("b", 4), t.new("other", 4)
    t.restrict(b, C.PERMUTATION, L)
    t.link_permutation(a, b, L)
    blocks = t.split(a, (2, 2))
    assert t.child_sizes(b) == (2, 2)
    twins = t.expand((b,))
    for block, twin in zip(blocks, twins):
        assert t.perm_root(block) == t.perm_root(twin)
        assert t.find(block) != t.find(twin)  # own scales
    assert t.perm_root(blocks[0]) != t.perm_root(blocks[1]) != t.perm_root(other)
    assert [t.cls(r) for r in blocks] == [C.MONOMIAL] * 2 and [t.cls(r) for r in twins] == [C.PERMUTATION] * 2
    # linking after a split: the other space is split the same way, blocks linked pairwise
    c, d = t.new("c", 4), t.new("d", 4)
    t.split(c, (1, 3))
    t.link_permutation(c, d, L)
    assert t.child_sizes(d) == (1, 3)
    assert [t.perm_root(r) for r in t.expand((c,))] == [t.perm_root(r) for r in t.expand((d,))]
    # differently split spaces cannot share a permutation
    e, f = t.new("e", 4), t.new("f", 4)
    t.split(e, (2, 2))
    t.split(f, (1, 3))
    t.link_permutation(e, f, L)
    assert all(t.cls(r) == C.CLEAR for r in t.expand((e, f)))


def test_union_keeps_the_permutation_group_when_the_new_root_is_older():
    t = SpaceTable()
    a, b = t.new("a", 4), t.new("b", 4)
    t.link_permutation(a, b, L)
    c = t.new("c", 4)
    t.union(b, c, L)  # b is older than c: b stays the root
    assert t.perm_root(a) == t.perm_root(b) == t.perm_root(c)


def test_union_keeps_the_permutation_group_when_the_linked_space_becomes_a_child():
    """BatchNorm links conv-out (b) and bn-out (c); a residual Add then unites c with an older space (a).
    b and c must still share one permutation, or BatchNorm's fold cannot be expressed."""
    t = SpaceTable()
    a, b, c = t.new("residual", 4), t.new("conv_out", 4), t.new("bn_out", 4)
    t.link_permutation(b, c, L)
    t.union(c, a, L)
    assert t.perm_root(b) == t.perm_root(c) == t.perm_root(a)


def test_pair_classes_meet_as_complex_scalars_per_pair():
    """RoPE pairs: complex ∧ monomial = a scaled quarter turn per pair; ∧ orthogonal = a rotation; ∧ signed
    permutation = a quarter turn; real scalars ∧ quarter turns = signs; layouts never mix; permutations hold only 1."""
    from eecompile.passes.spaces import BasisClass as C, meet
    assert meet(C.COMPLEX_HALF, C.MONOMIAL) == C.PAIR_SCALED_TURNS_HALF
    assert meet(C.COMPLEX_HALF, C.SIGNED_PERMUTATION) == C.PAIR_UNITS_HALF
    assert meet(C.COMPLEX_INTERLEAVED, C.ORTHOGONAL) == C.PAIR_ROTATIONS_INTERLEAVED
    assert meet(meet(C.COMPLEX_HALF, C.ORTHOGONAL), C.MONOMIAL) == C.PAIR_UNITS_HALF
    assert meet(C.PAIR_SCALES_HALF, C.PAIR_UNITS_HALF) == C.PAIR_SIGNS_HALF
    assert meet(C.COMPLEX_HALF, C.POSITIVE_MONOMIAL) == C.PAIR_POSITIVE_HALF
    assert meet(C.PAIR_SIGNS_HALF, C.INVERTIBLE) == C.PAIR_SIGNS_HALF
    assert meet(C.COMPLEX_HALF, C.COMPLEX_INTERLEAVED) == C.CLEAR
    assert meet(C.COMPLEX_HALF, C.PERMUTATION) == C.CLEAR
    assert meet(C.PAIR_UNITS_HALF, C.POSITIVE_MONOMIAL) == C.CLEAR


def test_a_clear_member_clears_its_permutation_group():
    """Spaces sharing a permutation cannot keep one when a member is clear: the whole group is cleared."""
    from eecompile.passes.spaces import Limit, SpaceTable

    table = SpaceTable()
    a, b, c = table.new("a", 4), table.new("b", 4), table.new("c", 4)
    link = Limit("bn", "BatchNormalization", "per-channel affine")
    table.link_permutation(a, b, link)
    table.restrict(c, BasisClass.PERMUTATION, link)
    table.clear(b, Limit("lp", "LpNormalization", "no rule for op LpNormalization"))
    assert table.settle_permutation_groups() == ["a"]
    assert table.cls(a) == BasisClass.CLEAR and table.cls(c) == BasisClass.PERMUTATION
    assert "shares its permutation with b" in table.root_leaf(a).limits[-1][1].reason


def test_batchnorm_before_an_op_without_rule_compiles_exactly(build, compile_exact, rng):
    """Conv → BatchNormalization → LpNormalization (no rule): BN's shared permutation falls with its output."""
    from onnx import TensorProto, helper

    c = 4
    inits = {"W": rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "s": rng.random(c).astype(np.float32) + 0.5,
             "b": rng.standard_normal(c).astype(np.float32), "m": rng.standard_normal(c).astype(np.float32),
             "v": rng.random(c).astype(np.float32) + 0.5}
    nodes = [helper.make_node("Conv", ["x", "W"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["conv", "s", "b", "m", "v"], ["bn"], name="bn"),
             helper.make_node("LpNormalization", ["bn"], ["y"], name="lp", axis=1)]
    path = build(nodes, [("x", TensorProto.FLOAT, [1, 3, 5, 5])], [("y", TensorProto.FLOAT, [1, c, 5, 5])], inits,
                 opset=17)
    report = compile_exact(path, {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}).report
    conv = next(s for s in report["spaces"] if "conv" in s["tensors"])
    assert conv["basis"] == "clear" and "shares its permutation" in conv["limited_by"]["reason"]
