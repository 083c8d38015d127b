"""The shipped small language model (eecompile/models/tinylm), its corpus, tokenizer and training."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")
ort = pytest.importorskip("onnxruntime")

from eecompile.errors import EECompileError  # noqa: E402
from eecompile.models import corpus as corpus_mod  # noqa: E402
from eecompile.models import tinylm  # noqa: E402
from eecompile.models.export import llama_io_names  # noqa: E402
from eecompile.models.train_lm import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    SPECIAL_TOKENS,
    encode_documents,
    heldout_perplexity,
)

needs_kjv = pytest.mark.skipif(
    not corpus_mod.corpus_available("kjv"),
    reason="corpus 'kjv' not installed (Debian: apt-get install -y bible-kjv)",
)
needs_fortunes = pytest.mark.skipif(
    not corpus_mod.corpus_available("fortunes"),
    reason="corpus 'fortunes' not installed (Debian: apt-get install -y fortunes)",
)

SAMPLE_TEXT = (
    "In the beginning God created the heaven and the earth.\n"
    "And the earth was without form, and void; and darkness was upon the face of the deep.\n\n"
    "Tabs\tand  double  spaces, café, naïve, 日本語, emoji 🙂, <s> literal </s> and <unk>."
)


@pytest.fixture(scope="module")
def shipped():
    onnx_path, tok_path, config = tinylm.load_tinylm()
    return onnx_path, tok_path, config


@pytest.fixture(scope="module")
def session(shipped):
    return ort.InferenceSession(str(shipped[0]), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def torch_model():
    return tinylm.load_checkpoint()


def _feeds(config, ids, past=None, past_len=0):
    b, s = ids.shape
    feeds = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((b, past_len + s), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past_len, past_len + s, dtype=np.int64), (b, s)).copy(),
    }
    names = llama_io_names(int(config["layers"]))[0][3:]
    if past is None:
        shape = (b, int(config["kv_heads"]), 0, int(config["head_dim"]))
        past = [np.zeros(shape, dtype=np.float32) for _ in names]
    feeds.update(dict(zip(names, past, strict=True)))
    return feeds


def _torch_run(model, feeds, config):
    names = llama_io_names(int(config["layers"]))[0]
    with torch.no_grad():
        outs = model(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names))
    return [o.numpy() for o in outs]


def test_shipped_files_and_size():
    d = tinylm.tinylm_dir()
    sizes = {f: (d / f).stat().st_size for f in ("model.onnx", "tokenizer.json", "model.pt")}
    assert sum(sizes.values()) <= 20 * 1024 * 1024, sizes
    metrics = tinylm.load_metrics()
    _, _, config = tinylm.load_tinylm()
    assert metrics["vocab_size"] == config["vocab_size"]
    assert metrics["corpus"] == "kjv"
    assert 1e6 <= metrics["parameters"] <= 1e7
    assert (d / "README.md").is_file()


def test_onnx_io_convention(session, shipped):
    config = shipped[2]
    ins, outs = llama_io_names(int(config["layers"]))
    assert [i.name for i in session.get_inputs()] == ins
    assert [o.name for o in session.get_outputs()] == outs
    logits = session.get_outputs()[0]
    assert logits.shape[-1] == config["vocab_size"]


def test_onnx_matches_torch_prefill_and_decode(session, shipped, torch_model):
    config = shipped[2]
    tok = tinylm.load_tokenizer()
    ids = np.asarray([tok.encode("And God said, Let there be light: and there was light.").ids[:12]] * 2)
    ids[1, 5:] = ids[1, 5:][::-1]  # two different rows
    feeds = _feeds(config, ids)
    ort_out = session.run(None, feeds)
    ref = _torch_run(torch_model, feeds, config)
    for a, b in zip(ort_out, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # one decode step on top of the prefill's cache
    step = np.asarray([[17], [42]], dtype=np.int64)
    feeds2 = _feeds(config, step, past=ort_out[1:], past_len=ids.shape[1])
    ort2 = session.run(None, feeds2)
    ref2 = _torch_run(torch_model, feeds2, config)
    for a, b in zip(ort2, ref2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # the cached decode equals recomputing the whole sequence
    full = session.run(None, _feeds(config, np.concatenate([ids, step], axis=1)))[0]
    np.testing.assert_allclose(ort2[0][:, -1], full[:, -1], rtol=1e-4, atol=1e-4)


def test_tokenizer_special_tokens_and_bos(shipped):
    tok = tinylm.load_tokenizer()
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert SPECIAL_TOKENS[BOS_ID] == "<s>" and SPECIAL_TOKENS[EOS_ID] == "</s>"
    enc = tok.encode("The LORD is my shepherd")
    assert enc.ids[0] == BOS_ID and BOS_ID not in enc.ids[1:]
    assert tok.get_vocab_size() == shipped[2]["vocab_size"]


def test_tokenizer_round_trips_text():
    tok = tinylm.load_tokenizer()
    body = "Byte-level BPE: caf\u00e9, na\u00efve, \u65e5\u672c\u8a9e, emoji \U0001f642, tabs\tand\nnewlines  end "
    assert tok.decode(tok.encode(body).ids) == body
    # special-token strings inside the text become the special ids (decoded only on request)
    ids = tok.encode(SAMPLE_TEXT).ids
    assert ids.count(BOS_ID) == 2 and EOS_ID in ids
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + SAMPLE_TEXT


@needs_kjv
def test_tokenizer_round_trips_heldout_kjv():
    _, heldout = corpus_mod.split_corpus(corpus_mod.load_corpus("kjv"))
    tok = tinylm.load_tokenizer()
    docs = corpus_mod.corpus_documents(heldout)[:10]
    for doc, enc in zip(docs, tok.encode_batch(docs), strict=True):
        assert tok.decode(enc.ids) == doc
    # a trained tokenizer compresses in-domain text well
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(docs))
    assert sum(len(d) for d in docs) / n_tokens > 3.0


@needs_fortunes
def test_tokenizer_round_trips_fortunes():
    tok = tinylm.load_tokenizer()
    docs = corpus_mod.corpus_documents(corpus_mod.load_corpus("fortunes"))[::500]
    for doc, enc in zip(docs, tok.encode_batch(docs), strict=True):
        assert tok.decode(enc.ids) == doc


@needs_kjv
def test_heldout_perplexity_matches_metrics(torch_model, shipped):
    metrics = tinylm.load_metrics()
    _, heldout = corpus_mod.split_corpus(corpus_mod.load_corpus(metrics["corpus"]))
    stream = encode_documents(tinylm.load_tokenizer(), corpus_mod.corpus_documents(heldout))
    assert len(stream) == metrics["heldout_tokens"]
    ppl = heldout_perplexity(torch_model, stream, int(shipped[2]["max_positions"]), max_windows=48)
    assert abs(ppl / metrics["heldout_perplexity"] - 1) < 0.10, (ppl, metrics["heldout_perplexity"])
    # far better than a uniform guess over the vocabulary
    assert metrics["heldout_perplexity"] < shipped[2]["vocab_size"] / 20


def test_greedy_generation_reads_as_text():
    a = tinylm.greedy_generate_plain("And God said", 24)
    assert a == tinylm.greedy_generate_plain("And God said", 24)  # deterministic
    words = a.split()
    assert len(words) >= 5
    assert sum(w.strip(",.;:").isalpha() for w in words) >= 0.7 * len(words)


def test_greedy_ids_protocol_matches_full_recompute(session, shipped):
    tok = tinylm.load_tokenizer()
    prompt = tok.encode("In the beginning").ids
    new = tinylm.greedy_generate_ids(prompt, 10, stop_at_eos=False)
    assert len(new) == 10
    seq = list(prompt)
    for expected in new:  # no cache: recompute the whole sequence every step
        logits = session.run(["logits"], _feeds(shipped[2], np.asarray([seq])))[0]
        assert int(np.argmax(logits[0, -1])) == expected
        seq.append(expected)


def test_generation_bad_input():
    ctx = tinylm.load_tinylm()[2]["max_positions"]
    with pytest.raises(tinylm.ContextLengthError, match="context"):
        tinylm.greedy_generate_ids([BOS_ID] * 10, ctx)
    with pytest.raises(EECompileError):
        tinylm.greedy_generate_plain("word " * 200, 1)
    with pytest.raises(ValueError, match="empty"):
        tinylm.greedy_generate_ids([], 4)
    with pytest.raises(ValueError, match="range"):
        tinylm.greedy_generate_ids([BOS_ID, 10**6], 4)
    assert tinylm.greedy_generate_ids([BOS_ID], 0) == []


# ----------------------------------------------------------------------------- corpus


@needs_kjv
def test_kjv_corpus_layout_and_split():
    text = corpus_mod.load_corpus("kjv")
    assert text.startswith("In the beginning God created the heaven and the earth.\n")
    docs = corpus_mod.corpus_documents(text)
    assert len(docs) == 1189  # chapters
    assert sum(d.count("\n") + 1 for d in docs) == 31102  # verses
    train, heldout = corpus_mod.split_corpus(text)
    assert (train, heldout) == corpus_mod.split_corpus(text)
    tr, ho = corpus_mod.corpus_documents(train), corpus_mod.corpus_documents(heldout)
    assert len(ho) == 59 and len(tr) + len(ho) == len(docs)
    assert not set(tr) & set(ho)
    path = corpus_mod.corpus_path("kjv")
    assert path.read_text(encoding="utf-8") == text


@needs_fortunes
def test_fortunes_corpus_is_disjoint_text():
    text = corpus_mod.load_corpus("fortunes")
    docs = corpus_mod.corpus_documents(text)
    assert len(docs) > 10000 and len(text) > 1_000_000
    if corpus_mod.corpus_available("kjv"):
        kjv = set(corpus_mod.corpus_documents(corpus_mod.load_corpus("kjv")))
        assert not kjv & set(docs)


def test_split_corpus_small_and_errors():
    text = "\n\n".join(f"doc {i}" for i in range(40)) + "\n"
    train, heldout = corpus_mod.split_corpus(text, 0.1)
    assert corpus_mod.corpus_documents(heldout) == [f"doc {i}" for i in (9, 19, 29, 39)]
    assert len(corpus_mod.corpus_documents(train)) == 36
    with pytest.raises(ValueError):
        corpus_mod.split_corpus(text, 0.0)
    with pytest.raises(ValueError):
        corpus_mod.split_corpus("one document only", 0.5)
    with pytest.raises(ValueError, match="unknown corpus"):
        corpus_mod.load_corpus("nope")


def test_missing_corpus_names_the_apt_command(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus_mod, "KJV_DATA", tmp_path / "bible.data")
    monkeypatch.setattr(corpus_mod, "FORTUNES_DIR", tmp_path / "fortunes")
    corpus_mod.load_corpus.cache_clear()
    try:
        for name in ("kjv", "fortunes"):
            assert not corpus_mod.corpus_available(name)
            with pytest.raises(corpus_mod.CorpusNotInstalledError, match="apt-get install -y") as info:
                corpus_mod.load_corpus(name)
            assert isinstance(info.value, EECompileError) and isinstance(info.value, FileNotFoundError)
    finally:
        corpus_mod.load_corpus.cache_clear()


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
@needs_kjv
def test_training_runs_end_to_end(tmp_path):
    from eecompile.models.train_lm import train

    metrics = train(tmp_path, steps=6, batch=4, eval_windows=4, log=lambda _m: None)
    for f in tinylm.FILES:
        assert (tmp_path / f).is_file(), f
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["steps"] == 6 and saved["heldout_eval_windows"] == 4
    assert np.isfinite(saved["heldout_perplexity"])
    text = tinylm.greedy_generate_plain("And", 5, model_dir=tmp_path, stop_at_eos=False)
    assert isinstance(text, str)
