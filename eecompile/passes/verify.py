"""Pass 6 — verify: the compiled graph is well formed and computes the original function.

Checks that no private op remains, that ``onnx.checker`` accepts the server model, and
that client-encrypt → server → client-decrypt equals the original model run by ONNX
Runtime on fresh random inputs (max-abs error relative to max-abs output).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from eecompile.errors import EECompileError

PRIVATE_DOMAIN = "ai.eecompile"
DEFAULT_TOLERANCE = 1e-4


class VerificationError(EECompileError):
    """The compiled model does not reproduce the original."""


@dataclass
class VerifyResult:
    """Outcome of verification."""

    checked: bool
    max_relative_error: float | None
    detail: str


def check_structure(model: onnx.ModelProto, path: str | Path | None = None) -> None:
    """No private-domain op is left, and the ONNX checker passes (on ``path`` when given)."""
    private = [n.name or n.op_type for n in model.graph.node if n.domain == PRIVATE_DOMAIN]
    if private:
        raise VerificationError(f"private basis-change ops left in the graph: {private[:5]}")
    try:
        onnx.checker.check_model(str(path) if path is not None else model, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"compiled model fails onnx.checker: {str(exc).splitlines()[0]}") from None


def random_feeds(session, seed: int, index_sizes: dict[str, int] | None = None, *, batch: int = 2,
                 length: int = 3) -> dict[str, np.ndarray]:
    """Random feeds for an ONNX Runtime session's inputs.

    Symbolic dims: the first one seen is the batch (``batch``), past lengths are 0, every
    other one is ``length``.
    """
    rng = np.random.default_rng(seed)
    index_sizes = index_sizes or {}
    feeds, symbols = {}, {}
    for inp in session.get_inputs():
        shape = []
        for d in inp.shape:
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            else:
                key = str(d)
                if key not in symbols:
                    symbols[key] = 0 if re.search("past", key, re.I) or re.search("past", inp.name, re.I) else (
                        batch if not symbols else length)
                shape.append(symbols[key])
        if "int" in inp.type:
            if inp.name in index_sizes:
                value = rng.integers(0, index_sizes[inp.name], size=shape)
            elif "position" in inp.name:
                value = np.broadcast_to(np.arange(shape[-1]), shape).copy() if shape else np.zeros(shape)
            elif "mask" in inp.name:
                value = np.ones(shape)
            else:
                value = np.zeros(shape)
            feeds[inp.name] = value.astype(np.int64 if "int64" in inp.type else np.int32)
        elif "bool" in inp.type:
            feeds[inp.name] = np.ones(shape, dtype=bool)
        else:
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """max |expected − actual| / max |expected| (absolute error when expected is all zeros)."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if expected.shape != actual.shape:
        return float("inf")
    if expected.size == 0:
        return 0.0
    finite = np.isfinite(expected)
    same_special = np.where(finite, np.isfinite(actual), (expected == actual) | (np.isnan(expected) & np.isnan(actual)))
    if not np.all(same_special):
        return float("inf")  # a NaN or an infinity where the other has none (or another)
    if not np.any(finite):
        return 0.0
    scale = float(np.max(np.abs(expected[finite])))
    err = float(np.max(np.abs(expected[finite] - actual[finite])))
    return err / scale if scale > 0 else err


def verify_equivalence(original: str | Path, server: str | Path, client, seeds=(0, 1),
                       tolerance: float = DEFAULT_TOLERANCE, feeds_list=None) -> VerifyResult:
    """Compare encrypt → server → decrypt with the original on random feeds."""
    import onnxruntime as ort

    try:
        ref = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
        enc = ort.InferenceSession(str(server), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        return VerifyResult(False, None, f"skipped: ONNX Runtime cannot load the model ({str(exc).splitlines()[0]})")
    index_sizes = {t.name: t.index.size for t in client.spec.inputs if t.kind == "index"}
    state_out = set(client.state_outputs)
    names = [o.name for o in ref.get_outputs() if o.name not in state_out]
    worst = 0.0
    for seed_or_feeds in (feeds_list or seeds):
        feeds = seed_or_feeds if isinstance(seed_or_feeds, dict) else random_feeds(ref, seed_or_feeds, index_sizes)
        try:
            expected = ref.run(names, feeds)
        except Exception as exc:
            return VerifyResult(False, None, f"skipped: the original model does not run on generated inputs "
                                             f"({str(exc).splitlines()[0][:200]})")
        got = enc.run(names, client.encrypt(feeds))
        decrypted = client.decrypt(dict(zip(names, got)))
        for name, exp in zip(names, expected):
            err = relative_error(exp, decrypted[name])
            worst = max(worst, err)
            if not err <= tolerance:
                raise VerificationError(f"compiled model output '{name}' differs from the original "
                                        f"(relative error {err:.2e} > {tolerance:.0e})")
    return VerifyResult(True, worst, f"max relative error {worst:.2e} over {len(feeds_list or seeds)} input(s)")
