"""`eecompile audit`: formats, the JSON contract, one-line errors."""

from __future__ import annotations

import json

import pytest

from eecompile.cli import main

KEYS = {"attack", "side_knowledge", "target", "recovered", "seconds"}


def test_json_on_zoo_llama(zoo_llama, english, capsys):
    rc = main(["audit", str(zoo_llama.out), "--base-model", str(zoo_llama.original), "--corpus", str(english),
               "--quick", "--traffic", "1000", "--generated", "1000", "--format", "json"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = json.loads(out)
    assert isinstance(rows, list) and rows
    for row in rows:
        assert KEYS <= set(row)
        assert 0.0 <= row["recovered"] <= 1.0
    attacks = {r["attack"] for r in rows}
    assert {"frequency analysis", "weight matching", "known plaintext", "hidden-state inversion",
            "linking attack"} <= attacks
    regimes = {r["regime"] for r in rows if r["attack"] == "weight matching"}
    assert {"base model known", "no base model"} <= regimes


def test_md_and_text_on_mlp(zoo_mlp, capsys):
    assert main(["audit", str(zoo_mlp.out), "--format", "md"]) == 0
    md = capsys.readouterr().out
    assert "| known plaintext |" in md
    assert main(["audit", str(zoo_mlp.out)]) == 0
    assert "known plaintext" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["audit", "/nonexistent/out"], "not found"),
    (["audit", "{tmp}"], "no server/model.onnx"),
    (["audit", "{out}", "--base-model", "/nonexistent.onnx"], "base model not found"),
    (["audit", "{out}", "--traffic", "ten"], "token counts"),
    (["audit", "{out}", "--corpus", "no-such-corpus"], "corpus"),
])
def test_errors_are_one_line(args, needle, zoo_mlp, zoo_llama, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, out=zoo_llama.out) for a in args]
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("eecompile: error: ") and "\n" not in err
    assert needle in err
