"""Atomic file writes: a crash never leaves a partial file under a final name.

A file is written under a temporary name in the same folder, ``.NAME.tmp<pid>`` (hidden,
never the final name, on the same file system so the rename is atomic), flushed to disk
(fsync) and only then renamed over ``NAME`` with ``os.replace``. A reader therefore sees
either the old file or the whole new one. On any exception the temporary file is removed
and the old file is left untouched; after a SIGKILL the temporary may stay behind, and
cleaners match it by the pattern ``.NAME.tmp*`` (``remove_stale``).

Not for directories (``store.replace_dir``) or checkpoints (``tokenizer_train.model.checkpoint``,
keeps the previous one).
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def temp_path(path) -> Path:
    """The temporary name used for ``path``: ``.NAME.tmp<pid>`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _fsync(p: Path) -> None:
    with open(p, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; the caller writes the file there. On a clean
    exit it is fsynced and renamed to ``path``; on any exception it is removed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        if fsync and tmp.is_file():
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path, mode: str = "w", fsync: bool = True, **kwargs) -> Iterator[IO]:
    """``open`` the temporary file of ``path`` (write modes only); renamed on a clean exit."""
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_open: a write mode is needed, got {mode!r}")
    with atomic_path(path, fsync=False) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def atomic_write_text(path, text: str, encoding: str | None = None) -> Path:
    """Write ``text`` to ``path`` atomically (like ``Path.write_text``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_write_json(path, doc, indent: int = 1) -> Path:
    """Write ``doc`` as JSON (one trailing newline) to ``path`` atomically, creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(doc, indent=indent) + "\n")


def remove_stale(path) -> list[Path]:
    """Remove what killed writers of ``path`` left beside it: ``.NAME.tmp<pid>`` (an
    unfinished write) and ``.NAME.old<pid>`` (a replaced copy not yet deleted). They never
    carry the final name, so readers never see them; this only frees the space."""
    path = Path(path)
    gone = []
    for pat in (f".{path.name}.tmp*", f".{path.name}.old*"):
        for p in path.parent.glob(pat):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone
