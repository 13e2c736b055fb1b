"""The one policy for every file the project writes (checkpoints, conversations, tables, tensors).

* Nothing existing is overwritten, and nothing is written into a non-empty directory, without ``force``.
* A tool never writes into a checkpoint directory it reads (``protect``), even with ``force``.
* Writes go to a temporary name beside the target and are renamed into place, so an interrupted or
  failed write leaves the old file (or the old checkpoint) whole and no half-written file behind.
* ``force`` replaces a checkpoint directory as a whole (no stale shard survives), and only a directory
  that holds nothing but checkpoint files: ``--force`` never deletes someone's other work. Its notes
  (``README.md``, ``*.txt``) are carried into the new directory unless the writer wrote its own.
* Every filesystem failure is an :class:`OutputError` naming the path and what went wrong.

Call ``check_file`` / ``check_dir`` before any work starts, then ``write_file`` / ``write_dir``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["OutputError", "check_file", "check_dir", "write_file", "write_text", "write_dir", "CHECKPOINT_SUFFIXES"]

# What a checkpoint directory may hold and still be replaced as a whole by --force: its data, and notes
# (kept, see write_dir).
CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".model", ".py", ".jinja")
NOTE_SUFFIXES = (".md", ".txt")


class OutputError(ValueError):
    """An output path that cannot or may not be written (named, with the reason and the way out)."""


def _oserror(e: OSError, path: Path, doing: str) -> OutputError:
    return OutputError(f"{path}: cannot {doing} ({e.strerror or e})")


def _inside(path: Path, directories: Iterable[str | Path]) -> Path | None:
    target = path.resolve()
    for d in directories:
        d = Path(d).resolve()
        if target == d or d in target.parents:
            return d
    return None


def _writable_parent(path: Path, what: str) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{what} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: the directory {parent} is not writable")


def check_file(path: str | Path, *, force: bool = False, protect: Iterable[str | Path] = (), what: str = "output",
               allow_existing: bool = False) -> Path:
    """Refuse, before any work, a file that could not or should not be written.

    ``protect``: directories this tool reads (a checkpoint); ``allow_existing``: the file is known to be
    the caller's own (``chat --load c.json --save c.json`` continues one conversation).
    """
    path = Path(path)
    inside = _inside(path, protect)
    if inside is not None:
        raise OutputError(f"{what} {path}: is inside the checkpoint directory {inside}, which this tool reads; "
                          "write it somewhere else (never into a checkpoint, not even with --force)")
    if path.is_dir():
        raise OutputError(f"{what} {path}: is a directory; give a file name")
    if path.exists() and not (force or allow_existing):
        raise OutputError(f"{what} {path}: already exists (pass --force to replace it)")
    _writable_parent(path, what)
    return path


def _foreign(path: Path) -> list[str]:
    """Entries of ``path`` that are not checkpoint files (so --force may not delete them)."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                  if not (p.is_file() and p.suffix in CHECKPOINT_SUFFIXES + NOTE_SUFFIXES))


def check_dir(path: str | Path, *, force: bool = False, protect: Iterable[str | Path] = (),
              what: str = "output directory") -> Path:
    """Refuse, before any work, a directory that could not or should not be (re)written as a checkpoint."""
    path = Path(path)
    inside = _inside(path, protect)
    if inside is not None:
        raise OutputError(f"{what} {path}: is inside {inside}, which this tool reads")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path}: exists and is not a directory")
    if path.is_dir():
        try:
            entries = list(path.iterdir())
        except OSError as e:
            raise _oserror(e, path, "list the directory") from None
        if entries and not force:
            raise OutputError(f"{what} {path}: is not empty (pass --force to replace the checkpoint in it as a whole)")
        foreign = _foreign(path) if entries else []
        if foreign:
            raise OutputError(f"{what} {path}: holds files that are not a checkpoint's ({', '.join(foreign[:5])}); "
                              "--force only replaces a checkpoint directory, so move them or choose another path")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{what} {path}: the directory is not writable")
    parent = path.absolute().parent
    if not parent.exists():
        try:  # `make_tiny a/b/c` creates a/b, as mkdir -p would; a failure is named here, before any work
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _oserror(e, parent, "create the directory") from None
    _writable_parent(path.absolute(), what)
    return path


def write_file(path: str | Path, fill: Callable[[Path], None], *, force: bool = False,
               protect: Iterable[str | Path] = (), what: str = "output", allow_existing: bool = False) -> Path:
    """``fill(temporary path)`` writes the content; it is then renamed onto ``path`` (atomic on one filesystem)."""
    path = check_file(path, force=force, protect=protect, what=what, allow_existing=allow_existing)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _oserror(e, path.parent, "create a temporary file in") from None
    tmp = Path(name)
    try:
        fill(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; what we write is meant to be read by others
        os.replace(tmp, path)
    except OSError as e:
        raise _oserror(e, path, "write") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | Path, text: str, **kwargs) -> Path:
    """:func:`write_file` for UTF-8 text."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), **kwargs)


def write_dir(path: str | Path, fill: Callable[[Path], None], *, force: bool = False,
              protect: Iterable[str | Path] = (), what: str = "output directory") -> Path:
    """``fill(temporary directory)`` writes every file; the directory then replaces ``path`` as a whole.

    The old directory (if any, and only with ``force``) is renamed aside, the new one renamed into place,
    and the old one deleted last. A failure or Ctrl-C at any point puts the old directory back; only a
    process killed (SIGKILL, power) between the two renames leaves it in ``.NAME.*.old/previous`` beside.
    """
    path = check_dir(path, force=force, protect=protect, what=what).absolute()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _oserror(e, path.parent, "create a temporary directory in") from None
    old: Path | None = None
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        if path.is_dir():
            for note in path.iterdir():
                if note.suffix in NOTE_SUFFIXES and note.is_file() and not (tmp / note.name).exists():
                    shutil.copy2(note, tmp / note.name)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "previous")
        os.replace(tmp, path)
    except BaseException as e:
        if old is not None and (old / "previous").exists() and not path.exists():
            os.replace(old / "previous", path)  # put the old checkpoint back
        if isinstance(e, OSError):
            raise _oserror(e, path, "write the directory") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path
