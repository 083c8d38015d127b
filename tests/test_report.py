"""eecompile.report: the lint report (JSON dict) and its text and Markdown renderings."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import eecompile
from eecompile.passes.analyze import analyze
from eecompile.passes.annotations import Protected
from eecompile.passes.graph import ModelGraph, infer_shapes, load_model
from eecompile.passes.normalize import normalize
from eecompile.passes.rules import unregistered
from eecompile.passes.spaces import BasisClass
from eecompile.report import BASIS_ORDER, bases_log2, render_markdown, render_text

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
H, HD = 2, 3
D = H * HD


def _model(path, rng, custom: bool = False):
    """Embedding → heads attention → Gelu → head, with an optional custom-domain op at the end."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("Gather", ["E", "ids"], ["x"], name="embed")]
    nodes += [helper.make_node("MatMul", ["x", f"W{t}"], [t], name=f"{t}_proj") for t in "qkv"]
    for t in "qkv":
        nodes += [helper.make_node("Reshape", [t, "heads"], [f"{t}4"], name=f"{t}_heads"),
                  helper.make_node("Transpose", [f"{t}4"], [f"{t}h"], name=f"{t}_transpose", perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["kh"], ["kt"], name="k_t", perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["qh", "kt"], ["scores"], name="qk"),
              helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "vh"], ["ctx"], name="pv"),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="ctx_transpose", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge"], ["merged"], name="merge_heads"),
              helper.make_node("MatMul", ["merged", "Wo"], ["o"], name="o_proj"),
              helper.make_node("Gelu", ["o"], ["g"], name="activation"),
              helper.make_node("MatMul", ["g", "W"], ["logits"], name="lm_head")]
    outputs = [helper.make_tensor_value_info("logits", FLOAT, ["B", "S", 9])]
    opsets = [helper.make_opsetid("", 20)]
    if custom:
        nodes.append(helper.make_node("Mystery", ["logits"], ["extra"], name="mystery_node", domain="com.example"))
        outputs.append(helper.make_tensor_value_info("extra", FLOAT, ["B", "S", 9]))
        opsets.append(helper.make_opsetid("com.example", 1))
    inits = {"E": f(9, D), "Wq": f(D, D), "Wk": f(D, D), "Wv": f(D, D), "Wo": f(D, D), "W": f(D, 9),
             "heads": np.array([0, 0, H, HD]), "merge": np.array([0, 0, D])}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", INT64, ["B", "S"])], outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(31)


def test_report_schema(rng, tmp_path):
    report = eecompile.lint_model(_model(tmp_path / "m.onnx", rng))
    assert set(report) >= {"model", "warnings", "spaces", "inputs", "outputs", "unsupported_ops", "weaknesses",
                           "policies",
                           "summary"}
    assert report["model"] == "m.onnx"
    for space in report["spaces"]:
        assert set(space) == {"name", "size", "basis", "class", "blocks", "limited_by", "lift", "bases_log2",
                              "groups_permuted", "tensors"}
        assert space["basis"] in BASIS_ORDER
        assert space["limited_by"] is None or set(space["limited_by"]) == {"node", "op_type", "reason"}
    names = [s["name"] for s in report["spaces"]]
    assert len(names) == len(set(names))
    assert report["summary"] == {b: sum(s["basis"] == b for s in report["spaces"])
                                 for b in {s["basis"] for s in report["spaces"]}}
    assert [i["name"] for i in report["inputs"]] == ["ids"] and [o["name"] for o in report["outputs"]] == ["logits"]
    assert report["unsupported_ops"] == []
    assert any("substitution cipher" in w for w in report["weaknesses"])
    assert any("attention patterns" in w for w in report["weaknesses"])


