"""Reference model zoo: tiny hand-written torch models, their ONNX exports and random feeds.

Models (:data:`ZOO_MODELS`): ``mlp``, ``mlp_softmax``, ``mlp_argmax``, ``cnn`` (ResNet
style), ``bert`` (post-LN encoder classifier), ``gpt2`` (pre-LN decoder, tied LM head) and
``llama`` (GQA, RoPE, SwiGLU, RMSNorm, Hugging Face/optimum-style KV cache).  Each is
exported with every (exporter, opset) pair in :data:`EXPORTERS`.
"""

from __future__ import annotations

from .export import EXPORTERS, LEGACY_OPSET, example_inputs, export_model
from .feeds import BATCH_LIMITS, make_feeds, run_torch, torch_inputs
from .registry import ZOO_MODELS, build_model, dynamic_axes, input_names, model_config, output_names

UNSUPPORTED: dict[tuple[str, str, int], str] = {}
"""(model, exporter, opset) combinations that cannot be exported or run, with the reason."""

__all__ = [
    "BATCH_LIMITS",
    "EXPORTERS",
    "LEGACY_OPSET",
    "UNSUPPORTED",
    "ZOO_MODELS",
    "build_model",
    "dynamic_axes",
    "example_inputs",
    "export_model",
    "input_names",
    "make_feeds",
    "model_config",
    "output_names",
    "run_torch",
    "torch_inputs",
]
