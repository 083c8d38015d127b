"""eecompile.runtime.client: the client shim, in numpy and as the two emitted ONNX models.

``decrypt(encrypt(x)) == x`` for every transform kind (dense, monomial, block-diagonal, per-head,
index, state, clear); ``client/encrypt.onnx`` and ``client/decrypt.onnx`` run in ONNX Runtime give
the same arrays as ``Client.encrypt``/``Client.decrypt``; a bundle survives save/load; a compiled
model can be driven by the two ONNX client models alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import eecompile
from eecompile.errors import FeedError
from eecompile.passes.basis import AxisBasis, Basis
from eecompile.passes.insert import BoundarySpec, BoundaryTransform
from eecompile.passes.verify import relative_error
from eecompile.runtime.client import Client

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(2000 + sum(request.node.nodeid.encode()) % 100_000)


def _dense(rng, n):
    return Basis(n, dense=rng.standard_normal((n, n)) + n * np.eye(n))


def _monomial(rng, n, signed=True):
    scale = rng.uniform(0.5, 2.0, n) * (rng.choice([-1.0, 1.0], n) if signed else 1.0)
    return Basis.monomial(rng.permutation(n), scale)


def _transforms(rng) -> list[BoundaryTransform]:
    """One transform of each kind, named after the tensors they apply to."""
    return [
        BoundaryTransform("hidden", "axis", axis=2, rank=3, basis="invertible",
                          heads=[AxisBasis((_dense(rng, 5),))]),
        BoundaryTransform("channels", "axis", axis=1, rank=4, basis="monomial",
                          heads=[AxisBasis((_monomial(rng, 6),))]),
        BoundaryTransform("channels_dense", "axis", axis=1, rank=3, basis="invertible",
                          heads=[AxisBasis((_dense(rng, 3),))]),
        BoundaryTransform("blocks", "axis", axis=1, rank=2, basis="block-invertible, permutation",
                          heads=[AxisBasis((_dense(rng, 2), Basis.monomial(rng.permutation(3)), Basis.identity(2)))]),
        BoundaryTransform("heads", "axis", axis=3, head_axis=1, rank=4, basis="invertible",
                          heads=[AxisBasis((_dense(rng, 4),)), AxisBasis((_monomial(rng, 4),))]),
        BoundaryTransform("ids", "index", index=Basis.monomial(rng.permutation(9))),
        BoundaryTransform("past_key", "state"),
        BoundaryTransform("mask", "clear"),
    ]


def _feeds(rng) -> dict[str, np.ndarray]:
    return {"hidden": rng.standard_normal((2, 3, 5)).astype(np.float32),
            "channels": rng.standard_normal((2, 6, 2, 2)).astype(np.float32),
            "channels_dense": rng.standard_normal((2, 3, 4)).astype(np.float32),
            "blocks": rng.standard_normal((4, 7)).astype(np.float32),
            "heads": rng.standard_normal((2, 2, 3, 4)).astype(np.float32),
            "ids": rng.integers(0, 9, (2, 6)).astype(np.int64),
            "past_key": rng.standard_normal((2, 2, 1, 4)).astype(np.float32),
            "mask": rng.standard_normal((2, 3)).astype(np.float32)}


@pytest.fixture
def client(rng) -> Client:
    transforms = _transforms(rng)
    return Client(BoundarySpec(transforms, list(transforms)), "test-model")


def test_decrypt_inverts_encrypt(client, rng):
    feeds = _feeds(rng)
    cipher = client.encrypt(feeds)
    plain = client.decrypt(cipher)
    assert set(plain) == set(feeds)
    for name, value in feeds.items():
        assert plain[name].dtype == value.dtype and plain[name].shape == value.shape
        if value.dtype == np.int64:
            np.testing.assert_array_equal(plain[name], value)
        else:
            np.testing.assert_allclose(plain[name], value, rtol=1e-5, atol=1e-5)
    for name in ("hidden", "channels", "channels_dense", "blocks", "heads", "ids"):
        assert not np.allclose(cipher[name], feeds[name]), name  # really transformed


def test_encrypt_is_the_documented_basis_change(client, rng):
    feeds = _feeds(rng)
    cipher = client.encrypt(feeds)
    t = client.spec.inputs
    np.testing.assert_allclose(cipher["hidden"], feeds["hidden"] @ t[0].heads[0].blocks[0].dense.astype(np.float32),
                               rtol=1e-5, atol=1e-5)
    perm, scale = t[1].heads[0].blocks[0].perm, t[1].heads[0].blocks[0].scale
    np.testing.assert_allclose(cipher["channels"], feeds["channels"][:, perm] * scale[None, :, None, None], rtol=1e-6)
    head1 = t[4].heads[1].blocks[0]
    np.testing.assert_allclose(cipher["heads"][:, 1], feeds["heads"][:, 1][..., head1.perm] * head1.scale, rtol=1e-6)
    # ids: the ciphertext id of i is where i lands in the permuted vocabulary
    perm = t[5].index.perm
    np.testing.assert_array_equal(perm[cipher["ids"]], feeds["ids"])


def test_state_and_clear_pass_through_untouched(client, rng):
    feeds = _feeds(rng)
    cipher = client.encrypt(feeds)
    assert cipher["past_key"] is feeds["past_key"] and cipher["mask"] is feeds["mask"]
    assert client.decrypt({"past_key": feeds["past_key"]})["past_key"] is feeds["past_key"]
    assert client.state_inputs == ["past_key"] and client.state_outputs == ["past_key"]


def test_index_inputs_round_trip_every_id(client):
    ids = np.arange(9, dtype=np.int64).reshape(3, 3)
    cipher = client.encrypt({"ids": ids})["ids"]
    assert sorted(cipher.ravel().tolist()) == list(range(9)) and not np.array_equal(cipher, ids)
    np.testing.assert_array_equal(client.decrypt({"ids": cipher})["ids"], ids)
    ids32 = ids.astype(np.int32)
    assert client.encrypt({"ids": ids32})["ids"].dtype == np.int32
    with pytest.raises(FeedError, match="outside"):
        client.encrypt({"ids": np.array([9])})


def test_bad_names_and_sizes_are_feed_errors(client, rng):
    with pytest.raises(FeedError, match="unknown input"):
        client.encrypt({"nope": np.zeros(3)})
    with pytest.raises(FeedError, match="unknown output"):
        client.decrypt({"nope": np.zeros(3)})
    with pytest.raises(FeedError, match="size 4 on axis 2"):
        client.encrypt({"hidden": np.zeros((2, 3, 4), np.float32)})


def _run_onnx(path, feeds: dict) -> dict:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def test_emitted_onnx_models_match_numpy(client, rng, tmp_path):
    bundle = client.save(tmp_path / "client")
    feeds = _feeds(rng)
    enc_model, dec_model = onnx.load(str(bundle / "encrypt.onnx")), onnx.load(str(bundle / "decrypt.onnx"))
    assert [i.name for i in enc_model.graph.input] == list(feeds)
    assert [o.name for o in enc_model.graph.output] == [f"{n}_encrypted" for n in feeds]
    assert [i.name for i in dec_model.graph.input] == list(feeds)
    assert [o.name for o in dec_model.graph.output] == [f"{n}_decrypted" for n in feeds]

    cipher = client.encrypt(feeds)
    got = _run_onnx(bundle / "encrypt.onnx", feeds)
    for name in feeds:
        np.testing.assert_allclose(got[f"{name}_encrypted"], cipher[name], rtol=1e-5, atol=1e-5, err_msg=name)
        assert got[f"{name}_encrypted"].dtype == cipher[name].dtype
    plain = _run_onnx(bundle / "decrypt.onnx", cipher)
    numpy_plain = client.decrypt(cipher)
    for name in feeds:
        np.testing.assert_allclose(plain[f"{name}_decrypted"], numpy_plain[name], rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(plain[f"{name}_decrypted"], feeds[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_emitted_onnx_models_pass_the_onnx_checker(client, rng, tmp_path):
    """With the model's IO types (as compile passes them), the client models are checker-valid."""
    types = {name: helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(v.dtype),
                                                 ["batch", *v.shape[1:]])
             for name, v in _feeds(rng).items()}
    bundle = client.save(tmp_path / "client", input_types=types, output_types=types)
    for name in ("encrypt.onnx", "decrypt.onnx"):
        onnx.checker.check_model(onnx.load(str(bundle / name)), full_check=True)


