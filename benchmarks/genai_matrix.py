"""ONNX Runtime GenAI matrix: builder models compiled and served by the stock runtime on ciphertext.

For each architecture (tiny random checkpoints, no downloads) × builder precision (fp32, int4 CPU) the
model is compiled exactly, and int4 also with ``--requantize``. Per row: the verification error, the
exposure count (intermediates and KV-cache outputs equal to the plaintext run), whether og.Generator's
greedy 32 tokens and a seeded top-k sample from client-encrypted prompt ids equal plaintext genai, and for
``--requantize`` the measured accuracy change against the original int4 model (max logit difference,
teacher-forced greedy-token agreement over 64 tokens, first free-running divergence).

    python benchmarks/genai_matrix.py [--archs llama,qwen2,...] [--out benchmarks/results/genai_matrix.md]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import eecompile
from eecompile.genai import genai_generate, run_generator
from eecompile.models import hf_decoders as hd
from eecompile.passes.options import CompileOptions

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "phi3", "granite")
PROMPT = [1, 17, 42, 99, 5, 200, 33]


def _tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, hd.VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<pad>").save_pretrained(str(directory))


def _build(checkpoint: Path, out: Path, precision: str) -> Path:
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
                    "-p", precision, "-e", "cpu", "-c", str(out.parent / f"cache-{precision}")],
                   check=True, capture_output=True, timeout=900)
    return out / "model.onnx"


def row(arch: str, precision: str, requantize: bool, model: Path, work: Path) -> str:
    """One table row (compile, exposure, stock-runtime generation, accuracy)."""
    out = work / f"out-{arch}-{precision}-{int(requantize)}"
    result = eecompile.compile_model(model, eecompile.generate_key(), out, options=CompileOptions(requantize=requantize))
    rep = result.report
    exp = rep["exposure"]
    exposed = f"{exp['intermediates_exposed']}/{exp['intermediates_compared']}, " \
              f"{exp['state_outputs_exposed']}/{exp['state_outputs_compared']}"
    classes = ", ".join(f"{v} {k}" for k, v in rep["summary"].items())
    greedy = genai_generate(out, PROMPT, 32).plain_ids == run_generator(model.parent, PROMPT, 32)
    sampled = genai_generate(out, PROMPT, 32, temperature=0.8, top_k=5, seed=3).plain_ids == \
        run_generator(model.parent, PROMPT, 32, temperature=0.8, top_k=5, seed=3)
    if requantize:
        acc = rep.get("accuracy", {})
        accuracy = (f"max logit diff {acc['max_logit_difference']:.3g}, agreement "
                    f"{acc['greedy_agreement'] * acc['tokens']:.0f}/{acc['tokens']}, first divergence "
                    f"{acc['first_divergence']}") if acc.get("measured") else acc.get("detail", "-")
        equal = f"{'yes' if greedy else 'no'} / {'yes' if sampled else 'no'} (vs original int4: not expected)"
    else:
        accuracy = "exact"
        equal = f"{'yes' if greedy else 'no'} / {'yes' if sampled else 'no'}"
    label = f"{precision}{' --requantize' if requantize else ''}"
    return (f"| {arch} | {label} | {rep['verification']['max_relative_error']:.2e} | {exposed} | {classes} | "
            f"{equal} | {accuracy} |")


def main(argv: list[str] | None = None) -> int:
    """Build, compile and serve every cell; print (and write) the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/genai_matrix.md"))
    args = parser.parse_args(argv)
    lines = ["| arch | build | verify rel. error | exposed (intermediates, KV outputs) | spaces | "
             "og greedy / seeded top-k = plaintext genai | accuracy |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for arch in args.archs.split(","):
            checkpoint = hd.build_checkpoint(arch, work / arch / "checkpoint")
            _tokenizer(checkpoint)
            for precision in ("fp32", "int4"):
                model = _build(checkpoint, work / arch / precision, precision)
                for requantize in ((False,) if precision == "fp32" else (False, True)):
                    lines.append(row(arch, precision, requantize, model, work))
                    print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