def test_renderings_name_every_space_and_unsupported_node(rng, tmp_path):
    path = _model(tmp_path / "m.onnx", rng, custom=True)
    with unregistered("Gelu"):
        report = eecompile.lint_model(path)
    unsupported = {u["node"]: u for u in report["unsupported_ops"]}
    assert set(unsupported) == {"activation", "mystery_node"}
    assert unsupported["mystery_node"]["domain"] == "com.example"
    text, markdown = render_text(report), render_markdown(report)
    assert len(report["spaces"]) >= 5
    for space in report["spaces"]:
        assert space["name"] in text
        assert f"`{space['name']}`" in markdown
        assert space["basis"] in text
    for node in ("activation", "mystery_node"):
        assert node in text and f"`{node}`" in markdown
    assert "com.example::Mystery" in text and "ai.onnx::Gelu" in markdown
    assert "unsupported ops" in text.lower()
    for weakness in report["weaknesses"]:
        assert weakness in text and weakness in markdown
    for io in report["inputs"] + report["outputs"]:
        assert f"{io['name']}: {io['protection']}" in text
    table_rows = [line for line in markdown.splitlines() if line.startswith("| `")]
    assert len(table_rows) == len(report["spaces"])


def test_renderings_without_unsupported_ops(rng, tmp_path):
    report = eecompile.lint_model(_model(tmp_path / "m.onnx", rng))
    text, markdown = render_text(report), render_markdown(report)
    assert "unsupported ops" not in text
    assert "## Unsupported ops\n\nnone" in markdown
    summary = text.splitlines()[2]
    assert summary.startswith(f"spaces: {len(report['spaces'])} (")


def test_compile_writes_the_same_report(rng, tmp_path):
    path = _model(tmp_path / "m.onnx", rng)
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")
    lint = eecompile.lint_model(path)
    assert [s["name"] for s in result.report["spaces"]] == [s["name"] for s in lint["spaces"]]
    assert [s["basis"] for s in result.report["spaces"]] == [s["basis"] for s in lint["spaces"]]
    assert result.report["verification"]["checked"]
    assert (tmp_path / "out" / "report.md").read_text() == render_markdown(result.report)


def test_every_protected_tensor_is_listed(rng, tmp_path):
    path = _model(tmp_path / "m.onnx", rng)
    mg = ModelGraph(infer_shapes(load_model(path)))
    normalize(mg)
    analysis = analyze(ModelGraph(infer_shapes(mg.export())))
    protected = {name for name, ann in analysis.ctx.ann.items() if isinstance(ann, Protected)}
    assert {"qh", "kh", "vh", "ctx"} <= protected
    listed = {t for s in eecompile.lint_model(path)["spaces"] for t in s["tensors"]}
    assert protected <= listed, sorted(protected - listed)


# -- honest protection of server-side state -------------------------------------------------------


