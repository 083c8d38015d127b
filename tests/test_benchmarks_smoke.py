"""Smoke tests of the cryptographic-baseline benchmark scripts at their smallest settings.

Not speed tests: they check that each script runs end to end, verifies its FHE outputs
against the plaintext, and writes its Markdown table, PNG plot and JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("tenseal")
pytest.importorskip("matplotlib")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    """Import a benchmark script (they set single-thread variables at import: restored here)."""
    env = dict(os.environ)
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))
        os.environ.clear()
        os.environ.update(env)


def test_fhe_embedding_smallest_cell(tmp_path):
    """p = 16, d = 16: every method verified against the table, results written."""
    fe = _load("fhe_embedding")
    rows = fe.run([16], [16], tmp_path, prefix="smoke", ee_batch=64, ee_reps=5, min_time=0.0, max_reps=2,
                  command="smoke", log=lambda *_: None)
    (row,) = rows
    for method in fe.METHODS:
        assert row[method]["max_rel_err"] < 1e-3, method
        assert row[method]["server_ms"] > 0
    assert row["ee"]["max_abs_err"] < 1e-5
    assert row["IVE"]["batch"] == 512 and row["one-hot SIMD"]["batch"] == 256 and row["TenSEAL mm"]["batch"] == 1
    md = (tmp_path / "smoke.md").read_text()
    assert "| 16 | 16 |" in md and "fastest FHE / EE" in md
    assert (tmp_path / "smoke.png").stat().st_size > 0
    assert json.loads((tmp_path / "smoke.json").read_text())["rows"][0]["p"] == 16


def test_ive_matches_the_table_at_the_ends_of_the_range():
    """IVE's DCT interpolation returns E[0] and E[p-1] (the ill-conditioned end of Chebyshev nodes)."""
    import numpy as np

    fe = _load("fhe_embedding")
    table = np.random.default_rng(1).standard_normal((64, 8))
    ive = fe.IVE(table)
    ids = np.array([0, 63, 31, 32])
    query = ive.encrypt(ids)
    ive.prepare(query)
    rows = ive.decrypt(ive.evaluate(query), len(ids))
    assert np.abs(rows - table[ids]).max() < 1e-4


def test_text_classification_few_messages(tmp_path):
    """A few messages: EE predictions equal plaintext, CKKS logits close, results written."""
    pytest.importorskip("torch")
    tc = _load("text_classification")
    if not (tc.FORTUNES / tc.CLASSES[0]).is_file():
        pytest.skip("the Debian package 'fortunes' is not installed")
    res = tc.run(tmp_path, prefix="smoke", epochs=1, messages=6, reps=2, command="smoke", log=lambda *_: None)
    assert res["ee"]["agreement"] == 1.0
    assert res["ckks"]["messages"] == 6 and res["ckks"]["max_logit_err"] < 1e-2
    assert 0 < res["ckks"]["share"]["lookup"] <= 1
    assert "EE (eecompile + ORT)" in (tmp_path / "smoke.md").read_text()
    assert (tmp_path / "smoke.png").stat().st_size > 0
