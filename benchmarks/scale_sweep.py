"""Scale sweep: compile cost of Llama-style models from ~10 M to ~1 B parameters, against its floor.

For each configuration: export with random weights (setup, not timed), compile in a fresh process with
verification on (wall time, time per phase, peak RSS overall and per phase of that process), then, in
the same process right after, measure the **floor**: the machine's BLAS time for the very dense
products the compile did (recorded while it ran: every dense block product, replayed as bare float64
``np.matmul`` on warm, preallocated operands) plus the time to read the model's weight bytes once and write them
once. Compile time is reported as a ratio to that floor and peak RSS against the largest tensor (the
bound is 2 x largest + 1 GiB). The latency columns time the encrypted vs the plaintext model side by
side in one ONNX Runtime process (interleaved, warm).

    python benchmarks/scale_sweep.py [--points 10M,50M,200M,1B,200M-folded,1B-folded,8Bfp16] [--workdir DIR]
                                     [--no-latency]

The plain points are exported with ``do_constant_folding=False``: every linear weight stays as trained,
``[out, in]``, behind a Transpose node (which the compile folds in memory order and ONNX Runtime folds when
it builds the original's sessions for verification). ``200M-folded`` / ``1B-folded`` are the same models
exported with the exporter's default constant folding (weights stored ``[in, out]``, no Transpose).

``8Bfp16`` is two decoder layers, the embedding and the LM head of Llama-3-8B's shapes (hidden 4096,
MLP 14336, vocabulary 128256) in float16 (its largest tensors, 1 GiB each), compiled without
verification (ONNX Runtime's CPU provider lacks float16 kernels for part of the graph).
Writes benchmarks/results/scale_sweep.md, .json and .png.
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
    "8Bfp16": dict(vocab_size=128256, hidden=4096, layers=2, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                   dtype="float16"),
}
for _name in ("200M", "1B"):  # the same models exported with torch.onnx.export's default constant folding
    CONFIGS[f"{_name}-folded"] = dict(CONFIGS[_name], fold_constants=True)
NO_VERIFY = {"8Bfp16"}
CHECK_PHASES = ("verify", "exposure")
"""Phases that check the compiled model (ONNX Runtime sessions); the others are the compile proper ("core")."""
COMMON = dict(rms_norm_eps=1e-5, rope_theta=10000.0, max_positions=2048, tied_embeddings=False)


def export(name: str, workdir: Path) -> tuple[Path, int]:
    """Export the configuration with random weights to workdir/name/model.onnx (+ .data)."""
    import torch

    from eecompile.models.export import llama_dynamic_axes, llama_example_inputs, llama_io_names
    from eecompile.models.llama import TinyLlama

    target = workdir / name / "model.onnx"
    cfg = {**CONFIGS[name], **COMMON}
    dtype = cfg.pop("dtype", "float32")
    fold_constants = cfg.pop("fold_constants", False)
    if target.exists():
        return target, _params(target)
    torch.manual_seed(0)
    with torch.no_grad():
        model = TinyLlama(cfg).eval()
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    params = sum(p.numel() for p in model.parameters())
    target.parent.mkdir(parents=True, exist_ok=True)
    in_names, out_names = llama_io_names(cfg["layers"])
    exported = target if dtype == "float32" else workdir / f"{name}-float32" / "model.onnx"
    exported.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, llama_example_inputs(cfg, batch=1, seq=2, past=1), str(exported), dynamo=False,
                      opset_version=17, input_names=in_names, output_names=out_names,
                      dynamic_axes=llama_dynamic_axes(cfg["layers"]), do_constant_folding=fold_constants,
                      external_data=True)
    del model
    if dtype == "float16":  # the model code computes RoPE and masks in float32: convert the exported graph
        to_float16(exported, target)
        shutil.rmtree(exported.parent, ignore_errors=True)
    return target, params


def to_float16(source: Path, target: Path) -> None:
    """``source`` with every float tensor (weights, inputs, outputs, the KV cache) in float16, by ONNX Runtime's
    converter (``onnxruntime.transformers.float16``), saved with its weights in ``model.onnx.data``."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))  # weights included: above 2 GB only as external data on save
    model = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)


