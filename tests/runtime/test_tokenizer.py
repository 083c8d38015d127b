"""Encrypted tokenizers: stock ``tokenizers`` encodes text straight to ciphertext ids and back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from eecompile.runtime.tokenizer import (  # noqa: E402
    TokenizerError,
    add_tokenizer_to_bundle,
    encrypt_tokenizer,
    load_bundle_tokenizer,
    tokenizer_vocab_size,
)


def real_text() -> str:
    """Real English text every Debian/Ubuntu system ships (licence texts), else the Zen of Python."""
    texts = []
    for name in ("GPL-3", "Apache-2.0", "LGPL-2.1", "Artistic"):
        path = Path("/usr/share/common-licenses") / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    if not texts:
        import codecs
        import this

        texts.append(codecs.decode(this.s, "rot13"))
    return "\n\n".join(texts)


TEXT = real_text()
PARAGRAPHS = [p.strip() for p in TEXT.split("\n\n") if p.strip()]
SAMPLES = PARAGRAPHS[::max(1, len(PARAGRAPHS) // 40)][:40] + ["Beautiful is better than ugly.", "ünïcödé ✓ 42"]


def bpe_template(vocab: int = 300) -> Tokenizer:
    """Byte-level BPE with a TemplateProcessing post-processor adding <s> ... </s>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(PARAGRAPHS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    tok.enable_padding(pad_id=tok.token_to_id("<pad>"), pad_token="<pad>")
    return tok


def wordpiece_bert(vocab: int = 200) -> Tokenizer:
    """BERT-style WordPiece with [CLS]/[SEP] added by BertProcessing."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                        show_progress=False)
    tok.train_from_iterator(PARAGRAPHS, trainer)
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    return tok


def unigram(vocab: int = 150) -> Tokenizer:
    """A Unigram (SentencePiece-style) tokenizer with a Sequence post-processor."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(PARAGRAPHS, trainer)
    tok.post_processor = processors.Sequence([
        processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])])
    return tok


