"""Fixtures for op-rule tests on real exports: ``torch_export(module, inputs, exporter, ...)``.

``exporter`` is ``dynamo`` (``torch.onnx.export(dynamo=True)``, default opset) or ``legacy``
(``dynamo=False``, opset 17). The export is static-shaped unless ``dynamic`` maps input names to
``{axis: name}``; the file lands under ``tmp_path``. Skips when torch or onnxscript is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import warnings
from pathlib import Path

import pytest

EXPORTERS = ("dynamo", "legacy")


@pytest.fixture
def torch_export(tmp_path):
    """``torch_export(module, inputs, exporter, input_names, output_names, dynamic=None) -> Path``."""
    counter = itertools.count()

    def _export(module, inputs: tuple, exporter: str, input_names: list[str], output_names: list[str],
                dynamic: dict | None = None) -> Path:
        for name in ("torch", "onnxscript") if exporter == "dynamo" else ("torch",):
            if importlib.util.find_spec(name) is None:
                pytest.skip(f"'{name}' is not installed (pip install -e '.[dev]')")
        import torch

        path = tmp_path / f"{exporter}-{next(counter)}.onnx"
        module = module.eval()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                shapes = None
                if dynamic:
                    shapes = {n: {a: torch.export.Dim(d) for a, d in axes.items()} if axes else None
                              for n, axes in dynamic.items()}
                    shapes = tuple(shapes.get(n) for n in input_names)
                torch.onnx.export(module, inputs, str(path), dynamo=True, input_names=input_names,
                                  output_names=output_names, dynamic_shapes=shapes, external_data=False)
            else:
                torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=17,
                                  input_names=input_names, output_names=output_names, dynamic_axes=dynamic)
        return path

    return _export
