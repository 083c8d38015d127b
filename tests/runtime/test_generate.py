"""Generation on ciphertext equals plaintext generation, token for token, greedy and seeded sampling."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from eecompile import Client
from eecompile.errors import BundleError, EECompileError
from eecompile.runtime.generate import (
    EncryptedGenerator,
    GenerationError,
    PlainGenerator,
    SamplingConfig,
    ServerDecoder,
    build_sampler_model,
    sample_reference,
)
from eecompile.runtime.ort_session import ProviderError, make_session, resolve_providers

DECODERS = [("llama", "dynamo", 20), ("llama", "legacy", 17), ("gpt2", "dynamo", 20)]
IDS = pytest.mark.parametrize("name,exporter,opset", DECODERS, ids=[f"{n}-{e}{o}" for n, e, o in DECODERS])
PROMPT = [5, 17, 42, 3, 60, 8, 33, 21]
NEW = 64
SAMPLED = dict(temperature=0.8, top_k=20, top_p=0.9)

_generators: dict = {}


def generators(zoo, key, name, exporter, opset, **kwargs):
    """(EncryptedGenerator, PlainGenerator) on the CPU, cached per configuration."""
    cache_key = (name, exporter, opset, tuple(sorted(kwargs.items())))
    if cache_key not in _generators:
        result = zoo.compile(name, exporter, opset, key)
        _generators[cache_key] = (EncryptedGenerator(result.out_dir, "cpu", **kwargs),
                                  PlainGenerator(zoo.export(name, exporter, opset), "cpu", **kwargs))
    return _generators[cache_key]


@IDS
def test_greedy_equals_plaintext(zoo, key_a, name, exporter, opset):
    enc, plain = generators(zoo, key_a, name, exporter, opset)
    got = enc.generate(PROMPT, NEW)
    ref = plain.generate(PROMPT, NEW)
    assert len(got.plain_ids) == NEW and got.finish_reason == "length"
    assert got.plain_ids == ref.plain_ids
    assert got.prompt_plain_ids == PROMPT
    # The server saw and produced ciphertext ids: the client's encryption of the plaintext ones.
    client = enc.client.client
    wire = client.encrypt({"input_ids": np.array([PROMPT + got.plain_ids])})["input_ids"][0].tolist()
    assert got.prompt_wire_ids + got.wire_ids == wire
    assert sum(a != b for a, b in zip(got.prompt_wire_ids + got.wire_ids, PROMPT + got.plain_ids)) > 0.8 * (NEW + 8)
    if name == "llama":  # the tied-embedding gpt2 repeats its last token under greedy decoding
        assert len(set(got.plain_ids)) > 1


@IDS
def test_seeded_sampling_equals_plaintext(zoo, key_a, name, exporter, opset):
    enc, plain = generators(zoo, key_a, name, exporter, opset)
    greedy = plain.generate(PROMPT, NEW).plain_ids
    settings = [dict(SAMPLED, seed=1234), dict(SAMPLED, seed=99), dict(temperature=2.5, seed=7)]
    runs = []
    for kwargs in settings:
        got = enc.generate(PROMPT, NEW, **kwargs)
        ref = plain.generate(PROMPT, NEW, **kwargs)
        assert got.plain_ids == ref.plain_ids, kwargs
        runs.append(got.plain_ids)
    assert enc.generate(PROMPT, NEW, **settings[0]).plain_ids == runs[0]  # same seed, same tokens
    assert runs[2] != greedy  # a hot temperature leaves the greedy path
    if name == "llama":
        assert runs[0] != runs[1]


def test_eos_stops_generation(zoo, key_a):
    enc, plain = generators(zoo, key_a, "llama", "dynamo", 20)
    full = plain.generate(PROMPT, 20).plain_ids
    eos = full[6]
    stop = full.index(eos)
    got = enc.generate(PROMPT, 20, eos_ids=[eos])
    ref = plain.generate(PROMPT, 20, eos_ids=[eos])
    assert got.finish_reason == ref.finish_reason == "eos"
    assert got.plain_ids == ref.plain_ids == full[: stop + 1]
    assert got.wire_ids[-1] == enc.client.encrypt_ids([eos])[0]


def test_stream_receives_encrypted_ids(zoo, key_a):
    enc, _ = generators(zoo, key_a, "llama", "legacy", 17)
    seen: list[int] = []
    got = enc.generate(PROMPT, 12, stream=seen.append, **SAMPLED, seed=3)
    assert seen == got.wire_ids
    assert enc.client.decrypt_ids(seen) == got.plain_ids
    assert seen != got.plain_ids


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_io_binding_keeps_cache_on_device(zoo, key_a, name):
    enc, _ = generators(zoo, key_a, name, "dynamo", 20)
    host, _ = generators(zoo, key_a, name, "dynamo", 20, io_binding=False)
    server = enc.server
    before = (server.binding_runs, server.host_runs)
    got = enc.generate(PROMPT, 16)
    assert (server.binding_runs - before[0], server.host_runs - before[1]) == (16, 0)  # prefill + 15 steps
    if name == "llama":
        assert server.interface.has_cache
        assert all(isinstance(v, ort.OrtValue) for v in server._cache.values())
        assert isinstance(server._logits, ort.OrtValue)
    h_before = (host.server.binding_runs, host.server.host_runs)
    ref = host.generate(PROMPT, 16)
    assert (host.server.binding_runs - h_before[0], host.server.host_runs - h_before[1]) == (0, 16)
    assert got.plain_ids == ref.plain_ids and got.wire_ids == ref.wire_ids
    sampled = enc.generate(PROMPT, 16, **SAMPLED, seed=5)
    assert sampled.plain_ids == host.generate(PROMPT, 16, **SAMPLED, seed=5).plain_ids


def test_server_step_api_and_cache_is_ciphertext(zoo, key_a):
    """The server's cache is ciphertext: it differs from the plaintext model's cache for the same prompt."""
    enc, plain = generators(zoo, key_a, "llama", "dynamo", 20)
    server = ServerDecoder(zoo.compile("llama", "dynamo", 20, key_a).server_model, "cpu")
    wire = enc.client.encrypt_ids(PROMPT)
    server.prefill(wire)
    first = server.sample(SamplingConfig())
    server.append(first)
    second = server.sample(SamplingConfig())
    assert enc.client.decrypt_ids([first, second]) == plain.generate(PROMPT, 2).plain_ids
    assert server.tokens == wire + [first]
    reference = ServerDecoder(zoo.export("llama", "dynamo", 20), "cpu")
    reference.prefill(PROMPT)
    k_enc = server._cache["past_key_values.0.key"].numpy()
    k_plain = reference._cache["past_key_values.0.key"].numpy()
    assert k_plain.shape[2] == 8 and k_enc.shape[2] == 9
    assert not np.allclose(k_enc[:, :, :8], k_plain, atol=1e-3)


def test_context_limits(zoo, key_a):
    enc, plain = generators(zoo, key_a, "gpt2", "dynamo", 20)
    assert enc.server.max_positions == plain.server.max_positions == 32  # the learned position table
    with pytest.raises(GenerationError, match="33 tokens but the model's context holds 32"):
        enc.generate([1] * 33, 4)
    llama, _ = generators(zoo, key_a, "llama", "dynamo", 20)
    assert llama.server.max_positions is None  # rotary positions: no table, no limit read from the graph
    short, short_plain = generators(zoo, key_a, "llama", "dynamo", 20, max_positions=12)
    got = short.generate(PROMPT, 10)
    assert got.finish_reason == "context" and len(got.plain_ids) == 12 - len(PROMPT) + 1
    assert got.plain_ids == short_plain.generate(PROMPT, 10).plain_ids == llama.generate(PROMPT, 5).plain_ids


def test_bad_inputs(zoo, key_a):
    enc, _ = generators(zoo, key_a, "llama", "dynamo", 20)
    with pytest.raises(GenerationError, match="empty"):
        enc.generate([], 4)
    with pytest.raises(GenerationError, match=r"token id 64 is outside the model's vocabulary \[0, 64\)"):
        enc.generate([1, 64], 4)
    with pytest.raises(GenerationError, match="outside"):
        enc.generate([-1], 4)
    with pytest.raises(GenerationError, match="outside"):
        enc.generate([1, 2], 4, eos_ids=[100])
    with pytest.raises(GenerationError, match="max_new_tokens"):
        enc.generate([1, 2], -1)
    with pytest.raises(GenerationError, match="top-k and top-p need a temperature"):
        enc.generate([1, 2], 4, top_k=5)
    with pytest.raises(GenerationError, match="top-p"):
        enc.generate([1, 2], 4, temperature=1.0, top_p=0.0)
    with pytest.raises(GenerationError, match="temperature"):
        enc.generate([1, 2], 4, temperature=-1.0)
    with pytest.raises(GenerationError, match="no tokenizer"):
        enc.generate("hello", 4)
    assert enc.generate([1, 2], 0).plain_ids == []


def test_bundle_from_another_compilation(tmp_path, zoo, key_a, key_b):
    a = zoo.compile("llama", "dynamo", 20, key_a)
    b = zoo.compile("llama", "dynamo", 20, key_b, tag="b")
    mixed = tmp_path / "mixed"
    shutil.copytree(a.out_dir / "server", mixed / "server")
    shutil.copytree(b.out_dir / "client", mixed / "client")
    with pytest.raises(BundleError, match="another compilation"):
        EncryptedGenerator(mixed, "cpu")
    gpt = zoo.compile("gpt2", "dynamo", 20, key_a)
    other = tmp_path / "other"
    shutil.copytree(gpt.out_dir / "server", other / "server")
    shutil.copytree(a.out_dir / "client", other / "client")
    with pytest.raises(BundleError, match="another compilation"):
        EncryptedGenerator(other, "cpu")
    with pytest.raises(BundleError, match="no compiled server model"):
        EncryptedGenerator(tmp_path / "nowhere", "cpu")


# -- the sampler -------------------------------------------------------------------------
@pytest.mark.parametrize("config", [SamplingConfig(), SamplingConfig(0.8, 20, 0.9, 0), SamplingConfig(1.0),
                                    SamplingConfig(0.5, top_k=1), SamplingConfig(1.3, top_p=0.3),
                                    SamplingConfig(1.0, top_k=500)], ids=str)
def test_sampler_graph_matches_reference_and_is_permutation_invariant(config):
    vocab = 300
    greedy = config.greedy
    session = make_session(build_sampler_model(greedy).SerializeToString(), "cpu")
    rng = np.random.default_rng(0)
    perm = rng.permutation(vocab)  # cipher index j holds plain logit perm[j]
    for trial in range(40):
        logits = (rng.standard_normal((1, 3, vocab)) * rng.uniform(0.5, 4)).astype(np.float32)
        u = float(rng.random())
        feeds = {"logits": logits}
        if not greedy:
            from eecompile.runtime.generate import _sampler_inputs

            feeds.update(_sampler_inputs(config, vocab, u))
        (plain_id,) = session.run(["next_id"], feeds)
        (cipher_id,) = session.run(["next_id"], {**feeds, "logits": logits[:, :, perm]})
        assert int(plain_id[0, 0]) == sample_reference(logits[0, -1], config, u)
        assert perm[int(cipher_id[0, 0])] == int(plain_id[0, 0])


def test_sampler_distribution_respects_top_k_and_top_p():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32))
    us = np.linspace(0, 1, 2001, endpoint=False)
    picks = [sample_reference(logits, SamplingConfig(1.0, top_k=3), u) for u in us]
    assert set(picks) == {0, 1, 2}
    assert abs(picks.count(0) / len(us) - 0.5 / 0.85) < 0.01
    picks = [sample_reference(logits, SamplingConfig(1.0, top_p=0.75), u) for u in us]
    assert set(picks) == {0, 1, 2}  # 0.5 + 0.2 < 0.75, so the third token is kept, the fourth not
    assert sample_reference(logits, SamplingConfig(1.0, top_p=0.1), 0.99) == 0


# -- ONNX Runtime providers --------------------------------------------------------------
def test_providers(caplog):
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ProviderError, match="unknown provider"):
        resolve_providers("tpu")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here: the fallback and the missing-CUDA error cannot be shown")
    with pytest.raises(ProviderError, match="CUDA provider was requested") as info:
        resolve_providers("cuda")
    assert isinstance(info.value, EECompileError) and "onnxruntime-gpu" in str(info.value)
    import eecompile.runtime.ort_session as ort_session

    ort_session._fallback_logged = False
    blob = build_sampler_model(True).SerializeToString()
    with caplog.at_level(logging.WARNING, logger="eecompile.runtime"):
        session = make_session(blob, "auto")
        make_session(blob, "auto")
    assert session.get_providers() == ["CPUExecutionProvider"]
    lines = [r.getMessage() for r in caplog.records if r.name == "eecompile.runtime"]
    assert lines == ["CUDA is not available to ONNX Runtime; running on the CPU execution provider"]


# -- the small trained model -------------------------------------------------------------
@pytest.fixture(scope="module")
def tinylm(tmp_path_factory, key_a):
    try:
        from eecompile.models.tinylm import load_tinylm

        model, tokenizer, config = load_tinylm()
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"the small trained model is not available: {exc}")
    from tokenizers import Tokenizer

    from eecompile import compile_model
    from eecompile.runtime.tokenizer import add_tokenizer_to_bundle

    out = tmp_path_factory.mktemp("tinylm") / "out"
    result = compile_model(model, key_a, out)
    add_tokenizer_to_bundle(tokenizer, result.client_dir, max_positions=config["max_positions"])
    plain_tok = Tokenizer.from_file(str(tokenizer))
    return (EncryptedGenerator(out, "cpu"),
            PlainGenerator(model, "cpu", tokenizer=plain_tok, eos_tokens=["</s>"], max_positions=config["max_positions"]),
            plain_tok)


def test_tinylm_greedy_equals_plaintext(tinylm):
    from eecompile.models.tinylm import greedy_generate_ids

    enc, plain, tok = tinylm
    for prompt in ("In the beginning God created the heaven", "And the LORD spake unto Moses, saying,"):
        got = enc.generate(prompt, NEW, eos_ids=[])
        ref = plain.generate(prompt, NEW, eos_ids=[])
        assert got.prompt_plain_ids == tok.encode(prompt).ids
        assert got.plain_ids == ref.plain_ids == greedy_generate_ids(tok.encode(prompt).ids, NEW, stop_at_eos=False)
        assert got.text == ref.text == tok.decode(ref.plain_ids)
        assert got.prompt_wire_ids == enc.tokenizer.encode(prompt).ids != got.prompt_plain_ids


def test_tinylm_sampling_equals_plaintext(tinylm):
    enc, plain, _ = tinylm
    prompt = "And God said,"
    texts = set()
    for seed in (0, 1, 2):
        got = enc.generate(prompt, 32, **SAMPLED, seed=seed)
        ref = plain.generate(prompt, 32, **SAMPLED, seed=seed)
        assert got.plain_ids == ref.plain_ids and got.text == ref.text and got.finish_reason == ref.finish_reason
        texts.add(got.text)
    assert len(texts) > 1


# -- the context length a model states (issue 9, item 7) -----------------------------------
def _rope_cache_model(path, rows: int, rotary_op: bool = False):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cos = numpy_helper.from_array(np.zeros((rows, 4), np.float32), "cos_cache")
    table = numpy_helper.from_array(np.zeros((10, 8), np.float32), "embed_tokens.weight")
    nodes = [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["h"])]
    if rotary_op:
        nodes.append(helper.make_node("RotaryEmbedding", ["h", "position_ids", "cos_cache", "cos_cache"], ["logits"],
                                      domain="com.microsoft"))
    else:
        nodes += [helper.make_node("Gather", ["cos_cache", "position_ids"], ["c"]),
                  helper.make_node("Concat", ["c", "c"], ["cc"], axis=-1),
                  helper.make_node("Mul", ["h", "cc"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"]),
                                           helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", 8])], [cos, table])
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("rotary_op", [False, True])
def test_context_from_a_rope_cache(tmp_path, rotary_op):
    from eecompile.runtime.generate import model_context_length

    assert model_context_length(_rope_cache_model(tmp_path / "m.onnx", 48, rotary_op)) == 48


def test_context_from_a_config_beside_the_model(zoo, key_a, tmp_path):
    import json

    import onnx

    from eecompile import compile_model
    from eecompile.runtime.generate import ServerDecoder, model_context_length

    src = zoo.export("llama", "dynamo", 20)
    assert model_context_length(src) is None  # rotary angles computed on the fly: the graph does not say
    model = tmp_path / "model" / "model.onnx"
    model.parent.mkdir()
    shutil.copy(src, model)
    (model.parent / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 12}))
    assert model_context_length(model) == 12
    result = compile_model(model, key_a, tmp_path / "out", verify=False)
    props = {p.key: p.value for p in onnx.load(str(result.server_model), load_external_data=False).metadata_props}
    assert props["max_position_embeddings"] == "12"  # recorded for the server, which has no config beside it
    server = ServerDecoder(result.server_model, "cpu")
    assert server.max_positions == 12
    with pytest.raises(GenerationError, match="13 tokens but the model's context holds 12"):
        server.prefill(list(range(13)))
    got = server.generate([1, 2, 3], 10 ** 12)
    assert got.finish_reason == "context" and len(got.ids) == 12 - 3 + 1
