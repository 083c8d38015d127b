"""The command line: keygen, compile, lint, and one-line errors (exit 2, never a traceback)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from eecompile.cli import EXIT_INTERNAL, main


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("eecompile: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], err


@pytest.fixture(scope="module")
def mlp_model(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from eecompile.models import export_model

    return export_model("mlp", tmp_path_factory.mktemp("cli-model") / "mlp.onnx")


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-key") / "test.key"
    assert main(["keygen", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, mlp_model, keyfile) -> Path:
    out = tmp_path_factory.mktemp("cli-out") / "out"
    assert main(["compile", str(mlp_model), "--key", str(keyfile), "--out", str(out)]) == 0
    return out


# -- help --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["keygen", "--help"], ["compile", "--help"], ["lint", "--help"],
                                  ["demo", "--help"]])
def test_help(capsys, argv):
    code, out, err = _run(capsys, *argv)
    assert code == 0
    assert out.startswith("usage: eecompile")
    assert err == ""


def test_no_command_prints_help(capsys):
    code, out, err = _run(capsys)
    assert code == 2
    assert "usage: eecompile" in err


def test_bad_arguments_are_one_line(capsys, tmp_path):
    code, _, err = _run(capsys, "compile", tmp_path / "m.onnx")
    _assert_user_error(code, err, "--key", "--out")
    code, _, err = _run(capsys, "lint", tmp_path / "m.onnx", "--format", "xml")
    _assert_user_error(code, err, "xml")


# -- keygen ------------------------------------------------------------------------------
def test_keygen_writes_0600_and_prints_fingerprint(capsys, tmp_path):
    from eecompile.keys import load_key

    path = tmp_path / "k.key"
    code, out, err = _run(capsys, "keygen", path)
    assert code == 0, err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key(path)
    assert str(path) in out
    assert key.fingerprint() in out
    assert key.secret.hex() not in out


def test_keygen_refuses_to_overwrite(capsys, tmp_path):
    path = tmp_path / "k.key"
    assert main(["keygen", str(path)]) == 0
    before = path.read_bytes()
    capsys.readouterr()
    code, _, err = _run(capsys, "keygen", path)
    _assert_user_error(code, err, str(path), "--force")
    assert path.read_bytes() == before


def test_keygen_force_replaces(capsys, tmp_path):
    from eecompile.keys import load_key

    path = tmp_path / "k.key"
    assert main(["keygen", str(path)]) == 0
    old = load_key(path)
    code, out, _ = _run(capsys, "keygen", path, "--force")
    assert code == 0
    new = load_key(path)
    assert new != old
    assert new.fingerprint() in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keygen_into_missing_directory(capsys, tmp_path):
    code, _, err = _run(capsys, "keygen", tmp_path / "no" / "such" / "dir" / "k.key")
    _assert_user_error(code, err)


# -- compile -----------------------------------------------------------------------------
def test_compile_writes_artifacts_and_summary(capsys, tmp_path, mlp_model, keyfile):
    from eecompile.keys import load_key

    before = _digest(mlp_model), _digest(keyfile)
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "compile", mlp_model, "--key", keyfile, "--out", out)
    assert code == 0, err
    for rel in ("server/model.onnx", "client/manifest.json", "client/transforms.npz", "client/encrypt.onnx",
                "client/decrypt.onnx", "report.json", "report.md"):
        assert (out / rel).is_file(), rel
    assert (_digest(mlp_model), _digest(keyfile)) == before  # inputs untouched
    assert load_key(keyfile).fingerprint() in stdout
    assert "spaces:" in stdout and "inputs:" in stdout and "outputs:" in stdout
    assert "verification: passed" in stdout
    assert str(out / "server" / "model.onnx") in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["checked"] is True


def test_compile_no_verify(capsys, tmp_path, mlp_model, keyfile):
    code, stdout, err = _run(capsys, "compile", mlp_model, "--key", keyfile, "--out", tmp_path / "o", "--no-verify")
    assert code == 0, err
    assert "verification: not run" in stdout


def test_compile_refuses_non_empty_directory(capsys, tmp_path, mlp_model, keyfile):
    out = tmp_path / "out"
    out.mkdir()
    precious = out / "notes.txt"
    precious.write_text("do not lose me\n")
    code, _, err = _run(capsys, "compile", mlp_model, "--key", keyfile, "--out", out)
    _assert_user_error(code, err, str(out), "--force")
    assert precious.read_text() == "do not lose me\n"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_compile_force_replaces_artifacts(capsys, tmp_path, mlp_model, keyfile, compiled):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    (out / "notes.txt").write_text("mine\n")
    stale = out / "report.md"
    stale.write_text("stale\n")
    code, _, err = _run(capsys, "compile", mlp_model, "--key", keyfile, "--out", out)
    _assert_user_error(code, err, "not empty")
    assert stale.read_text() == "stale\n"
    code, _, err = _run(capsys, "compile", mlp_model, "--key", keyfile, "--out", out, "--force")
    assert code == 0, err
    assert stale.read_text().startswith("# eecompile report")
    assert (out / "notes.txt").read_text() == "mine\n"  # only eecompile's artifacts are replaced


def test_compile_refuses_to_overwrite_its_own_input(capsys, tmp_path, mlp_model, keyfile):
    out = tmp_path / "out"
    (out / "server").mkdir(parents=True)
    model = out / "server" / "model.onnx"
    model.write_bytes(mlp_model.read_bytes())
    code, _, err = _run(capsys, "compile", model, "--key", keyfile, "--out", out, "--force")
    _assert_user_error(code, err, "--out")
    assert model.read_bytes() == mlp_model.read_bytes()


def test_compile_is_deterministic(capsys, tmp_path, mlp_model, keyfile, compiled):
    out = tmp_path / "again"
    assert main(["compile", str(mlp_model), "--key", str(keyfile), "--out", str(out), "--no-verify"]) == 0
    assert _digest(out / "server" / "model.onnx") == _digest(compiled / "server" / "model.onnx")


# -- lint --------------------------------------------------------------------------------
def test_lint_text(capsys, mlp_model):
    code, out, err = _run(capsys, "lint", mlp_model)
    assert code == 0, err
    assert "mlp.onnx" in out and "basis" in out and "inputs:" in out and "weaknesses:" in out


def test_lint_json(capsys, mlp_model):
    code, out, err = _run(capsys, "lint", mlp_model, "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    for key in ("spaces", "inputs", "outputs", "unsupported_ops", "weaknesses"):
        assert key in report
    assert report["spaces"] and all({"name", "size", "basis", "limited_by", "tensors"} <= set(s)
                                    for s in report["spaces"])
    assert [i["name"] for i in report["inputs"]] == ["x"]


def test_lint_markdown(capsys, mlp_model):
    code, out, err = _run(capsys, "lint", mlp_model, "--format", "md")
    assert code == 0, err
    assert out.startswith("# eecompile report")
    assert "| space | size | basis | limited by |" in out


def test_lint_does_not_modify_model(capsys, mlp_model):
    before = _digest(mlp_model)
    assert main(["lint", str(mlp_model)]) == 0
    assert _digest(mlp_model) == before


# -- bad input ---------------------------------------------------------------------------
def test_missing_model_file(capsys, tmp_path, keyfile):
    missing = tmp_path / "missing.onnx"
    code, _, err = _run(capsys, "lint", missing)
    _assert_user_error(code, err, "missing.onnx")
    code, _, err = _run(capsys, "compile", missing, "--key", keyfile, "--out", tmp_path / "out")
    _assert_user_error(code, err, "missing.onnx")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"\x08\x07garbage"], ids=["random", "empty", "short"])
def test_corrupt_model_file(capsys, tmp_path, keyfile, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    code, _, err = _run(capsys, "lint", bad)
    _assert_user_error(code, err, "bad.onnx")
    code, _, err = _run(capsys, "compile", bad, "--key", keyfile, "--out", tmp_path / "out")
    _assert_user_error(code, err, "bad.onnx")
    assert bad.read_bytes() == content


def test_truncated_model_file(capsys, tmp_path, mlp_model):
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(mlp_model.read_bytes()[: mlp_model.stat().st_size // 2])
    code, _, err = _run(capsys, "lint", bad)
    _assert_user_error(code, err, "truncated.onnx")


@pytest.mark.parametrize("mutate", ["truncated", "random", "bad-hex", "bad-fingerprint", "missing"])
def test_corrupt_key_file(capsys, tmp_path, mlp_model, keyfile, mutate):
    bad = tmp_path / "bad.key"
    text = keyfile.read_text()
    if mutate == "truncated":
        bad.write_text(text[: len(text) // 2])
    elif mutate == "random":
        bad.write_bytes(os.urandom(200))
    elif mutate == "bad-hex":
        doc = json.loads(text)
        doc["key"] = "zz" * 32
        bad.write_text(json.dumps(doc))
    elif mutate == "bad-fingerprint":
        doc = json.loads(text)
        doc["fingerprint"] = "0" * 16
        bad.write_text(json.dumps(doc))
    out = tmp_path / "out"
    code, _, err = _run(capsys, "compile", mlp_model, "--key", bad, "--out", out)
    _assert_user_error(code, err, "bad.key")
    assert not out.exists() or not any(out.iterdir())


def test_key_file_of_another_version(capsys, tmp_path, mlp_model, keyfile):
    doc = json.loads(keyfile.read_text())
    doc["version"] = 2
    bad = tmp_path / "v2.key"
    bad.write_text(json.dumps(doc))
    code, _, err = _run(capsys, "compile", mlp_model, "--key", bad, "--out", tmp_path / "out")
    _assert_user_error(code, err, "v2.key", "version")


def test_model_given_as_key(capsys, tmp_path, mlp_model):
    code, _, err = _run(capsys, "compile", mlp_model, "--key", mlp_model, "--out", tmp_path / "out")
    _assert_user_error(code, err, "mlp.onnx")


def test_output_path_is_a_file(capsys, tmp_path, mlp_model, keyfile):
    target = tmp_path / "file.txt"
    target.write_text("x")
    code, _, err = _run(capsys, "compile", mlp_model, "--key", keyfile, "--out", target)
    _assert_user_error(code, err, "file.txt")
    assert target.read_text() == "x"
    code, _, err = _run(capsys, "compile", mlp_model, "--key", keyfile, "--out", target / "sub")
    _assert_user_error(code, err)


def test_os_errors_are_one_line(capsys, tmp_path, monkeypatch, mlp_model, keyfile):
    import eecompile.compiler

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr(eecompile.compiler, "compile_model", denied)
    code, _, err = _run(capsys, "compile", mlp_model, "--key", keyfile, "--out", tmp_path / "out")
    _assert_user_error(code, err, "Permission denied", "out")


def test_unexpected_errors_are_one_line(capsys, tmp_path, monkeypatch, mlp_model):
    import eecompile.compiler

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(eecompile.compiler, "lint_model", broken)
    monkeypatch.delenv("EECOMPILE_DEBUG", raising=False)
    code, _, err = _run(capsys, "lint", mlp_model)
    assert code == EXIT_INTERNAL
    assert err.splitlines() == ["eecompile: internal error: RuntimeError: boom second line "
                                "(run with EECOMPILE_DEBUG=1 for a traceback)"]
    monkeypatch.setenv("EECOMPILE_DEBUG", "1")
    code, _, err = _run(capsys, "lint", mlp_model)
    assert code == EXIT_INTERNAL
    assert "Traceback" in err


def test_subprocess_errors_have_no_traceback(tmp_path, mlp_model, keyfile):
    """A real process: one stderr line, exit 2, and the input model untouched."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(os.urandom(1000))
    env = {k: v for k, v in os.environ.items() if k != "EECOMPILE_DEBUG"}
    for argv in (["lint", str(bad)],
                 ["compile", str(bad), "--key", str(keyfile), "--out", str(tmp_path / "out")],
                 ["compile", str(mlp_model), "--key", str(bad), "--out", str(tmp_path / "out")]):
        proc = subprocess.run([sys.executable, "-m", "eecompile", *argv], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("eecompile: error: ")
        assert proc.stdout == ""


# -- verification is never silently skipped ----------------------------------------------------
def _unverifiable_model(path: Path) -> Path:
    """y = Reshape(x[B, n], [-1, 4]) · 2: none of the generated shapes has B·n divisible by 4."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Mul", ["r", "two"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["r0", 4])],
        [numpy_helper.from_array(np.array([-1, 4], np.int64), "shape"),
         numpy_helper.from_array(np.full(1, 2.0, np.float32), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_compile_that_cannot_verify_exits_non_zero(capsys, tmp_path, keyfile):
    model = _unverifiable_model(tmp_path / "four.onnx")
    code, stdout, err = _run(capsys, "compile", model, "--key", keyfile, "--out", tmp_path / "o")
    _assert_user_error(code, err, "cannot verify", "--verify-shapes", "--no-verify")
    assert not (tmp_path / "o").exists()
    code, stdout, err = _run(capsys, "compile", model, "--key", keyfile, "--out", tmp_path / "o", "--no-verify")
    assert code == 0, err
    assert "verification: not run" in stdout


def test_compile_verify_shapes_and_feeds(capsys, tmp_path, keyfile):
    import numpy as np

    model = _unverifiable_model(tmp_path / "four.onnx")
    code, stdout, err = _run(capsys, "compile", model, "--key", keyfile, "--out", tmp_path / "a",
                             "--verify-shapes", "n=4")
    assert code == 0, err
    assert "verification: passed" in stdout and "n=4" in stdout
    np.savez(tmp_path / "feeds.npz", x=np.ones((3, 4), np.float32))
    code, stdout, err = _run(capsys, "compile", model, "--key", keyfile, "--out", tmp_path / "b",
                             "--verify-feeds", tmp_path / "feeds.npz")
    assert code == 0, err
    assert "B=3, n=4" in json.loads((tmp_path / "b" / "report.json").read_text())["verification"]["detail"]
    code, _, err = _run(capsys, "compile", model, "--key", keyfile, "--out", tmp_path / "c", "--verify-shapes", "n")
    _assert_user_error(code, err, "--verify-shapes")
    code, _, err = _run(capsys, "compile", model, "--key", keyfile, "--out", tmp_path / "c", "--verify-feeds",
                        tmp_path / "missing.npz")
    _assert_user_error(code, err, "--verify-feeds")
    code, _, err = _run(capsys, "compile", model, "--key", keyfile, "--out", tmp_path / "c", "--no-verify",
                        "--verify-shapes", "n=4")
    _assert_user_error(code, err, "--no-verify")


def test_compile_refuses_a_key_file_others_can_read(capsys, tmp_path, mlp_model, keyfile):
    exposed = tmp_path / "exposed.key"
    exposed.write_bytes(keyfile.read_bytes())
    exposed.chmod(0o644)
    out = tmp_path / "out"
    code, _, err = _run(capsys, "compile", mlp_model, "--key", exposed, "--out", out, "--no-verify")
    _assert_user_error(code, err, str(exposed), f"chmod 600 {exposed}", "--allow-insecure-key")
    assert not out.exists()
    code, _, err = _run(capsys, "compile", mlp_model, "--key", exposed, "--out", out, "--no-verify",
                        "--allow-insecure-key")
    assert code == 0, err


def _external_data_model(path: Path) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).random((64, 512), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 512])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


@pytest.mark.parametrize("command", ["lint", "compile"])
def test_truncated_external_data_is_a_user_error(capsys, tmp_path, keyfile, command):
    model = _external_data_model(tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    argv = ["lint", model] if command == "lint" else ["compile", model, "--key", keyfile, "--out", tmp_path / "o"]
    code, _, err = _run(capsys, *argv)
    _assert_user_error(code, err, str(data), "truncated")
    assert not (tmp_path / "o").exists()


def test_compile_prints_the_exposure_summary(capsys, tmp_path, mlp_model, keyfile):
    code, stdout, err = _run(capsys, "compile", mlp_model, "--key", keyfile, "--out", tmp_path / "o")
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    e = report["exposure"]
    assert e["checked"] and e["intermediates_exposed"] == 0
    assert f"  exposure: 0 of {e['intermediates_compared']} intermediate tensors equal the plaintext run" in stdout
    assert "WARNING" not in stdout and "exposed:" not in stdout


def test_file_size_limit_names_the_cause_and_the_file(tmp_path, mlp_model, keyfile):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "eecompile", "compile", str(mlp_model), "--key", str(keyfile),
                           "--out", str(out), "--no-verify"], capture_output=True, text=True, preexec_fn=limit,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("eecompile: error: file size limit exceeded while writing ") and str(out) in line, line
    assert not out.exists()  # cleanup stays correct


def test_full_disk_names_the_cause_and_the_file(capsys, tmp_path, mlp_model, keyfile, monkeypatch):
    import errno

    import eecompile.compiler

    def full(*args, **kwargs):
        raise OSError("49152 requested and 32768 written")  # what numpy's tofile says on a full disk

    monkeypatch.setattr(eecompile.compiler.onnx, "save_model", full)
    out = tmp_path / "out"
    code, _, err = _run(capsys, "compile", mlp_model, "--key", keyfile, "--out", out, "--no-verify")
    _assert_user_error(code, err, "no space left on device while writing", "model.onnx")
    assert not out.exists()
    from eecompile.staging import write_error_message

    assert write_error_message(OSError(errno.ENOSPC, "No space left on device"), "f.bin") == \
        "no space left on device while writing f.bin"
