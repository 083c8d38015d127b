"""`eecompile bench` smoke test: well-formed output on a small model (not a speed test)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from eecompile.cli import main  # noqa: E402

KEYS = {"plaintext_ms_p50", "plaintext_ms_p90", "encrypted_ms_p50", "encrypted_ms_p90", "ratio",
        "ratio_spread", "shim_ms_p50", "shim_share", "provider", "batch", "seq", "iters", "model"}


def test_bench_json_is_well_formed(zoo, key_a, capsys):
    """One JSON object with the documented keys and sane values."""
    result = zoo.compile("llama", "dynamo", 20, key_a)
    assert main(["bench", str(result.out_dir), "--iters", "5", "--warmup", "1", "--seq", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert KEYS <= set(data)
    assert data["provider"] == "cpu" and data["iters"] == 5 and data["seq"] == 4
    assert data["plaintext_ms_p50"] > 0 and data["encrypted_ms_p50"] > 0
    assert data["ratio"] == pytest.approx(data["encrypted_ms_p50"] / data["plaintext_ms_p50"])
    assert 0 < data["shim_share"] < 1


def test_bench_text_and_errors(zoo, key_a, tmp_path, capsys):
    """Text output names both models; a missing directory or bad provider is one error line."""
    result = zoo.compile("mlp", "dynamo", 20, key_a)
    assert main(["bench", str(result.out_dir), "--iters", "3", "--warmup", "1"]) == 0
    text = capsys.readouterr().out
    assert "plaintext" in text and "encrypted" in text and "ratio" in text
    assert main(["bench", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eecompile: error:") and len(err.strip().splitlines()) == 1
    assert main(["bench", str(result.out_dir), "--iters", "0"]) == 2


def _one_error_line(capsys, *fragments) -> None:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eecompile: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_bench_refuses_a_bundle_from_another_compilation(zoo, key_a, key_b, tmp_path, capsys):
    import shutil

    a = zoo.compile("mlp", "dynamo", 20, key_a).out_dir
    b = zoo.compile("mlp", "dynamo", 20, key_b, tag="b").out_dir
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    shutil.rmtree(mixed / "client")
    shutil.copytree(b / "client", mixed / "client")
    assert main(["bench", str(mixed), "--iters", "2", "--warmup", "1", "--json"]) == 2
    _one_error_line(capsys, "another compilation")


def test_bench_warmup_zero_runs_and_negative_is_refused(zoo, key_a, capsys):
    out = str(zoo.compile("mlp", "dynamo", 20, key_a).out_dir)
    assert main(["bench", out, "--iters", "2", "--warmup", "0", "--json"]) == 0  # used to segfault
    assert json.loads(capsys.readouterr().out)["iters"] == 2
    assert main(["bench", out, "--iters", "2", "--warmup", "-1"]) == 2
    _one_error_line(capsys, "--warmup")


@pytest.mark.parametrize("argv", [["--batch", "1000000000000"], ["--seq", "100000000000"], ["--batch", "0"]])
def test_bench_absurd_sizes_are_user_errors(zoo, key_a, capsys, argv):
    out = str(zoo.compile("mlp", "dynamo", 20, key_a).out_dir)
    assert main(["bench", out, "--iters", "2", *argv]) == 2
    _one_error_line(capsys, argv[0])
