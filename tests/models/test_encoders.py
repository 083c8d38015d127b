"""Real exports of encoders, vision and diffusion models (:mod:`eecompile.models.hf_encoders`), compiled.

Each cell is a tiny random-weight Hugging Face / diffusers model exported one way, compiled with
``compile_model`` (verification on) and held to the encoder matrix's bar
(``benchmarks/encoder_matrix.py``, whose report readers are used here): verification ran and is
exact (≤ 1e-5), no tensor that depends on a protected input is computed in plaintext (the
compile's exposure measure; attention scores and per-token statistics excluded by it), no op
without a rule, and no float input left clear except a diffusion timestep entering only through
``Sin``/``Cos`` of itself.

The default run covers one model per rule family added for these models: InstanceNormalization /
GroupNorm and Resize (a diffusers UNet, legacy), Pad and depthwise Conv (MobileNetV2, legacy),
GatherND (CLIP text pooling, dynamo), comparisons of ids against constants, CumSum and
GatherElements (RoBERTa's position ids, dynamo), a fused QKV selected by parts after its head split and
rotate_half through casts (ModernBERT, legacy), relative-position keys folded into a tiled constant
(DeBERTa-v2, legacy), a contiguous ``as_strided`` view (Swin's pooler, dynamo). The rest of the matrix is ``slow``; cells with a
known gap are ``xfail(strict=True)`` with the measured reason.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from eecompile.models import hf_encoders as he

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

DEFAULT_CELLS = [("unet2d", "legacy17"), ("mobilenet_v2", "legacy17"), ("clip_text", "dynamo20"),
                 ("roberta", "dynamo20"), ("modernbert", "legacy17"), ("deberta_v2", "legacy17"),
                 ("swin", "dynamo20")]
"""One model per new rule family (see the module docstring); about two minutes together on 2 cores."""

KNOWN_GAPS: dict[tuple[str, str], str] = {}
"""Cells measured below the bar, with the cause; remove an entry when its cell passes."""


def _bench():
    """``benchmarks/encoder_matrix.py`` as a module (its report readers)."""
    if "encoder_matrix" in sys.modules:
        return sys.modules["encoder_matrix"]
    spec = importlib.util.spec_from_file_location("encoder_matrix", BENCH / "encoder_matrix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["encoder_matrix"] = module
    spec.loader.exec_module(module)
    return module


def _require(arch: str, exporter: str) -> None:
    missing = [m for m in ("torch", "transformers", "safetensors") if importlib.util.find_spec(m) is None]
    if he.SPECS[arch].kind in ("unet", "vae_decoder") and importlib.util.find_spec("diffusers") is None:
        missing.append("diffusers")
    if exporter.startswith("dynamo") and importlib.util.find_spec("onnxscript") is None:
        missing.append("onnxscript")
    if exporter == "optimum" and not Path(he.OPTIMUM_PYTHON).is_file():
        missing.append(f"the optimum interpreter {he.OPTIMUM_PYTHON}")
    if missing:
        reason = f"not installed: {', '.join(missing)} (pip install -e '.[dev]')"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def encoder_cells(tmp_path_factory):
    """``cell(arch, exporter) -> facts``: export (cached per session), compile, read the report."""
    import eecompile

    root = tmp_path_factory.mktemp("encoders")
    key = eecompile.generate_key()
    done: dict[tuple[str, str], dict] = {}

    def cell(arch: str, exporter: str) -> dict:
        _require(arch, exporter)
        if (arch, exporter) not in done:
            result = he.export_one(root, arch, exporter)
            if result.path is None:
                pytest.fail(f"export failed: {result.error}", pytrace=False)
            out = root / arch / exporter / "compiled"
            eecompile.compile_model(result.path, key, out, force=True)
            done[(arch, exporter)] = _bench().report_facts(out, Path(result.path))
        return done[(arch, exporter)]

    return cell


def _check(facts: dict) -> None:
    ver, expo = facts["verification"], facts["exposure"]
    assert ver["checked"], f"verification did not run: {ver['detail']}"
    assert ver["max_relative_error"] <= 1e-5, ver["detail"]
    assert not facts["unsupported"], f"ops without a rule: {facts['unsupported']}"
    assert expo["checked"], expo.get("detail")
    assert expo["exposed_secret"] == 0, f"exposed: {expo['secret_ops']} ({expo['secret_first']})"
    bad = [c["why"] for c in facts["clear_float_inputs"] if not c["allowed"]]
    assert not bad, bad


@pytest.mark.parametrize("arch,exporter", DEFAULT_CELLS)
def test_rule_family_representatives(arch, exporter, encoder_cells):
    facts = encoder_cells(arch, exporter)
    _check(facts)
    if arch == "unet2d":  # the timestep is the one clear float input, and the report says why
        (clear,) = facts["clear_float_inputs"]
        assert clear["name"] == "timestep" and clear["allowed"] and "Sin/Cos" in clear["why"]
        assert facts["exposure"]["exposed_clear_input"] > 0  # its sinusoidal embedding, computed from it alone
    else:
        assert facts["residual"]["class"] != "clear"


def _slow_cells():
    cells = []
    for arch in he.ARCHS:
        for exporter in he.EXPORTERS:
            if (arch, exporter) in DEFAULT_CELLS or (exporter == "optimum" and he.SPECS[arch].optimum_task is None):
                continue
            marks = [pytest.mark.slow]
            if (arch, exporter) in KNOWN_GAPS:
                marks.append(pytest.mark.xfail(reason=KNOWN_GAPS[(arch, exporter)], strict=True))
            cells.append(pytest.param(arch, exporter, marks=marks, id=f"{arch}-{exporter}"))
    return cells


@pytest.mark.parametrize("arch,exporter", _slow_cells())
def test_encoder_matrix_cell(arch, exporter, encoder_cells):
    _check(encoder_cells(arch, exporter))


def test_diffusers_models_have_no_optimum_export():
    """optimum exports diffusers models only as whole pipelines: the cell records that instead of an export."""
    with pytest.raises(RuntimeError, match="whole pipelines"):
        he.export_optimum("unet2d", "unused", "unused.onnx")


def test_unknown_arch_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        he.check_arch("nope")
