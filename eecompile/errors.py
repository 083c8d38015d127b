"""Error types. Every error a user can cause derives from :class:`EECompileError`;
the CLI prints its message on one line and exits non-zero."""

from __future__ import annotations


class EECompileError(Exception):
    """Base class of every user-facing eecompile error."""


class ModelFileError(EECompileError):
    """The model file is missing, unreadable or not a valid ONNX model."""


class KeyFileError(EECompileError):
    """The key file is missing, corrupt or of another format version."""


class BundleError(EECompileError):
    """A client bundle is missing, corrupt, or belongs to another compilation."""


class FeedError(EECompileError):
    """Feeds passed to a session have wrong names, shapes or dtypes."""


class OutputDirError(EECompileError):
    """The output directory cannot be written (e.g. it is not empty and --force was not given)."""
