"""Tiny random-weight Hugging Face encoders, vision models and diffusers models, exported four ways.

The encoder matrix (issue 11): sixteen models (:data:`ARCHS`) built from tiny configs (hidden 32,
2 layers, 4 heads, vocabulary 100; 32×32 images; small diffusers UNet / VAE), with noise on every
parameter (:func:`eecompile.models.hf_decoders.perturb_parameters`: the dynamo exporter deduplicates
equal initializers, and norm gains become non-trivial).  Each model is exported with
(:data:`EXPORTERS`):

* ``dynamo20`` / ``dynamo23`` — ``torch.onnx.export(dynamo=True)`` at the default opset / at 23;
* ``legacy17`` — the TorchScript exporter (``dynamo=False``) at opset 17;
* ``optimum`` — ``optimum.exporters.onnx.main_export`` on a ``save_pretrained`` checkpoint, in the
  optimum environment (:data:`eecompile.models.hf_decoders.OPTIMUM_PYTHON`, transformers 4.57); the
  checkpoint is rebuilt there from the same tiny config and ``model.safetensors``.  optimum exports
  diffusers models only as whole pipelines, so the two diffusers cells record that instead.

CLIP text uses the current config convention (``eos_token_id`` = the last id, pooled by
``input_ids == eos``); a config with ``eos_token_id == 2`` selects transformers' legacy pooling,
``argmax`` over the ids, which no permutation of the vocabulary but the identity keeps exact.
The torch exports have a dynamic batch (and sequence, for text); text models are always given an
attention mask (transformers 5.x models otherwise fail the legacy exporter on ``aten::diff``).
Attention is ``sdpa`` where it exports, else ``eager`` (recorded as the export's note; Swin and T5
need eager under dynamo).  Exports are cached like the decoder matrix's.

The module imports only the standard library at import time, so it also runs as a script under the
optimum environment's interpreter (``python hf_encoders.py optimum-export ...``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__:
    from .hf_decoders import OPTIMUM_PYTHON, ExportResult, error_line, perturb_parameters
else:  # run as a script (the optimum environment): the sibling module, stdlib-only at import time
    from hf_decoders import OPTIMUM_PYTHON, ExportResult, error_line, perturb_parameters  # type: ignore

EXPORTERS: tuple[str, ...] = ("dynamo20", "dynamo23", "legacy17", "optimum")
"""The four ways every model is exported."""

HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB, POSITIONS, IMAGE = 32, 2, 4, 64, 100, 64, 32


@dataclass(frozen=True)
class Spec:
    """How one architecture is built, fed and exported.

    ``kind`` picks the builder: ``auto`` (``AutoModel.from_config``), ``t5_encoder``,
    ``whisper_encoder``, ``clip_text``, ``clip_vision``, ``unet`` (diffusers ``UNet2DModel``),
    ``vae_decoder`` (diffusers ``AutoencoderKL.decode``).  ``inputs`` maps each input name to its
    example shape (``-1`` = the batch, ``-2`` = the sequence); ``dynamic`` maps input names to
    ``{axis: name}``; ``optimum_task`` is the task given to ``main_export`` (``None``: not
    exportable with optimum, ``optimum_note`` says why) and ``optimum_file`` the exported file kept.
    """

    kind: str
    config: dict[str, Any]
    inputs: dict[str, tuple[int, ...]]
    outputs: tuple[str, ...]
    dtypes: dict[str, str] = field(default_factory=dict)
    optimum_task: str | None = "feature-extraction"
    optimum_file: str = "model.onnx"
    optimum_note: str = ""
    text: bool = False


_TEXT_INPUTS = {"input_ids": (-1, -2), "attention_mask": (-1, -2)}
_TEXT_DTYPES = {"input_ids": "int64", "attention_mask": "int64"}
_IMAGE = {"pixel_values": (-1, 3, IMAGE, IMAGE)}
_BERTISH = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "intermediate_size": INTERMEDIATE, "vocab_size": VOCAB, "max_position_embeddings": POSITIONS,
            "pad_token_id": 0}
_VIT_LIKE = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
             "intermediate_size": INTERMEDIATE, "image_size": IMAGE, "patch_size": 8}
_DIFFUSERS_NOTE = "optimum exports diffusers models only as whole pipelines (not a bare UNet2DModel / AutoencoderKL)"

SPECS: dict[str, Spec] = {
    "bert": Spec("auto", {"model_type": "bert", **_BERTISH}, _TEXT_INPUTS, ("last_hidden_state", "pooler_output"),
                 _TEXT_DTYPES, text=True),
    "roberta": Spec("auto", {"model_type": "roberta", **_BERTISH, "pad_token_id": 1, "bos_token_id": 0,
                             "eos_token_id": 2, "max_position_embeddings": POSITIONS + 2},
                    _TEXT_INPUTS, ("last_hidden_state", "pooler_output"), _TEXT_DTYPES, text=True),
    "distilbert": Spec("auto", {"model_type": "distilbert", "dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS,
                                "hidden_dim": INTERMEDIATE, "vocab_size": VOCAB,
                                "max_position_embeddings": POSITIONS, "pad_token_id": 0},
                       _TEXT_INPUTS, ("last_hidden_state",), _TEXT_DTYPES, text=True),
    "deberta_v2": Spec("auto", {"model_type": "deberta-v2", **_BERTISH, "relative_attention": True,
                                "position_buckets": 16, "max_relative_positions": POSITIONS,
                                "pos_att_type": ["p2c", "c2p"], "position_biased_input": False},
                       _TEXT_INPUTS, ("last_hidden_state",), _TEXT_DTYPES, text=True),
    "modernbert": Spec("auto", {"model_type": "modernbert", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
                                "num_attention_heads": HEADS, "intermediate_size": INTERMEDIATE,
                                "vocab_size": VOCAB, "max_position_embeddings": POSITIONS,
                                "global_attn_every_n_layers": 1, "pad_token_id": 0, "bos_token_id": 1,
                                "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2},
                       _TEXT_INPUTS, ("last_hidden_state",), _TEXT_DTYPES, text=True),
    "vit": Spec("auto", {"model_type": "vit", **_VIT_LIKE}, _IMAGE, ("last_hidden_state", "pooler_output")),
    "swin": Spec("auto", {"model_type": "swin", "image_size": IMAGE, "patch_size": 4, "embed_dim": 16,
                          "depths": [1, 1], "num_heads": [2, 4], "window_size": 4, "mlp_ratio": 2.0},
                 _IMAGE, ("last_hidden_state", "pooler_output")),
    "convnext": Spec("auto", {"model_type": "convnext", "image_size": IMAGE, "hidden_sizes": [16, 32],
                              "depths": [1, 1], "num_stages": 2, "patch_size": 4}, _IMAGE, ("last_hidden_state", "pooler_output")),
    "resnet": Spec("auto", {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32],
                            "depths": [1, 1], "layer_type": "basic"}, _IMAGE, ("last_hidden_state", "pooler_output")),
    "mobilenet_v2": Spec("auto", {"model_type": "mobilenet_v2", "image_size": IMAGE, "depth_multiplier": 0.25,
                                  "min_depth": 8}, _IMAGE, ("last_hidden_state", "pooler_output")),
    "whisper_encoder": Spec("whisper_encoder", {"model_type": "whisper", "d_model": HIDDEN, "encoder_layers": LAYERS,
                                                "encoder_attention_heads": HEADS, "encoder_ffn_dim": INTERMEDIATE,
                                                "decoder_layers": 1, "decoder_attention_heads": HEADS,
                                                "decoder_ffn_dim": INTERMEDIATE, "num_mel_bins": 16,
                                                "max_source_positions": 16, "max_target_positions": 16,
                                                "vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1,
                                                "eos_token_id": 2, "decoder_start_token_id": 1},
                            {"input_features": (-1, 16, 32)}, ("last_hidden_state",),
                            optimum_task="automatic-speech-recognition", optimum_file="encoder_model.onnx"),
    "t5_encoder": Spec("t5_encoder", {"model_type": "t5", "d_model": HIDDEN, "d_kv": 8, "num_heads": HEADS,
                                      "d_ff": INTERMEDIATE, "num_layers": LAYERS, "vocab_size": VOCAB,
                                      "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
                                      "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
                                      "tie_word_embeddings": False},
                       _TEXT_INPUTS, ("last_hidden_state",), _TEXT_DTYPES,
                       optimum_task="text2text-generation-with-past", optimum_file="encoder_model.onnx", text=True),
    "clip_text": Spec("clip_text", {"model_type": "clip_text_model", "hidden_size": HIDDEN,
                                    "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                                    "intermediate_size": INTERMEDIATE, "vocab_size": VOCAB,
                                    "max_position_embeddings": 16, "pad_token_id": 0, "bos_token_id": 98,
                                    "eos_token_id": 99},
                      _TEXT_INPUTS, ("last_hidden_state", "pooler_output"), _TEXT_DTYPES, text=True),
    "clip_vision": Spec("clip_vision", {"model_type": "clip_vision_model", **_VIT_LIKE},
                        _IMAGE, ("last_hidden_state", "pooler_output")),
    "unet2d": Spec("unet", {"sample_size": 16, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
                            "block_out_channels": [16, 32], "norm_num_groups": 8,
                            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8},
                   {"sample": (-1, 3, 16, 16), "timestep": (-1,)}, ("out_sample",), {"timestep": "float32"},
                   optimum_task=None, optimum_note=_DIFFUSERS_NOTE),
    "vae_decoder": Spec("vae_decoder", {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
                                        "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
                                        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
                                        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
                                        "sample_size": 16},
                        {"latent_sample": (-1, 4, 8, 8)}, ("sample",), optimum_task=None,
                        optimum_note=_DIFFUSERS_NOTE),
}
"""Every architecture of the matrix."""

ARCHS: tuple[str, ...] = tuple(SPECS)
"""The architectures, in table order."""

EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 7


def check_arch(arch: str) -> Spec:
    """The :class:`Spec` of ``arch``; ``ValueError`` naming the known architectures otherwise."""
    if arch not in SPECS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    return SPECS[arch]


def check_exporter(exporter: str) -> None:
    """Raise ``ValueError`` if ``exporter`` is not one of :data:`EXPORTERS`."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {', '.join(EXPORTERS)}")


