"""Encoder residual streams: the basis class of the residual stream of tiny random Hugging Face encoders
(ViT, BERT, CLIP-vision, Whisper encoder), exported with torch.onnx (dynamo at the default opset, legacy at
opset 17), compiled with the default policy and with ``--policy rebase``, and the served cost of the policy
measured by ``eecompile bench`` (encrypted vs original, side by side).

The residual stream's class is the weakest class over the spaces of every LayerNormalization's input (the
tensor the stream carries into each norm, pre-LN or post-LN). Norm gains and biases are randomised so that
nothing is folded by accident.

    python benchmarks/encoder_streams.py --out /tmp/encoder_streams [--iters 200] [--results-md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = ("vit", "bert", "clip-vision", "whisper-encoder")
EXPORTERS = ("dynamo", "legacy17")
ORDER = ["orthogonal", "ones-orthogonal", "invertible", "block-invertible", "monomial", "signed-permutation",
         "permutation", "clear"]


SIZES = {
    "tiny": {"hidden": 32, "layers": 2, "heads": 4, "ffn": 64, "image": 16, "patch": 8, "tokens": 8, "mel": 16,
             "frames": 16},
    "base": {"hidden": 384, "layers": 4, "heads": 6, "ffn": 1536, "image": 224, "patch": 16, "tokens": 128,
             "mel": 80, "frames": 400},
}
"""``tiny``: the analysis at a glance; ``base``: MiniLM-sized widths, where the rebase MatMuls' cost is measurable."""


