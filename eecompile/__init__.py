"""eecompile: equivariant encryption of ONNX models.

``compile_model`` folds key-derived basis changes into a model's weights; the server runs
the result with ONNX Runtime on ciphertext; ``Client`` encrypts inputs and decrypts
outputs; ``EncryptedSession`` does both around a local ONNX Runtime session.
"""

from eecompile.compiler import CompileResult, compile_model, lint_model
from eecompile.errors import EECompileError
from eecompile.keys import MasterKey, generate_key, load_key, save_key
from eecompile.runtime.client import Client
from eecompile.runtime.session import EncryptedSession

__all__ = ["compile_model", "lint_model", "CompileResult", "Client", "EncryptedSession", "MasterKey",
           "generate_key", "load_key", "save_key", "EECompileError", "RemoteSession", "RemoteGenerator"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``RemoteSession`` / ``RemoteGenerator`` (eecompile.remote, the [serve] extra), imported on first use."""
    if name in ("RemoteSession", "RemoteGenerator"):
        from eecompile import remote

        return getattr(remote, name)
    raise AttributeError(f"module 'eecompile' has no attribute {name!r}")
