"""EncryptedSession: ``onnxruntime.InferenceSession.run`` with plaintext in and out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eecompile.errors import BundleError, FeedError
from eecompile.runtime.client import Client

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class EncryptedSession:
    """Runs a compiled model: encrypts feeds, runs the server model, decrypts outputs."""

    def __init__(self, out_dir: str | Path, providers: list[str] | None = None, sess_options=None) -> None:
        import onnxruntime as ort

        from eecompile.compiler import model_id, recover_out_dir

        out = Path(out_dir)
        recover_out_dir(out)  # finish a --force replacement that a killed compile left half done
        server = out / "server" / "model.onnx"
        if not server.is_file():
            raise BundleError(f"no compiled server model at {server}")
        self.client = Client.load(out / "client")
        if self.client.model_id != model_id(out / "server"):
            raise BundleError(f"client bundle in {out / 'client'} belongs to another compilation than {server}")
        self.session = ort.InferenceSession(str(server), sess_options, providers=providers or default_providers())

    def get_inputs(self):
        """The server model's inputs (names, shapes and types are the original ones)."""
        return self.session.get_inputs()

    def get_outputs(self):
        """The server model's outputs."""
        return self.session.get_outputs()

    def _check(self, feeds: dict[str, np.ndarray]) -> None:
        expected = {i.name: i for i in self.session.get_inputs()}
        missing = sorted(set(expected) - set(feeds))
        unknown = sorted(set(feeds) - set(expected))
        if missing or unknown:
            raise FeedError(f"feeds do not match the model inputs: missing {missing}, unknown {unknown}")
        for name, value in feeds.items():
            spec = expected[name]
            value = np.asarray(value)
            want = _ORT_TYPES.get(spec.type)
            if want is not None and value.dtype != want:
                raise FeedError(f"input '{name}' has dtype {value.dtype}; the model expects {np.dtype(want)}")
            if len(spec.shape) != value.ndim or any(isinstance(d, int) and d != v for d, v in zip(spec.shape, value.shape)):
                raise FeedError(f"input '{name}' has shape {list(value.shape)}; the model expects {spec.shape}")

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray], run_options=None) -> list[np.ndarray]:
        """Like ``InferenceSession.run``: plaintext feeds in, plaintext outputs out.

        Server-state outputs (KV cache ``present*``) come back as ciphertext, to be fed back
        as the matching ``past*`` inputs, which pass through untouched.
        """
        self._check(feeds)
        names = output_names or [o.name for o in self.session.get_outputs()]
        raw = self.session.run(names, self.client.encrypt(feeds), run_options)
        plain = self.client.decrypt(dict(zip(names, raw)))
        return [plain[n] for n in names]
