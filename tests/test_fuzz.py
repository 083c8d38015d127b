"""Property tests: random bytes, truncations and random edits of model files, key files,
manifests and transforms. Whatever the input, the CLI exits 0, or 2 with one line
``eecompile: error: ...`` — never 70, never a traceback — the input is never modified, and
OUT is never half written (issue 9)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from eecompile.cli import main  # noqa: E402
from eecompile.keys import MasterKey, save_key  # noqa: E402
from eecompile.staging import OUT_PREFIX, staging_folders  # noqa: E402

SETTINGS = settings(max_examples=int(os.environ.get("EECOMPILE_FUZZ_EXAMPLES", "40")), deadline=None,
                    derandomize=os.environ.get("EECOMPILE_FUZZ_RANDOM", "") in ("", "0"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _model_bytes() -> bytes:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W1")
    b1 = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "B1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W2")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "B1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])], [w1, b1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


MODEL = _model_bytes()
KEY = MasterKey(bytes(range(32)))


def _cli(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def _assert_contract(code: int, err: str) -> None:
    assert code in (0, 2), err
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("eecompile: error: "), err


def _assert_out(code: int, out: Path) -> None:
    """A failed compile into a new OUT leaves nothing; a successful one leaves every artifact."""
    if code != 0:
        assert not out.exists()
        return
    for rel in ("server/model.onnx", "client/manifest.json", "client/transforms.npz", "report.json", "report.md"):
        assert (out / rel).is_file(), rel
    assert not staging_folders(out, OUT_PREFIX)


def _mutate(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "random", "splice"]))
    if kind == "truncate":
        return data[:draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "random":
        return draw(st.binary(max_size=512))
    pos = draw(st.integers(0, max(0, len(data) - 1)))
    if kind == "flip":
        buf = bytearray(data)
        for offset in draw(st.lists(st.integers(0, 16), min_size=1, max_size=4)):
            i = min(len(buf) - 1, pos + offset)
            buf[i] ^= draw(st.integers(1, 255))
        return bytes(buf)
    if kind == "insert":
        return data[:pos] + draw(st.binary(min_size=1, max_size=16)) + data[pos:]
    end = draw(st.integers(pos, len(data)))
    return data[:pos] + data[end:]


@pytest.fixture(scope="module")
def workdir():
    root = Path(tempfile.mkdtemp(prefix="eecompile-fuzz-test-"))
    key = root / "k.key"
    save_key(KEY, key)
    model = root / "model.onnx"
    model.write_bytes(MODEL)
    out = root / "good"
    assert main(["compile", str(model), "--key", str(key), "--out", str(out)]) == 0
    yield root
    shutil.rmtree(root, ignore_errors=True)


@SETTINGS
@given(data=st.data())
def test_mutated_model_files(workdir, data):
    mutated = _mutate(MODEL, data.draw)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        model = Path(tmp) / "m.onnx"
        model.write_bytes(mutated)
        code, err = _cli("lint", model)
        _assert_contract(code, err)
        out = Path(tmp) / "out"
        code, err = _cli("compile", model, "--key", workdir / "k.key", "--out", out)
        _assert_contract(code, err)
        _assert_out(code, out)
        assert model.read_bytes() == mutated  # the input is never modified


@SETTINGS
@given(data=st.data())
def test_mutated_key_files(workdir, data):
    original = (workdir / "k.key").read_bytes()
    mutated = _mutate(original, data.draw)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        key = Path(tmp) / "m.key"
        key.write_bytes(mutated)
        key.chmod(0o600)
        out = Path(tmp) / "out"
        code, err = _cli("compile", workdir / "model.onnx", "--key", key, "--out", out, "--no-verify")
        _assert_contract(code, err)
        _assert_out(code, out)
        assert key.read_bytes() == mutated


def _json_edit(doc, draw):
    """Replace one value somewhere in the JSON document by a random JSON value."""
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False),
                     st.text(max_size=8))
    value = draw(st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                                          max_size=3), max_leaves=5))
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + [i])

    walk(doc, [])
    path = draw(st.sampled_from(paths))
    if not path:
        return value
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return doc


@SETTINGS
@given(data=st.data())
def test_mutated_manifests_and_transforms(workdir, data):
    good = workdir / "good"
    target = data.draw(st.sampled_from(["manifest.json", "transforms.npz"]))
    original = (good / "client" / target).read_bytes()
    if target == "manifest.json" and data.draw(st.booleans()):
        mutated = json.dumps(_json_edit(json.loads(original), data.draw)).encode()
    else:
        mutated = _mutate(original, data.draw)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        out = Path(tmp) / "out"
        shutil.copytree(good, out)
        (out / "client" / target).write_bytes(mutated)
        code, err = _cli("bench", out, "--iters", "1", "--warmup", "0", "--json")
        _assert_contract(code, err)
        if mutated != original:
            assert code == 2, "an edited bundle file must be refused"
        assert (out / "client" / target).read_bytes() == mutated
