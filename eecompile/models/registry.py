"""Registry of the reference zoo: constructors, configs, ONNX input/output names and dims."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from . import bert, cnn, gpt2, llama, mlp
from ._common import perturb_, seeded_build

ZOO_MODELS: tuple[str, ...] = ("mlp", "mlp_softmax", "mlp_argmax", "cnn", "bert", "gpt2", "llama")

_CONFIGS: dict[str, dict[str, Any]] = {
    "mlp": dict(mlp.CONFIG, head="logits"),
    "mlp_softmax": dict(mlp.CONFIG, head="softmax"),
    "mlp_argmax": dict(mlp.CONFIG, head="argmax"),
    "cnn": dict(cnn.CONFIG),
    "bert": dict(bert.CONFIG),
    "gpt2": dict(gpt2.CONFIG),
    "llama": dict(llama.CONFIG),
}


def check_name(name: str) -> None:
    """Raise ``ValueError`` if ``name`` is not one of :data:`ZOO_MODELS`."""
    if name not in ZOO_MODELS:
        raise ValueError(f"unknown zoo model {name!r}; expected one of {', '.join(ZOO_MODELS)}")


def model_config(name: str) -> dict[str, Any]:
    """Return a copy of the configuration (sizes, vocab, heads, ...) of zoo model ``name``."""
    check_name(name)
    return copy.deepcopy(_CONFIGS[name])


def _construct(name: str) -> nn.Module:
    if name == "mlp":
        return mlp.TinyMLP("logits")
    if name == "mlp_softmax":
        return mlp.TinyMLP("softmax")
    if name == "mlp_argmax":
        return mlp.TinyMLP("argmax")
    if name == "cnn":
        return cnn.TinyResNet()
    if name == "bert":
        return bert.TinyBertClassifier()
    if name == "gpt2":
        return gpt2.TinyGPT2()
    if name == "llama":
        return llama.TinyLlama()
    raise AssertionError(name)


def build_model(name: str, seed: int = 0) -> nn.Module:
    """Build zoo model ``name`` in eval mode with seeded random weights plus Gaussian noise.

    Every floating-point parameter and buffer gets ``0.02 * N(0, 1)`` added (norm gains are
    not all ones, biases not all zeros); BatchNorm running statistics are randomised with a
    positive variance.  The RoPE ``inv_freq`` table of ``llama`` is the only buffer left
    exact.  The same ``(name, seed)`` always gives the same weights.
    """
    check_name(name)
    model = seeded_build(lambda: _construct(name), seed)
    perturb_(model, seed, skip_buffers=("inv_freq",))
    return model.eval()


def input_names(name: str) -> list[str]:
    """ONNX graph input names of zoo model ``name``, in positional order."""
    check_name(name)
    if name.startswith("mlp"):
        return ["x"]
    if name == "cnn":
        return ["image"]
    if name == "bert":
        return ["input_ids", "attention_mask"]
    if name == "gpt2":
        return ["input_ids"]
    layers = _CONFIGS[name]["layers"]
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(name: str) -> list[str]:
    """ONNX graph output names of zoo model ``name``, in order."""
    check_name(name)
    if name == "mlp_softmax":
        return ["probs"]
    if name == "mlp_argmax":
        return ["label"]
    if name != "llama":
        return ["logits"]
    layers = _CONFIGS[name]["layers"]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["logits", *present]


def dynamic_axes(name: str) -> dict[str, dict[int, str]]:
    """Symbolic dims per input/output name: ``batch``, ``sequence``, ``past_sequence``, ..."""
    check_name(name)
    axes: dict[str, dict[int, str]] = {}
    if name.startswith("mlp") or name == "cnn":
        axes = {n: {0: "batch"} for n in input_names(name) + output_names(name)}
    elif name == "bert":
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"}}
    elif name == "gpt2":
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    else:
        axes = {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"},
            "logits": {0: "batch", 1: "sequence"},
        }
        for n in input_names(name)[3:]:
            axes[n] = {0: "batch", 2: "past_sequence"}
        for n in output_names(name)[1:]:
            axes[n] = {0: "batch", 2: "total_sequence"}
    return axes
