"""Loading models: onnx.checker, and ONNX Runtime's op registry for the ops ONNX does not know."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from eecompile.errors import ModelFileError
from eecompile.passes.graph import InvalidModel, check_model, load_checked, load_model
from eecompile.passes.verify import VerificationError, check_structure

FLOAT = TensorProto.FLOAT
H = 8


def _ort_model(make_model, extra=(), sln_attrs=None, skip_inputs=("a", "b", "g2"), skip_outputs=("y", "", "", "s")):
    """SimplifiedLayerNormalization (default domain) then com.microsoft SkipSimplifiedLayerNormalization."""
    nodes = [
        helper.make_node("SimplifiedLayerNormalization", ["x", "g1"], ["a"], name="sln",
                         **(sln_attrs if sln_attrs is not None else {"epsilon": 1e-6, "axis": -1})),
        helper.make_node("Relu", ["x"], ["b"], name="relu"),
        helper.make_node("SkipSimplifiedLayerNormalization", list(skip_inputs), list(skip_outputs), name="skip",
                         domain="com.microsoft", epsilon=1e-6),
        *extra,
    ]
    outputs = [("y", FLOAT, [2, 3, H])] + ([("s", FLOAT, [2, 3, H])] if "s" in skip_outputs else [])
    inits = {"g1": np.linspace(0.5, 1.5, H).astype(np.float32), "g2": np.linspace(1.5, 0.5, H).astype(np.float32)}
    return make_model(nodes, [("x", FLOAT, [2, 3, H])], outputs, inits, opset=22,
                      extra_opsets=[("com.microsoft", 1)])


def test_plain_model_is_checked_by_onnx_checker(build):
    path = build([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, [2])], [("y", FLOAT, [2])])
    model, validity = load_checked(path)
    assert validity.describe() == "onnx.checker"
    assert validity.ort_ops == () and validity.unregistered == ()
    assert load_model(path).graph.node[0].op_type == "Relu"


def test_ops_onnx_runtime_registers_are_accepted_and_named(build, make_model):
    path = build(_ort_model(make_model), check=False)
    model, validity = load_checked(path)
    assert len(model.graph.node) == 3
    assert validity.ort_ops == ("SimplifiedLayerNormalization", "com.microsoft::SkipSimplifiedLayerNormalization")
    assert validity.describe() == ("onnx.checker + ONNX Runtime op registry (ops onnx.checker does not know: "
                                   "SimplifiedLayerNormalization, com.microsoft::SkipSimplifiedLayerNormalization)")


def test_contrib_ops_alone_are_checked_against_onnx_runtime(build, make_model):
    # onnx.checker passes (it skips com.microsoft); the contrib op is still checked against ONNX Runtime.
    model = _ort_model(make_model)
    model.graph.node[0].CopyFrom(helper.make_node("Relu", ["x"], ["a"], name="sln"))
    _, validity = load_checked(build(model))
    assert validity.ort_ops == ("com.microsoft::SkipSimplifiedLayerNormalization",)


def test_an_op_no_registry_knows_is_refused(build, make_model):
    model = _ort_model(make_model)
    model.graph.node[0].op_type = "NoSuchNormalization"
    with pytest.raises(ModelFileError, match="No Op registered for NoSuchNormalization with domain_version of 22 "
                                             r"\(ONNX Runtime does not register it either\)"):
        load_model(build(model, check=False))


def test_an_op_onnx_runtime_registers_only_for_later_opsets_is_refused(build, make_model):
    # RMSNormalization is ONNX (and ONNX Runtime) opset 23; at opset 22 neither has it.
    model = make_model([helper.make_node("RMSNormalization", ["x", "g"], ["y"])], [("x", FLOAT, [2, H])],
                       [("y", FLOAT, [2, H])], {"g": np.ones(H, np.float32)}, opset=22)
    with pytest.raises(ModelFileError, match="No Op registered for RMSNormalization"):
        load_model(build(model, check=False))


def test_the_rest_of_the_model_is_still_checked(build, make_model):
    # A node reading a tensor nothing defines, after the ONNX Runtime op that stopped onnx.checker the first time.
    bad = helper.make_node("Relu", ["undefined_tensor"], ["z"], name="bad")
    model = _ort_model(make_model, extra=[bad])
    model.graph.output.append(helper.make_tensor_value_info("z", FLOAT, [2, 3, H]))
    with pytest.raises(ModelFileError, match="undefined_tensor"):
        load_model(build(model, check=False))


@pytest.mark.parametrize("case, message", [
    ("inputs", r"node skip \(com.microsoft::SkipSimplifiedLayerNormalization\) has 1 inputs; "
               "ONNX Runtime's schema takes 3 to 4"),
    ("outputs", r"has 5 outputs; ONNX Runtime's schema gives 1 to 4"),
    ("attribute", r"node sln \(SimplifiedLayerNormalization\) has attribute 'gamma', which ONNX Runtime's "
                  "schema does not define"),
])
def test_nodes_are_checked_against_the_onnx_runtime_schema(build, make_model, case, message):
    kwargs = {"inputs": {"skip_inputs": ("a",)},
              "outputs": {"skip_outputs": ("y", "m", "v", "s", "extra")},
              "attribute": {"sln_attrs": {"epsilon": 1e-6, "gamma": 1.0}}}[case]
    with pytest.raises(ModelFileError, match=message):
        load_model(build(_ort_model(make_model, **kwargs), check=False))


def test_trailing_empty_optional_inputs_do_not_count(build, make_model):
    _, validity = load_checked(build(_ort_model(make_model, skip_inputs=("a", "b", "g2", "")), check=False))
    assert "com.microsoft::SkipSimplifiedLayerNormalization" in validity.ort_ops


def test_custom_domain_ops_no_registry_knows_are_listed_not_checked(build, make_model):
    model = make_model([helper.make_node("MyOp", ["x"], ["y"], domain="my.domain")], [("x", FLOAT, [2])],
                       [("y", FLOAT, [2])], opset=22, extra_opsets=[("my.domain", 1)])
    _, validity = load_checked(build(model))
    assert validity.unregistered == ("my.domain::MyOp",)
    assert validity.describe() == "onnx.checker; not checked (custom-domain ops no registry knows: my.domain::MyOp)"


def test_server_models_are_checked_the_same_way(build, make_model):
    model = _ort_model(make_model)
    path = build(model, check=False)
    assert check_structure(model, path).ort_ops == ("SimplifiedLayerNormalization",
                                                    "com.microsoft::SkipSimplifiedLayerNormalization")
    assert check_model(model).ort_ops == check_structure(model).ort_ops
    model.graph.node[0].op_type = "NoSuchNormalization"
    with pytest.raises(InvalidModel, match="NoSuchNormalization"):
        check_model(model)
    with pytest.raises(VerificationError, match="compiled model fails onnx.checker: No Op registered for "
                                                "NoSuchNormalization"):
        check_structure(model)


def test_shapes_are_inferred_past_external_weights_and_ort_ops(tmp_path, monkeypatch, make_model):
    """ONNX Runtime's symbolic shape inference reads an Add's bias; with the weights in external data (not
    loaded, and relative to the model, not the working directory) it still runs, and the weights stay."""
    import onnx

    from eecompile.passes.graph import ModelGraph, _symbolic_shapes, infer_shapes

    bias = np.linspace(-1, 1, H).astype(np.float32)
    nodes = [helper.make_node("Add", ["x", "bias"], ["xb"], name="add"),
             helper.make_node("SimplifiedLayerNormalization", ["xb", "g"], ["n"], name="sln", axis=-1, epsilon=1e-6),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    model = make_model(nodes, [("x", FLOAT, ["B", "S", H])], [("y", FLOAT, ["B", "S", H])],
                       {"bias": bias, "g": np.ones(H, np.float32)}, opset=22)
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_model(folder / "m.onnx")
    assert _symbolic_shapes(loaded) is not None
    mg = ModelGraph(infer_shapes(loaded), folder)
    assert mg.shape(mg.tensors["n"]) == ["B", "S", H]
    assert [v.name for v in mg.graph.inputs] == ["x"]
    np.testing.assert_array_equal(mg.const("bias"), bias)
