"""The attacker's "public model" when it does not know the private weights.

A privately fine-tuned model differs from its public base by a weight change. Without a real
fine-tune at hand, :func:`perturbed_copy` simulates one: every weight matrix (initializers
with two or more axes) gets independent Gaussian noise so that ``||W_public - W|| / ||W||``
equals ``relative_change``. Norm gains, biases and constant tables of positions stay as they
are. The benchmark also uses a real fine-tune of the trained language model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def perturbed_copy(src: str | Path, dst: str | Path, relative_change: float, seed: int = 0) -> Path:
    """Write a copy of the ONNX model ``src`` with every weight matrix moved by ``relative_change``."""
    rng = np.random.default_rng(seed)
    model = onnx.load(str(src), load_external_data=True)
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim < 2 or not np.issubdtype(arr.dtype, np.floating) or arr.size < 4:
            continue
        rms = float(np.sqrt(np.mean(arr.astype(np.float64) ** 2)))
        noise = rng.standard_normal(arr.shape) * relative_change * rms
        init.CopyFrom(numpy_helper.from_array((arr + noise).astype(arr.dtype), init.name))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst))
    return dst


def relative_change(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b|| / ||b||``."""
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))
