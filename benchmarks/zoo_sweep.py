"""Zoo sweep: every zoo model, encrypted vs plaintext latency and client-shim share, side by side.

    python benchmarks/zoo_sweep.py [--provider cpu|cuda] [--iters N] [--exporter dynamo --opset 20]

Writes benchmarks/results/zoo_sweep_<provider>.md, .json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"mlp": (32, 1), "mlp_softmax": (32, 1), "mlp_argmax": (32, 1), "cnn": (32, 1),
          "bert": (8, 32), "gpt2": (8, 32), "llama": (8, 32)}  # the zoo has 32 positions


def main(argv: list[str] | None = None) -> int:
    """Compile and bench every zoo model; write the table and plot."""
    from eecompile import compile_model, generate_key
    from eecompile.bench import run_bench
    from eecompile.models import ZOO_MODELS, export_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--exporter", default="dynamo")
    parser.add_argument("--opset", type=int, default=20)
    args = parser.parse_args(argv)
    key = generate_key()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ZOO_MODELS:
            model = export_model(name, Path(tmp) / f"{name}.onnx", exporter=args.exporter, opset=args.opset)
            out = compile_model(model, key, Path(tmp) / f"out-{name}").out_dir
            batch, seq = SHAPES[name]
            result = run_bench(out, provider=args.provider, batch=batch, seq=seq, iters=args.iters, progress=False)
            row = {"name": name, **asdict(result)}
            row.pop("model")
            rows.append(row)
            print(json.dumps(row), flush=True)
    write(rows, args)
    return 0


def write(rows: list[dict], args) -> None:
    """Markdown table, JSON and a bar plot of the ratios."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"zoo_sweep_{args.provider}"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU")
    lines = [f"Provider {args.provider}; machine: {cpu}, {os.cpu_count()} cores; exporter {args.exporter} opset "
             f"{args.opset}; {args.iters} interleaved iterations per model after warm-up, IO binding.", "",
             "| model | batch × seq | plaintext p50 | encrypted p50 | ratio (± spread) | shim p50 | shim share |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['batch']} × {r['seq']} | {r['plaintext_ms_p50']:.3f} ms | "
                     f"{r['encrypted_ms_p50']:.3f} ms | {r['ratio']:.3f} ± {r['ratio_spread']:.3f} | "
                     f"{r['shim_ms_p50']:.3f} ms | {100 * r['shim_share']:.1f}% |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r["name"] for r in rows]
    ax.bar(names, [r["ratio"] for r in rows], yerr=[r["ratio_spread"] for r in rows], capsize=3)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel(f"encrypted / plaintext p50 ({args.provider})")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)


if __name__ == "__main__":
    sys.exit(main())
