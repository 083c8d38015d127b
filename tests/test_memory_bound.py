"""Compile memory is bounded by the largest tensor, not the model: a model whose weights are several times the
bound compiles with a peak RSS that exceeds a same-width twin with a few layers by at most the bound.

The twin has the same widths, so the same bases (a dense input basis, monomial ones after each Relu) and the same
fixed costs (sampling and inverting the dense basis, its client matrices, the libraries); what differs is only
how many weights there are. A fold holds its weight and its result (2 x the tensor) plus float64 chunks of a
fixed size. With verification on, the same bound holds: an ONNX Runtime session holds its model's weights, so a
model above eecompile.passes.segments.PIECEWISE_BYTES is verified (and its exposure measured) in segments, one
segment's weights at a time (the twin, below it, in one session).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

WIDTH, LAYERS, TWIN_LAYERS = 1024, 96, 8
SLACK = 48 << 20

_CHILD = """
import sys
from eecompile import compile_model
from eecompile.keys import MasterKey
result = compile_model(sys.argv[1], MasterKey(bytes(range(32))), sys.argv[2], verify=sys.argv[3] == "1",
                       progress=False)
assert sys.argv[3] != "1" or result.verification.checked, result.verification.detail
print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
"""


def _mlp(path, width: int, layers: int):
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


def _peak(model, out, verify: bool = False) -> int:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(out), "1" if verify else "0"], check=True,
                          capture_output=True, text=True)
    return int(done.stdout.split()[-1]) * 1024


@pytest.mark.parametrize("verify", [False, True], ids=["verify-off", "verify-on"])
def test_peak_rss_does_not_grow_with_the_model(tmp_path, verify):
    big, largest = _mlp(tmp_path / "big.onnx", WIDTH, LAYERS)  # 96 x 4 MiB = 384 MiB of weights
    twin, _ = _mlp(tmp_path / "twin.onnx", WIDTH, TWIN_LAYERS)  # the same widths, 32 MiB of weights
    total = LAYERS * largest
    bound = 2 * largest + SLACK
    assert total >= 4 * bound, "the model must exceed the bound several times for this to mean anything"
    growth = _peak(big, tmp_path / "out-big", verify) - _peak(twin, tmp_path / "out-twin", verify)
    assert growth <= bound, (f"peak RSS grew by {growth / 2**20:.0f} MiB over the {TWIN_LAYERS}-layer twin, above "
                             f"the bound {bound / 2**20:.0f} MiB (largest tensor {largest / 2**20:.0f} MiB, weights "
                             f"{total / 2**20:.0f} MiB)")
    served = onnx.load(str(tmp_path / "out-big" / "server" / "model.onnx"), load_external_data=False)
    assert sum(t.data_location == TensorProto.EXTERNAL for t in served.graph.initializer) == LAYERS
