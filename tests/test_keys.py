"""Tests for eecompile.keys: key files, HKDF, per-space RNG derivation."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from eecompile.errors import EECompileError, KeyFileError
from eecompile.keys import (
    DERIVATION_VERSION,
    KEY_FORMAT,
    KEY_VERSION,
    MasterKey,
    derive_rng,
    generate_key,
    hkdf_sha256,
    load_key,
    save_key,
)

FIXED = MasterKey(bytes(range(32)))


def _write_doc(path, **overrides):
    doc = {
        "format": KEY_FORMAT,
        "version": KEY_VERSION,
        "key": FIXED.secret.hex(),
        "fingerprint": FIXED.fingerprint(),
    }
    doc.update(overrides)
    doc = {k: v for k, v in doc.items() if v is not _DROP}
    path.write_text(json.dumps(doc))
    return path


_DROP = object()


def test_constants():
    assert KEY_FORMAT == "eecompile-key"
    assert KEY_VERSION == 1
    assert DERIVATION_VERSION == b"eecompile/v1"


def test_generate_key_is_random_32_bytes():
    a, b = generate_key(), generate_key()
    assert isinstance(a.secret, bytes) and len(a.secret) == 32
    assert a != b


@pytest.mark.parametrize("n", [0, 16, 31, 33, 64])
def test_masterkey_rejects_wrong_length(n):
    with pytest.raises(ValueError):
        MasterKey(b"\x01" * n)


def test_repr_hides_secret():
    key = generate_key()
    for text in (repr(key), str(key), f"{key}"):
        assert key.secret.hex() not in text
        assert repr(key.secret) not in text
        assert key.fingerprint() in text


def test_fingerprint():
    import hashlib

    fp = FIXED.fingerprint()
    assert fp == hashlib.sha256(b"eecompile-fingerprint" + FIXED.secret).hexdigest()[:16]
    assert len(fp) == 16
    assert fp != hashlib.sha256(FIXED.secret).hexdigest()[:16]
    assert generate_key().fingerprint() != fp


def test_masterkey_frozen():
    with pytest.raises(Exception):
        FIXED.secret = b"\x00" * 32  # type: ignore[misc]


def test_round_trip(tmp_path):
    key = generate_key()
    p = save_key(key, tmp_path / "k.json")
    assert p == tmp_path / "k.json"
    loaded = load_key(p)
    assert loaded == key and loaded.secret == key.secret
    doc = json.loads(p.read_text())
    assert doc == {
        "format": KEY_FORMAT,
        "version": KEY_VERSION,
        "key": key.secret.hex(),
        "fingerprint": key.fingerprint(),
    }


def test_round_trip_str_path(tmp_path):
    key = generate_key()
    save_key(key, str(tmp_path / "k.json"))
    assert load_key(str(tmp_path / "k.json")) == key


def test_mode_0600(tmp_path):
    p = save_key(generate_key(), tmp_path / "k.json")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


def test_mode_0600_with_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        p = save_key(generate_key(), tmp_path / "k.json")
        q = save_key(generate_key(), tmp_path / "k.json", overwrite=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(q).st_mode) == 0o600


def test_refuse_overwrite(tmp_path):
    p = tmp_path / "k.json"
    first = generate_key()
    save_key(first, p)
    with pytest.raises(KeyFileError) as ei:
        save_key(generate_key(), p)
    msg = str(ei.value)
    assert str(p) in msg and "exists" in msg and "\n" not in msg
    assert load_key(p) == first  # untouched


def test_refuse_overwrite_other_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("precious")
    with pytest.raises(KeyFileError):
        save_key(generate_key(), p)
    assert p.read_text() == "precious"


def test_overwrite(tmp_path):
    p = tmp_path / "k.json"
    p.write_text("old content")
    os.chmod(p, 0o644)
    key = generate_key()
    save_key(key, p, overwrite=True)
    assert load_key(p) == key
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["k.json"]  # no temp files left behind


def test_overwrite_creates_missing(tmp_path):
    key = generate_key()
    p = save_key(key, tmp_path / "new.json", overwrite=True)
    assert load_key(p) == key
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


def test_save_into_missing_dir(tmp_path):
    with pytest.raises(KeyFileError):
        save_key(generate_key(), tmp_path / "nope" / "k.json")


def _load_error(path) -> str:
    with pytest.raises(KeyFileError) as ei:
        load_key(path)
    assert isinstance(ei.value, EECompileError)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


def test_load_missing(tmp_path):
    msg = _load_error(tmp_path / "absent.json")
    assert "does not exist" in msg


def test_load_directory(tmp_path):
    _load_error(tmp_path)


def test_load_not_json(tmp_path):
    p = tmp_path / "k.json"
    p.write_text("this is { not json")
    assert "not valid JSON" in _load_error(p)


def test_load_binary_garbage(tmp_path):
    p = tmp_path / "k.json"
    p.write_bytes(b"\xff\xfe\x00garbage")
    assert "not valid JSON" in _load_error(p)


def test_load_json_not_object(tmp_path):
    p = tmp_path / "k.json"
    p.write_text("[1, 2, 3]")
    assert "not an eecompile key file" in _load_error(p)


def test_load_wrong_format(tmp_path):
    p = _write_doc(tmp_path / "k.json", format="something-else")
    msg = _load_error(p)
    assert "not an eecompile key file" in msg and "something-else" in msg


def test_load_missing_format(tmp_path):
    p = _write_doc(tmp_path / "k.json", format=_DROP)
    assert "not an eecompile key file" in _load_error(p)


def test_load_other_version(tmp_path):
    p = _write_doc(tmp_path / "k.json", version=2)
    msg = _load_error(p)
    assert msg == f"key file {p} has format version 2; this eecompile reads version 1"


@pytest.mark.parametrize("version", ["1", 1.5, True, None])
def test_load_bad_version_types(tmp_path, version):
    p = _write_doc(tmp_path / "k.json", version=version)
    assert "format version" in _load_error(p)


def test_load_bad_hex(tmp_path):
    p = _write_doc(tmp_path / "k.json", key="zz" * 32)
    assert "not valid hex" in _load_error(p)


def test_load_missing_key_field(tmp_path):
    p = _write_doc(tmp_path / "k.json", key=_DROP)
    assert "'key'" in _load_error(p)


@pytest.mark.parametrize("nbytes", [0, 16, 31, 33])
def test_load_wrong_length(tmp_path, nbytes):
    p = _write_doc(tmp_path / "k.json", key="ab" * nbytes)
    msg = _load_error(p)
    assert f"{nbytes} bytes" in msg and "expected 32" in msg


def test_load_fingerprint_mismatch(tmp_path):
    p = _write_doc(tmp_path / "k.json", fingerprint="0" * 16)
    assert "fingerprint" in _load_error(p)


def test_load_fingerprint_missing(tmp_path):
    p = _write_doc(tmp_path / "k.json", fingerprint=_DROP)
    assert "fingerprint" in _load_error(p)


def test_load_flipped_key_byte_detected(tmp_path):
    p = save_key(FIXED, tmp_path / "k.json")
    doc = json.loads(p.read_text())
    doc["key"] = ("ff" if doc["key"][:2] != "ff" else "00") + doc["key"][2:]
    p.write_text(json.dumps(doc))
    assert "fingerprint" in _load_error(p)


# RFC 5869, Appendix A.
def test_hkdf_rfc5869_case1():
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = hkdf_sha256(ikm, info, 42, salt=salt)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_hkdf_rfc5869_case3():
    ikm = bytes.fromhex("0b" * 22)
    okm = hkdf_sha256(ikm, b"", 42)
    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )


def test_hkdf_lengths():
    ikm = b"\x01" * 32
    assert len(hkdf_sha256(ikm, b"x")) == 32
    assert hkdf_sha256(ikm, b"x", 100)[:32] == hkdf_sha256(ikm, b"x", 32)
    assert hkdf_sha256(ikm, b"x", 0) == b""
    with pytest.raises(ValueError):
        hkdf_sha256(ikm, b"x", 255 * 32 + 1)


def test_derive_rng_deterministic():
    a = derive_rng(FIXED, "layer0.hidden").standard_normal(64)
    b = derive_rng(MasterKey(bytes(range(32))), "layer0.hidden").standard_normal(64)
    assert np.array_equal(a, b)


def test_derive_rng_matches_spec():
    okm = hkdf_sha256(FIXED.secret, b"eecompile/v1\0space")
    expected = np.random.Generator(np.random.PCG64(int.from_bytes(okm, "big"))).integers(0, 2**62, 8)
    assert np.array_equal(derive_rng(FIXED, "space").integers(0, 2**62, 8), expected)


def test_derive_rng_names_independent():
    a = derive_rng(FIXED, "a").standard_normal(4096)
    b = derive_rng(FIXED, "b").standard_normal(4096)
    c = derive_rng(FIXED, "a2").standard_normal(4096)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # Independent standard normals: sample correlation ~ N(0, 1/4096).
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.1
    assert abs(np.corrcoef(a, c)[0, 1]) < 0.1


def test_derive_rng_keys_independent():
    other = MasterKey(bytes(range(1, 33)))
    assert not np.array_equal(
        derive_rng(FIXED, "x").standard_normal(16), derive_rng(other, "x").standard_normal(16)
    )


def test_derive_rng_unicode_name():
    a = derive_rng(FIXED, "tête").random(4)
    assert np.array_equal(a, derive_rng(FIXED, "tête").random(4))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_load_refuses_a_key_others_may_access(tmp_path, mode):
    p = save_key(FIXED, tmp_path / "k.json")
    os.chmod(p, mode)
    msg = _load_error(p)
    assert str(p) in msg and f"chmod 600 {p}" in msg and f"{mode:04o}" in msg
    assert load_key(p, allow_insecure=True) == FIXED  # the explicit override
    os.chmod(p, 0o600)
    assert load_key(p) == FIXED
    os.chmod(p, 0o400)
    assert load_key(p) == FIXED
