"""Atomic writes: every output appears whole or not at all.

A write goes to a temporary file in a hidden ``.partial/`` folder beside its destination and
is renamed into place when complete, so a reader (or a ``glob("*.nii.gz")`` of the folder)
never sees a half-written file, and a run killed mid-write leaves the old file untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_MULTI_SUFFIXES = (".nii.gz", ".nii", ".tar.gz")


def _full_suffix(path: Path) -> str:
    name = path.name
    for suf in _MULTI_SUFFIXES:
        if name.endswith(suf):
            return suf
    return path.suffix


PARTIAL_DIR = ".partial"
"""Hidden folder beside each output where temporary files live until they are renamed into
place, so a killed run leaves nothing that a ``glob("*.nii.gz")`` of the folder would pick up."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path (same suffix) to write; rename it to ``path`` on success.

    The temporary file lives in ``<folder>/.partial/``; on an exception it is removed and
    ``path`` is left as it was, so a reader never sees a half-written file.
    """
    path = Path(path)
    tmp_dir = path.parent / PARTIAL_DIR
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp" + _full_suffix(path), dir=tmp_dir)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp_dir.rmdir()  # only when empty (other writers may be busy in it)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **kwargs):
    """Open a temporary file for writing and rename it to ``path`` when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file (UTF-8)."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)



def move_atomic(src: Path, dst: Path) -> None:
    """Move a file into place atomically (rename; across file systems: copy to a temporary
    file beside ``dst``, rename, then remove ``src``)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        src.unlink()


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link ``src`` at ``dst`` (same file system), else an atomic copy; skip when ``dst``
    already holds the same bytes (same size and mtime, or the same inode)."""
    if dst.exists():
        a, b = src.stat(), dst.stat()
        if (a.st_ino == b.st_ino and a.st_dev == b.st_dev) or (a.st_size == b.st_size and int(a.st_mtime) <= int(b.st_mtime)):
            return
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
