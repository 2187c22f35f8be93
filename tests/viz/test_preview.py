"""lib.viz.preview: headless runs get the offline render, never itkwidgets."""

from __future__ import annotations

from lib.viz import preview


def test_preview_3d_offline_when_headless(case, tmp_path, capsys):
    out = preview.preview_3d(case, interactive=False, use_itkwidgets=True, offline_png=tmp_path / "p.png")
    assert out == tmp_path / "p.png"
    assert out.exists()
    assert "itkwidgets 3D viewer not used" in capsys.readouterr().out
