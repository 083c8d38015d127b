"""eecompile.passes.constant_views: which axis of a constant each axis of a view of it reads."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes.constant_views import ViewAxis, constant_view


def _chain(*steps, shape=(4, 6, 8)):
    """A graph reading constant ``C`` through ``steps`` (op, attrs, extra inputs, output rank), then a MatMul."""
    c = gs.Constant("C", np.zeros(shape, np.float32))
    tensor, ranks = c, {}
    for i, (op, attrs, extra, rank) in enumerate(steps):
        out = gs.Variable(f"t{i}", dtype=np.float32)
        gs.Node(op, name=f"n{i}", attrs=attrs, inputs=[tensor, *extra], outputs=[out])
        ranks[out.name] = rank
        tensor = out
    y = gs.Variable("y", dtype=np.float32)
    reader = gs.Node("MatMul", name="mm", inputs=[gs.Variable("a", dtype=np.float32), tensor], outputs=[y])
    const_shape = lambda t: tuple(t.shape) if isinstance(t, gs.Constant) else None  # noqa: E731
    return tensor, reader, const_shape, lambda t: ranks.get(t.name)


def _repeats(known):
    return lambda t: known


def test_transpose_of_tile_with_a_run_time_batch():
    reps = gs.Variable("reps", dtype=np.int64)
    tensor, reader, shape, rank = _chain(("Tile", {}, [reps], 3), ("Transpose", {"perm": [0, 2, 1]}, [], 3))
    view = constant_view(tensor, reader, shape, rank, _repeats([None, 1, 1]))
    assert view.constant.name == "C" and view.reader.op == "Tile"
    assert view.axes == (ViewAxis(0, True), ViewAxis(2), ViewAxis(1))


def test_unknown_repeats_count_as_repeated():
    reps = gs.Variable("reps", dtype=np.int64)
    tensor, reader, shape, rank = _chain(("Tile", {}, [reps], 3))
    assert all(ax.repeats for ax in constant_view(tensor, reader, shape, rank).axes)


def test_unsqueeze_and_expand_add_broadcast_axes():
    axes = gs.Constant("axes", np.array([0], np.int64))
    target = gs.Variable("target", dtype=np.int64)
    tensor, reader, shape, rank = _chain(("Unsqueeze", {}, [axes], 4), ("Expand", {}, [target], 5),
                                         shape=(1, 6, 8))
    view = constant_view(tensor, reader, shape, rank, const=lambda t: t.values if isinstance(t, gs.Constant)
                         else None)
    # Expand adds a leading axis; the Unsqueezed axis and the constant's size-1 axis are broadcast
    assert view.axes == (ViewAxis(None), ViewAxis(None), ViewAxis(None), ViewAxis(1), ViewAxis(2))


def test_a_chain_tensor_read_by_another_op_is_not_a_view():
    tensor, reader, shape, rank = _chain(("Transpose", {"perm": [0, 2, 1]}, [], 3))
    gs.Node("Relu", inputs=[tensor.inputs[0].inputs[0]], outputs=[gs.Variable("other", dtype=np.float32)])
    assert constant_view(tensor, reader, shape, rank) is None


def test_shape_reads_do_not_count():
    tensor, reader, shape, rank = _chain(("Transpose", {"perm": [0, 2, 1]}, [], 3))
    gs.Node("Shape", inputs=[tensor], outputs=[gs.Variable("s", dtype=np.int64)])
    assert constant_view(tensor, reader, shape, rank).axes == (ViewAxis(0), ViewAxis(2), ViewAxis(1))


def test_an_op_that_changes_values_ends_the_view():
    tensor, reader, shape, rank = _chain(("Relu", {}, [], 3))
    assert constant_view(tensor, reader, shape, rank) is None


def test_a_chain_longer_than_the_bound_is_not_followed():
    from eecompile.passes.constant_views import _MAX_DEPTH

    short = _chain(*[("Identity", {}, [], 3)] * _MAX_DEPTH)
    assert constant_view(*short) is not None
    assert constant_view(*_chain(*[("Identity", {}, [], 3)] * (_MAX_DEPTH + 2))) is None