def export_path(root: str | Path, arch: str, exporter: str) -> Path:
    """Where ``exporter``'s export of ``arch`` lives under ``root``: ``root/arch/exporter/model.onnx``."""
    check_arch(arch)
    check_exporter(exporter)
    return Path(root) / arch / exporter / "model.onnx"


def checkpoint_dir(root: str | Path, arch: str) -> Path:
    """The checkpoint folder of ``arch`` under ``root``: ``root/arch/checkpoint``."""
    check_arch(arch)
    return Path(root) / arch / "checkpoint"


# --- building ---------------------------------------------------------------------------


def _hf_config(spec: Spec) -> Any:
    from transformers import AutoConfig

    kwargs = dict(spec.config)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def _raw_model(spec: Spec, attn_implementation: str) -> Any:
    """The un-perturbed model ``spec`` describes (random init)."""
    if spec.kind == "unet":
        from diffusers import UNet2DModel

        return UNet2DModel(**spec.config)
    if spec.kind == "vae_decoder":
        from diffusers import AutoencoderKL

        return AutoencoderKL(**spec.config)
    config = _hf_config(spec)
    if spec.kind == "auto":
        from transformers import AutoModel

        try:
            return AutoModel.from_config(config, attn_implementation=attn_implementation)
        except ValueError as exc:  # a model without attention
            if "attention implementation" not in str(exc):
                raise
            return AutoModel.from_config(_hf_config(spec))  # a fresh config: the failed call set its attention
    if spec.kind == "t5_encoder":
        from transformers import T5EncoderModel

        config._attn_implementation = attn_implementation
        return T5EncoderModel(config)
    if spec.kind == "whisper_encoder":
        from transformers import WhisperModel

        config._attn_implementation = attn_implementation
        return WhisperModel(config)
    if spec.kind == "clip_text":
        from transformers import CLIPTextModel

        config._attn_implementation = attn_implementation
        return CLIPTextModel(config)
    if spec.kind == "clip_vision":
        from transformers import CLIPVisionModel

        config._attn_implementation = attn_implementation
        return CLIPVisionModel(config)
    raise ValueError(f"unknown model kind {spec.kind!r}")