def _params(model: Path) -> int:
    return int(sum(np.prod(s) for s, _ in _weights(model)))


def disk_bytes(model: Path) -> int:
    """Size of a model and its external data on disk."""
    return sum(p.stat().st_size for p in model.parent.iterdir() if p.is_file())


def compile_in_child(model: Path, out: Path, verify: bool) -> dict:
    """Compile in a fresh process and measure the floor there right after (see :func:`child`)."""
    key = out.parent / "key.json"
    if not key.exists():
        subprocess.run([sys.executable, "-m", "eecompile", "keygen", str(key)], check=True,
                       stdout=subprocess.DEVNULL)
    command = [sys.executable, __file__, "--child", str(model), str(out), str(key)]
    if not verify:
        command.append("--no-verify")
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _hwm_gib(reset: bool = False) -> float:
    """This process's peak RSS (VmHWM) in GiB; ``reset`` starts a new peak from the current RSS."""
    kib = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
    if reset:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass
    return kib / 2**20


def child(model: Path, out: Path, key: Path, verify: bool) -> dict:
    """The compile, timed per phase, with every dense product recorded; then the floor, measured here.

    Peak RSS (VmHWM, this process's own address space; ``getrusage`` would count the parent's) is read
    and reset at each phase end, so each phase's peak is its own.
    """
    import logging

    from eecompile import compile_model
    from eecompile.passes import weight_fold
    from eecompile.passes.basis import Basis

    products: list[tuple[int, int, int]] = []  # (m, k, n): one (m x k) @ (k x n) float64 product each
    dense_product, basis_right = weight_fold.dense_product, Basis.right

    def recording_product(a, b, out=None):
        products.append((int(np.prod(a.shape[:-1])), int(a.shape[-1]), int(b.shape[-1])))
        return dense_product(a, b, out)

    def recording_right(self, array, axis=-1):
        if self.dense is not None:
            products.append((int(np.size(array)) // self.size, self.size, self.size))
        return basis_right(self, array, axis)

    weight_fold.dense_product, Basis.right = recording_product, recording_right
    phases: dict[str, dict] = {}

    class Phases(logging.Handler):
        def emit(self, record):
            _, name, seconds = record.getMessage().split()
            phases[name] = {"s": float(seconds), "peak_rss_gib": _hwm_gib(reset=True)}

    logger = logging.getLogger("eecompile.phase")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Phases())
    _hwm_gib(reset=True)
    start = time.perf_counter()
    result = compile_model(str(model), str(key), str(out), force=True, verify=verify, progress=False)
    seconds = time.perf_counter() - start
    peak = max([p["peak_rss_gib"] for p in phases.values()] + [_hwm_gib()])
    weight_fold.dense_product, Basis.right = dense_product, basis_right
    weights = _weights(model)
    floor_blas = blas_time(products)
    floor_io = io_time(model, out.parent / "io-floor.bin")
    core = {k: v for k, v in phases.items() if k not in CHECK_PHASES}
    core_s = seconds - sum(v["s"] for k, v in phases.items() if k in CHECK_PHASES)  # all but the checks
    return dict(compile_s=seconds, peak_rss_gib=peak, phases=phases, dense_products=len(products),
                core_s=core_s, core_peak_rss_gib=max((v["peak_rss_gib"] for v in core.values()), default=0.0),
                core_ratio_to_floor=core_s / (floor_blas + floor_io),
                dense_gflop=sum(2.0 * m * k * n for m, k, n in products) / 1e9, floor_blas_s=floor_blas,
                floor_io_s=floor_io, floor_s=floor_blas + floor_io, ratio_to_floor=seconds / (floor_blas + floor_io),
                largest_tensor_gib=max(int(np.prod(s)) * np.dtype(d).itemsize for s, d in weights) / 2**30,
                weight_gib=sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in weights) / 2**30,
                verified=result.verification.checked, max_relative_error=result.verification.max_relative_error,
                blas_f32_vs_f64=precision_probe(products))


