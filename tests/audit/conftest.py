"""Fixtures for the audit tests: small compiled zoo models, the trained language model when it
is shipped, and real English text from the Debian corpus packages (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eecompile.keys import MasterKey

CORPUS_CHARS = 1_200_000  # enough for 10^4 traffic tokens and a few 10^5 reference tokens


@pytest.fixture(scope="session")
def english(tmp_path_factory) -> Path:
    """A UTF-8 file of real English text (part of the installed Debian corpora)."""
    from eecompile.models import corpus

    names = [n for n in ("fortunes", "kjv") if corpus.corpus_available(n)]
    if not names:
        pytest.skip("no English corpus installed (Debian: apt-get install -y fortunes bible-kjv)")
    text = "\n\n".join(corpus.load_corpus(n)[: CORPUS_CHARS // len(names)] for n in names)
    path = tmp_path_factory.mktemp("corpus") / "english.txt"
    path.write_text(text, encoding="utf-8")
    return path


class Compiled:
    """One compiled model: the original, the output directory, and views of both."""

    def __init__(self, original: Path, out: Path, tokenizer: Path | None = None) -> None:
        from eecompile.audit.server import ModelView, Truth

        self.original, self.out, self.tokenizer = original, out, tokenizer
        self.server = ModelView(out / "server")
        self.base = ModelView(original)
        self.truth = Truth(out / "client")

    @property
    def perm(self) -> np.ndarray:
        return self.truth.vocab_perm(self.server.token_input)

    def encrypt(self, ids):
        return self.truth.encrypt_ids(self.server.token_input, ids)


def _compile(original: Path, out: Path, seed: int, tokenizer: Path | None = None) -> Compiled:
    from eecompile import compile_model

    compile_model(original, MasterKey(bytes((seed + i) % 256 for i in range(32))), out, force=True)
    return Compiled(original, out, tokenizer)


@pytest.fixture(scope="session")
def audit_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit")


def _zoo(root: Path, name: str, seed: int = 0) -> Path:
    from eecompile.models import export_model

    path = root / f"{name}-seed{seed}.onnx"
    if not path.exists():
        export_model(name, path, exporter="legacy", opset=17, seed=seed)
    return path


@pytest.fixture(scope="session")
def zoo_llama(audit_root) -> Compiled:
    return _compile(_zoo(audit_root, "llama"), audit_root / "out-llama", 1)


@pytest.fixture(scope="session")
def zoo_llama_other_seed(audit_root) -> Path:
    """An unrelated model of the same architecture (other random weights): no side knowledge."""
    return _zoo(audit_root, "llama", seed=7)


@pytest.fixture(scope="session")
def zoo_gpt2(audit_root) -> Compiled:
    return _compile(_zoo(audit_root, "gpt2"), audit_root / "out-gpt2", 2)


@pytest.fixture(scope="session")
def zoo_mlp(audit_root) -> Compiled:
    return _compile(_zoo(audit_root, "mlp"), audit_root / "out-mlp", 3)


@pytest.fixture(scope="session")
def zoo_mlp_other_seed(audit_root) -> Path:
    return _zoo(audit_root, "mlp", seed=7)


@pytest.fixture(scope="session")
def zoo_cnn(audit_root) -> Compiled:
    return _compile(_zoo(audit_root, "cnn"), audit_root / "out-cnn", 4)


@pytest.fixture(scope="session")
def tinylm(audit_root) -> Compiled:
    """The shipped trained language model, compiled (skipped when it is not shipped)."""
    pytest.importorskip("tokenizers")
    try:
        from eecompile.models.tinylm import load_tinylm, tinylm_dir

        tinylm_dir()
        onnx_path, tok_path, _ = load_tinylm()
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"the trained language model is not shipped here ({exc})")
    return _compile(Path(onnx_path), audit_root / "out-tinylm", 5, Path(tok_path))


@pytest.fixture(scope="session")
def tinylm_split(tinylm, english):
    """Disjoint traffic / reference token ids of the English text, with the model's tokenizer."""
    from eecompile.audit.text import HFTokenizer, split_traffic

    tok = HFTokenizer(tinylm.tokenizer)
    return split_traffic(tok, english.read_text(), "english", max_traffic_tokens=60_000)


@pytest.fixture(scope="session")
def char_split(english):
    """The same text with the 64-id character tokenizer of the zoo models."""
    from eecompile.audit.text import CharTokenizer, split_traffic

    return split_traffic(CharTokenizer(64), english.read_text()[:600_000], "english", max_traffic_tokens=60_000)
