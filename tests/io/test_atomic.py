"""lib.io.atomic: a failed or killed write leaves nothing a reader would pick up."""

from __future__ import annotations

import pytest

from lib import io


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    io.write_text(target, "old\n")

    def killed_mid_write():
        with io.atomic_write(target, "w") as fh:
            fh.write("partial")
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        killed_mid_write()
    assert target.read_text() == "old\n"
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]


def test_a_killed_write_leaves_no_nifti_in_the_folder(tmp_path):
    """A temporary file left by a killed run is never picked up by a glob of the folder."""
    target = tmp_path / "liver_001.nii.gz"
    ctx = io.atomic_path(target)
    tmp = ctx.__enter__()  # as if the process died here
    tmp.write_bytes(b"partial")
    assert list(tmp_path.glob("*.nii.gz")) == []
    assert tmp.parent.name == io.PARTIAL_DIR
    assert tmp.name.endswith(".nii.gz")
