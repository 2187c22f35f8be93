"""lib.core.digest: content digests of folders, identical for identical bytes, cached by size and mtime."""

from __future__ import annotations

import json
import os
import time

import pytest

from lib.core import digest
from lib.core.digest import DigestCache, digest_paths, digest_tree, files_differing

_OLD = time.time_ns() - 3600 * 10**9  # an hour ago: past the racy window, so the cache keeps it


def _tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.nii.gz").write_bytes(b"\x00\x01\x02" * 100)
    (root / "sub" / "b.csv").write_text("case_id,x\n1,2\n")
    (root / ".stage.json").write_text('{"finished": "now"}')
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "m.pyc").write_bytes(b"pyc")
    for f in (root / "a.nii.gz", root / "sub" / "b.csv"):
        os.utime(f, ns=(_OLD, _OLD))
    return root


def test_same_bytes_rewritten_give_the_same_digest_one_byte_changes_it(tmp_path):
    root = _tree(tmp_path / "d")
    first = digest_paths([root])
    (root / "a.nii.gz").write_bytes(b"\x00\x01\x02" * 100)  # same bytes, new mtime
    assert digest_paths([root]) == first
    (root / "a.nii.gz").write_bytes(b"\x00\x01\x03" + b"\x00\x01\x02" * 99)  # one byte
    assert digest_paths([root]) != first


def test_a_moved_folder_keeps_its_digest_a_renamed_file_does_not(tmp_path):
    root = _tree(tmp_path / "d")
    first = digest_paths([root])
    moved = tmp_path / "elsewhere" / "d"
    moved.parent.mkdir()
    root.rename(moved)
    assert digest_paths([moved]) == first  # relative paths: the workspace may move
    (moved / "sub" / "b.csv").rename(moved / "sub" / "c.csv")
    assert digest_paths([moved]) != first


def test_stamps_locks_caches_and_previous_outputs_are_left_out(tmp_path):
    root = _tree(tmp_path / "d")
    first = digest_paths([root])
    (root / ".stage.json").write_text('{"finished": "later"}')
    (root / ".lock").write_text('{"pid": 1}')
    (root / ".previous").mkdir()
    (root / ".previous" / "old.csv").write_text("old")
    (root / "__pycache__" / "m.pyc").write_bytes(b"other")
    assert digest_paths([root]) == first
    assert sorted(digest_tree(root, digest.DEFAULT_EXCLUDE)["by_file"]) == ["a.nii.gz", "sub/b.csv"]


def test_several_paths_any_order_and_a_missing_one(tmp_path):
    a, b = _tree(tmp_path / "a"), tmp_path / "b.txt"
    b.write_text("b")
    assert digest_paths([a, b]) == digest_paths([b, a])
    assert digest_paths([a, b]) != digest_paths([a])
    assert digest_paths([a, tmp_path / "gone"]) != digest_paths([a])  # a missing input counts
    assert digest_tree(tmp_path / "gone")["digest"] == "missing"


def test_the_cache_spares_rereading_unchanged_files_and_is_written_atomically(tmp_path, monkeypatch):
    root = _tree(tmp_path / "d")
    cache_file = tmp_path / "runs" / ".digests.json"
    reads: list[str] = []
    real = digest.file_sha256
    monkeypatch.setattr(digest, "file_sha256", lambda p: reads.append(os.path.basename(p)) or real(p))
    first = digest_paths([root], cache_file=cache_file)
    assert sorted(reads) == ["a.nii.gz", "b.csv"]
    assert set(json.loads(cache_file.read_text())) == {str((root / "a.nii.gz").resolve()),
                                                       str((root / "sub" / "b.csv").resolve())}
    assert not list(cache_file.parent.glob("*.tmp"))
    reads.clear()
    assert digest_paths([root], cache_file=cache_file) == first
    assert reads == []  # size and mtime unchanged: nothing read
    (root / "sub" / "b.csv").write_text("case_id,x\n1,3\n")  # same size, new mtime
    assert digest_paths([root], cache_file=cache_file) != first
    assert reads == ["b.csv"]


def test_a_file_written_just_now_is_not_trusted_to_the_cache(tmp_path, monkeypatch):
    f = tmp_path / "fresh.txt"
    f.write_text("abc")  # mtime = now: a rewrite within the clock's tick would keep size and mtime
    cache = DigestCache()
    cache.sha(f)
    assert str(f.resolve()) not in cache.entries
    os.utime(f, ns=(_OLD, _OLD))
    cache.sha(f)
    assert str(f.resolve()) in cache.entries


def test_entries_of_deleted_files_are_pruned_and_a_broken_cache_file_is_ignored(tmp_path):
    root = _tree(tmp_path / "d")
    cache_file = tmp_path / ".digests.json"
    digest_paths([root], cache_file=cache_file)
    (root / "a.nii.gz").unlink()
    digest_paths([root], cache_file=cache_file)
    assert list(json.loads(cache_file.read_text())) == [str((root / "sub" / "b.csv").resolve())]
    cache_file.write_text("{not json")
    assert digest_paths([root], cache_file=cache_file) == digest_paths([root])


def test_files_differing_counts_added_removed_and_changed(tmp_path):
    root = _tree(tmp_path / "d")
    before = digest_tree(root, digest.DEFAULT_EXCLUDE)
    (root / "a.nii.gz").write_bytes(b"x")
    (root / "new.txt").write_text("n")
    (root / "sub" / "b.csv").unlink()
    after = digest_tree(root, digest.DEFAULT_EXCLUDE)
    assert files_differing(before, after) == 3
    assert files_differing(after, after) == 0


@pytest.mark.parametrize("pattern", ["cache", "*.ipynb"])
def test_pipeline_style_exclusions_drop_a_folder_or_a_suffix(tmp_path, pattern):
    root = _tree(tmp_path / "d")
    (root / "cache").mkdir()
    (root / "cache" / "k.npz").write_bytes(b"k")
    (root / "01_x.ipynb").write_text("{}")
    files = digest_tree(root, (*digest.DEFAULT_EXCLUDE, pattern))["by_file"]
    assert ("cache/k.npz" in files) == (pattern != "cache")
    assert ("01_x.ipynb" in files) == (pattern != "*.ipynb")


def test_dot_folders_keep_their_names_and_linked_folders_are_followed_once(tmp_path):
    root = _tree(tmp_path / "d")
    (root / ".partial").mkdir()
    (root / ".partial" / "x.tmp").write_text("half")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "h.txt").write_text("h")
    outside = tmp_path / "download"
    outside.mkdir()
    (outside / "ct.nii.gz").write_bytes(b"ct")
    (root / "linked").symlink_to(outside)
    (outside / "loop").symlink_to(tmp_path)  # a cycle back up: walked once, never forever
    files = sorted(digest_tree(root, digest.DEFAULT_EXCLUDE)["by_file"])
    assert files[:3] == [".hidden/h.txt", "a.nii.gz", "linked/ct.nii.gz"]
    assert ".partial/x.tmp" not in files
    before = digest_paths([root])
    (outside / "ct.nii.gz").write_bytes(b"CT")
    assert digest_paths([root]) != before
