"""eecompile.passes.plan: bases drawn from the key, never leaving a protected axis in plain coordinates."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from eecompile.keys import MasterKey
from eecompile.passes.analyze import analyze
from eecompile.passes.basis import Basis
from eecompile.passes.graph import ModelGraph, infer_shapes, load_model
from eecompile.passes.normalize import normalize
from eecompile.passes.plan import draw_basis, leaves_coordinates_in_place, plan
from eecompile.passes.spaces import BasisClass, Ref

FLOAT = TensorProto.FLOAT
C, GROUPS = 8, 4


def _analysis(path):
    mg = ModelGraph(load_model(path), path.parent)
    normalize(mg)
    return analyze(ModelGraph(infer_shapes(mg.export())))


def _small_groups(build, rng):
    """Conv -> GroupNormalization (4 groups of 2 channels, per-channel gain) -> Conv: permutations inside
    each pair only, so a draw leaves all 8 channels in place once in 16 keys."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return build([helper.make_node("Conv", ["x", "W1"], ["h"], name="conv1"),
                  helper.make_node("GroupNormalization", ["h", "s", "t"], ["n"], name="norm", num_groups=GROUPS),
                  helper.make_node("Conv", ["n", "W2"], ["y"], name="conv2")],
                 [("x", FLOAT, [1, 3, 4, 4])], [("y", FLOAT, [1, 2, 4, 4])],
                 {"W1": f(C, 3, 1, 1), "s": f(C), "t": f(C), "W2": f(2, C, 1, 1)}, opset=21)


def test_no_key_leaves_a_protected_axis_in_place(rng, build):
    analysis = _analysis(_small_groups(build, rng))
    spaces = analysis.ctx.spaces
    (paired,) = [top for top in spaces.top_roots() if len(spaces.expand((Ref(top),))) == GROUPS]
    blocks = [r.space for r in spaces.expand((Ref(paired),))]
    assert all(spaces.leaves[b].cls == BasisClass.PERMUTATION and spaces.leaves[b].size == 2 for b in blocks)
    redrawn = 0
    for i in range(160):
        key = MasterKey(i.to_bytes(32, "big"))
        chosen = plan(analysis, key).bases
        assert not all(leaves_coordinates_in_place(chosen[b]) for b in blocks), f"key {i}"
        assert plan(analysis, key).bases.keys() == chosen.keys()
        first = [draw_basis(key, spaces, b) for b in blocks]
        redrawn += all(leaves_coordinates_in_place(basis) for basis in first)
    assert redrawn >= 3  # about 10 of 160 keys drew every pair in place first: the redraw was exercised


def test_the_plan_is_a_function_of_the_key(rng, build):
    analysis = _analysis(_small_groups(build, rng))
    a, b = (plan(analysis, MasterKey(bytes([7]) * 32)).bases for _ in range(2))
    assert all(np.array_equal(a[r].matrix(), b[r].matrix()) for r in a)


def test_in_place_bases_however_stored():
    assert leaves_coordinates_in_place(Basis.identity(3))
    assert leaves_coordinates_in_place(Basis(3, dense=np.eye(3)))
    assert leaves_coordinates_in_place(Basis.monomial(np.arange(3), np.ones(3)))
    assert not leaves_coordinates_in_place(Basis.monomial(np.array([1, 0, 2])))
    assert not leaves_coordinates_in_place(Basis.monomial(np.arange(3), np.array([1.0, -1.0, 1.0])))