def small_bpe(vocab: int = 60) -> Tokenizer:
    """A lowercase character-level BPE small enough for the zoo models' 64-entry vocabulary."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=36,
                                  show_progress=False)
    tok.train_from_iterator(PARAGRAPHS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    return tok


def random_perm(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(size)


def save(tok: Tokenizer, path: Path) -> Path:
    tok.save(str(path))
    return path


def check_round_trips(plain: Tokenizer, enc: Tokenizer, perm: np.ndarray, pair: bool = True) -> None:
    inv = np.argsort(perm)
    changed = 0
    for text in SAMPLES:
        p = plain.encode(text)
        e = enc.encode(text)
        assert e.ids == [int(inv[i]) for i in p.ids]
        assert [int(perm[i]) for i in e.ids] == p.ids
        assert e.tokens == p.tokens
        assert e.offsets == p.offsets
        assert enc.decode(e.ids) == plain.decode(p.ids)
        assert enc.decode(e.ids, skip_special_tokens=False) == plain.decode(p.ids, skip_special_tokens=False)
        changed += sum(a != b for a, b in zip(e.ids, p.ids))
    assert changed > 0.8 * sum(len(plain.encode(t).ids) for t in SAMPLES)
    if pair:
        p = plain.encode(SAMPLES[0], SAMPLES[1])
        e = enc.encode(SAMPLES[0], SAMPLES[1])
        assert e.ids == [int(inv[i]) for i in p.ids]
        assert e.type_ids == p.type_ids
    # Every token of the vocabulary (special tokens included) maps to its encrypted id and back.
    for token, i in plain.get_vocab(with_added_tokens=True).items():
        assert enc.token_to_id(token) == int(inv[i])
        assert enc.id_to_token(int(inv[i])) == token


def test_bpe_template_round_trips(tmp_path):
    plain = bpe_template()
    perm = random_perm(320, seed=1)  # model vocabulary larger than the tokenizer's
    enc_path = encrypt_tokenizer(save(plain, tmp_path / "plain.json"), perm, tmp_path / "enc.json")
    enc = Tokenizer.from_file(str(enc_path))
    check_round_trips(plain, enc, perm)
    inv = np.argsort(perm)
    # The template's special tokens are the encrypted ids, not the plaintext ones.
    e = enc.encode("hello world")
    assert e.ids[0] == inv[plain.token_to_id("<s>")] != plain.token_to_id("<s>")
    assert e.ids[-1] == inv[plain.token_to_id("</s>")] != plain.token_to_id("</s>")
    # Padding inserts the encrypted pad id.
    batch = enc.encode_batch(["a", "a longer sentence here"])
    assert batch[0].ids[-1] == inv[plain.token_to_id("<pad>")]
    for text in SAMPLES[:5]:
        assert enc.decode(enc.encode(text).ids) == text.strip() or enc.decode(enc.encode(text).ids) == text
    # Every special token alone round-trips.
    for special in ("<unk>", "<s>", "</s>", "<pad>"):
        e = enc.encode(special, add_special_tokens=False)
        assert e.ids == [int(inv[plain.token_to_id(special)])]
        assert enc.decode(e.ids, skip_special_tokens=False) == special


def test_wordpiece_bert_processing(tmp_path):
    plain = wordpiece_bert()
    perm = random_perm(plain.get_vocab_size(), seed=2)  # exactly the tokenizer's size
    enc = Tokenizer.from_file(str(encrypt_tokenizer(save(plain, tmp_path / "p.json"), perm, tmp_path / "e.json")))
    check_round_trips(plain, enc, perm)
    inv = np.argsort(perm)
    e = enc.encode("The licence is free software.")
    assert e.ids[0] == inv[plain.token_to_id("[CLS]")] and e.ids[-1] == inv[plain.token_to_id("[SEP]")]
    assert e.tokens[0] == "[CLS]"
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["post_processor"]["cls"] == ["[CLS]", int(inv[plain.token_to_id("[CLS]")])]
    assert data["post_processor"]["sep"] == ["[SEP]", int(inv[plain.token_to_id("[SEP]")])]
    # Unknown words come back as the encrypted [UNK].
    e = enc.encode("ⱷⱷⱷ", add_special_tokens=False)
    assert e.ids == [int(inv[plain.token_to_id("[UNK]")])]


def test_unigram_sequence_processor_with_holes(tmp_path):
    plain = unigram()
    perm = random_perm(plain.get_vocab_size() + 37, seed=3)
    enc = Tokenizer.from_file(str(encrypt_tokenizer(save(plain, tmp_path / "p.json"), perm, tmp_path / "e.json")))
    check_round_trips(plain, enc, perm, pair=False)


def test_client_bundle_permutation(tmp_path, zoo, key_a):
    """With a compiled model: the tokenizer's ids are the ids the client's encrypt() produces."""
    from eecompile import Client

    result = zoo.compile("llama", "dynamo", 20, key_a)
    client = Client.load(result.client_dir)
    plain = small_bpe()
    assert plain.get_vocab_size() <= 64
    enc = Tokenizer.from_file(str(encrypt_tokenizer(save(plain, tmp_path / "p.json"), client, tmp_path / "e.json")))
    for text in SAMPLES[:10]:
        ids = np.array([plain.encode(text).ids], dtype=np.int64)
        assert enc.encode(text).ids == client.encrypt({"input_ids": ids})["input_ids"][0].tolist()
    # Directory form and the bundle helpers.
    bundle = tmp_path / "client"
    import shutil

    shutil.copytree(result.client_dir, bundle)
    add_tokenizer_to_bundle(tmp_path / "p.json", bundle)
    tok, manifest = load_bundle_tokenizer(bundle, client.model_id)
    assert manifest["eos_tokens"] == ["</s>"] and manifest["bos_tokens"] == ["<s>"]
    assert tok.encode("free software").ids == enc.encode("free software").ids
    assert tok.decode(tok.encode("free software").ids) == "free software"
    from eecompile.errors import BundleError

    with pytest.raises(BundleError, match="another compilation"):
        load_bundle_tokenizer(bundle, "0" * 64)
    (bundle / "tokenizer.json").write_text((bundle / "tokenizer.json").read_text().replace('"<s>"', '"<S>"', 1))
    with pytest.raises(BundleError, match="does not match its manifest"):
        load_bundle_tokenizer(bundle, client.model_id)


def test_vocabulary_too_large_is_refused(tmp_path):
    plain = bpe_template(vocab=300)
    with pytest.raises(TokenizerError, match=r"ids up to 299 \(300 ids\).*64 entries"):
        encrypt_tokenizer(save(plain, tmp_path / "p.json"), random_perm(64), tmp_path / "e.json")
    assert not (tmp_path / "e.json").exists()


def test_bad_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        encrypt_tokenizer(tmp_path / "missing.json", random_perm(10), tmp_path / "e.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="invalid JSON"):
        encrypt_tokenizer(tmp_path / "bad.json", random_perm(10), tmp_path / "e.json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(TokenizerError, match="no 'model' section"):
        encrypt_tokenizer(tmp_path / "other.json", random_perm(10), tmp_path / "e.json")
    with pytest.raises(TokenizerError, match="permutation"):
        encrypt_tokenizer(tmp_path / "other.json", np.array([0, 0, 1]), tmp_path / "e.json")


def test_vocab_size_counts_every_id():
    data = json.loads(bpe_template().to_str())
    assert tokenizer_vocab_size(data) == 300
