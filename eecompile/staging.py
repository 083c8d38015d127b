"""Staging folders: where a compile (or lint) writes before anything is published, and how a
killed run's leftovers are recognised, finished or removed.

A staging folder is ``<parent>/<prefix>XXXXXXXX/`` holding a marker file
(:data:`MARKER`, JSON with the owner's pid and host) that the owning process keeps
``flock``-ed for its whole life. The kernel drops that lock when the process dies, however
it dies (SIGKILL included), so "the marker exists and its lock is free" means "left behind
by a dead eecompile" — no pid guessing, no timing.

A compile writes its artifacts into ``staging/new/`` and publishes them with
:func:`commit`: it first writes ``staging/COMMIT`` (atomically), then, artifact by artifact,
renames the old one into ``staging/old/`` and the new one into place. A run killed before
``COMMIT`` exists left the old compilation untouched (the staging folder is just removed);
a run killed after it is *rolled forward* by :func:`recover` (the remaining renames are
done), so the folder always ends with one compilation, complete — the old one or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: leftovers are never judged stale
    fcntl = None

MARKER = ".eecompile-staging"
COMMIT = "COMMIT"
NEW, OLD = "new", "old"
OUT_PREFIX = ".eecompile-"
LINT_PREFIX = "eecompile-lint-"
# what a staging folder of an eecompile without markers (<= 0.1.0) could hold
_LEGACY_NAMES = {"scratch.bin", "server", "client", "report.json", "report.md"}
_LEGACY_EMPTY_AGE_S = 60.0

Notice = Callable[[str], None]


def fault_point(name: str) -> None:
    """Test hook: ``EECOMPILE_FAULT=<name>:KILL`` (or ``:TERM``) signals this process at ``name``."""
    spec = os.environ.get("EECOMPILE_FAULT")
    if not spec:
        return
    point, _, sig = spec.partition(":")
    if point == name:
        os.kill(os.getpid(), signal.SIGTERM if sig.upper() == "TERM" else signal.SIGKILL)


class Staging:
    """A fresh staging folder under ``parent``, locked by this process until :meth:`close`."""

    def __init__(self, parent: str | Path, prefix: str, purpose: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent)).resolve()
        self._fd = os.open(self.path / MARKER, os.O_CREAT | os.O_RDWR, 0o600)
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        doc = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "purpose": purpose}
        os.write(self._fd, json.dumps(doc).encode())

    def close(self) -> None:
        """Remove the folder and release the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _human(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.0f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


def _probe(folder: Path) -> tuple[str, dict, int | None]:
    """("live" | "stale" | "foreign", marker document, fd holding the lock when stale)."""
    marker = folder / MARKER
    if not marker.is_file():
        names = {p.name for p in folder.iterdir()}
        if names and names <= _LEGACY_NAMES:
            return "stale", {}, None
        if not names and time.time() - folder.stat().st_mtime > _LEGACY_EMPTY_AGE_S:
            return "stale", {}, None
        return ("live" if not names else "foreign"), {}, None
    try:
        doc = json.loads(marker.read_text() or "{}")
    except (OSError, ValueError):
        doc = {}
    if fcntl is None:
        return "live", doc, None
    try:
        fd = os.open(marker, os.O_RDWR)
    except OSError:
        return "foreign", doc, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return "live", doc, None
    return "stale", doc, fd


def staging_folders(parent: Path, prefix: str) -> list[Path]:
    """The folders under ``parent`` named like staging folders."""
    try:
        return sorted(p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink())
    except (FileNotFoundError, NotADirectoryError):
        return []


def live_owner(parent: Path, prefix: str) -> dict | None:
    """The marker of a staging folder under ``parent`` whose owner is still running, if any."""
    for folder in staging_folders(parent, prefix):
        state, doc, fd = _probe(folder)
        if fd is not None:
            os.close(fd)
        if state == "live":
            return doc
    return None


def recover(parent: str | Path, prefix: str, names: Iterable[str] = (), notice: Notice | None = None,
            what: str = "compile") -> list[str]:
    """Finish or remove the staging folders that dead eecompile runs left under ``parent``.

    A folder whose ``COMMIT`` exists is rolled forward into ``parent`` (its remaining
    ``names`` renamed into place) before it is removed. Returns one line per folder,
    also passed to ``notice``.
    """
    parent = Path(parent)
    lines = []
    for folder in staging_folders(parent, prefix):
        state, doc, fd = _probe(folder)
        if state != "stale":
            continue
        try:
            who = f"pid {doc['pid']}" if "pid" in doc else "an older eecompile"
            size = _size(folder)
            if (folder / COMMIT).is_file():
                try:
                    recorded = json.loads((folder / COMMIT).read_text())["names"]
                except (OSError, ValueError, KeyError, TypeError):
                    recorded = list(names)
                _roll_forward(folder, parent, recorded)
                line = (f"finished the --force replacement that a killed {what} ({who}) had started in {parent}: "
                        "its new artifacts are complete in place")
            else:
                line = f"removed {folder} ({_human(size)}), left by a killed {what} ({who})"
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)
        lines.append(line)
        if notice is not None:
            notice(line)
    return lines


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif _exists(path):
        path.unlink()


def _roll_forward(staging: Path, out: Path, names: Iterable[str], hook: bool = False) -> None:
    new_dir, old_dir = staging / NEW, staging / OLD
    old_dir.mkdir(exist_ok=True)
    step = 0
    for name in names:
        new = new_dir / name
        if not _exists(new):
            continue  # already in place
        target, old = out / name, old_dir / name
        if _exists(target):
            if _exists(old):  # cannot happen with one committer; the target is then not the old one
                _remove(target)
            else:
                os.replace(target, old)
                step += 1
                if hook:
                    fault_point(f"commit-{step}")
        os.replace(new, target)
        step += 1
        if hook:
            fault_point(f"commit-{step}")


@contextmanager
def _signals_deferred():
    """SIGINT / SIGTERM wait until the block ends (the renames of a commit are not interrupted)."""
    block = getattr(signal, "pthread_sigmask", None)
    if block is None:  # pragma: no cover
        yield
        return
    previous = block(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        block(signal.SIG_SETMASK, previous)


def commit(staging: Path, out: Path, names: Iterable[str]) -> None:
    """Publish ``staging/new/<name>`` as ``out/<name>`` for every name (see the module docstring)."""
    names = list(names)
    with _signals_deferred():
        tmp = staging / (COMMIT + ".tmp")
        tmp.write_text(json.dumps({"names": names}) + "\n")
        os.replace(tmp, staging / COMMIT)
        fault_point("commit-0")
        _roll_forward(staging, out, names, hook=True)
        fault_point("committed")


def write_error_message(exc: OSError, path: str | Path) -> str:
    """One line naming the cause and the file of a failed write (numpy's short writes carry no errno)."""
    import errno

    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) or (code is None and "requested and" in str(exc)):
        return f"no space left on device while writing {path}"
    if code == errno.EFBIG:
        return f"file size limit exceeded while writing {path} (see 'ulimit -f')"
    return f"cannot write {path}: {exc.strerror or exc}"


@contextmanager
def writing(path: str | Path):
    """Turn an OSError raised while writing ``path`` into an :class:`OutputDirError` naming the file."""
    from eecompile.errors import OutputDirError

    try:
        yield
    except OSError as exc:
        raise OutputDirError(write_error_message(exc, path)) from None
