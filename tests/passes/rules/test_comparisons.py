"""eecompile.passes.rules.comparisons: token ids compared with constants on ciphertext.

``Equal(ids, c)`` is exact against the permuted constant; an order comparison is exact only when
its result does not depend on the id; the boolean result is clear (it shows where the compared
token stands, as an attention mask does).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from eecompile.runtime.client import Client

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
V, D, PAD = 20, 6, 1


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _ids(rng, pads: bool = True):
    ids = rng.integers(2, V, (2, 5)).astype(np.int64)
    if pads:
        ids[0, 3:] = PAD
    return ids


def _roberta_positions(build, rng, compare_first: bool):
    """RoBERTa's ``cumsum(ids != pad) * (ids != pad) + pad`` position ids, then two embeddings; the pad
    constant is shared by Equal and Add, as exporters deduplicate it."""
    positions = [helper.make_node("Equal", ["input_ids", "pad"], ["is_pad"], name="eq"),
                 helper.make_node("Not", ["is_pad"], ["keep"], name="not"),
                 helper.make_node("Cast", ["keep"], ["keep_i"], name="cast", to=INT64),
                 helper.make_node("CumSum", ["keep_i", "axis"], ["count"], name="cumsum"),
                 helper.make_node("Mul", ["count", "keep_i"], ["inc"], name="mul"),
                 helper.make_node("Add", ["inc", "pad"], ["pos"], name="add_pad"),
                 helper.make_node("Gather", ["P", "pos"], ["pe"], name="pos_embed")]
    words = [helper.make_node("Gather", ["E", "input_ids"], ["we"], name="embed")]
    nodes = (positions + words) if compare_first else (words + positions)
    nodes += [helper.make_node("Add", ["we", "pe"], ["h"], name="sum"),
              helper.make_node("MatMul", ["h", "W"], ["y"], name="head")]
    return build(nodes, [("input_ids", INT64, ["B", "S"])], [("y", FLOAT, ["B", "S", 3])],
                 {"pad": np.array(PAD, np.int64), "axis": np.array(1, np.int64), "P": _f(rng, 10, D),
                  "E": _f(rng, V, D), "W": _f(rng, D, 3)})


@pytest.mark.parametrize("compare_first", [True, False])
def test_equal_against_the_pad_id_is_folded(compare_first, rng, build, lint, compile_exact):
    path = _roberta_positions(build, rng, compare_first)
    report = lint(path)
    assert report.protection("inputs", "input_ids") == f"permuted index values ({V} classes)"
    assert not report["unsupported_ops"]
    result = compile_exact(path, [{"input_ids": _ids(rng)}, {"input_ids": _ids(rng, pads=False)}])
    server = onnx.load(str(result.server_model))
    equal = next(n for n in server.graph.node if n.op_type == "Equal")
    consts = {t.name: numpy_helper.to_array(t) for t in server.graph.initializer}
    client = Client.load(result.client_dir)
    encrypted_pad = client.encrypt({"input_ids": np.array([PAD], np.int64)})["input_ids"][0]
    assert int(consts[equal.input[1]]) == int(encrypted_pad)  # compared with the pad id as the client encrypts it
    add = next(n for n in server.graph.node if n.name == "add_pad")
    assert int(consts[add.input[1]]) == PAD  # the shared constant keeps its plaintext value for the Add


def _compare_graph(build, rng, op: str, value: int):
    return build([helper.make_node(op, ["input_ids", "c"], ["m"], name="cmp"),
                  helper.make_node("Gather", ["E", "input_ids"], ["h"], name="embed"),
                  helper.make_node("Cast", ["m"], ["mf"], name="cast", to=FLOAT),
                  helper.make_node("Unsqueeze", ["mf", "last"], ["mu"], name="unsq"),
                  helper.make_node("Mul", ["h", "mu"], ["y"], name="mask")],
                 [("input_ids", INT64, ["B", "S"])], [("y", FLOAT, ["B", "S", D])],
                 {"c": np.array(value, np.int64), "E": _f(rng, V, D), "last": np.array([-1], np.int64)})


@pytest.mark.parametrize("op,value,permuted", [("Less", 5, False), ("Less", 0, True), ("GreaterOrEqual", V, True),
                                               ("Greater", -1, True), ("LessOrEqual", V - 1, True),
                                               ("Greater", 3, False)])
def test_order_comparisons_keep_ids_only_when_the_result_is_constant(op, value, permuted, rng, build, lint,
                                                                     compile_exact):
    path = _compare_graph(build, rng, op, value)
    report = lint(path)
    expected = f"permuted index values ({V} classes)" if permuted else "clear"
    assert report.protection("inputs", "input_ids") == expected
    compile_exact(path, [{"input_ids": _ids(rng)} for _ in range(2)])


def test_two_id_tensors_compared_share_one_permutation(rng, build, lint, compile_exact):
    path = build([helper.make_node("Gather", ["E", "a"], ["ha"], name="embed_a"),
                  helper.make_node("Gather", ["E2", "b"], ["hb"], name="embed_b"),
                  helper.make_node("Equal", ["a", "b"], ["same"], name="eq"),
                  helper.make_node("Unsqueeze", ["same", "last"], ["same_u"], name="unsq"),
                  helper.make_node("Where", ["same_u", "ha", "hb"], ["y"], name="pick")],
                 [("a", INT64, [2, 5]), ("b", INT64, [2, 5])], [("y", FLOAT, [2, 5, D])],
                 {"E": _f(rng, V, D), "E2": _f(rng, V, D), "last": np.array([-1], np.int64)})
    report = lint(path)
    assert report.protection("inputs", "a") == f"permuted index values ({V} classes)"
    assert report.protection("inputs", "b") == f"permuted index values ({V} classes)"
    a = _ids(rng)
    b = a.copy()
    b[1, :2] = (b[1, :2] + 1) % V
    compile_exact(path, {"a": a, "b": b})


def _roberta_module():
    import torch
    from torch import nn

    class Embeddings(nn.Module):
        """RoBERTa's embeddings: position ids from the non-pad tokens, two lookups, a norm, a head."""

        def __init__(self) -> None:
            super().__init__()
            self.words = nn.Embedding(V, 8, padding_idx=PAD)
            self.positions = nn.Embedding(12, 8, padding_idx=PAD)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 3)

        def forward(self, input_ids):
            mask = input_ids.ne(PAD).int()
            positions = (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + PAD
            return self.head(self.norm(self.words(input_ids) + self.positions(positions)))

    torch.manual_seed(0)
    return Embeddings()


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_roberta_position_ids_export(exporter, rng, torch_export, lint, compile_exact):
    import torch

    ids = torch.tensor([[5, 6, 7, PAD, PAD], [3, 4, 8, 9, 10]])
    path = torch_export(_roberta_module(), (ids,), exporter, ["input_ids"], ["y"])
    report = lint(path)
    assert report.protection("inputs", "input_ids") == f"permuted index values ({V} classes)"
    assert not report["unsupported_ops"]
    result = compile_exact(path, [{"input_ids": _ids(rng)}, {"input_ids": _ids(rng, pads=False)}])
    assert result.report["exposure"]["intermediates_exposed"] == 0
