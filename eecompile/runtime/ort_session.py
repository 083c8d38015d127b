"""ONNX Runtime sessions: CUDA when available, CPU otherwise — and never silently when CUDA was asked for.

``make_session(path, provider)`` takes ``"auto"`` (CUDA if this onnxruntime has a working
CUDA execution provider, else CPU with one log line on stderr), ``"cuda"`` (CUDA or a
clear :class:`ProviderError`), ``"cpu"``, or an explicit list of ONNX Runtime provider
names. ``onnxruntime.preload_dlls()`` is called once, before the first CUDA session, where
the installed onnxruntime has it (onnxruntime-gpu >= 1.21 finds the CUDA/cuDNN libraries
of the ``nvidia-*`` wheels that way).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from eecompile.errors import EECompileError

log = logging.getLogger("eecompile.runtime")

PROVIDER_CHOICES = ("auto", "cuda", "cpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_preloaded = False


class ProviderError(EECompileError):
    """The requested execution provider is not available (e.g. CUDA without onnxruntime-gpu)."""


def _preload() -> None:
    global _preloaded
    if _preloaded:
        return
    _preloaded = True
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls") and CUDA in ort.get_available_providers():
        try:
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - a failed preload only means CUDA may not load later
            log.debug("onnxruntime.preload_dlls() failed: %s", exc)


def available_providers() -> list[str]:
    """The execution providers of the installed onnxruntime (after preloading the CUDA libraries)."""
    import onnxruntime as ort

    _preload()
    return list(ort.get_available_providers())


def resolve_providers(provider: str | list[str] | tuple[str, ...] | None = "auto") -> list[str]:
    """The provider list for ``provider`` (auto|cuda|cpu, or explicit names)."""
    if provider is None:
        provider = "auto"
    if not isinstance(provider, str):
        return list(provider)
    choice = provider.lower()
    if choice not in PROVIDER_CHOICES:
        raise ProviderError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDER_CHOICES)}")
    available = available_providers()
    if choice == "cpu":
        return [CPU]
    if choice == "cuda":
        if CUDA not in available:
            raise ProviderError("the CUDA provider was requested but this onnxruntime has no "
                                f"CUDAExecutionProvider (available: {', '.join(available)}); "
                                "install onnxruntime-gpu (pip install 'eecompile[gpu]') or use --provider cpu")
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available else [CPU]


def session_options(log_severity: int = 3):
    """SessionOptions with ONNX Runtime's own warnings silenced (they go to stderr otherwise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = log_severity
    return options


def make_session(path: str | os.PathLike | bytes, provider: str | list[str] | tuple[str, ...] | None = "auto", *,
                 options=None):
    """An ``onnxruntime.InferenceSession`` of ``path`` (a file, or a serialized model) on ``provider``.

    With ``"cuda"``, a session that ONNX Runtime could only create on the CPU (CUDA
    libraries missing at run time) is an error, not a fallback.
    """
    import onnxruntime as ort

    requested = provider if isinstance(provider, str) or provider is None else "explicit"
    providers = resolve_providers(provider)
    source = path if isinstance(path, bytes) else str(Path(path))
    session = ort.InferenceSession(source, sess_options=options or session_options(), providers=providers)
    active = session.get_providers()
    if requested == "cuda" and CUDA not in active:
        raise ProviderError("the CUDA provider was requested but ONNX Runtime could not start it "
                            "(CUDA or cuDNN libraries missing?); use --provider cpu to run on the CPU")
    if requested in (None, "auto") and CUDA not in active:
        _log_fallback_once()
    return session


_fallback_logged = False


def _log_fallback_once() -> None:
    global _fallback_logged
    if not _fallback_logged:
        _fallback_logged = True
        log.warning("CUDA is not available to ONNX Runtime; running on the CPU execution provider")


def session_device(session) -> tuple[str, int]:
    """(device type for IO binding / OrtValues, device id) of a session: ("cuda", 0) or ("cpu", 0)."""
    return ("cuda", 0) if CUDA in session.get_providers() else ("cpu", 0)
