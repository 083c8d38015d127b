"""``eecompile bench``: the original and the encrypted model side by side in one process.

Both sessions use the same provider and IO binding (inputs and outputs bound once, on the
device); after warm-up, repetitions alternate between the two models (order swapped each
round) so drift affects both alike. Reports p50/p90 latency of each, the paired
encrypted/plaintext ratio with its spread, and the client shim's encrypt+decrypt time as a
share of the end-to-end encrypted call.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from eecompile.errors import BundleError, EECompileError
from eecompile.passes.verify import random_feeds
from eecompile.runtime.client import Client


@dataclass
class BenchResult:
    """Latencies in milliseconds; ``ratio`` = encrypted p50 / plaintext p50."""

    model: str
    provider: str
    batch: int
    seq: int
    iters: int
    plaintext_ms_p50: float
    plaintext_ms_p90: float
    encrypted_ms_p50: float
    encrypted_ms_p90: float
    ratio: float
    ratio_spread: float
    shim_ms_p50: float
    shim_share: float
    policy: str = "default"
    """The compile policy (report.json): ``rebase`` adds re-basing MatMuls, whose cost the ratio shows."""

    def to_json(self) -> str:
        """One JSON object."""
        return json.dumps(asdict(self))

    def to_text(self) -> str:
        """A short human-readable summary."""
        return (f"model {self.model} on {self.provider}, batch {self.batch}, seq {self.seq}, {self.iters} iterations, "
                f"compile policy {self.policy}\n"
                f"  plaintext : p50 {self.plaintext_ms_p50:8.3f} ms   p90 {self.plaintext_ms_p90:8.3f} ms\n"
                f"  encrypted : p50 {self.encrypted_ms_p50:8.3f} ms   p90 {self.encrypted_ms_p90:8.3f} ms\n"
                f"  ratio     : {self.ratio:.3f} ± {self.ratio_spread:.3f} (paired, half the p10–p90 range)\n"
                f"  client shim (encrypt + decrypt): p50 {self.shim_ms_p50:.3f} ms = "
                f"{100 * self.shim_share:.1f}% of the end-to-end encrypted call\n")


def _providers(provider: str) -> list[str]:
    import onnxruntime as ort

    if provider == "cuda":
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception:  # preload is best effort; availability is checked below
                pass
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EECompileError("--provider cuda: this onnxruntime has no CUDAExecutionProvider "
                                 "(install the 'gpu' extra: pip install 'eecompile[gpu]')")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider != "cpu":
        raise EECompileError(f"unknown provider {provider!r}; use cpu or cuda")
    return ["CPUExecutionProvider"]


MAX_TOKENS = 1 << 24  # batch × seq positions a benchmark accepts (far beyond any real one)


def _quiet_options():
    """Session options that keep ONNX Runtime's warnings off stderr (errors still raise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return options


class _BoundModel:
    """A session with its feeds and outputs bound once on the device."""

    def __init__(self, session, feeds: dict[str, np.ndarray], device: str) -> None:
        import onnxruntime as ort

        self.session = session
        self.binding = session.io_binding()
        self._inputs = {n: ort.OrtValue.ortvalue_from_numpy(v, device, 0) for n, v in feeds.items()}
        for name, value in self._inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        for out in session.get_outputs():
            self.binding.bind_output(out.name, device)

    def run(self) -> float:
        """One call; seconds."""
        start = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        return time.perf_counter() - start

    def outputs(self) -> dict[str, np.ndarray]:
        """The last outputs, copied to the host."""
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.binding.copy_outputs_to_cpu()))


