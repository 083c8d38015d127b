"""Real English text shipped by Debian packages, for training and measuring small language models.

Nothing here is downloaded at run time: every corpus is read from files that a Debian
package installs.  Available names (:data:`CORPORA`):

``"kjv"``
    The King James Bible (1611, public domain), 31,102 verses, about 4.3 MB of ASCII
    text.  Shipped compressed by ``bible-kjv-text`` (``/usr/lib/bible.data``) and read
    with the ``bible`` program from ``bible-kjv`` (``apt-get install -y bible-kjv``
    installs both).  Layout: one chapter per document, one verse per line, verse
    references removed; documents are separated by one blank line.

``"fortunes"``
    The BSD ``fortune`` cookie files shipped by ``fortunes`` + ``fortunes-min``
    (``/usr/share/games/fortunes``; jokes, quotations, definitions, computing folklore;
    about 2.5 MB).  ``ascii-art`` and the mostly non-English ``translate-me`` are left out.
    Layout: one fortune per document (internal blank lines removed, tabs expanded);
    documents are separated by one blank line.  Disjoint in style and vocabulary from
    ``"kjv"``: use it as out-of-distribution text (traffic, n-gram statistics).

Every corpus text consists of *documents* separated by exactly one blank line
(``"\\n\\n"``), and no document contains a blank line, so :func:`split_corpus` can split
on document boundaries.  Texts are deterministic for a given installed package version.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

from ..errors import EECompileError

CORPORA: dict[str, str] = {
    "kjv": "King James Bible (public domain), Debian packages bible-kjv-text + bible-kjv",
    "fortunes": "BSD fortune cookie files, Debian packages fortunes + fortunes-min",
}
"""Corpus name -> one-line description."""

INSTALL_COMMANDS: dict[str, str] = {
    "kjv": "apt-get install -y bible-kjv",
    "fortunes": "apt-get install -y fortunes",
}
"""Corpus name -> the command that installs the Debian package(s) it is read from."""

KJV_DATA = Path("/usr/lib/bible.data")
"""The compressed KJV text installed by ``bible-kjv-text``."""

FORTUNES_DIR = Path("/usr/share/games/fortunes")
"""Directory of the fortune cookie files installed by ``fortunes`` / ``fortunes-min``."""

_FORTUNES_EXCLUDE = frozenset({"ascii-art", "translate-me"})
_KJV_LINE = re.compile(r"^(\S+?)(\d+):(\d+) (.*)$")


class CorpusNotInstalledError(EECompileError, FileNotFoundError):
    """The Debian package that ships a corpus is not installed; the message names the fix."""


def _check_name(name: str) -> None:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {', '.join(CORPORA)}")


def _missing(name: str, what: str) -> CorpusNotInstalledError:
    return CorpusNotInstalledError(
        f"corpus {name!r} needs {what}; install it with: {INSTALL_COMMANDS[name]}"
    )


def corpus_available(name: str = "kjv") -> bool:
    """Whether the Debian package(s) of corpus ``name`` are installed (nothing is read)."""
    _check_name(name)
    if name == "kjv":
        return KJV_DATA.is_file() and shutil.which("bible") is not None
    return any(p.is_file() for p in _fortune_files())


def _fortune_files() -> list[Path]:
    if not FORTUNES_DIR.is_dir():
        return []
    files = []
    for p in sorted(FORTUNES_DIR.iterdir()):
        # cookie files have no suffix; skip the .dat indexes and the .u8 symlinks
        if p.suffix or p.is_symlink() or not p.is_file() or p.name in _FORTUNES_EXCLUDE:
            continue
        files.append(p)
    return files


def _read_kjv() -> str:
    if not KJV_DATA.is_file():
        raise _missing("kjv", f"{KJV_DATA} (Debian package bible-kjv-text)")
    exe = shutil.which("bible")
    if exe is None:
        raise _missing("kjv", "the 'bible' program (Debian package bible-kjv)")
    # -f turns pretty-printing off: one "Ge1:1 text" line per verse, no line wrapping
    proc = subprocess.run(
        [exe, "-f", "-p", str(KJV_DATA.parent), "Gen1:1-Rev22:21"],
        capture_output=True, check=False, cwd="/", env={**os.environ, "LC_ALL": "C"},
    )
    if proc.returncode != 0:
        raise EECompileError(f"'bible' failed ({proc.returncode}): {proc.stderr.decode(errors='replace').strip()}")
    chapters: list[list[str]] = []
    last: tuple[str, str] | None = None
    for line in proc.stdout.decode("ascii", errors="replace").splitlines():
        m = _KJV_LINE.match(line)
        if m is None:
            continue
        book, chapter, _verse, text = m.groups()
        if (book, chapter) != last:
            chapters.append([])
            last = (book, chapter)
        chapters[-1].append(" ".join(text.split()))
    n_verses = sum(len(c) for c in chapters)
    if n_verses != 31102:
        raise EECompileError(f"expected 31102 KJV verses from {KJV_DATA}, got {n_verses}")
    return "\n\n".join("\n".join(c) for c in chapters) + "\n"


def _read_fortunes() -> str:
    files = _fortune_files()
    if not files:
        raise _missing("fortunes", f"the cookie files in {FORTUNES_DIR} (Debian package fortunes)")
    docs: list[str] = []
    for path in files:
        raw = path.read_bytes().decode("utf-8", errors="replace")
        for cookie in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
            lines = [ln.expandtabs(8).rstrip() for ln in cookie.splitlines()]
            lines = [ln for ln in lines if ln.strip()]
            if lines:
                docs.append("\n".join(lines))
    return "\n\n".join(docs) + "\n"


@functools.lru_cache(maxsize=4)
def load_corpus(name: str = "kjv") -> str:
    """The full text of corpus ``name`` (see :data:`CORPORA` and the module docstring).

    Raises :class:`CorpusNotInstalledError` (an :class:`~eecompile.errors.EECompileError`
    and a :class:`FileNotFoundError`) naming the ``apt-get install`` command when the
    Debian package is missing, and ``ValueError`` for an unknown name.
    """
    _check_name(name)
    return _read_kjv() if name == "kjv" else _read_fortunes()


def corpus_path(name: str = "kjv", cache_dir: str | Path | None = None) -> Path:
    """A UTF-8 plain-text file whose content is exactly ``load_corpus(name)``.

    The text is written once into ``cache_dir`` (default ``$EECOMPILE_CACHE`` or
    ``$XDG_CACHE_HOME/eecompile`` or ``~/.cache/eecompile``, subfolder ``corpus``) under a
    name that includes a digest of the text, so a package upgrade gives a new file.
    """
    text = load_corpus(name)
    if cache_dir is None:
        base = os.environ.get("EECOMPILE_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "eecompile"
        )
        cache_dir = Path(base) / "corpus"
    cache_dir = Path(cache_dir)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    path = cache_dir / f"{name}-{digest}.txt"
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path


def corpus_documents(text: str) -> list[str]:
    """The documents of a corpus text (separated by blank lines), empty ones dropped."""
    return [d.strip("\n") for d in re.split(r"\n[ \t]*\n", text) if d.strip()]


def split_corpus(text: str, heldout_fraction: float = 0.05) -> tuple[str, str]:
    """Deterministic ``(train, heldout)`` split of ``text`` on document boundaries.

    Document ``i`` (0-based) of ``n`` goes to held-out iff
    ``floor((i + 1) * f) > floor(i * f)``, i.e. every ``1/f``-th document, spread evenly
    over the whole text (so held-out chapters come from every book, not just the last).
    Both parts keep the corpus layout (documents joined by one blank line).
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    docs = corpus_documents(text)
    if len(docs) < 2:
        raise ValueError("the text has fewer than two documents (blank-line separated); cannot split")
    frac = Fraction(heldout_fraction).limit_denominator(10**6)  # exact arithmetic, no float drift
    train: list[str] = []
    heldout: list[str] = []
    for i, doc in enumerate(docs):
        if (i + 1) * frac // 1 > i * frac // 1:
            heldout.append(doc)
        else:
            train.append(doc)
    if not heldout or not train:
        raise ValueError(f"heldout_fraction {heldout_fraction} leaves one side empty for {len(docs)} documents")
    return "\n\n".join(train) + "\n", "\n\n".join(heldout) + "\n"


__all__ = [
    "CORPORA",
    "INSTALL_COMMANDS",
    "CorpusNotInstalledError",
    "corpus_available",
    "corpus_documents",
    "corpus_path",
    "load_corpus",
    "split_corpus",
]
