"""lib.viz.browser: the case browser's view changes with its controls; the headless view and the 3D render."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lib.core import labels as L
from lib.viz import browser, render3d
from lib.viz.style import save_figure
from tests.helpers.spines import SHAPE, spine_mask


def test_browser_view_changes_with_slider_window_and_overlay(case):
    b = browser.CaseBrowser([case])
    assert b.sliders["axial"].max == SHAPE[2] - 1
    first = b.image.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    b.sliders["axial"].value = 5
    moved = b.image.value
    assert moved != first
    b.window.value = "soft"
    assert b.image.value != moved
    off = b.image.value
    b.overlay.value = False
    assert b.image.value != off
    assert "T12" in b.dice.value
    assert "0.000" in b.dice.value
    assert "L5" in b.dice.value


def test_per_vertebra_dice_in_craniocaudal_order(case):
    from lib.io import load_volume

    t = load_volume(case.mask).array
    p = load_volume(case.prediction).array
    d = browser.per_vertebra_dice(t, p)
    assert list(d) == ["T12", "L1", "L2", "L3", "L4", "L5"]
    assert d["T12"] == 0.0
    assert d["L3"] == 1.0


def test_headless_view_and_3d_render(case, tmp_path):
    png = browser.save_view(case, tmp_path / "view.png", window="bone")
    im = np.asarray(Image.open(png).convert("RGB"))
    assert im.shape[0] > 100
    assert im.std() > 10
    r3 = save_figure(render3d.plot_3d(spine_mask([24, 23, 22]), (2.0, 2.0, 2.0)), tmp_path / "r3.png", dpi=90)
    im3 = np.asarray(Image.open(r3).convert("RGB")).astype(int)
    # label colours appear in the render
    l4 = np.array(L.LABELS[23].rgb)
    assert (np.abs(im3 - l4).sum(axis=2) < 120).sum() > 50