def test_bundle_survives_save_and_load(client, rng, tmp_path):
    client.save(tmp_path / "client", extra={"note": "x"})
    loaded = Client.load(tmp_path / "client")
    assert loaded.model_id == "test-model"
    assert [(t.name, t.kind) for t in loaded.spec.inputs] == [(t.name, t.kind) for t in client.spec.inputs]
    feeds = _feeds(rng)
    a, b = client.encrypt(feeds), loaded.encrypt(feeds)
    for name in feeds:
        np.testing.assert_array_equal(a[name], b[name])
    assert not list(tmp_path.glob("client/*.key"))


# -- a compiled model driven by the ONNX client models alone ------------------------------------


def _lm(path, rng):
    """ids → embedding (+ x projection) → cache concat → logits; past_key/present_key as state."""
    d, vocab = 6, 10
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["feat", "Wf"], ["f"], name="feat_proj"),
             helper.make_node("Add", ["e", "f"], ["h"], name="add"),
             helper.make_node("Concat", ["past_key", "h"], ["present_key"], name="cache", axis=1),
             helper.make_node("ReduceSum", ["present_key", "axis1"], ["pooled"], name="pool", keepdims=0),
             helper.make_node("MatMul", ["h", "W"], ["logits"], name="head"),
             helper.make_node("MatMul", ["pooled", "Wp"], ["summary"], name="summary")]
    inits = {"E": rng.standard_normal((vocab, d)), "Wf": rng.standard_normal((3, d)), "W": rng.standard_normal((d, vocab)),
             "Wp": rng.standard_normal((d, 2)), "axis1": np.array([1])}
    graph = helper.make_graph(
        nodes, "lm",
        [helper.make_tensor_value_info("ids", INT64, ["B", "S"]), helper.make_tensor_value_info("feat", FLOAT, ["B", "S", 3]),
         helper.make_tensor_value_info("past_key", FLOAT, ["B", "P", d])],
        [helper.make_tensor_value_info("logits", FLOAT, ["B", "S", vocab]),
         helper.make_tensor_value_info("summary", FLOAT, ["B", 2]),
         helper.make_tensor_value_info("present_key", FLOAT, ["B", "T", d])],
        [numpy_helper.from_array(np.asarray(v, np.float32 if k != "axis1" else np.int64), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_onnx_client_models_drive_a_compiled_model(rng, tmp_path):
    path = _lm(tmp_path / "lm.onnx", rng)
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")
    client = eecompile.Client.load(result.client_dir)
    kinds = {t.name: t.kind for t in client.spec.inputs}
    assert kinds == {"ids": "index", "feat": "axis", "past_key": "state"}
    assert {t.name: t.kind for t in client.spec.outputs}["present_key"] == "state"

    feeds = {"ids": rng.integers(0, 10, (2, 3)).astype(np.int64), "feat": rng.standard_normal((2, 3, 3)).astype(np.float32),
             "past_key": np.zeros((2, 0, 6), np.float32)}
    encrypted = _run_onnx(result.client_dir / "encrypt.onnx", feeds)
    server_feeds = {name: encrypted[f"{name}_encrypted"] for name in feeds}
    np.testing.assert_array_equal(server_feeds["ids"], client.encrypt(feeds)["ids"])
    assert server_feeds["past_key"].shape == (2, 0, 6)
    server = ort.InferenceSession(str(result.server_model), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in server.get_outputs()]
    cipher = dict(zip(out_names, server.run(None, server_feeds)))
    decrypted = _run_onnx(result.client_dir / "decrypt.onnx", cipher)
    expected = _run_onnx(path, feeds)
    for name in ("logits", "summary"):
        assert relative_error(expected[name], decrypted[f"{name}_decrypted"]) <= 1e-5, name
        assert not np.allclose(expected[name], cipher[name])
    np.testing.assert_array_equal(decrypted["present_key_decrypted"], cipher["present_key"])  # state: untouched


# -- reduced precision: float16 in, float16 out (and bfloat16) -----------------------------------
from eecompile.passes.precision import BFLOAT16, round_to_bfloat16  # noqa: E402

_REDUCED = {"float16": (np.dtype(np.float16), TensorProto.FLOAT16, 2.0 ** -11),
            "bfloat16": (BFLOAT16, TensorProto.BFLOAT16, 2.0 ** -8)}


def _reduced_client(rng) -> Client:
    transforms = [t for t in _transforms(rng) if t.kind == "axis"]
    return Client(BoundarySpec(transforms, list(transforms)), "test-model")


def _reduced_feeds(rng, dtype) -> dict[str, np.ndarray]:
    return {k: v.astype(dtype) for k, v in _feeds(rng).items() if k in ("hidden", "channels", "channels_dense",
                                                                        "blocks", "heads")}


@pytest.mark.parametrize("name", sorted(_REDUCED))
def test_reduced_precision_keeps_its_type_and_rounds_once(rng, name):
    """encrypt/decrypt of float16 (bfloat16) values give float16 (bfloat16): the float64 transform rounded once."""
    dtype, _, u = _REDUCED[name]
    client = _reduced_client(rng)
    feeds = _reduced_feeds(rng, dtype)
    cipher = client.encrypt(feeds)
    exact = Client(client.spec).encrypt({k: v.astype(np.float64) for k, v in feeds.items()})  # float64, no rounding
    for key, value in feeds.items():
        assert cipher[key].dtype == dtype, key
        want = exact[key].astype(np.float16) if dtype == np.float16 else round_to_bfloat16(exact[key])
        np.testing.assert_array_equal(cipher[key].astype(np.float64), want.astype(np.float64), err_msg=key)
    plain = client.decrypt(cipher)
    for key, value in feeds.items():
        assert plain[key].dtype == dtype
        # two roundings (the ciphertext and the plaintext) amplified by the basis' condition: a few u
        assert relative_error(value, plain[key]) < 64 * u, key


def _run_reference(path, feeds: dict) -> dict:
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    return dict(zip([o.name for o in model.graph.output], ReferenceEvaluator(model).run(None, feeds)))


@pytest.mark.parametrize("name", sorted(_REDUCED))
def test_reduced_precision_client_models_match_numpy(rng, tmp_path, name):
    """encrypt.onnx / decrypt.onnx with float16 (bfloat16) IO run on ONNX Runtime's CPU (the transform in float32
    between two Casts), return that type, and agree with the numpy client within one rounding of that type."""
    dtype, elem, u = _REDUCED[name]
    client = _reduced_client(rng)
    feeds = _reduced_feeds(rng, dtype)
    types = {k: helper.make_tensor_type_proto(elem, list(v.shape)) for k, v in feeds.items()}
    bundle = client.save(tmp_path / "client", input_types=types, output_types=types)
    for file in ("encrypt.onnx", "decrypt.onnx"):
        model = onnx.load(str(bundle / file))
        onnx.checker.check_model(model, full_check=True)
        assert {o.type.tensor_type.elem_type for o in model.graph.output} == {elem}
        ort.InferenceSession(str(bundle / file), providers=["CPUExecutionProvider"])  # every kernel exists on CPU
    # ONNX Runtime's Python binding takes and returns no bfloat16 numpy arrays (the models run on its CPU provider
    # from C/C++); in Python, onnx's reference evaluator runs the bfloat16 models
    run = _run_onnx if dtype == np.float16 else _run_reference
    cipher = client.encrypt(feeds)
    got = run(bundle / "encrypt.onnx", feeds)
    for key in feeds:
        assert got[f"{key}_encrypted"].dtype == dtype
        assert relative_error(cipher[key], got[f"{key}_encrypted"]) <= 2 * u, key
    plain = run(bundle / "decrypt.onnx", cipher)
    numpy_plain = client.decrypt(cipher)
    for key in feeds:
        assert plain[f"{key}_decrypted"].dtype == dtype
        assert relative_error(numpy_plain[key], plain[f"{key}_decrypted"]) <= 2 * u, key
