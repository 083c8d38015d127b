"""EncryptedSession and Client reject bad input with one clear error naming the problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from eecompile import Client, EncryptedSession, compile_model
from eecompile.demo import VOCAB, build_demo_model
from eecompile.errors import BundleError, EECompileError, FeedError
from eecompile.keys import MasterKey

KEY_A = MasterKey(bytes(range(32)))
KEY_B = MasterKey(bytes(range(1, 33)))


@pytest.fixture(scope="module")
def compilations(tmp_path_factory) -> tuple[Path, Path]:
    """The demo transformer compiled twice, with two keys (no torch needed)."""
    root = tmp_path_factory.mktemp("session-errors")
    model = root / "demo.onnx"
    onnx.save(build_demo_model(), str(model))
    out_a = compile_model(model, KEY_A, root / "a", verify=False).out_dir
    out_b = compile_model(model, KEY_B, root / "b", verify=False).out_dir
    return out_a, out_b


def _ids(batch: int = 2, seq: int = 5) -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (batch, seq), dtype=np.int64)


def test_good_feeds_run(compilations):
    (logits,) = EncryptedSession(compilations[0]).run(["logits"], {"input_ids": _ids()})
    assert logits.shape == (2, 5, VOCAB)


def test_client_bundle_from_another_compilation(compilations, tmp_path):
    out_a, out_b = compilations
    mixed = tmp_path / "mixed"
    shutil.copytree(out_a, mixed)
    shutil.rmtree(mixed / "client")
    shutil.copytree(out_b / "client", mixed / "client")
    with pytest.raises(BundleError, match="another compilation"):
        EncryptedSession(mixed)


def test_missing_or_corrupt_bundle(compilations, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(compilations[0], out)
    (out / "client" / "manifest.json").write_text("{ not json")
    with pytest.raises(BundleError, match="corrupt"):
        EncryptedSession(out)
    shutil.rmtree(out / "client")
    with pytest.raises(BundleError, match="client"):
        EncryptedSession(out)
    with pytest.raises(BundleError):
        EncryptedSession(tmp_path / "nowhere")
    with pytest.raises(BundleError):
        Client.load(tmp_path / "nowhere")


def test_truncated_transforms(compilations, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(compilations[0], out)
    npz = out / "client" / "transforms.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    with pytest.raises(BundleError, match="transforms|corrupt"):
        Client.load(out / "client")


def test_wrong_feed_name(compilations):
    session = EncryptedSession(compilations[0])
    with pytest.raises(FeedError, match="input_ids") as info:
        session.run(None, {"token_ids": _ids()})
    assert "token_ids" in str(info.value)
    with pytest.raises(FeedError, match="input_ids"):
        session.run(None, {})
    with pytest.raises(FeedError, match="extra"):
        session.run(None, {"input_ids": _ids(), "extra": _ids()})


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_wrong_feed_dtype(compilations, dtype):
    session = EncryptedSession(compilations[0])
    with pytest.raises(FeedError, match="input_ids") as info:
        session.run(None, {"input_ids": _ids().astype(dtype)})
    assert np.dtype(dtype).name in str(info.value)


@pytest.mark.parametrize("shape", [(5,), (1, 2, 5)])
def test_wrong_feed_rank(compilations, shape):
    session = EncryptedSession(compilations[0])
    with pytest.raises(FeedError, match="input_ids"):
        session.run(None, {"input_ids": np.zeros(shape, np.int64)})


def test_ids_out_of_vocabulary(compilations):
    session = EncryptedSession(compilations[0])
    bad = _ids()
    bad[0, 0] = VOCAB
    with pytest.raises(FeedError, match="input_ids"):
        session.run(None, {"input_ids": bad})


def test_client_rejects_unknown_names(compilations):
    client = Client.load(compilations[0] / "client")
    with pytest.raises(FeedError, match="input_ids"):
        client.encrypt({"ids": _ids()})
    with pytest.raises(FeedError, match="logits"):
        client.decrypt({"scores": np.zeros((1, 1, VOCAB), np.float32)})


def test_errors_are_eecompile_errors():
    assert issubclass(FeedError, EECompileError) and issubclass(BundleError, EECompileError)


# -- bundle integrity (issue 9, items 3 and 11) ---------------------------------------------
def _bundle_copy(compilations, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(compilations[0], out)
    return out


def _reseal(client_dir: Path) -> None:
    """Recompute the manifest's digests, as someone who knows the format could (structure checks remain)."""
    import json

    from eecompile.runtime.client import DIGESTED_FILES, _file_digest, manifest_digest

    path = client_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = {name: _file_digest(client_dir / name) for name in DIGESTED_FILES}
    manifest["manifest_digest"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


def test_edited_manifest_is_refused_naming_the_file(compilations, tmp_path):
    import json

    out = _bundle_copy(compilations, tmp_path)
    path = out / "client" / "manifest.json"
    manifest = json.loads(path.read_text())
    for entry in manifest["inputs"]:  # the client would send plaintext to the server
        entry.update(kind="clear")
        entry.pop("index", None)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for load in (Client.load, lambda _: EncryptedSession(out)):
        with pytest.raises(BundleError, match="manifest.json") as info:
            load(out / "client")
        assert "\n" not in str(info.value) and "digest" in str(info.value)


def test_reversed_transforms_are_refused_naming_the_file(compilations, tmp_path):
    out = _bundle_copy(compilations, tmp_path)
    npz = out / "client" / "transforms.npz"
    with np.load(npz) as data:
        arrays = {k: data[k][::-1].copy() for k in data.files}  # same shapes, wrong values
    with open(npz, "wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(BundleError, match="transforms.npz"):
        Client.load(out / "client")
    with pytest.raises(BundleError, match="transforms.npz"):
        EncryptedSession(out)


@pytest.mark.parametrize("content", ["[]", "null", "42", '"x"'])
def test_manifest_that_is_not_an_object(compilations, tmp_path, content):
    out = _bundle_copy(compilations, tmp_path)
    (out / "client" / "manifest.json").write_text(content)
    with pytest.raises(BundleError, match="manifest.json"):
        Client.load(out / "client")


def test_transforms_one_row_short_is_refused_at_load(compilations, tmp_path):
    out = _bundle_copy(compilations, tmp_path)
    npz = out / "client" / "transforms.npz"
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    name = max(arrays, key=lambda k: arrays[k].size)
    arrays[name] = arrays[name][:-1]
    with open(npz, "wb") as fh:
        np.savez(fh, **arrays)
    _reseal(out / "client")
    with pytest.raises(BundleError, match="corrupt") as info:
        Client.load(out / "client")
    assert name in str(info.value)


# -- bad values through the Python API are eecompile errors, checked before ONNX Runtime (item 11) --
@pytest.mark.parametrize("ids", [np.array([[1.0, 2.0]]), np.array([[np.nan, 1.0]]), np.array([[0.5]], np.float32),
                                 np.array([["a", "b"]])])
def test_client_refuses_ids_that_are_not_integer_arrays(compilations, ids):
    client = Client.load(compilations[0] / "client")
    with pytest.raises(FeedError, match="input_ids") as info:
        client.encrypt({"input_ids": ids})
    assert "\n" not in str(info.value)


def test_client_refuses_a_scalar_for_a_vector_space(compilations):
    client = Client.load(compilations[0] / "client")
    with pytest.raises(FeedError, match="rank"):
        client.decrypt({"logits": np.array(3.0, np.float32)})


def test_client_refuses_feeds_that_are_not_a_dict(compilations):
    client = Client.load(compilations[0] / "client")
    with pytest.raises(FeedError, match="dict"):
        client.encrypt([_ids()])


def test_unknown_output_name_is_a_feed_error(compilations):
    session = EncryptedSession(compilations[0])
    with pytest.raises(FeedError, match="nope"):
        session.run(["nope"], {"input_ids": _ids()})
    with pytest.raises(FeedError, match="output_names"):
        session.run("logits", {"input_ids": _ids()})


def test_attention_mask_longer_than_the_ids(zoo, key_a):
    pytest.importorskip("torch")
    session = EncryptedSession(zoo.compile("bert", "dynamo", 20, key_a).out_dir)
    ids = np.ones((1, 4), np.int64)
    with pytest.raises(FeedError, match="attention_mask|sequence"):
        session.run(None, {"input_ids": ids, "attention_mask": np.ones((1, 6), np.int64)})
    llama = EncryptedSession(zoo.compile("llama", "dynamo", 20, key_a).out_dir)
    feeds = {i.name: np.zeros([1 if d == "batch" else 0 if d == "past_sequence" else d for d in i.shape], np.float32)
             for i in llama.get_inputs() if i.name.startswith("past")}
    feeds.update(input_ids=ids, position_ids=np.arange(4)[None], attention_mask=np.ones((1, 9), np.int64))
    with pytest.raises(FeedError, match="attention_mask"):
        llama.run(None, feeds)


def test_negative_seed_is_a_generation_error():
    from eecompile.runtime.generate import GenerationError, SamplingConfig

    for seed in (-1, 1.5, True):
        with pytest.raises(GenerationError, match="seed"):
            SamplingConfig(0.7, seed=seed)
