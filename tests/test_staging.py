"""Fault injection: a compile or lint killed at a chosen point (SIGKILL or SIGTERM, via the
``EECOMPILE_FAULT`` hook, so nothing depends on timing) leaves either the old compilation or
the new one, complete, and its leftovers never block or pollute the next run."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from eecompile import staging
from eecompile.cli import main
from eecompile.compiler import ARTIFACTS, check_out_dir, recover_out_dir
from eecompile.errors import OutputDirError


def _tree(out: Path) -> dict[str, str]:
    """Digest of every artifact file (the report's own paths are the same for every compile here)."""
    files = {}
    for name in ARTIFACTS:
        path = out / name
        for f in sorted([path] if path.is_file() else path.rglob("*")):
            if f.is_file():
                files[str(f.relative_to(out))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return files


def _cli(*argv, fault: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, **(env or {})}
    environ.pop("EECOMPILE_FAULT", None)
    if fault:
        environ["EECOMPILE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "eecompile", *map(str, argv)], capture_output=True, text=True,
                          env=environ, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from eecompile.models import export_model

    return export_model("mlp", tmp_path_factory.mktemp("staging-model") / "mlp.onnx")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("staging-keys")
    for name in ("a.key", "b.key"):
        assert main(["keygen", str(d / name)]) == 0
    return d / "a.key", d / "b.key"


@pytest.fixture(scope="module")
def references(tmp_path_factory, model, keys) -> tuple[Path, dict, dict]:
    """A compilation with key A (to be replaced) and the artifacts key B gives (the replacement)."""
    d = tmp_path_factory.mktemp("staging-ref")
    # the same OUT path for both, so that the reports (which name nothing else) are comparable
    out = d / "out"
    assert main(["compile", str(model), "--key", str(keys[1]), "--out", str(out), "--no-verify"]) == 0
    new = _tree(out)
    shutil.rmtree(out)
    assert main(["compile", str(model), "--key", str(keys[0]), "--out", str(out), "--no-verify"]) == 0
    old = _tree(out)
    assert old != new
    return out, old, new


POINTS = ["emit", "staged", "commit-0"] + [f"commit-{i}" for i in range(1, 2 * len(ARTIFACTS) + 1)] + ["committed"]


@pytest.mark.parametrize("point", POINTS)
def test_force_killed_anywhere_leaves_one_complete_compilation(point, tmp_path, model, keys, references):
    ref, old, new = references
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    (out / "notes.txt").write_text("mine\n")
    proc = _cli("compile", model, "--key", keys[1], "--out", out, "--force", "--no-verify", fault=f"{point}:KILL")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # whoever opens the folder next (a session, generate, bench or compile) finishes or discards the leftover
    lines = recover_out_dir(out)
    assert len(lines) == 1 and "killed compile" in lines[0]
    assert not staging.staging_folders(out, staging.OUT_PREFIX)
    state = _tree(out)
    committed = point not in ("emit", "staged")  # COMMIT is written first: from then on it is rolled forward
    assert state == (new if committed else old), point
    assert (out / "notes.txt").read_text() == "mine\n"
    from eecompile import EncryptedSession

    EncryptedSession(out)  # the bundle matches its server


def test_sigterm_cleans_up_like_sigint(tmp_path, model, keys, references):
    ref, old, _ = references
    fresh = tmp_path / "fresh"
    proc = _cli("compile", model, "--key", keys[0], "--out", fresh, "--no-verify", fault="emit:TERM")
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines() == ["eecompile: terminated"]
    assert not fresh.exists()  # a compile that created OUT leaves nothing
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    for point in ("staged", "commit-3"):  # during the swap the signal waits until it is complete
        proc = _cli("compile", model, "--key", keys[1], "--out", out, "--force", "--no-verify", fault=f"{point}:TERM")
        assert proc.returncode == 143, proc.stderr
        assert not staging.staging_folders(out, staging.OUT_PREFIX), point
    assert _tree(out) != old  # commit-3 finished the replacement before the signal was handled


def test_leftover_of_a_killed_compile_does_not_block_the_next(tmp_path, model, keys, references):
    out = tmp_path / "out"
    proc = _cli("compile", model, "--key", keys[0], "--out", out, "--no-verify", fault="emit:KILL")
    assert proc.returncode == -signal.SIGKILL
    (leftover,) = staging.staging_folders(out, staging.OUT_PREFIX)
    assert (leftover / staging.MARKER).exists()
    proc = _cli("compile", model, "--key", keys[0], "--out", out, "--no-verify")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("eecompile: removed ") and leftover.name in line and "killed compile" in line
    assert not leftover.exists()
    assert _tree(out) == references[1]


def test_leftover_of_an_older_eecompile_is_removed(tmp_path):
    out = tmp_path / "out"
    legacy = out / ".eecompile-abc123xy"
    (legacy / "server").mkdir(parents=True)
    (legacy / "scratch.bin").write_bytes(b"\0" * 1000)
    check_out_dir(out, force=False)
    assert not out.exists() or not any(out.iterdir())


def test_staging_of_a_running_compile_is_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with staging.Staging(out, staging.OUT_PREFIX, "compile") as live:
        (live.path / "scratch.bin").write_bytes(b"x")
        assert recover_out_dir(out) == []
        with pytest.raises(OutputDirError, match="another eecompile compile"):
            check_out_dir(out, force=True)
        assert live.path.exists()
    assert not live.path.exists()


def test_killed_lint_leftover_is_removed_by_the_next_lint(tmp_path, model):
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"TMPDIR": str(temp)}
    proc = _cli("lint", model, fault="lint:KILL", env=env)
    assert proc.returncode == -signal.SIGKILL
    (leftover,) = staging.staging_folders(temp, staging.LINT_PREFIX)
    proc = _cli("lint", model, env=env)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("eecompile: removed ") and "killed lint" in line
    assert not staging.staging_folders(temp, staging.LINT_PREFIX)
    proc = _cli("lint", model, fault="lint:TERM", env=env)
    assert proc.returncode == 143 and not staging.staging_folders(temp, staging.LINT_PREFIX)