def build_model(arch: str, seed: int = 0, attn_implementation: str = "sdpa") -> Any:
    """A tiny random-weight model of ``arch`` in eval mode, noise on every parameter (a checkpoint's model)."""
    import torch

    spec = check_arch(arch)
    torch.manual_seed(seed)
    model = _raw_model(spec, attn_implementation)
    perturb_parameters(model, seed)
    return model.eval()


def build_checkpoint(arch: str, directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny ``arch`` checkpoint (``save_pretrained``, safetensors) into ``directory``; reuse one there."""
    directory = Path(directory)
    if (directory / "model.safetensors").is_file() or (directory / "diffusion_pytorch_model.safetensors").is_file():
        return directory
    model = build_model(arch, seed, attn_implementation="eager")
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    (directory / "eecompile_tiny_config.json").write_text(json.dumps(SPECS[arch].config, indent=2) + "\n")
    return directory


def load_model(arch: str, checkpoint: str | Path, attn_implementation: str = "sdpa") -> Any:
    """Load ``arch`` from the checkpoint with the running library (``from_pretrained``, offline, eval mode).

    ``from_pretrained`` maps the checkpoint's keys across transformers versions (4.x / 5.x name
    some weights differently), so both environments load the same weights.  Models without
    attention ignore ``attn_implementation``.
    """
    spec = check_arch(arch)
    directory = str(Path(checkpoint))
    if spec.kind == "unet":
        from diffusers import UNet2DModel

        return UNet2DModel.from_pretrained(directory).eval()
    if spec.kind == "vae_decoder":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(directory).eval()
    import transformers

    cls = {"auto": transformers.AutoModel, "t5_encoder": transformers.T5EncoderModel,
           "whisper_encoder": transformers.WhisperModel, "clip_text": transformers.CLIPTextModel,
           "clip_vision": transformers.CLIPVisionModel}[spec.kind]
    try:
        model = cls.from_pretrained(directory, attn_implementation=attn_implementation)
    except ValueError as exc:  # no attention in the model (ConvNeXt, ResNet, ...): the argument does not apply
        if "attention implementation" not in str(exc):
            raise
        model = cls.from_pretrained(directory)
    return model.eval()


# --- exporting with torch.onnx ----------------------------------------------------------


def _wrapper(arch: str, model: Any) -> Any:
    """``inputs -> outputs`` of :data:`SPECS` as a plain torch module (tensors in, a tuple of tensors out)."""
    import torch

    spec = SPECS[arch]

    class Wrapped(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            named = dict(zip(spec.inputs, args))
            if spec.kind == "unet":
                return (self.inner(named["sample"], named["timestep"]).sample,)
            if spec.kind == "vae_decoder":
                return (self.inner.decode(named["latent_sample"]).sample,)
            inner = self.inner.encoder if spec.kind == "whisper_encoder" else self.inner
            out = inner(**named)
            return tuple(getattr(out, name) for name in spec.outputs)

    return Wrapped(model).eval()


def example_inputs(arch: str, batch: int = EXAMPLE_BATCH, seq: int = EXAMPLE_SEQ, seed: int = 0) -> dict[str, Any]:
    """Example torch inputs of ``arch`` by name (ids in ``[3, vocab)``, a mask of ones, normal floats, timesteps)."""
    import torch

    spec = check_arch(arch)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for name, shape in spec.inputs.items():
        dims = tuple(batch if d == -1 else seq if d == -2 else d for d in shape)
        if name == "input_ids":
            out[name] = torch.randint(3, VOCAB, dims, generator=gen, dtype=torch.int64)
        elif name == "attention_mask":
            out[name] = torch.ones(dims, dtype=torch.int64)
        elif name == "timestep":
            out[name] = torch.rand(dims, generator=gen) * 999.0
        else:
            out[name] = torch.randn(dims, generator=gen)
    return out


def dynamic_axes(arch: str) -> dict[str, dict[int, str]]:
    """``{input: {axis: name}}``: the batch of every input, the sequence of text inputs."""
    spec = check_arch(arch)
    return {name: {i: ("batch" if d == -1 else "sequence") for i, d in enumerate(shape) if d < 0}
            for name, shape in spec.inputs.items()}


def export_torch(arch: str, model: Any, path: str | Path, exporter: str) -> Path:
    """Export ``model`` (from :func:`build_model` / :func:`load_model`) with ``torch.onnx.export``.

    ``dynamo20`` uses the exporter's default opset, ``dynamo23`` opset 23, ``legacy17`` the
    TorchScript exporter at opset 17.  Inputs / outputs are named as in :data:`SPECS`; the batch
    (and a text model's sequence) is dynamic.  The file is self-contained and written atomically.
    Raises whatever the exporter raises.
    """
    import onnx
    import torch

    check_exporter(exporter)
    if exporter == "optimum":
        raise ValueError("use export_optimum for the optimum exporter")
    spec = SPECS[arch]
    wrapped = _wrapper(arch, model)
    inputs = example_inputs(arch)
    args = tuple(inputs.values())
    names, outputs = list(inputs), list(spec.outputs)
    axes = dynamic_axes(arch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "model.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            if exporter.startswith("dynamo"):
                opset = int(exporter[len("dynamo"):])
                shapes = (tuple({a: torch.export.Dim.DYNAMIC for a in axes[n]} or None for n in names),)  # *args
                torch.onnx.export(wrapped, args, str(raw), dynamo=True, opset_version=None if opset == 20 else opset,
                                  input_names=names, output_names=outputs, dynamic_shapes=shapes,
                                  external_data=False, verbose=False)
            else:
                out_axes = {o: {0: "batch"} for o in outputs}
                torch.onnx.export(wrapped, args, str(raw), dynamo=False, opset_version=17, input_names=names,
                                  output_names=outputs, dynamic_axes={**axes, **out_axes}, do_constant_folding=True)
        proto = onnx.load(str(raw), load_external_data=True)
    tmp_path = path.with_name(path.name + ".partial")
    onnx.save_model(proto, str(tmp_path), save_as_external_data=False)
    os.replace(tmp_path, path)
    return path


# --- exporting with optimum (in its own environment) ------------------------------------


def export_optimum(arch: str, checkpoint: str | Path, path: str | Path, python: str = OPTIMUM_PYTHON,
                   timeout: float = 900.0) -> Path:
    """Export the checkpoint with optimum's ``main_export`` into ``path``'s folder, in a subprocess.

    The subprocess runs this file under ``python`` (the optimum environment), rebuilds the model
    there, saves a checkpoint and calls ``main_export`` with the arch's task; the file
    :attr:`Spec.optimum_file` becomes ``path``.  Raises ``RuntimeError`` with the last error line
    if it fails (or the arch has no optimum export), ``FileNotFoundError`` without ``python``.
    """
    spec = check_arch(arch)
    if spec.optimum_task is None:
        raise RuntimeError(spec.optimum_note)
    if not Path(python).exists():
        raise FileNotFoundError(f"optimum interpreter {python} not found (set EECOMPILE_OPTIMUM_PYTHON)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [python, str(Path(__file__).resolve()), "optimum-export", "--arch", arch,
               "--checkpoint", str(Path(checkpoint).resolve()), "--out", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        produced = Path(tmp) / spec.optimum_file
        if proc.returncode != 0 or not produced.is_file():
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            marked = [line for line in lines if line.startswith("OPTIMUM-EXPORT-ERROR:")]
            last = marked[-1].split(":", 1)[1].strip() if marked else (lines[-1] if lines else f"rc {proc.returncode}")
            raise RuntimeError(last)
        import shutil

        data = [p for p in Path(tmp).iterdir() if p.name.startswith(spec.optimum_file) and p != produced]
        if data:
            raise RuntimeError(f"optimum wrote external data for {spec.optimum_file}; not expected at this size")
        shutil.copyfile(produced, path.with_name(path.name + ".partial"))
        os.replace(path.with_name(path.name + ".partial"), path)
    return path


def _optimum_export_main(arch: str, checkpoint: str, out: str) -> None:
    """Body of the ``optimum-export`` subcommand (runs inside the optimum environment)."""
    from optimum.exporters.onnx import main_export

    model = load_model(arch, checkpoint, attn_implementation="eager")
    if SPECS[arch].kind == "whisper_encoder":  # the checkpoint is the whole WhisperModel; optimum wants the head too
        from transformers import WhisperForConditionalGeneration

        full = WhisperForConditionalGeneration(model.config)
        full.model.load_state_dict(model.state_dict())
        model = full.eval()
    if SPECS[arch].kind == "t5_encoder":  # an encoder-only checkpoint: optimum exports T5 as encoder + decoder
        from transformers import T5ForConditionalGeneration

        full = T5ForConditionalGeneration(_hf_config(SPECS[arch]))
        full.encoder.load_state_dict(model.encoder.state_dict())
        full.shared.load_state_dict(model.shared.state_dict())
        model = full.eval()
    extra: dict[str, Any] = {}
    if SPECS[arch].kind == "whisper_encoder":  # optimum's dummy audio is 3000 frames; this encoder takes 32
        extra["nb_max_frames"] = 2 * model.config.max_source_positions
    if SPECS[arch].kind == "clip_text":  # no transformers-library config for a bare CLIPTextModel: pass optimum's own
        from optimum.exporters.onnx.model_configs import CLIPTextOnnxConfig

        extra["custom_onnx_configs"] = {"model": CLIPTextOnnxConfig(model.config, task="feature-extraction")}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        main_export(tmp, output=out, task=SPECS[arch].optimum_task, library_name="transformers", device="cpu",
                    do_validation=True, **extra)


# --- the whole set ----------------------------------------------------------------------


def export_one(root: str | Path, arch: str, exporter: str, retry_failed: bool = False,
               optimum_timeout: float = 900.0) -> ExportResult:
    """Build (cached) and export (cached) ``arch`` with ``exporter`` under ``root``; never raises for export errors.

    A failure is written to ``export_error.txt`` beside the would-be model and returned as the
    result's ``error``.  The torch exporters try ``attn_implementation="sdpa"`` first and fall back
    to ``"eager"`` (recorded in the result's ``note``).
    """
    path = export_path(root, arch, exporter)
    err_file = path.parent / "export_error.txt"
    note_file = path.parent / "export_note.txt"
    if path.is_file():
        note = note_file.read_text().strip() if note_file.is_file() else ""
        return ExportResult(arch, exporter, str(path), None, 0.0, True, note)
    if err_file.is_file() and not retry_failed:
        return ExportResult(arch, exporter, None, err_file.read_text().strip(), 0.0, True)
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    note = ""
    try:
        ckpt = build_checkpoint(arch, checkpoint_dir(root, arch))
        if exporter == "optimum":
            export_optimum(arch, ckpt, path, timeout=optimum_timeout)
        else:
            try:
                export_torch(arch, load_model(arch, ckpt, attn_implementation="sdpa"), path, exporter)
            except Exception as exc:  # noqa: BLE001 - recorded, then retried with eager attention
                if SPECS[arch].kind in ("unet", "vae_decoder"):
                    raise
                note = f"sdpa failed ({error_line(exc)}); exported with eager attention"
                export_torch(arch, load_model(arch, ckpt, attn_implementation="eager"), path, exporter)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, none hidden
        msg = error_line(exc)
        if note:
            msg = f"{msg} (with eager attention; {note})"
        err_file.write_text(msg + "\n")
        return ExportResult(arch, exporter, None, msg, time.perf_counter() - start, False, note)
    if err_file.is_file():
        err_file.unlink()
    if note:
        note_file.write_text(note + "\n")
    return ExportResult(arch, exporter, str(path), None, time.perf_counter() - start, False, note)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``export`` (this environment) or ``optimum-export`` (inside the optimum environment)."""
    parser = argparse.ArgumentParser(description="tiny Hugging Face / diffusers encoders, exported four ways")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="export archs x exporters under --out")
    p.add_argument("--out", required=True)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--exporters", default=",".join(EXPORTERS))
    p.add_argument("--retry-failed", action="store_true")
    q = sub.add_parser("optimum-export", help="(internal) run optimum's main_export on one checkpoint")
    q.add_argument("--arch", required=True)
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "optimum-export":
        try:
            _optimum_export_main(args.arch, args.checkpoint, args.out)
        except Exception as exc:  # noqa: BLE001 - reported as one line to the parent process
            traceback.print_exc()
            print(f"OPTIMUM-EXPORT-ERROR: {error_line(exc)}", file=sys.stderr)
            return 1
        return 0
    ok = True
    for arch in args.archs.split(","):
        for exporter in args.exporters.split(","):
            r = export_one(args.out, arch, exporter, args.retry_failed)
            ok &= r.path is not None
            print(f"export {arch}/{exporter}: {'ok' if r.path else 'FAILED: ' + str(r.error)} "
                  f"({r.seconds:.1f}s{', cached' if r.cached else ''}){' ' + r.note if r.note else ''}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
