"""Content digests of files and folders, so that a stage knows when what it reads has changed.

``digest_tree(root, exclude=...)`` hashes every file under ``root`` (relative path, size and the
SHA-256 of its bytes, in sorted order). Reading GB-size CT folders on every ``make reproduce``
would be slow, so each file's SHA-256 is cached in a JSON file keyed by (absolute path, size,
mtime in ns): an unchanged file is not read again; a rewritten file is (and, if its bytes are the
same, gives the same digest: the digest is of content, never of time stamps). A file modified
within :data:`RACY_NS` of being hashed is not cached (a rewrite within the clock's tick could keep
its size and mtime), and entries of files that no longer exist are dropped when the cache is saved.

``digest_paths([...], cache_file)`` is the one-string form for several files and folders.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_BLOCK = 1 << 20
RACY_NS = 2 * 10**9
"""A file whose mtime is this close to the time it is hashed is hashed again next time."""

DEFAULT_EXCLUDE = (".stage.json", ".lock", ".previous", "__pycache__", ".digests.json", ".*.tmp", ".partial")
"""Never content: stage stamps, the run lock, set-aside outputs, byte code, the digest cache and
temporary files of atomic writes."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class DigestCache:
    """Per-file SHA-256 keyed by (path, size, mtime_ns), kept in a JSON file (atomic writes)."""

    path: Path | None = None
    entries: dict[str, list] = field(default_factory=dict)
    dirty: bool = False

    @classmethod
    def load(cls, path: str | Path | None) -> DigestCache:
        if path is None:
            return cls()
        p = Path(path)
        try:
            entries = json.loads(p.read_text())
        except (OSError, ValueError):
            entries = {}
        return cls(p, entries if isinstance(entries, dict) else {})

    def sha(self, f: Path) -> str:
        """The file's SHA-256: from the cache when its size and mtime are the recorded ones."""
        st = f.stat()
        key = str(f.resolve())
        hit = self.entries.get(key)
        if isinstance(hit, list) and len(hit) == 3 and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        sha = file_sha256(f)
        if time.time_ns() - st.st_mtime_ns > RACY_NS:
            self.entries[key] = [st.st_size, st.st_mtime_ns, sha]
            self.dirty = True
        elif self.entries.pop(key, None) is not None:
            self.dirty = True
        return sha

    def save(self) -> None:
        """Write the cache (atomically), without the entries of files that no longer exist."""
        if self.path is None:
            return
        gone = [k for k in self.entries if not os.path.exists(k)]
        for k in gone:
            del self.entries[k]
        if self.dirty or gone:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)  # atomic: a reader sees the old cache or the new one
            self.dirty = False


def _excluded(rel: str, exclude: Iterable[str]) -> bool:
    parts = rel.split("/")
    return any(fnmatch.fnmatch(rel, pat) or any(fnmatch.fnmatch(p, pat) for p in parts) for pat in exclude)


def tree_files(root: Path, exclude: Iterable[str] = ()) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of every file under ``root`` (sorted), without the excluded ones:
    a pattern matches the relative path or any of its parts (``cache`` drops a ``cache/`` folder).
    Linked folders are followed (downloads are often linked in), each real folder once."""
    exclude = list(exclude)
    if root.is_file():
        return [(root.name, root)]
    out = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        base = Path(dirpath)
        st = base.stat()
        if (st.st_dev, st.st_ino) in seen:  # a link back up the tree: walked already
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        prefix = "" if base == root else base.relative_to(root).as_posix() + "/"
        dirnames[:] = sorted(d for d in dirnames if not _excluded(prefix + d, exclude))
        for name in sorted(filenames):
            rel = prefix + name
            if not _excluded(rel, exclude) and (base / name).is_file():
                out.append((rel, base / name))
    return sorted(out)


def digest_tree(root: str | Path, exclude: Iterable[str] = (), cache: DigestCache | None = None) -> dict:
    """``{"digest": sha256, "files": n, "by_file": {rel: sha}}`` of the content under ``root``
    (``"digest": "missing"`` when it does not exist)."""
    root = Path(root)
    if not root.exists():
        return {"digest": "missing", "files": 0, "by_file": {}}
    cache = cache or DigestCache()
    by_file = {rel: cache.sha(p) for rel, p in tree_files(root, exclude)}
    h = hashlib.sha256()
    for rel, sha in by_file.items():
        h.update(f"{rel}\0{sha}\n".encode())
    return {"digest": h.hexdigest(), "files": len(by_file), "by_file": by_file}


def digest_paths(paths: Iterable[str | Path], cache_file: str | Path | None = None,
                 exclude: Iterable[str] = DEFAULT_EXCLUDE) -> str:
    """One SHA-256 of the content of several files and folders (any order; a missing one counts).

    Each path contributes its name and :func:`digest_tree` digest, so a moved workspace keeps its
    digests. ``cache_file``: the per-file cache (:class:`DigestCache`), read and saved here.
    """
    cache = DigestCache.load(cache_file)
    exclude = tuple(exclude)
    parts = sorted((Path(p).name, str(p), digest_tree(p, exclude, cache)["digest"]) for p in paths)
    cache.save()
    h = hashlib.sha256()
    for name, _, dig in parts:
        h.update(f"{name}\0{dig}\n".encode())
    return h.hexdigest()


def files_differing(a: dict, b: dict) -> int:
    """How many files differ between two :func:`digest_tree` results (added, removed or changed)."""
    fa, fb = a.get("by_file", {}), b.get("by_file", {})
    return sum(fa.get(k) != fb.get(k) for k in set(fa) | set(fb))
