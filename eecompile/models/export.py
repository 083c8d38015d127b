"""ONNX export of the zoo models with the dynamo (torch.export) and legacy (TorchScript) exporters."""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from .feeds import make_feeds, torch_inputs
from .registry import build_model, check_name, dynamic_axes, input_names, output_names

LEGACY_OPSET: int = 17
"""Opset used for the legacy TorchScript exporter in :data:`EXPORTERS`."""

EXPORTERS: tuple[tuple[str, int], ...] = (("dynamo", 20), ("dynamo", 23), ("legacy", LEGACY_OPSET))
"""The (exporter, opset) pairs every zoo model is exported and tested with."""

_EXAMPLE = {"batch": 2, "seq": 3, "past": 4}  # distinct sizes > 1 so no dim gets specialised


def example_inputs(name: str) -> tuple[torch.Tensor, ...]:
    """Example positional torch inputs used for tracing (batch 2, seq 3, past 4)."""
    return torch_inputs(name, make_feeds(name, seed=0, **_EXAMPLE))


def _dynamo_shapes(name: str) -> tuple[object, ...]:
    """``dynamic_shapes`` for torch.export; llama's ``*past_key_values`` form one nested tuple."""
    axes = dynamic_axes(name)
    specs = [axes.get(n, {}) for n in input_names(name)]
    if name == "llama":
        return (*specs[:3], tuple(specs[3:]))
    return tuple(specs)


def _rename_output_dims(proto: onnx.ModelProto, name: str) -> None:
    """Give graph outputs the symbolic dim names of :func:`dynamic_axes`.

    torch.export names derived output dims by expression (``"past_sequence + sequence"``);
    this makes e.g. ``present.*`` axis 2 read ``total_sequence`` like ``attention_mask``.
    """
    axes = dynamic_axes(name)
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        for axis, sym in axes.get(out.name, {}).items():
            if axis < len(dims) and not dims[axis].HasField("dim_value"):
                dims[axis].dim_param = sym


