"""Reference zoo: every model x exporter exports, runs in ONNX Runtime and matches torch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from eecompile.models import (  # noqa: E402
    BATCH_LIMITS,
    EXPORTERS,
    UNSUPPORTED,
    ZOO_MODELS,
    build_model,
    export_model,
    input_names,
    make_feeds,
    model_config,
    output_names,
    run_torch,
)

RTOL = ATOL = 1e-4
CASES = [(m, e, o) for m in ZOO_MODELS for e, o in EXPORTERS]
TEXT = {"bert", "gpt2", "llama"}
STANDARD_23 = {"RMSNormalization", "RotaryEmbedding", "Attention"}


def _id(case: tuple[str, str, int]) -> str:
    return f"{case[0]}-{case[1]}{case[2]}"


class _ExportCache:
    """Exports each (model, exporter, opset) at most once per test module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[tuple[str, str, int], Path] = {}
        self.sessions: dict[tuple[str, str, int], ort.InferenceSession] = {}

    def path(self, case: tuple[str, str, int]) -> Path:
        if case in UNSUPPORTED:
            pytest.xfail(UNSUPPORTED[case])
        if case not in self.paths:
            name, exporter, opset = case
            self.paths[case] = export_model(name, self.root / f"{_id(case)}.onnx", exporter, opset)
        return self.paths[case]

    def session(self, case: tuple[str, str, int]) -> ort.InferenceSession:
        if case not in self.sessions:
            self.sessions[case] = ort.InferenceSession(str(self.path(case)), providers=["CPUExecutionProvider"])
        return self.sessions[case]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> _ExportCache:
    return _ExportCache(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {name: build_model(name) for name in ZOO_MODELS}


def _run_ort(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def _assert_close(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert set(got) == set(ref)
    for k, r in ref.items():
        assert got[k].shape == r.shape, k
        assert got[k].dtype == r.dtype, k
        if r.dtype == np.int64:
            np.testing.assert_array_equal(got[k], r, err_msg=k)
        else:
            np.testing.assert_allclose(got[k], r, rtol=RTOL, atol=ATOL, err_msg=k)


def _op_types(path: Path) -> set[str]:
    m = onnx.load(str(path))
    return {(f"{n.domain}::" if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in m.graph.node}


# --------------------------------------------------------------------------- ORT vs torch


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_onnxruntime_matches_torch(case, exports, models) -> None:
    name, exporter, opset = case
    sess = exports.session(case)
    assert [i.name for i in sess.get_inputs()] == input_names(name)
    assert [o.name for o in sess.get_outputs()] == output_names(name)
    limit = BATCH_LIMITS.get(case, 3)
    shapes = [(min(2, limit), 5, 0), (min(3, limit), 3, 0)]
    if name == "llama":
        shapes += [(min(2, limit), 3, 4), (1, 1, 6)]
    for i, (batch, seq, past) in enumerate(shapes):
        feeds = make_feeds(name, seed=i, batch=batch, seq=seq, past=past)
        _assert_close(_run_ort(sess, feeds), run_torch(name, models[name], feeds))


@pytest.mark.parametrize("exporter,opset", EXPORTERS, ids=lambda x: str(x))
def test_llama_decode_step(exporter, opset, exports, models) -> None:
    """Prefill (past=0, seq=4), then feed present.* back as past for a one-token step."""
    case = ("llama", exporter, opset)
    sess = exports.session(case)
    model = models["llama"]
    batch = min(2, BATCH_LIMITS.get(case, 2))
    layers = model_config("llama")["layers"]
    prefill = make_feeds("llama", seed=7, batch=batch, seq=4, past=0)
    got = _run_ort(sess, prefill)
    _assert_close(got, run_torch("llama", model, prefill))
    step = make_feeds("llama", seed=8, batch=batch, seq=1, past=4)
    for i in range(layers):
        for kv in ("key", "value"):
            step[f"past_key_values.{i}.{kv}"] = got[f"present.{i}.{kv}"]
    got2 = _run_ort(sess, step)
    _assert_close(got2, run_torch("llama", model, step))
    # the cache is consistent with running all five tokens at once
    full = make_feeds("llama", seed=0, batch=batch, seq=5, past=0)
    full["input_ids"] = np.concatenate([prefill["input_ids"], step["input_ids"]], axis=1)
    ref_full = run_torch("llama", model, full)
    np.testing.assert_allclose(got2["logits"][:, -1], ref_full["logits"][:, -1], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got2["present.1.key"], ref_full["present.1.key"], rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- graph shape


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_export_is_self_contained_and_dynamic(case, exports) -> None:
    name, exporter, opset = case
    path = exports.path(case)
    m = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(m)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    assert {p.name for p in path.parent.iterdir() if p.name.startswith(_id(case))} == {path.name}
    assert {o.version for o in m.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch", vi.name
        if vi.name.startswith("past_key_values."):
            assert dims[2].dim_param == "past_sequence"
        elif name in TEXT:
            assert dims[1].dim_param, vi.name
    # no two non-scalar initializers are identical (the noise in build_model guarantees it)
    seen: dict[bytes, str] = {}
    for t in m.graph.initializer:
        arr = onnx.numpy_helper.to_array(t)
        if arr.size > 1:
            key = arr.dtype.str.encode() + str(arr.shape).encode() + arr.tobytes()
            assert key not in seen, f"{t.name} duplicates {seen.get(key)}"
            seen[key] = t.name


@pytest.mark.parametrize("exporter,opset", EXPORTERS, ids=lambda x: str(x))
def test_llama_standard_ops(exporter, opset, exports) -> None:
    ops = _op_types(exports.path(("llama", exporter, opset)))
    if exporter == "dynamo" and opset >= 23:
        assert STANDARD_23 <= ops
        assert "Softmax" not in ops and "Neg" not in ops and "ReduceMean" not in ops
    else:
        assert not STANDARD_23 & ops
        assert {"Softmax", "Neg", "Slice", "Expand", "ReduceMean", "Sqrt", "MatMul"} <= ops


def test_expected_ops(exports) -> None:
    assert "ArgMax" in _op_types(exports.path(("mlp_argmax", "dynamo", 20)))
    assert "Softmax" in _op_types(exports.path(("mlp_softmax", "dynamo", 20)))
    assert {"Gelu", "LayerNormalization"} <= _op_types(exports.path(("mlp", "dynamo", 20)))
    assert {"Conv", "MaxPool", "Relu", "Add"} <= _op_types(exports.path(("cnn", "legacy", EXPORTERS[2][1])))
    assert {"Split", "Trilu", "Gelu"} <= _op_types(exports.path(("gpt2", "dynamo", 20)))


# --------------------------------------------------------------------------- torch side


def test_build_model_noise_and_determinism() -> None:
    for name in ZOO_MODELS:
        a, b, c = build_model(name, 0), build_model(name, 0), build_model(name, 1)
        assert not a.training
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        for k, v in sa.items():
            torch.testing.assert_close(v, sb[k], rtol=0, atol=0)
            if v.is_floating_point() and not k.endswith("inv_freq"):
                assert not torch.equal(v, sc[k]), k
        for mod in a.modules():
            if isinstance(mod, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)) or type(mod).__name__.endswith("RMSNorm"):
                assert not torch.all(mod.weight == 1)
            if isinstance(mod, torch.nn.BatchNorm2d):
                assert torch.all(mod.running_var > 0)
            if getattr(mod, "bias", None) is not None:
                assert not torch.all(mod.bias == 0)


def test_llama_standard_path_matches_decomposed_in_torch(models) -> None:
    ref = models["llama"]
    std = build_model("llama")
    std.standard_ops = True
    feeds = make_feeds("llama", seed=3, batch=2, seq=3, past=2)
    feeds["position_ids"] = np.array([[2, 3, 4], [5, 7, 9]])
    out_ref, out_std = run_torch("llama", ref, feeds), run_torch("llama", std, feeds)
    for k in out_ref:
        np.testing.assert_allclose(out_std[k], out_ref[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_llama_attention_mask_padding(models) -> None:
    """A left-padded row gives the same last-token logits as the unpadded sequence."""
    model = models["llama"]
    f = make_feeds("llama", seed=4, batch=1, seq=4)
    padded = make_feeds("llama", seed=4, batch=1, seq=6)
    padded["input_ids"][:, 2:] = f["input_ids"]
    padded["attention_mask"][:, :2] = 0
    padded["position_ids"] = np.array([[0, 0, 0, 1, 2, 3]])
    a, b = run_torch("llama", model, f), run_torch("llama", model, padded)
    np.testing.assert_allclose(b["logits"][:, 2:], a["logits"], rtol=1e-5, atol=1e-5)


def test_gpt2_head_is_tied() -> None:
    model = build_model("gpt2")
    assert sum(1 for _ in model.parameters()) == len({id(p) for p in model.parameters()})
    assert "wte.weight" in dict(model.named_parameters())
    assert model_config("gpt2")["tied_embeddings"] is True


def test_make_feeds_shapes() -> None:
    cfg = model_config("llama")
    f = make_feeds("llama", seed=0, batch=3, seq=2, past=5)
    assert f["input_ids"].shape == (3, 2) and f["input_ids"].dtype == np.int64
    assert f["input_ids"].min() >= 0 and f["input_ids"].max() < cfg["vocab_size"]
    assert f["attention_mask"].shape == (3, 7) and np.all(f["attention_mask"] == 1)
    np.testing.assert_array_equal(f["position_ids"], np.tile(np.arange(5, 7), (3, 1)))
    assert f["past_key_values.1.value"].shape == (3, cfg["kv_heads"], 5, cfg["head_dim"])
    assert f["past_key_values.0.key"].dtype == np.float32
    assert make_feeds("llama", past=0)["past_key_values.0.key"].shape[2] == 0
    b = make_feeds("bert", batch=3, seq=4)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]]
    assert make_feeds("cnn", batch=2)["image"].shape == (2, 3, 16, 16)
    assert make_feeds("mlp", batch=4)["x"].dtype == np.float32
    assert set(make_feeds("gpt2")) == {"input_ids"}
    for name in ZOO_MODELS:
        assert list(make_feeds(name)) == input_names(name)


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown zoo model"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="unknown zoo model"):
        make_feeds("nope")
    with pytest.raises(ValueError, match="unknown exporter"):
        export_model("mlp", tmp_path / "a.onnx", exporter="tf2onnx")
    with pytest.raises(ValueError, match="opset"):
        export_model("mlp", tmp_path / "a.onnx", exporter="legacy", opset=23)
    assert math.isclose(model_config("llama")["rms_norm_eps"], 1e-5)