def _kv_model(path, rng):
    """k = x·Wk split into heads and appended to the cache: present = Concat(past, k) on the sequence axis."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
             helper.make_node("Reshape", ["k", "heads"], ["k4"], name="k_heads"),
             helper.make_node("Transpose", ["k4"], ["kh"], name="k_transpose", perm=[0, 2, 1, 3]),
             helper.make_node("Concat", ["past_key", "kh"], ["present_key"], name="cache", axis=2),
             helper.make_node("Transpose", ["present_key"], ["pt"], name="back", perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["pt", "merge"], ["merged"], name="merge_heads"),
             helper.make_node("MatMul", ["merged", "Wo"], ["y"], name="out")]
    inputs = [helper.make_tensor_value_info("x", FLOAT, ["B", "S", D]),
              helper.make_tensor_value_info("past_key", FLOAT, ["B", H, "P", HD])]
    outputs = [helper.make_tensor_value_info("y", FLOAT, ["B", "T", 4]),
               helper.make_tensor_value_info("present_key", FLOAT, ["B", H, "T", HD])]
    inits = {"Wk": f(D, D), "Wo": f(D, 4), "heads": np.array([0, 0, H, HD]), "merge": np.array([0, 0, D])}
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_protected_state_is_called_ciphertext(rng, tmp_path):
    report = eecompile.lint_model(_kv_model(tmp_path / "kv.onnx", rng))
    for side, name in (("inputs", "past_key"), ("outputs", "present_key")):
        protection = next(io["protection"] for io in report[side] if io["name"] == name)
        assert protection.startswith("server-side state (ciphertext: invertible on axis 3, per index of axis 1")
    assert report["warnings"] == []
    assert not render_text(report).splitlines()[1].startswith("WARNING")


def test_clear_state_is_reported_as_clear_prominently(rng, tmp_path):
    path = _kv_model(tmp_path / "kv.onnx", rng)
    with unregistered("MatMul"):
        report = eecompile.lint_model(path)
    protection = next(io["protection"] for io in report["outputs"] if io["name"] == "present_key")
    assert "ciphertext" not in protection and "CLEAR" in protection
    assert "ciphertext" not in next(io["protection"] for io in report["inputs"] if io["name"] == "past_key")
    assert len(report["warnings"]) == 1 and "1 of 1 KV-cache output(s) are CLEAR state" in report["warnings"][0]
    assert "present_key" in report["warnings"][0]
    text, markdown = render_text(report), render_markdown(report)
    assert text.splitlines()[1] == f"WARNING: {report['warnings'][0]}"
    assert markdown.splitlines()[2].startswith(f"> **Warning:** {report['warnings'][0]}")


def test_partly_clear_state_counts_its_clear_heads(rng, tmp_path):
    from eecompile.passes.spaces import Limit
    from eecompile.report import build_report

    mg = ModelGraph(infer_shapes(load_model(_kv_model(tmp_path / "kv.onnx", rng))))
    normalized = normalize(mg)
    analysis = analyze(ModelGraph(infer_shapes(mg.export())))
    ann = analysis.ctx.get(analysis.mg.tensors["present_key"])
    assert isinstance(ann, Protected) and ann.head_axis == 1 and len(ann.refs) == H
    analysis.ctx.spaces.clear(ann.refs[0], Limit("test", "Test", "cleared by the test"))
    report = build_report(analysis, normalized, "kv.onnx")
    protection = next(io["protection"] for io in report["outputs"] if io["name"] == "present_key")
    assert protection.startswith(f"server-side state: 1 of {H} heads clear (ciphertext on the rest: invertible")
    assert any("partly clear state: 1 of 2 heads clear" in w for w in report["warnings"])


def test_weak_spaces_say_what_would_lift_them(rng, tmp_path):
    from eecompile.report import lift

    report = eecompile.lint_model(_model(tmp_path / "m.onnx", rng))
    for space in report["spaces"]:
        if space["basis"] in ("clear", "permutation", "signed-permutation", "monomial"):
            assert space["lift"]["kind"] in ("re-export", "policy", "inherent to the op", "follows another space",
                                             "unknown")
            assert space["lift"]["how"] in render_text(report) and space["lift"]["how"] in render_markdown(report)
        else:
            assert space["lift"] is None
    ids = next(s for s in report["spaces"] if "ids" in s["tensors"])
    assert ids["lift"]["kind"] == "inherent to the op"
    reshape = {"node": "n", "op_type": "Reshape", "reason": "cannot follow the protected axis through [4] -> [2, 2]"}
    assert lift(reshape, "clear")["kind"] == "re-export" and "opset 23" in lift(reshape, "clear")["how"]
    assert lift({"node": "n", "op_type": "Mul", "reason": "multiplied by a per-coordinate constant"},
                "monomial")["kind"] == "policy"
    assert lift({"node": "n", "op_type": "Foo", "reason": "no rule for op com.x::Foo"}, "clear")["kind"] == "re-export"
    assert lift({"node": "n", "op_type": "Relu", "reason": "Relu commutes only with positive monomial bases"},
                "monomial")["kind"] == "inherent to the op"
    assert lift(reshape, "orthogonal") is None


@pytest.mark.parametrize("limit,basis,kind,says", [
    ({"op_type": "LayerNormalization", "reason": "its gain cannot be folded: Add 'residual' is neither a linear "
      "layer nor an op that only moves the feature axis, so the gain stays and must be permuted"}, "permutation",
     "policy", "--policy rebase"),
    ({"op_type": "LayerNormalization", "reason": "its gain is kept (the space is permuted anyway), so it must be "
      "permuted"}, "permutation", "follows another space", "once that is lifted the gain folds"),
    ({"op_type": "Mul", "reason": "multiplied by a per-coordinate constant"}, "monomial", "policy", "graph outputs"),
    ({"op_type": "Gelu", "reason": "Gelu commutes only with a permutation basis"}, "permutation",
     "inherent to the op", "elementwise nonlinearity"),
    ({"op_type": "Tanh", "reason": "Tanh commutes only with a signed-permutation basis"}, "signed-permutation",
     "inherent to the op", "elementwise nonlinearity"),
    ({"op_type": "Mul", "reason": "product of a tensor with itself"}, "permutation", "inherent to the op", "product"),
])
def test_every_weak_class_and_binding_op_gets_a_concrete_hint(limit, basis, kind, says):
    from eecompile.report import lift

    found = lift({"node": "n", **limit}, basis)
    assert found["kind"] == kind and says in found["how"]


def test_a_space_the_rebase_policy_lifts_says_so_with_its_cost(rng, tmp_path):
    """A post-LN gain feeding the residual Add: the lint names the norm and ``--policy rebase``'s cost; under
    the policy the report records it and no space still carries the hint."""
    from eecompile.passes.options import CompileOptions

    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="in_proj"),
             helper.make_node("LayerNormalization", ["h", "g", "b"], ["n"], name="post_ln", axis=-1),
             helper.make_node("MatMul", ["n", "W2"], ["f"], name="ffn"),
             helper.make_node("Add", ["n", "f"], ["s"], name="residual"),
             helper.make_node("MatMul", ["s", "W3"], ["y"], name="head")]
    inits = [numpy_helper.from_array(v, k) for k, v in
             {"W1": f(4, 16), "g": f(16) + 2.0, "b": f(16), "W2": f(16, 16), "W3": f(16, 3)}.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, ["B", 4])],
                              [helper.make_tensor_value_info("y", FLOAT, ["B", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "post_ln.onnx"
    onnx.save(model, str(path))
    report = eecompile.lint_model(path)
    stream = next(s for s in report["spaces"] if "s" in s["tensors"])
    assert stream["basis"] == "permutation" and stream["limited_by"]["node"] == "post_ln"
    assert stream["lift"]["how"].startswith("`--policy rebase` would make this dense at the cost of one 16×16 "
                                            "MatMul per binding op (1 here, after LayerNormalization 'post_ln')")
    assert stream["lift"]["how"] in render_text(report)
    rebased = eecompile.lint_model(path, options=CompileOptions(policy="rebase"))
    assert rebased["policy"] == "rebase"
    assert all("--policy rebase" not in (s["lift"] or {}).get("how", "") for s in rebased["spaces"])
    assert next(s for s in rebased["spaces"] if "s" in s["tensors"])["basis"] == "invertible"  # no norm after it


def test_bases_log2_counts_discrete_classes_only():
    assert bases_log2([(BasisClass.PERMUTATION, 2)] * 8) == 8.0
    assert bases_log2([(BasisClass.SIGNED_PERMUTATION, 3)]) == round(np.log2(6) + 3, 1)
    assert bases_log2([(BasisClass.PAIR_SIGNS_HALF, 8)]) == 4.0 and bases_log2([(BasisClass.PAIR_UNITS_HALF, 8)]) == 8.0
    assert bases_log2([(BasisClass.PERMUTATION, 4), (BasisClass.INVERTIBLE, 4)]) is None
    assert bases_log2([(BasisClass.MONOMIAL, 4)]) is None and bases_log2([(BasisClass.CLEAR, 4)]) == 0.0


def test_a_space_with_few_bases_is_named_in_the_weaknesses(rng, tmp_path):
    """Four groups of two channels under permutations: 2^4 bases, which a server can simply try."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(v, n) for n, v in
             {"W1": f(8, 3, 1, 1), "s": f(8), "t": f(8), "W2": f(2, 8, 1, 1)}.items()]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W1"], ["h"], name="conv1"),
         helper.make_node("GroupNormalization", ["h", "s", "t"], ["n"], name="norm", num_groups=4),
         helper.make_node("Conv", ["n", "W2"], ["y"], name="conv2")],
        "g", [helper.make_tensor_value_info("x", FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", FLOAT, [1, 2, 4, 4])], inits)
    path = tmp_path / "groups.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    report = eecompile.lint_model(path)
    (paired,) = [s for s in report["spaces"] if "h" in s["tensors"]]
    assert paired["basis"] == "permutation" and paired["bases_log2"] == 4.0
    assert [s["bases_log2"] for s in report["spaces"] if "x" in s["tensors"]] == [None]  # dense: a continuum
    (weak,) = [w for w in report["weaknesses"] if "fewer than 2^32 bases" in w]
    assert f"{paired['name']} (2^4)" in weak
