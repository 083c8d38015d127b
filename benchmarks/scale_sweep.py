"""Scale sweep: compile cost of Llama-style models from ~10 M to ~1 B parameters.

For each configuration: export with random weights and external data (setup, not timed),
compile in a fresh process (wall time and peak RSS of that process), report GB/s of
weights processed, and time the encrypted vs the plaintext model side by side in one
ONNX Runtime process (interleaved, warm), as a latency ratio.

    python benchmarks/scale_sweep.py [--points 10M,50M,200M,1B] [--workdir DIR] [--skip-latency-above N]

Writes benchmarks/results/scale_sweep.md and scale_sweep.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

CONFIGS = {
    "10M": dict(vocab_size=8000, hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, intermediate=688),
    "50M": dict(vocab_size=16000, hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64, intermediate=1376),
    "200M": dict(vocab_size=32000, hidden=1024, layers=12, heads=16, kv_heads=4, head_dim=64, intermediate=2816),
    "1B": dict(vocab_size=32000, hidden=2048, layers=20, heads=32, kv_heads=8, head_dim=64, intermediate=5632),
}
COMMON = dict(rms_norm_eps=1e-5, rope_theta=10000.0, max_positions=2048, tied_embeddings=False)


def export(name: str, workdir: Path) -> tuple[Path, int]:
    """Export the configuration with random weights to workdir/name/model.onnx (+ .data)."""
    import torch

    from eecompile.models.export import llama_dynamic_axes, llama_example_inputs, llama_io_names
    from eecompile.models.llama import TinyLlama

    target = workdir / name / "model.onnx"
    cfg = {**CONFIGS[name], **COMMON}
    torch.manual_seed(0)
    with torch.no_grad():
        model = TinyLlama(cfg).eval()
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    params = sum(p.numel() for p in model.parameters())
    if target.exists():
        return target, params
    target.parent.mkdir(parents=True, exist_ok=True)
    in_names, out_names = llama_io_names(cfg["layers"])
    torch.onnx.export(model, llama_example_inputs(cfg, batch=1, seq=2, past=1), str(target), dynamo=False,
                      opset_version=17, input_names=in_names, output_names=out_names,
                      dynamic_axes=llama_dynamic_axes(cfg["layers"]), do_constant_folding=False,
                      external_data=True)
    del model
    return target, params


def disk_bytes(model: Path) -> int:
    """Size of a model and its external data on disk."""
    return sum(p.stat().st_size for p in model.parent.iterdir() if p.is_file())


def compile_in_child(model: Path, out: Path) -> tuple[float, float]:
    """Compile in a fresh process; (wall seconds, peak RSS GiB of that process)."""
    key = out.parent / "key.json"
    if not key.exists():
        subprocess.run([sys.executable, "-m", "eecompile", "keygen", str(key)], check=True,
                       stdout=subprocess.DEVNULL)
    # Peak RSS from /proc/self/status VmHWM: it belongs to this process's own address space.
    # (getrusage's ru_maxrss survives exec, so a child forked from this big parent would
    # report the parent's peak.)
    code = ("import time; from eecompile import compile_model; t=time.perf_counter(); "
            f"compile_model({str(model)!r}, {str(key)!r}, {str(out)!r}, force=True, verify=False); "
            "hwm=[l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print(time.perf_counter()-t, hwm)")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    seconds, rss_kib = done.stdout.split()[-2:]
    return float(seconds), int(rss_kib) / 2**20


def latency_ratio(model: Path, out: Path, iters: int) -> tuple[float, float, float]:
    """(plaintext ms p50, encrypted ms p50, ratio) for one decode-sized call, interleaved."""
    import onnxruntime as ort

    from eecompile import Client

    opts = ort.SessionOptions()
    plain = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    enc = ort.InferenceSession(str(out / "server" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    client = Client.load(out / "client")
    feeds = {}
    for i in plain.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = np.full((1, 8), 3, np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, 8), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(8, dtype=np.int64)[None]
        else:
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    enc_feeds = client.encrypt(feeds)
    times = {"plain": [], "enc": []}
    for _ in range(3):
        plain.run(None, feeds)
        enc.run(None, enc_feeds)
    for _ in range(iters):
        for tag, sess, f in (("plain", plain, feeds), ("enc", enc, enc_feeds)):
            t = time.perf_counter()
            sess.run(None, f)
            times[tag].append((time.perf_counter() - t) * 1e3)
    p, e = float(np.median(times["plain"])), float(np.median(times["enc"]))
    return p, e, e / p


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and write the table and plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default="10M,50M,200M,1B")
    parser.add_argument("--workdir", default="/tmp/eecompile-scale")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--keep", action="store_true", help="keep exported models between runs")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    rows = []
    for name in args.points.split(","):
        model, params = export(name, workdir)
        out = workdir / name / "out"
        seconds, rss = compile_in_child(model, out)
        size = disk_bytes(model)
        largest = max(np.prod(s) * 4 for s in _weight_shapes(model))
        p, e, ratio = latency_ratio(model, out, args.iters)
        row = dict(point=name, params=params, disk_gib=size / 2**30, largest_tensor_mib=largest / 2**20,
                   compile_s=seconds, peak_rss_gib=rss, gb_per_s=size / 1e9 / seconds,
                   plaintext_ms_p50=p, encrypted_ms_p50=e, ratio=ratio)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(workdir / name, ignore_errors=True)
    write_results(rows)
    return 0


def _weight_shapes(model: Path) -> list[tuple[int, ...]]:
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    return [tuple(t.dims) for t in proto.graph.initializer]


def write_results(rows: list[dict]) -> None:
    """benchmarks/results/scale_sweep.md and .png."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"Machine: {cpu}, {os.cpu_count()} cores, "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM (CPU rows).", "",
             "| config | params | model on disk | largest tensor | compile wall | peak RSS (compiler) | GB/s | "
             "plaintext p50 | encrypted p50 | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['point']} | {r['params'] / 1e6:.0f} M | {r['disk_gib']:.2f} GiB | "
                     f"{r['largest_tensor_mib']:.0f} MiB | {r['compile_s']:.1f} s | {r['peak_rss_gib']:.2f} GiB | "
                     f"{r['gb_per_s']:.3f} | {r['plaintext_ms_p50']:.1f} ms | {r['encrypted_ms_p50']:.1f} ms | "
                     f"{r['ratio']:.3f} |")
    if len(rows) >= 2:
        x = np.log([r["params"] for r in rows])
        y = np.log([r["compile_s"] for r in rows])
        slope = float(np.polyfit(x, y, 1)[0])
        lines += ["", f"Compile time grows as params^{slope:.2f} (least-squares slope on log-log axes)."]
    (RESULTS / "scale_sweep.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "scale_sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    params = [r["params"] for r in rows]
    a.loglog(params, [r["compile_s"] for r in rows], "o-", label="compile wall (s)")
    a.loglog(params, [r["peak_rss_gib"] for r in rows], "s-", label="peak RSS (GiB)")
    a.loglog(params, [r["disk_gib"] for r in rows], "^--", label="model on disk (GiB)")
    a.set_xlabel("parameters")
    a.legend()
    b.semilogx(params, [r["ratio"] for r in rows], "o-")
    b.axhline(1.0, color="grey", lw=0.5)
    b.set_xlabel("parameters")
    b.set_ylabel("encrypted / plaintext latency (CPU)")
    fig.tight_layout()
    fig.savefig(RESULTS / "scale_sweep.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