def build(arch: str, size: str = "tiny"):
    """A random-weight model of ``size`` (see :data:`SIZES`), its example inputs and input names."""
    import torch
    from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    d = SIZES[size]
    if arch == "vit":
        model = ViTModel(ViTConfig(hidden_size=d["hidden"], num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                                   intermediate_size=d["ffn"], image_size=d["image"], patch_size=d["patch"]))
        args, names = (torch.randn(1, 3, d["image"], d["image"]),), ["pixel_values"]
    elif arch == "bert":
        inner = BertModel(BertConfig(vocab_size=100, hidden_size=d["hidden"], num_hidden_layers=d["layers"],
                                     num_attention_heads=d["heads"], intermediate_size=d["ffn"],
                                     max_position_embeddings=max(64, d["tokens"])))

        class Outputs(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
                return out.last_hidden_state, out.pooler_output

        model = Outputs(inner)
        args = (torch.randint(0, 100, (1, d["tokens"])), torch.ones(1, d["tokens"], dtype=torch.long))
        names = ["input_ids", "attention_mask"]
    elif arch == "clip-vision":
        model = CLIPVisionModel(CLIPVisionConfig(hidden_size=d["hidden"], num_hidden_layers=d["layers"],
                                                 num_attention_heads=d["heads"], intermediate_size=d["ffn"],
                                                 image_size=d["image"], patch_size=d["patch"]))
        args, names = (torch.randn(1, 3, d["image"], d["image"]),), ["pixel_values"]
    elif arch == "whisper-encoder":
        model = WhisperEncoder(WhisperConfig(d_model=d["hidden"], encoder_layers=d["layers"],
                                             encoder_attention_heads=d["heads"], encoder_ffn_dim=d["ffn"],
                                             num_mel_bins=d["mel"], max_source_positions=d["frames"] // 2,
                                             decoder_layers=1, decoder_attention_heads=d["heads"], vocab_size=100))
        args, names = (torch.randn(1, d["mel"], d["frames"]),), ["input_features"]
    else:
        raise ValueError(f"unknown arch {arch}")
    model.eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model, args, names


def export(arch: str, exporter: str, path: Path, size: str = "tiny") -> Path:
    """Export one tiny model with torch.onnx (``dynamo``: default opset; ``legacy17``: dynamo=False, opset 17)."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    model, args, names = build(arch, size)
    if exporter == "legacy17":
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17, input_names=names)
    else:
        torch.onnx.export(model, args, str(path), dynamo=True, input_names=names)
    return path


def residual_class(report: dict, model_path: Path) -> tuple[str, list[str]]:
    """The weakest class over the spaces holding each LayerNormalization's input, and what limits it."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    inputs = {n.input[0] for n in graph.node if n.op_type == "LayerNormalization"}
    found = [s for s in report["spaces"] if inputs & set(s["tensors"])]
    if not found:
        return "clear", ["no LayerNormalization input is protected"]
    weakest = max(found, key=lambda s: ORDER.index(s["basis"]) if s["basis"] in ORDER else len(ORDER))
    limits = sorted({f"{s['limited_by']['op_type']} {s['limited_by']['node']}" for s in found
                     if s["basis"] == weakest["basis"] and s["limited_by"]})
    return weakest["basis"], limits


def run_cell(arch: str, exporter: str, out: Path, iters: int, size: str = "tiny") -> dict:
    """Export, compile with each policy, read the residual class, bench both compiles."""
    from eecompile.bench import run_bench
    from eecompile.compiler import compile_model
    from eecompile.keys import generate_key
    from eecompile.passes.options import CompileOptions

    model = out / f"{arch}-{exporter}-{size}.onnx"
    if not model.exists():
        subprocess.run([sys.executable, __file__, "--export-one", arch, exporter, str(model), "--size", size], check=True,
                       capture_output=True)
    key = generate_key()
    row = {"arch": arch, "exporter": exporter, "size": size}
    for policy in ("default", "rebase"):
        target = out / f"{arch}-{exporter}-{policy}"
        result = compile_model(model, key, target, force=True, options=CompileOptions(policy=policy))
        cls, limits = residual_class(result.report, model)
        bench = run_bench(target, iters=iters, warmup=10, progress=False)
        inserted = next((p for p in result.report["policies"] if p.startswith("policy rebase: ")), "")
        count = inserted.removeprefix("policy rebase: ").split(" ")[0]
        row[policy] = {"residual": cls, "limited_by": limits, "verified": result.verification.checked,
                       "max_relative_error": result.verification.max_relative_error,
                       "exposed": result.report["exposure"].get("intermediates_exposed"),
                       "rebase_matmuls": int(count) if count.isdigit() else 0,
                       "ratio": bench.ratio, "enc_ms": bench.encrypted_ms_p50, "plain_ms": bench.plaintext_ms_p50}
    return row


def markdown(rows: list[dict], command: str, size: str = "tiny") -> str:
    """The RESULTS.md section."""
    d = SIZES[size]
    out = [f"## Encoder residual streams ({size})", "",
           f"Random-weight Hugging Face encoders (hidden {d['hidden']}, {d['layers']} layers, {d['heads']} heads, "
           f"FFN {d['ffn']}; BERT {d['tokens']} tokens, ViT/CLIP {d['image']}² images; LayerNorm gains and biases "
           "randomised), residual-stream class = weakest class over the spaces of every LayerNormalization input. "
           "`default` adds nothing to the served model; `rebase` (`eecompile compile --policy rebase`) inserts one "
           "d×d MatMul after each op that binds the stream to a permutation. Ratio = encrypted p50 / original p50 "
           "from `eecompile bench` (CPU, batch 1, interleaved); every compile verified exact against the original.",
           "", f"Command: `{command}`", "",
           "| model | exporter | default: residual | bound by | ratio | rebase: residual | MatMuls added | ratio | "
           "max rel. error (default / rebase) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, b = r["default"], r["rebase"]
        bound = "; ".join(d["limited_by"]) if d["residual"] not in ("orthogonal", "ones-orthogonal") else "—"
        out.append(f"| {r['arch']} | {r['exporter']} | {d['residual']} | {bound} | {d['ratio']:.2f} | {b['residual']} | "
                   f"{b['rebase_matmuls']} | {b['ratio']:.2f} | {d['max_relative_error']:.1e} / "
                   f"{b['max_relative_error']:.1e} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "encoder_streams"))
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--exporters", default=",".join(EXPORTERS))
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--export-one", nargs=3, metavar=("ARCH", "EXPORTER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.export_one:
        export(args.export_one[0], args.export_one[1], Path(args.export_one[2]), args.size)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for arch in args.archs.split(","):
        for exporter in args.exporters.split(","):
            rows.append(run_cell(arch, exporter, out, args.iters, args.size))
            print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(markdown(rows, f"python benchmarks/encoder_streams.py --size {args.size} --iters {args.iters}", args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