def export_model(
    name: str,
    path: str | Path,
    exporter: str = "dynamo",
    opset: int = 20,
    seed: int = 0,
) -> Path:
    """Export zoo model ``name`` (weights from ``build_model(name, seed)``) to one ``.onnx`` file.

    ``exporter`` is ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, opset >= 18) or
    ``"legacy"`` (TorchScript exporter, opset 17..20).  The file is self-contained (no
    external data) and has a dynamic batch axis, plus dynamic sequence / past-sequence axes
    for the text models.  For ``llama`` with dynamo at opset >= 23 the standard
    ``RMSNormalization``/``RotaryEmbedding``/``Attention`` ops are emitted; otherwise
    everything is decomposed into basic ops.  Returns the written path.
    """
    check_name(name)
    if exporter not in ("dynamo", "legacy"):
        raise ValueError(f"unknown exporter {exporter!r}; expected 'dynamo' or 'legacy'")
    if exporter == "dynamo" and opset < 18:
        raise ValueError(f"the dynamo exporter needs opset >= 18, got {opset}")
    if exporter == "legacy" and not 17 <= opset <= 20:
        raise ValueError(f"the legacy exporter is used with opset 17..20 here, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_model(name, seed)
    if name == "llama":
        model.standard_ops = exporter == "dynamo" and opset >= 23  # type: ignore[attr-defined]
    args = example_inputs(name)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "model.onnx"
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            if exporter == "dynamo":
                torch.onnx.export(
                    model,
                    args,
                    str(raw),
                    dynamo=True,
                    opset_version=opset,
                    input_names=input_names(name),
                    output_names=output_names(name),
                    dynamic_shapes=_dynamo_shapes(name),
                    external_data=False,
                    verbose=False,
                )
            else:
                torch.onnx.export(
                    model,
                    args,
                    str(raw),
                    dynamo=False,
                    opset_version=opset,
                    input_names=input_names(name),
                    output_names=output_names(name),
                    dynamic_axes=dynamic_axes(name),
                    do_constant_folding=True,
                )
        proto = onnx.load(str(raw), load_external_data=True)
    _rename_output_dims(proto, name)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    return path


# --- export of a given Llama-style decoder instance (any config, e.g. a trained model) ---


def llama_io_names(layers: int) -> tuple[list[str], list[str]]:
    """Hugging Face/optimum ONNX ``(input_names, output_names)`` of a ``layers``-layer decoder.

    Inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.N.key|value``;
    outputs ``logits``, ``present.N.key|value``.  Same convention as the ``llama`` zoo model.
    """
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def llama_dynamic_axes(layers: int) -> dict[str, dict[int, str]]:
    """Symbolic dims (``batch``, ``sequence``, ``past_sequence``, ``total_sequence``) per IO name."""
    inputs, outputs = llama_io_names(layers)
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for n in inputs[3:]:
        axes[n] = {0: "batch", 2: "past_sequence"}
    for n in outputs[1:]:
        axes[n] = {0: "batch", 2: "total_sequence"}
    return axes


def llama_example_inputs(config: dict, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[torch.Tensor, ...]:
    """Positional example inputs (random ids, ones mask, positions, N(0,1) past) for tracing a decoder."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(config["vocab_size"]), (batch, seq), generator=gen, dtype=torch.int64)
    mask = torch.ones((batch, past + seq), dtype=torch.int64)
    pos = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous()
    shape = (batch, int(config["kv_heads"]), past, int(config["head_dim"]))
    kv = [torch.randn(shape, generator=gen) for _ in range(2 * int(config["layers"]))]
    return (ids, mask, pos, *kv)


def export_llama_module(
    model: torch.nn.Module,
    path: str | Path,
    exporter: str = "dynamo",
    opset: int = 20,
) -> Path:
    """Export a given :class:`~eecompile.models.llama.TinyLlama` instance (any config) to ``path``.

    Unlike :func:`export_model`, which builds a zoo model by name with random weights, this
    exports the module as it is (e.g. a trained checkpoint).  Same exporters, opsets, IO
    names (:func:`llama_io_names`) and dynamic dims (:func:`llama_dynamic_axes`) as the
    ``llama`` zoo model; the file is self-contained.  The model is put in eval mode and its
    ``standard_ops`` flag is set as for the zoo (True only for dynamo at opset >= 23).
    """
    if exporter not in ("dynamo", "legacy"):
        raise ValueError(f"unknown exporter {exporter!r}; expected 'dynamo' or 'legacy'")
    if exporter == "dynamo" and opset < 18:
        raise ValueError(f"the dynamo exporter needs opset >= 18, got {opset}")
    if exporter == "legacy" and not 17 <= opset <= 20:
        raise ValueError(f"the legacy exporter is used with opset 17..20 here, got {opset}")
    config = model.config  # type: ignore[attr-defined]
    layers = int(config["layers"])
    in_names, out_names = llama_io_names(layers)
    axes = llama_dynamic_axes(layers)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.standard_ops = exporter == "dynamo" and opset >= 23  # type: ignore[attr-defined]
    args = llama_example_inputs(config)
    specs = [axes.get(n, {}) for n in in_names]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "model.onnx"
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            if exporter == "dynamo":
                torch.onnx.export(
                    model,
                    args,
                    str(raw),
                    dynamo=True,
                    opset_version=opset,
                    input_names=in_names,
                    output_names=out_names,
                    dynamic_shapes=(*specs[:3], tuple(specs[3:])),
                    external_data=False,
                    verbose=False,
                )
            else:
                torch.onnx.export(
                    model,
                    args,
                    str(raw),
                    dynamo=False,
                    opset_version=opset,
                    input_names=in_names,
                    output_names=out_names,
                    dynamic_axes=axes,
                    do_constant_folding=True,
                )
        proto = onnx.load(str(raw), load_external_data=True)
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        for axis, sym in axes.get(out.name, {}).items():
            if axis < len(dims) and not dims[axis].HasField("dim_value"):
                dims[axis].dim_param = sym
    onnx.save_model(proto, str(path), save_as_external_data=False)
    return path
