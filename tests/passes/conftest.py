"""Shared builders for the pass and op-rule unit tests: tiny ONNX graphs made with ``onnx.helper``.

Fixtures (no torch anywhere):

* ``make_model(nodes, inputs, outputs, inits=None, opset=20)`` builds the ``ModelProto`` only.
* ``build(nodes, inputs, outputs, inits=None, opset=20)`` saves a checked model under ``tmp_path``
  and returns its path (``build(model_proto)`` saves a ready model). ``inputs``/``outputs`` are
  ``(name, elem_type, shape)`` tuples or value infos; ``inits`` maps names to numpy arrays.
* ``lint(path)`` is the report dict of :func:`eecompile.lint_model` with lookups by tensor name
  (``.space(t)``, ``.basis(t)``, ``.protection(side, name)``).
* ``compile_exact(path, feeds)`` compiles with a fresh key and asserts that
  ``EncryptedSession(out).run(None, feeds)`` equals ``onnxruntime.InferenceSession(path).run``
  to a relative error of 1e-5 on every output; returns the ``CompileResult``.
* ``rng`` is a numpy generator for the random inputs and weights of one test.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import eecompile
from eecompile.passes.verify import relative_error

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
TOLERANCE = 1e-5


def value_info(spec) -> onnx.ValueInfoProto:
    """``(name, elem_type, shape)`` (shape None: unknown rank) or a ready value info."""
    if isinstance(spec, onnx.ValueInfoProto):
        return spec
    name, elem, shape = spec
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(nodes, inputs, outputs, inits=None, opset: int = 20, extra_opsets=()) -> onnx.ModelProto:
    """An ONNX model from helper nodes, value-info specs and named numpy initializers."""
    initializers = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    graph = helper.make_graph(list(nodes), "g", [value_info(i) for i in inputs],
                              [value_info(o) for o in outputs], initializers)
    opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in extra_opsets]]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def space_of(report: dict, tensor: str) -> dict:
    """The report's space entry that lists ``tensor`` (fails when none or several do)."""
    found = [s for s in report["spaces"] if tensor in s["tensors"]]
    assert len(found) == 1, (f"tensor {tensor!r} is listed by {len(found)} spaces: "
                             f"{[(s['name'], s['tensors']) for s in report['spaces']]}")
    return found[0]


def io_protection(report: dict, side: str, name: str) -> str:
    """The ``protection`` text of a graph input or output."""
    return next(io["protection"] for io in report[side] if io["name"] == name)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded per test (the seed differs from the compiler's own verification seeds)."""
    seed = 1000 + sum(request.node.nodeid.encode()) % 100_000
    return np.random.default_rng(seed)


@pytest.fixture(name="make_model")
def make_model_fixture():
    """``make_model(nodes, inputs, outputs, inits=None, opset=20) -> ModelProto`` (not saved)."""
    return make_model


@pytest.fixture
def build(tmp_path):
    """``build(nodes, inputs, outputs, inits=None, opset=20, name=...) -> Path`` of a saved, checked model."""
    counter = itertools.count()

    def _build(nodes, inputs=(), outputs=(), inits=None, opset: int = 20, name: str | None = None,
               extra_opsets=(), check: bool = True) -> Path:
        if isinstance(nodes, onnx.ModelProto):
            model = nodes
        else:
            model = make_model(nodes, inputs, outputs, inits, opset, extra_opsets)
        if check:
            onnx.checker.check_model(model, full_check=True)
        path = tmp_path / f"{name or 'model'}-{next(counter)}.onnx"
        onnx.save(model, str(path))
        return path

    return _build


class Report(dict):
    """A lint report dict with lookups by tensor name."""

    def space(self, tensor: str) -> dict:
        """The space entry that lists ``tensor``."""
        return space_of(self, tensor)

    def basis(self, tensor: str) -> str:
        """The ``basis`` of the space that carries ``tensor``."""
        return space_of(self, tensor)["basis"]

    def protection(self, side: str, name: str) -> str:
        """The ``protection`` text of graph input/output ``name`` (``side``: inputs or outputs)."""
        return io_protection(self, side, name)


@pytest.fixture
def lint():
    """``lint(path) -> Report`` (:func:`eecompile.lint_model`'s dict, with lookups by tensor)."""
    def _lint(path) -> Report:
        return Report(eecompile.lint_model(path))
    return _lint


@pytest.fixture
def compile_exact(tmp_path):
    """Compile with a fresh key, then assert plaintext ORT == decrypt(server(encrypt(x))) on ``feeds``."""
    counter = itertools.count()

    def _compile(path: Path, feeds: dict | list[dict], tolerance: float = TOLERANCE, key=None):
        out = tmp_path / f"out-{next(counter)}"
        result = eecompile.compile_model(path, key or eecompile.generate_key(), out)
        ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        enc = eecompile.EncryptedSession(out, providers=["CPUExecutionProvider"])
        names = [o.name for o in ref.get_outputs()]
        for one in feeds if isinstance(feeds, list) else [feeds]:
            expected = ref.run(None, one)
            got = enc.run(None, one)
            assert len(got) == len(expected)
            for name, e, g in zip(names, expected, got):
                assert g.shape == e.shape and g.dtype == e.dtype, name
                err = relative_error(e, g)
                assert err <= tolerance, f"output {name}: relative error {err:.3e} > {tolerance:.0e}"
        return result

    return _compile
