"""``eecompile compile --tokenizer`` and ``eecompile generate``: stdout is exactly the continuation;
bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from eecompile.cli import main  # noqa: E402
from eecompile.runtime.generate import EncryptedGenerator, PlainGenerator  # noqa: E402

PROMPT = "the licence is free"


def _text() -> list[str]:
    texts = []
    for name in ("GPL-3", "Apache-2.0"):
        path = Path("/usr/share/common-licenses") / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    if not texts:
        import codecs
        import this

        texts.append(codecs.decode(this.s, "rot13"))
    return [p for t in texts for p in t.split("\n\n") if p.strip()]


def small_bpe(vocab: int) -> Tokenizer:
    """A lowercase character-level BPE with <s> ... </s> template, trained on real English text."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=36,
                                  show_progress=False)
    tok.train_from_iterator(_text(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return tok


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("eecompile: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


@pytest.fixture(scope="module")
def setup(tmp_path_factory, zoo):
    root = tmp_path_factory.mktemp("cli-generate")
    model = zoo.export("llama", "dynamo", 20)
    plain_tok = small_bpe(60)
    tok_path = root / "tokenizer.json"
    plain_tok.save(str(tok_path))
    key = root / "k.key"
    assert main(["keygen", str(key)]) == 0
    out = root / "out"
    assert main(["compile", str(model), "--key", str(key), "--out", str(out), "--tokenizer", str(tok_path)]) == 0
    return {"root": root, "model": model, "tokenizer": plain_tok, "tokenizer_path": tok_path, "key": key, "out": out}


def _reference(setup, prompt=PROMPT, n=12, **kwargs):
    plain = PlainGenerator(setup["model"], "cpu", tokenizer=setup["tokenizer"], eos_tokens=["</s>"])
    return plain.generate(prompt, n, **kwargs)


def test_compile_with_tokenizer_writes_encrypted_tokenizer(setup, capsys):
    client = setup["out"] / "client"
    manifest = json.loads((client / "tokenizer-manifest.json").read_text())
    assert manifest["eos_tokens"] == ["</s>"] and manifest["model_vocab_size"] == 64
    enc = Tokenizer.from_file(str(client / "tokenizer.json"))
    plain = setup["tokenizer"]
    assert enc.encode(PROMPT).tokens == plain.encode(PROMPT).tokens
    assert enc.encode(PROMPT).ids != plain.encode(PROMPT).ids
    assert enc.decode(enc.encode(PROMPT).ids) == PROMPT
    assert json.loads(setup["tokenizer_path"].read_text()) == json.loads(plain.to_str())  # the input is untouched


def test_generate_prints_exactly_the_continuation(setup, capsys):
    code, out, err = _run(capsys, "generate", setup["out"], "--prompt", PROMPT, "--max-new-tokens", 12,
                          "--provider", "cpu")
    assert code == 0, err
    ref = _reference(setup)
    assert out == ref.text and out  # exactly the continuation: no banner, no newline when not a terminal
    assert err == ""
    enc = EncryptedGenerator(setup["out"], "cpu").generate(PROMPT, 12)
    assert enc.plain_ids == ref.plain_ids and enc.text == out


def test_generate_sampling_and_show_wire(setup, capsys):
    args = ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "11"]
    code, out, err = _run(capsys, "generate", setup["out"], "--prompt", PROMPT, "--max-new-tokens", 16,
                          "--provider", "cpu", "--show-wire", *args)
    assert code == 0, err
    ref = _reference(setup, n=16, temperature=0.8, top_k=20, top_p=0.9, seed=11)
    assert out == ref.text
    enc = EncryptedGenerator(setup["out"], "cpu").generate(PROMPT, 16, temperature=0.8, top_k=20, top_p=0.9, seed=11)
    lines = err.splitlines()
    assert lines[0] == "eecompile: prompt ids as the server saw them: " + " ".join(map(str, enc.prompt_wire_ids))
    assert lines[1].startswith("eecompile: generated ids as the server produced them: "
                               + " ".join(map(str, enc.wire_ids)))
    assert enc.prompt_wire_ids != enc.prompt_plain_ids


def test_generate_with_prompt_ids(setup, capsys):
    code, out, err = _run(capsys, "generate", setup["out"], "--prompt-ids", "5,17 42", "--max-new-tokens", 6,
                          "--provider", "cpu")
    assert code == 0, err
    ref = PlainGenerator(setup["model"], "cpu").generate([5, 17, 42], 6, eos_ids=[2])  # the tokenizer's </s>
    assert out == " ".join(map(str, ref.plain_ids)) + "\n"


def test_generate_auto_provider_logs_to_stderr_only(setup, capsys):
    import onnxruntime as ort

    code, out, err = _run(capsys, "generate", setup["out"], "--prompt", PROMPT, "--max-new-tokens", 4)
    assert code == 0
    assert out == _reference(setup, n=4).text
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "running on the CPU" in err or err == ""  # logged once per process


@pytest.mark.parametrize("argv,fragments", [
    (["--prompt", ""], ["prompt is empty"]),
    (["--prompt", "   "], ["prompt is empty"]),
    (["--prompt", "the ⱷ licence"], ["does not know", "unknown token"]),
    (["--prompt", PROMPT, "--max-context", "4"], ["tokens but the model's context holds 4"]),
    (["--prompt-ids", "1 64"], ["token id 64 is outside the model's vocabulary [0, 64)"]),
    (["--prompt-ids", "1 x"], ["--prompt-ids takes integers"]),
    (["--prompt", PROMPT, "--top-k", "5"], ["need a temperature"]),
    (["--prompt", PROMPT, "--temperature", "1", "--top-p", "1.5"], ["top-p must be in (0, 1]"]),
    (["--prompt", PROMPT, "--max-new-tokens", "-3"], ["--max-new-tokens must be >= 0"]),
], ids=["empty", "blank", "unknown-token", "too-long", "id-outside-vocab", "bad-ids", "top-k-greedy", "top-p",
        "negative-n"])
def test_bad_input_is_one_line(setup, capsys, argv, fragments):
    code, out, err = _run(capsys, "generate", setup["out"], "--provider", "cpu", *argv)
    _one_line_error(code, err, *fragments)
    assert out == ""


def test_cuda_requested_but_missing(setup, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    code, out, err = _run(capsys, "generate", setup["out"], "--prompt", PROMPT, "--provider", "cuda")
    _one_line_error(code, err, "CUDA provider was requested", "onnxruntime-gpu")
    assert out == ""


def test_bundle_of_another_model(setup, capsys, zoo, tmp_path):
    other = tmp_path / "other"
    assert main(["compile", str(zoo.export("gpt2", "dynamo", 20)), "--key", str(setup["key"]), "--out", str(other)]) == 0
    capsys.readouterr()
    mixed = tmp_path / "mixed"
    shutil.copytree(setup["out"] / "server", mixed / "server")
    shutil.copytree(other / "client", mixed / "client")
    code, out, err = _run(capsys, "generate", mixed, "--prompt-ids", "1 2", "--provider", "cpu")
    _one_line_error(code, err, "belongs to another compilation")
    # A tokenizer copied in from another compilation is refused too.
    shutil.copy(setup["out"] / "client" / "tokenizer.json", other / "client")
    shutil.copy(setup["out"] / "client" / "tokenizer-manifest.json", other / "client")
    code, out, err = _run(capsys, "generate", other, "--prompt", PROMPT, "--provider", "cpu")
    _one_line_error(code, err, "tokenizer", "another compilation")
    # No tokenizer at all: text prompts are refused, ids work.
    shutil.rmtree(other)
    assert main(["compile", str(zoo.export("gpt2", "dynamo", 20)), "--key", str(setup["key"]), "--out", str(other)]) == 0
    capsys.readouterr()
    code, out, err = _run(capsys, "generate", other, "--prompt", PROMPT, "--provider", "cpu")
    _one_line_error(code, err, "no tokenizer", "--tokenizer")
    code, out, err = _run(capsys, "generate", tmp_path / "missing", "--prompt", PROMPT, "--provider", "cpu")
    _one_line_error(code, err, "no compiled server model")


def test_compile_refuses_a_tokenizer_too_large(setup, capsys, tmp_path):
    big = tmp_path / "big.json"
    small_bpe(100).save(str(big))
    out = tmp_path / "out"
    code, _, err = _run(capsys, "compile", setup["model"], "--key", setup["key"], "--out", out, "--tokenizer", big)
    _one_line_error(code, err, "100 ids", "64 entries")
    assert not out.exists()
    (tmp_path / "bad.json").write_text("{}")
    code, _, err = _run(capsys, "compile", setup["model"], "--key", setup["key"], "--out", out,
                        "--tokenizer", tmp_path / "bad.json")
    _one_line_error(code, err, "not a Hugging Face tokenizer.json")
    code, _, err = _run(capsys, "compile", setup["model"], "--key", setup["key"], "--out", out,
                        "--tokenizer", tmp_path / "missing.json")
    _one_line_error(code, err, "tokenizer file not found")


def test_llm_demo(setup, capsys):
    from eecompile.demo import run_llm_demo

    code = run_llm_demo(files=(Path(setup["model"]), setup["tokenizer_path"], None), prompt=PROMPT, max_new_tokens=8)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "identical tokens" in out
    assert f"plaintext model:  {PROMPT}{_reference(setup, n=8).text}" in out


def test_llm_demo_cli(capsys, monkeypatch):
    import eecompile.demo as demo

    monkeypatch.setattr(demo, "_tinylm_files", lambda: None)
    code, out, err = _run(capsys, "demo", "--llm")
    assert code == 0 and "not available" in out


def _tinylm():
    try:
        from eecompile.models.tinylm import load_tinylm

        return load_tinylm()
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"the small trained model is not available: {exc}")


def test_tinylm_generate_cli(tmp_path, capsys):
    """The README's path: compile the trained model with its tokenizer, generate text on ciphertext."""
    from eecompile.models.tinylm import greedy_generate_plain

    model, tokenizer, config = _tinylm()
    out = tmp_path / "out"
    key = tmp_path / "k.key"
    assert main(["keygen", str(key)]) == 0
    assert main(["compile", str(model), "--key", str(key), "--out", str(out), "--tokenizer", str(tokenizer)]) == 0
    capsys.readouterr()
    prompt = "In the beginning God created"
    code, text, err = _run(capsys, "generate", out, "--prompt", prompt, "--max-new-tokens", 24, "--provider", "cpu",
                           "--max-context", config["max_positions"])
    assert code == 0, err
    assert text == greedy_generate_plain(prompt, 24) and text.strip()
    code, _, err = _run(capsys, "generate", out, "--prompt", "word " * 200, "--provider", "cpu",
                        "--max-context", config["max_positions"])
    _one_line_error(code, err, f"the model's context holds {config['max_positions']}")


def test_llm_demo_with_the_trained_model(capsys):
    from eecompile.demo import run_llm_demo

    _tinylm()
    code = run_llm_demo(max_new_tokens=16)
    out = capsys.readouterr().out
    assert code == 0 and "identical tokens" in out, out


def test_tinylm_context_is_enforced_without_being_told(tmp_path, capsys):
    """The shipped model records its 128-token context: over-long prompts are refused and generation
    stops when the context is full, with no --max-context (issue 9, item 7)."""
    from eecompile.runtime.generate import ServerDecoder, model_context_length

    model, tokenizer, config = _tinylm()
    assert model_context_length(model) == config["max_positions"] == 128
    out = tmp_path / "out"
    key = tmp_path / "k.key"
    assert main(["keygen", str(key)]) == 0
    assert main(["compile", str(model), "--key", str(key), "--out", str(out), "--tokenizer", str(tokenizer),
                 "--no-verify"]) == 0
    capsys.readouterr()
    assert ServerDecoder(out / "server" / "model.onnx", "cpu").max_positions == 128  # the server model says so
    code, _, err = _run(capsys, "generate", out, "--prompt", "And God said, " * 80, "--provider", "cpu")
    _one_line_error(code, err, "the model's context holds 128")
    code, _, err = _run(capsys, "generate", out, "--prompt-ids", " ".join(["5"] * 300), "--provider", "cpu")
    _one_line_error(code, err, "300 tokens but the model's context holds 128")
    code, text, err = _run(capsys, "generate", out, "--prompt-ids", "1 5 6", "--max-new-tokens", "1000000000000",
                           "--provider", "cpu")
    assert code == 0, err
    assert len(text.split()) == 128 - 3 + 1  # the last token is sampled from the full context, not fed back
    assert "context of 128 tokens is full" in err


@pytest.mark.parametrize("seed", ["-1", "-100"])
def test_negative_seed_is_a_user_error(setup, capsys, seed):
    code, _, err = _run(capsys, "generate", setup["out"], "--prompt", PROMPT, "--temperature", "0.8",
                        "--seed", seed, "--provider", "cpu")
    _one_line_error(code, err, "seed")
