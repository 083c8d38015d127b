"""Real English text as token ids: the traffic clients send and the attacker's reference corpus.

The two are always **disjoint**: a corpus's documents are shuffled with a fixed seed and cut
in two, the first part feeding simulated client traffic, the second the attacker's n-gram
statistics. A model's own ``tokenizer.json`` (Hugging Face ``tokenizers``) turns text into
ids; zoo models without a tokenizer use :class:`CharTokenizer` (one id per character class).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eecompile.audit.server import AuditError

_CHARS = " etaoinshrdlcumwfgypbvkjxqz\n.,;:'\"!?-()0123456789"


class CharTokenizer:
    """Lower-cased characters to ids ``0..vocab_size-1`` (rarest classes merged into the last id).

    For zoo models, whose random weights come with no tokenizer: it gives English-shaped
    id statistics over any small vocabulary.
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 2:
            raise AuditError(f"a character tokenizer needs a vocabulary of at least 2 ids, not {vocab_size}")
        self.vocab_size = vocab_size
        table = np.full(256, vocab_size - 1, dtype=np.int64)
        for i, ch in enumerate(_CHARS[: vocab_size - 1]):
            table[ord(ch)] = i
            if ch.isalpha():
                table[ord(ch.upper())] = i
        self._table = table

    def encode_ids(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            raw = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)
            out.append(self._table[raw])
        return out


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (the model's public, plaintext tokenizer)."""

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:  # pragma: no cover - tokenizers ships with the models extra
            raise AuditError("reading tokenizer.json needs the 'tokenizers' package (pip install tokenizers)") from None
        path = Path(path)
        if not path.is_file():
            raise AuditError(f"tokenizer file not found: {path}")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own exception type
            raise AuditError(f"{path} is not a readable tokenizer.json ({exc})") from None
        self.vocab_size = self._tok.get_vocab_size()
        self.path = path

    def encode_ids(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def read_corpus(spec: str | Path | None) -> tuple[str, list[tuple[str, str]]]:
    """``(name, parts)`` of a corpus, ``parts`` a list of ``(name, text)``: a text file, a name of
    :mod:`eecompile.models.corpus`, or ``None`` for every Debian corpus installed here (KJV
    Bible, fortunes; one part each)."""
    from eecompile.models import corpus as corpora

    if spec is not None and Path(spec).is_file():
        try:
            return Path(spec).name, [(Path(spec).name, Path(spec).read_text(encoding="utf-8", errors="replace"))]
        except OSError as exc:
            raise AuditError(f"cannot read corpus {spec}: {exc.strerror}") from None
    if spec is not None:
        if str(spec) not in corpora.CORPORA:
            raise AuditError(f"corpus {spec} is neither a file nor one of {', '.join(corpora.CORPORA)}")
        names = [str(spec)]
    else:
        names = [n for n in corpora.CORPORA if corpora.corpus_available(n)]
        if not names:
            raise AuditError("no English corpus is installed; pass --corpus TEXT or install one with: "
                             + " / ".join(corpora.INSTALL_COMMANDS.values()))
    return "+".join(names), [(n, corpora.load_corpus(n)) for n in names]


def documents(text: str, max_chars: int = 4000) -> list[str]:
    """Blank-line separated documents of ``text``; long ones cut into pieces of about ``max_chars``."""
    docs = []
    for doc in re.split(r"\n[ \t]*\n", text):
        doc = doc.strip()
        while len(doc) > max_chars:
            cut = doc.rfind("\n", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            docs.append(doc[:cut])
            doc = doc[cut:].strip()
        if doc:
            docs.append(doc)
    return docs


@dataclass
class Split:
    """Disjoint token-id documents: ``traffic`` (clients' requests) and ``reference`` (the attacker's).

    ``reference_parts`` splits the reference by source corpus, for attacks that pick the
    reference that fits the ciphertext best."""

    traffic: list[np.ndarray]
    reference: list[np.ndarray]
    corpus: str
    reference_parts: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @property
    def traffic_tokens(self) -> int:
        return int(sum(len(d) for d in self.traffic))

    @property
    def reference_tokens(self) -> int:
        return int(sum(len(d) for d in self.reference))


def split_traffic(tokenizer, text: str | list[tuple[str, str]], corpus: str = "", traffic_fraction: float = 0.55,
                  seed: int = 0, max_traffic_tokens: int | None = None,
                  max_reference_tokens: int | None = None) -> Split:
    """Shuffle the documents of ``text`` (seeded), send ``traffic_fraction`` of them as traffic,
    give the rest to the attacker; cap each side's token count if asked. ``text`` may be a list
    of ``(name, text)`` parts (documents of all parts are mixed; the reference keeps track of
    which part each came from)."""
    parts = [(corpus or "text", text)] if isinstance(text, str) else list(text)
    docs, labels = [], []
    for name, part in parts:
        part_docs = documents(part)
        docs += part_docs
        labels += [name] * len(part_docs)
    if len(docs) < 2:
        raise AuditError("the corpus has fewer than two documents (blank-line separated); cannot split it")
    order = np.random.default_rng(seed).permutation(len(docs))
    cut = max(1, min(len(docs) - 1, int(round(traffic_fraction * len(docs)))))
    traffic_docs = [docs[i] for i in order[:cut]]
    reference_idx = order[cut:]
    reference = _encode_capped(tokenizer, [docs[i] for i in reference_idx], max_reference_tokens)
    ref_labels = [labels[i] for i in reference_idx][: len(reference)]
    by_part: dict[str, list[np.ndarray]] = {}
    if len(parts) > 1:
        for label, ids in zip(ref_labels, reference):
            by_part.setdefault(label, []).append(ids)
    return Split(_encode_capped(tokenizer, traffic_docs, max_traffic_tokens), reference, corpus, by_part)


def _encode_capped(tokenizer, docs: list[str], cap: int | None) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    total = 0
    step = 512
    for s in range(0, len(docs), step):
        for ids in tokenizer.encode_ids(docs[s:s + step]):
            if cap is not None and total + len(ids) > cap:
                if cap - total > 0:
                    out.append(ids[: cap - total])
                return out
            out.append(ids)
            total += len(ids)
    return out


def take_tokens(docs: list[np.ndarray], n: int) -> list[np.ndarray]:
    """The first ``n`` tokens of a document list (the last document cut)."""
    out, total = [], 0
    for d in docs:
        if total >= n:
            break
        out.append(d[: n - total])
        total += len(out[-1])
    return out
