"""Master keys: generation, key files, and deterministic derivation of per-space randomness.

A master key is 32 random bytes. Every secret basis is derived from it deterministically:
``HKDF-SHA256(secret, info = DERIVATION_VERSION + b"\\0" + space name)`` seeds a numpy
``Generator``, so the same key and the same model always produce byte-identical output, and
different space names give independent streams.

Key files are small JSON documents written with mode 0600 from the moment they are created::

    {"format": "eecompile-key", "version": 1, "key": "<64 hex chars>", "fingerprint": "<16 hex>"}

The fingerprint is a one-way hash of the secret and is safe to publish (e.g. to check that a
client bundle and a server artifact were compiled with the same key).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eecompile.errors import KeyFileError

__all__ = [
    "KEY_FORMAT",
    "KEY_VERSION",
    "DERIVATION_VERSION",
    "KEY_BYTES",
    "MasterKey",
    "generate_key",
    "save_key",
    "load_key",
    "check_key_permissions",
    "hkdf_sha256",
    "derive_rng",
]

KEY_FORMAT = "eecompile-key"
KEY_VERSION = 1
DERIVATION_VERSION = b"eecompile/v1"
KEY_BYTES = 32

_FINGERPRINT_DOMAIN = b"eecompile-fingerprint"


@dataclass(frozen=True)
class MasterKey:
    """A 32-byte master secret. Its ``repr`` shows only the public fingerprint."""

    secret: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.secret, (bytes, bytearray)):
            raise TypeError(f"MasterKey secret must be bytes, got {type(self.secret).__name__}")
        if isinstance(self.secret, bytearray):
            object.__setattr__(self, "secret", bytes(self.secret))
        if len(self.secret) != KEY_BYTES:
            raise ValueError(f"MasterKey secret must be {KEY_BYTES} bytes, got {len(self.secret)}")

    def fingerprint(self) -> str:
        """First 16 hex chars of SHA-256(b"eecompile-fingerprint" + secret); safe to publish."""
        return hashlib.sha256(_FINGERPRINT_DOMAIN + self.secret).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"MasterKey(fingerprint={self.fingerprint()!r})"

    __str__ = __repr__


def generate_key() -> MasterKey:
    """A fresh master key from the OS CSPRNG."""
    return MasterKey(secrets.token_bytes(KEY_BYTES))


def _key_document(key: MasterKey) -> bytes:
    doc = {
        "format": KEY_FORMAT,
        "version": KEY_VERSION,
        "key": key.secret.hex(),
        "fingerprint": key.fingerprint(),
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def save_key(key: MasterKey, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``key`` to ``path`` as a JSON key file with mode 0600; return the path.

    The file is created with mode 0600 (never world-readable, even briefly). An existing file
    is refused with :class:`KeyFileError` unless ``overwrite=True``, in which case the new key
    is written to a temporary file in the same directory and atomically renamed over it.
    """
    path = Path(path)
    data = _key_document(key)
    if not overwrite:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            raise KeyFileError(
                f"key file {path} already exists; refusing to overwrite it"
            ) from None
        except OSError as e:
            raise KeyFileError(f"cannot create key file {path}: {e.strerror or e}") from None
        try:
            os.fchmod(fd, 0o600)  # umask could only have narrowed it; make it exact
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return path

    directory = path.parent if str(path.parent) else Path(".")
    try:
        # mkstemp creates the file O_CREAT|O_EXCL with mode 0600.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise KeyFileError(f"cannot write key file {path}: {e.strerror or e}") from None
    try:
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise KeyFileError(f"cannot write key file {path}: {e.strerror or e}") from None
        raise
    return path


def check_key_permissions(path: str | os.PathLike[str]) -> None:
    """Refuse a key file that the group or others may access (as ssh does for private keys)."""
    if os.name != "posix":  # pragma: no cover - no POSIX modes to check
        return
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # reading it reports the problem
    if mode & 0o077:
        raise KeyFileError(
            f"key file {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run 'chmod 600 {path}' (or pass --allow-insecure-key to use it anyway)"
        )


def load_key(path: str | os.PathLike[str], *, allow_insecure: bool = False) -> MasterKey:
    """Read a key file written by :func:`save_key`.

    Raises :class:`KeyFileError` with a one-line message if the file is missing or unreadable,
    is not JSON, is not an eecompile key file, has another format version, holds a key that is
    not 32 bytes of hex, or whose fingerprint does not match the key — and, unless
    ``allow_insecure``, if the group or others may read or write it (``chmod 600`` fixes that).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(f"key file {path} is a directory, not a key file") from None
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror or e}") from None

    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyFileError(f"key file {path} is not valid JSON (corrupt or not a key file)") from None
    if not isinstance(doc, dict):
        raise KeyFileError(f"key file {path} is not an eecompile key file (expected a JSON object)")

    fmt = doc.get("format")
    if fmt != KEY_FORMAT:
        raise KeyFileError(
            f"key file {path} is not an eecompile key file (format field is {fmt!r}, expected {KEY_FORMAT!r})"
        )

    version = doc.get("version")
    if type(version) is not int or version != KEY_VERSION:
        raise KeyFileError(
            f"key file {path} has format version {version!r}; this eecompile reads version {KEY_VERSION}"
        )

    hex_key = doc.get("key")
    if not isinstance(hex_key, str):
        raise KeyFileError(f"key file {path} has no key (the 'key' field is missing or not a string)")
    try:
        secret = bytes.fromhex(hex_key)
    except ValueError:
        raise KeyFileError(f"key file {path} is corrupt: the 'key' field is not valid hex") from None
    if len(secret) != KEY_BYTES:
        raise KeyFileError(
            f"key file {path} is corrupt: the key is {len(secret)} bytes, expected {KEY_BYTES}"
        )
    key = MasterKey(secret)

    fingerprint = doc.get("fingerprint")
    if fingerprint != key.fingerprint():
        raise KeyFileError(
            f"key file {path} is corrupt: fingerprint {fingerprint!r} does not match the key "
            f"(expected {key.fingerprint()!r})"
        )
    if not allow_insecure:
        check_key_permissions(path)
    return key


def hkdf_sha256(ikm: bytes, info: bytes, length: int = 32, salt: bytes = b"") -> bytes:
    """HKDF-SHA256 (RFC 5869): extract with ``salt`` (zeros if empty), expand to ``length`` bytes."""
    hash_len = hashlib.sha256().digest_size
    if length < 0 or length > 255 * hash_len:
        raise ValueError(f"HKDF-SHA256 output length must be in [0, {255 * hash_len}], got {length}")
    if not salt:
        salt = b"\x00" * hash_len
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm = b""
    block = b""
    counter = 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def derive_rng(key: MasterKey, name: str) -> np.random.Generator:
    """A numpy Generator seeded from ``key`` and the stable space ``name``.

    Same key and name give the same stream; different names give independent streams.
    """
    if not isinstance(name, str):
        raise TypeError(f"space name must be a str, got {type(name).__name__}")
    okm = hkdf_sha256(key.secret, DERIVATION_VERSION + b"\0" + name.encode("utf-8"), 32)
    return np.random.Generator(np.random.PCG64(int.from_bytes(okm, "big")))
