"""Compile memory is bounded by the largest tensor, not the model: a model whose weights are several times
the bound compiles with a peak RSS that grows over a same-graph twin with tiny weights by at most the bound.

The fold computes in float64, so a weight being folded is held as two float64 arrays (the weight and its
product): 4x the float32 tensor. The bound asserted is that plus a small slack; the model's weights are
several times larger. Verification is off here: an ONNX Runtime session holds its model's weights, so
verification costs one model (original, then compiled, one at a time; benchmarks/scale_sweep.py measures it).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

LAYERS = 24
SLACK = 48 << 20

_CHILD = """
import sys
from eecompile import compile_model
from eecompile.keys import MasterKey
compile_model(sys.argv[1], MasterKey(bytes(range(32))), sys.argv[2], verify=False, progress=False)
print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
"""


def _mlp(path, width: int, layers: int = LAYERS):
    """``layers`` MatMul → Relu blocks of ``width`` x ``width`` float32 weights, embedded in the file."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", width])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path, width * width * 4


def _peak(model, out) -> int:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(out)], check=True,
                          capture_output=True, text=True)
    return int(done.stdout.split()[-1]) * 1024


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured 2026-12-02: the compile still grows by ~870 MiB for 384 MiB of "
                   "weights: runtime/generate.py::_model_limits (called by compiler._record_context) parses the "
                   "whole embedded model with onnx.load; without it the growth is ~230 MiB (plan holds dense bases "
                   "and their inverses; not yet separated from the bound)")
def test_peak_rss_does_not_grow_with_the_model(tmp_path):
    big, largest = _mlp(tmp_path / "big.onnx", 2048)   # 24 x 16 MiB = 384 MiB of weights
    tiny, _ = _mlp(tmp_path / "tiny.onnx", 16)         # the same graph, weights of 1 KiB
    total = LAYERS * largest
    bound = 4 * largest + SLACK
    assert total >= 3 * bound, "the model must exceed the bound several times for this to mean anything"
    growth = _peak(big, tmp_path / "out-big") - _peak(tiny, tmp_path / "out-tiny")
    assert growth <= bound, (f"peak RSS grew by {growth / 2**20:.0f} MiB over the tiny twin, above the bound "
                             f"{bound / 2**20:.0f} MiB (largest tensor {largest / 2**20:.0f} MiB, weights "
                             f"{total / 2**20:.0f} MiB)")
    served = onnx.load(str(tmp_path / "out-big" / "server" / "model.onnx"), load_external_data=False)
    assert sum(t.data_location == TensorProto.EXTERNAL for t in served.graph.initializer) == LAYERS
