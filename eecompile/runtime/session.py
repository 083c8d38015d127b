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
        if sess_options is None:  # ONNX Runtime's optimizer notes are not the user's concern; errors still raise
            sess_options = ort.SessionOptions()
            sess_options.log_severity_level = 3
        self.session = ort.InferenceSession(str(server), sess_options, providers=providers or default_providers())

    def get_inputs(self):
        """The server model's inputs (names, shapes and types are the original ones)."""
        return self.session.get_inputs()

    def get_outputs(self):
        """The server model's outputs."""
        return self.session.get_outputs()

    def _check(self, feeds: dict[str, np.ndarray]) -> None:
        if not isinstance(feeds, dict):
            raise FeedError(f"feeds must be a dict of input name to array, got {type(feeds).__name__}")
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
        symbols: dict[str, tuple[str, int]] = {}  # one size per symbolic dim across all inputs
        for name, value in feeds.items():
            for dim, size in zip(expected[name].shape, np.shape(value)):
                if isinstance(dim, str) and dim:
                    first = symbols.setdefault(dim, (name, size))
                    if first[1] != size:
                        raise FeedError(f"input '{name}' has {dim}={size} but '{first[0]}' has {dim}={first[1]}; "
                                        "they must agree")
        if "attention_mask" in feeds and "input_ids" in feeds and np.ndim(feeds["attention_mask"]) >= 1:
            past = next((np.shape(v)[2] for k, v in sorted(feeds.items()) if k.startswith("past") and np.ndim(v) == 4), 0)
            want = np.shape(feeds["input_ids"])[-1] + past
            got = np.shape(feeds["attention_mask"])[-1]
            if got != want:
                raise FeedError(f"'attention_mask' covers {got} positions; it must cover the past ({past}) and the "
                                f"new ids ({want - past}): {want}")

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray], run_options=None) -> list[np.ndarray]:
        """Like ``InferenceSession.run``: plaintext feeds in, plaintext outputs out.

        Server-state outputs (KV cache ``present*``) come back as ciphertext, to be fed back
        as the matching ``past*`` inputs, which pass through untouched.
        """
        self._check(feeds)
        available = [o.name for o in self.session.get_outputs()]
        if output_names is not None:
            if isinstance(output_names, str) or not all(isinstance(n, str) for n in output_names):
                raise FeedError(f"output_names must be a list of output names, got {output_names!r}")
            unknown = sorted(set(output_names) - set(available))
            if unknown:
                raise FeedError(f"unknown output name(s) {unknown}; the model's outputs are {available}")
        names = list(output_names) if output_names else available
        raw = self.session.run(names, self.client.encrypt(feeds), run_options)
        plain = self.client.decrypt(dict(zip(names, raw)))
        return [plain[n] for n in names]