def blas_time(products: list[tuple[int, int, int]]) -> float:
    """Seconds the BLAS takes for these float64 ``(m x k) @ (k x n)`` products, on warm operands: one buffer per
    operand, as large as the largest product needs, filled once; each product runs on views of them (so no
    product pays for new memory, which the compile's work buffers do not either)."""
    if not products:
        return 0.0
    rng = np.random.default_rng(0)
    a = rng.standard_normal(max(m * k for m, k, _ in products))
    b = rng.standard_normal(max(k * n for _, k, n in products))
    c = np.zeros(max(m * n for m, _, n in products))
    total = 0.0
    for m, k, n in products:
        left, right, out = a[:m * k].reshape(m, k), b[:k * n].reshape(k, n), c[:m * n].reshape(m, n)
        t = time.perf_counter()
        np.matmul(left, right, out=out)
        total += time.perf_counter() - t
    return total


def precision_probe(products: list[tuple[int, int, int]]) -> dict:
    """float32 against float64 on the largest dense product's shape: time ratio and the relative error
    of the float32 product (what computing the folds in float32 would cost in exactness)."""
    if not products:
        return {}
    rows, k, _ = max(products, key=lambda p: p[0] * p[1] * p[2])
    rng = np.random.default_rng(1)
    a = rng.standard_normal((min(rows, 8192), k)).astype(np.float32)
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    t = time.perf_counter()
    exact = a.astype(np.float64) @ q
    t64 = time.perf_counter() - t
    q32 = q.astype(np.float32)
    t = time.perf_counter()
    fast = a @ q32
    t32 = time.perf_counter() - t
    err = float(np.max(np.abs(fast - exact)) / np.max(np.abs(exact)))
    rounded = float(np.max(np.abs(exact.astype(np.float32) - exact)) / np.max(np.abs(exact)))
    return {"shape": [int(a.shape[0]), k], "f64_s": t64, "f32_s": t32, "f32_rel_error": err,
            "f64_rounded_to_f32_rel_error": rounded}