def run_bench(out_dir: str | Path, *, provider: str = "cpu", batch: int = 1, seq: int = 16, iters: int = 50,
              warmup: int = 5, original: str | Path | None = None, progress: bool = True,
              seed: int = 0) -> BenchResult:
    """Benchmark a compiled model directory against its original model."""
    import onnxruntime as ort

    from eecompile.compiler import model_id, recover_out_dir

    out = Path(out_dir)
    recover_out_dir(out)  # finish a --force replacement that a killed compile left half done
    server = out / "server" / "model.onnx"
    if not server.is_file():
        raise BundleError(f"no compiled model in {out} (server/model.onnx missing)")
    try:
        policy = str(json.loads((out / "report.json").read_text()).get("policy", "default"))
    except (OSError, json.JSONDecodeError, AttributeError):
        policy = "default"
    if original is None:
        try:
            original = json.loads((out / "report.json").read_text())["source_model"]
        except (OSError, KeyError, json.JSONDecodeError):
            raise EECompileError(f"{out}/report.json does not name the original model; pass --original") from None
    if not Path(original).is_file():
        raise EECompileError(f"original model {original} not found; pass --original")
    for label, value, low in (("--batch", batch, 1), ("--seq", seq, 1), ("--iters", iters, 1), ("--warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise EECompileError(f"{label} must be an integer >= {low}, got {value}")
    if batch * seq > MAX_TOKENS:
        raise EECompileError(f"--batch {batch} × --seq {seq} is {batch * seq} positions, more than a benchmark "
                             f"can hold ({MAX_TOKENS}); use smaller values")
    client = Client.load(out / "client")
    if client.model_id != model_id(out / "server"):
        raise BundleError(f"the client bundle in {out / 'client'} belongs to another compilation than {server}")
    providers = _providers(provider)
    device = "cuda" if provider == "cuda" else "cpu"
    plain = ort.InferenceSession(str(original), _quiet_options(), providers=providers)
    enc = ort.InferenceSession(str(server), _quiet_options(), providers=providers)
    index_sizes = {t.name: t.index.size for t in client.spec.inputs if t.kind == "index"}
    try:
        feeds = random_feeds(plain, seed, index_sizes, batch=batch, length=seq)
        enc_feeds = client.encrypt(feeds)
        models = {"plain": _BoundModel(plain, feeds, device), "enc": _BoundModel(enc, enc_feeds, device)}
        for _ in range(warmup):
            for model in models.values():
                model.run()
    except MemoryError:
        raise EECompileError(f"--batch {batch} --seq {seq}: the inputs or outputs do not fit in memory; "
                             "use smaller values") from None
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors (e.g. an allocation it cannot make)
        if type(exc).__module__.startswith("onnxruntime"):
            raise EECompileError(f"the model cannot run at --batch {batch} --seq {seq}: "
                                 f"{' '.join(str(exc).split())[:300]}") from None
        raise
    times = {"plain": [], "enc": [], "shim": []}
    enc_outputs = None  # read only once a run has produced them (--warmup 0 times the very first call)
    for i in range(iters):
        order = ("plain", "enc") if i % 2 == 0 else ("enc", "plain")
        for tag in order:
            times[tag].append(models[tag].run() * 1e3)
        if enc_outputs is None:
            enc_outputs = models["enc"].outputs()
        start = time.perf_counter()
        client.decrypt(enc_outputs)
        client.encrypt(feeds)
        times["shim"].append((time.perf_counter() - start) * 1e3)
        if progress and iters >= 20 and (i + 1) % max(1, iters // 20) == 0:
            done = (i + 1) * 20 // iters
            print(f"\rbench [{'#' * done}{'.' * (20 - done)}] {i + 1}/{iters}", end="", file=sys.stderr, flush=True)
    if progress and iters >= 20:
        print(file=sys.stderr)
    plain_t, enc_t, shim_t = (np.array(times[k]) for k in ("plain", "enc", "shim"))
    paired = enc_t / plain_t
    shim = float(np.median(shim_t))
    return BenchResult(
        model=str(original), provider=provider, batch=batch, seq=seq, iters=iters,
        plaintext_ms_p50=float(np.median(plain_t)), plaintext_ms_p90=float(np.percentile(plain_t, 90)),
        encrypted_ms_p50=float(np.median(enc_t)), encrypted_ms_p90=float(np.percentile(enc_t, 90)),
        ratio=float(np.median(enc_t) / np.median(plain_t)),
        ratio_spread=float((np.percentile(paired, 90) - np.percentile(paired, 10)) / 2),
        shim_ms_p50=shim, shim_share=shim / (shim + float(np.median(enc_t))), policy=policy,
    )