def io_time(model: Path, scratch: Path) -> float:
    """Seconds to read the model's weight bytes once (its files, as the compile does) and write as many once."""
    chunk = 64 << 20
    t = time.perf_counter()
    written = 0
    with open(scratch, "wb") as out:
        for path in sorted(p for p in model.parent.iterdir() if p.is_file() and p != scratch):
            with open(path, "rb") as fh:
                while block := fh.read(chunk):
                    out.write(block)
                    written += len(block)
    seconds = time.perf_counter() - t
    scratch.unlink()
    return seconds


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
    parser.add_argument("--no-latency", action="store_true", help="skip the plaintext/encrypted latency columns")
    parser.add_argument("--keep", action="store_true", help="keep exported models between runs")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "OUT", "KEY"), help=argparse.SUPPRESS)
    parser.add_argument("--no-verify", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model, out, key = (Path(p) for p in args.child)
        print(json.dumps(child(model, out, key, not args.no_verify)), flush=True)
        return 0
    workdir = Path(args.workdir)
    rows = []
    for name in args.points.split(","):
        model, params = export(name, workdir)
        out = workdir / name / "out"
        measured = compile_in_child(model, out, verify=name not in NO_VERIFY)
        size = disk_bytes(model)
        bound = 2 * measured["largest_tensor_gib"] + 1
        row = dict(point=name, params=params, disk_gib=size / 2**30, **measured, rss_bound_gib=bound,
                   gb_per_s=size / 1e9 / measured["compile_s"])
        if not args.no_latency and name not in NO_VERIFY:
            p, e, ratio = latency_ratio(model, out, args.iters)
            row.update(plaintext_ms_p50=p, encrypted_ms_p50=e, ratio=ratio)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(workdir / name, ignore_errors=True)
    write_results(merged_rows(rows))
    return 0


def merged_rows(rows: list[dict]) -> list[dict]:
    """The recorded rows (benchmarks/results/scale_sweep.json) with this run's replacing those of the same points,
    in the recorded order, new points last: a run of some points keeps the others' last measurement."""
    try:
        recorded = json.loads((RESULTS / "scale_sweep.json").read_text())
    except (OSError, ValueError):
        recorded = []
    fresh = {r["point"]: r for r in rows}
    merged = [fresh.pop(r["point"], r) for r in recorded if isinstance(r, dict) and "point" in r]
    return merged + [r for r in rows if r["point"] in fresh]


def _weights(model: Path) -> list[tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every initializer, without reading the weights."""
    from onnx import helper

    from eecompile.passes.store import load_structure

    proto = load_structure(model)
    return [(tuple(t.dims), np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))) for t in proto.graph.initializer]


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
             "| config | params | weights | largest tensor | compile wall | floor (BLAS + I/O) | ratio to floor | "
             "peak RSS | compile proper: s / ratio / peak RSS | bound 2x largest + 1 GiB | verified (max rel. error) | "
             "plaintext p50 | encrypted p50 | latency ratio |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verified = f"yes ({r['max_relative_error']:.1e})" if r["verified"] else "off"
        latency = (f"{r['plaintext_ms_p50']:.1f} ms | {r['encrypted_ms_p50']:.1f} ms | {r['ratio']:.3f}"
                   if "ratio" in r else "– | – | –")
        lines.append(f"| {r['point']} | {r['params'] / 1e6:.0f} M | {r['weight_gib']:.2f} GiB | "
                     f"{r['largest_tensor_gib'] * 1024:.0f} MiB | {r['compile_s']:.1f} s | "
                     f"{r['floor_s']:.1f} s ({r['floor_blas_s']:.1f} + {r['floor_io_s']:.1f}) | "
                     f"{r['ratio_to_floor']:.3f} | {r['peak_rss_gib']:.2f} GiB | "
                     f"{r['core_s']:.1f} s / {r['core_ratio_to_floor']:.3f} / {r['core_peak_rss_gib']:.2f} GiB | "
                     f"{r['rss_bound_gib']:.2f} GiB | "
                     f"{verified} | {latency} |")
    lines += ["", "Compile proper: the wall time less the verify and exposure phases (which run ONNX Runtime sessions, "
                  "one model at a time, a model above 64 MiB of weights in segments, one segment's weights at a time); "
                  "its peak RSS is that of the phases analyse, plan, fold, emit.", "",
              "Per phase (seconds / peak RSS GiB of that phase):", ""]
    for r in rows:
        lines.append(f"- {r['point']}: " + ", ".join(f"{k} {v['s']:.1f} s / {v['peak_rss_gib']:.2f}"
                                                     for k, v in r["phases"].items()))
    probe = next((r["blas_f32_vs_f64"] for r in reversed(rows) if r.get("blas_f32_vs_f64")), None)
    if probe:
        lines += ["", f"float32 vs float64 on a {probe['shape'][0]}x{probe['shape'][1]} product: "
                      f"{probe['f64_s'] / max(probe['f32_s'], 1e-9):.1f}x faster, relative error "
                      f"{probe['f32_rel_error']:.1e} (float64 rounded to float32: "
                      f"{probe['f64_rounded_to_f32_rel_error']:.1e})."]
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
    a.loglog(params, [r["floor_s"] for r in rows], "x:", label="floor: BLAS + weight I/O (s)")
    a.loglog(params, [r["peak_rss_gib"] for r in rows], "s-", label="peak RSS (GiB)")
    a.loglog(params, [r["disk_gib"] for r in rows], "^--", label="model on disk (GiB)")
    a.set_xlabel("parameters")
    a.legend()
    b.semilogx([r["params"] for r in rows if "ratio" in r], [r["ratio"] for r in rows if "ratio" in r], "o-")
    b.axhline(1.0, color="grey", lw=0.5)
    b.set_xlabel("parameters")
    b.set_ylabel("encrypted / plaintext latency (CPU)")
    fig.tight_layout()
    fig.savefig(RESULTS / "scale_sweep.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
