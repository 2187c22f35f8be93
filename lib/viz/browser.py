"""The case browser (ipywidgets): three slice sliders, window presets, truth beside prediction.

Pick a case, move the sagittal / coronal / axial sliders, switch windows (:data:`lib.viz.style.WINDOWS`),
toggle the label overlay and its opacity, and see the case's per-vertebra Dice. It renders with
matplotlib into an image widget, so it works offline in JupyterLab 4; headless runs call
:func:`save_view` to write the same view as a PNG.
"""

from __future__ import annotations

import io as _io
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from lib.core import labels as L
from lib.core.cases import Case
from lib.io.integrity import load_mask
from lib.io.nifti import load_ct
from lib.metrics.overlap import dice_per_label
from lib.viz.style import LABEL_VMAX, WINDOWS, label_cmap, save_figure, window_limits

PLANES = ("sagittal", "coronal", "axial")


def _slice(arr: np.ndarray, plane: str, index: int) -> np.ndarray:
    """A 2D slice of an (x, y, z) RAS+ array oriented for display (superior / anterior up)."""
    if plane == "sagittal":
        return np.rot90(arr[index, :, :])  # rows: z (S up), cols: y (A right)
    if plane == "coronal":
        return np.rot90(arr[:, index, :])  # rows: z, cols: x
    return np.rot90(arr[:, :, index])      # axial: rows y (A up), cols x


def _aspect(spacing, plane: str) -> float:
    sx, sy, sz = spacing
    return {"sagittal": sz / sy, "coronal": sz / sx, "axial": sy / sx}[plane]


def per_vertebra_dice(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Dice per vertebra present in the truth (name -> Dice), craniocaudal order."""
    present = L.ordered([int(v) for v in np.unique(truth) if v and int(v) in L.LABELS])
    d = dice_per_label(truth, pred, present)
    return {L.name(v): d.get(v, 0.0) for v in present}


def render_view(image: np.ndarray, spacing, truth: np.ndarray | None = None, pred: np.ndarray | None = None,
                position: Sequence[int] | None = None, window: str = "bone", overlay: bool = True,
                opacity: float = 0.45, title: str = "") -> plt.Figure:
    """Three planes through ``position`` for truth (top row) and prediction (bottom row).

    Args:
        image: CT in HU, (x, y, z) RAS+.
        spacing: voxel size in mm per axis.
        truth, pred: label maps on the same grid (either may be None).
        position: voxel (x, y, z) of the slices; default the centre.
        window: a key of :data:`WINDOWS`.
        overlay, opacity: label overlay on/off and its alpha.
    """
    vmin, vmax = window_limits(window)
    pos = [s // 2 for s in image.shape] if position is None else [int(p) for p in position]
    rows = [("truth", truth), ("prediction", pred)] if (truth is not None or pred is not None) else [("image", None)]
    rows = [(n, m) for n, m in rows if m is not None] or [("image", None)]
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 4.2 * len(rows)), squeeze=False)
    cmap = label_cmap()
    for r, (name, mask) in enumerate(rows):
        for c, plane in enumerate(PLANES):
            ax = axes[r][c]
            idx = pos[c]
            ax.imshow(_slice(image, plane, idx), cmap="gray", vmin=vmin, vmax=vmax,
                      aspect=_aspect(spacing, plane), interpolation="nearest")
            if overlay and mask is not None:
                m = _slice(mask, plane, idx).astype(np.int32)
                ax.imshow(np.ma.masked_equal(m, 0), cmap=cmap, vmin=0, vmax=LABEL_VMAX, alpha=opacity,
                          aspect=_aspect(spacing, plane), interpolation="nearest")
            ax.set_title(f"{name} — {plane} {idx}", fontsize=9)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def load_case(case: Case):
    """``(image Volume, truth uint8 or None, prediction uint8 or None)`` of a case (absent files: None)."""
    img = load_ct(case.image)
    truth = load_mask(case.mask).array.astype(np.uint8, copy=False) if case.mask and Path(case.mask).exists() else None
    pred = load_mask(case.prediction).array.astype(np.uint8, copy=False) if case.prediction and Path(case.prediction).exists() \
        else None
    return img, truth, pred


def save_view(case: Case, path: str | Path, **kwargs) -> Path:
    """Headless twin of the browser: write the same view of one case as a PNG."""
    img, truth, pred = load_case(case)
    return save_figure(render_view(img.array, img.spacing, truth, pred, title=case.case_id, **kwargs), path, dpi=90)


class CaseBrowser:
    """ipywidgets case browser; display it as the last expression of a cell (``browser.widget``)."""

    def __init__(self, cases: Sequence[Case]):
        import ipywidgets as W  # optional: interactive sessions only

        if not cases:
            raise ValueError("CaseBrowser needs at least one case")
        self.cases = {c.case_id: c for c in cases}
        self._cache: dict[str, tuple] = {}
        self.picker = W.Dropdown(options=list(self.cases), description="case")
        self.sliders = {p: W.IntSlider(description=p, continuous_update=False) for p in PLANES}
        self.window = W.ToggleButtons(options=list(WINDOWS), description="window")
        self.overlay = W.Checkbox(value=True, description="labels")
        self.opacity = W.FloatSlider(value=0.45, min=0.0, max=1.0, step=0.05, description="opacity",
                                     continuous_update=False)
        self.image = W.Image(format="png")
        self.dice = W.HTML()
        controls = W.VBox([self.picker, *self.sliders.values(), self.window, W.HBox([self.overlay, self.opacity])])
        self.widget = W.VBox([controls, self.image, self.dice])
        self.picker.observe(lambda _: self._on_case(), names="value")
        for w in (*self.sliders.values(), self.window, self.overlay, self.opacity):
            w.observe(lambda _: self.refresh(), names="value")
        self._on_case()

    def _get(self, cid):
        if cid not in self._cache:
            self._cache = {cid: load_case(self.cases[cid])}  # keep one case in memory
        return self._cache[cid]

    def _on_case(self) -> None:
        img, truth, pred = self._get(self.picker.value)
        self._updating = True
        for ax, p in enumerate(PLANES):
            s = self.sliders[p]
            s.max = img.shape[ax] - 1
            s.value = img.shape[ax] // 2
        self._updating = False
        if truth is not None and pred is not None:
            rows = "".join(f"<tr><td>{k}</td><td>{v:.3f}</td></tr>" for k, v in per_vertebra_dice(truth, pred).items())
            self.dice.value = f"<b>Dice per vertebra</b><table>{rows}</table>"
        else:
            self.dice.value = "<i>no truth/prediction pair for this case</i>"
        self.refresh()

    def refresh(self) -> None:
        if getattr(self, "_updating", False):
            return
        img, truth, pred = self._get(self.picker.value)
        fig = render_view(img.array, img.spacing, truth, pred, [self.sliders[p].value for p in PLANES],
                          self.window.value, self.overlay.value, self.opacity.value, title=self.picker.value)
        buf = _io.BytesIO()
        fig.savefig(buf, dpi=80, format="png")
        plt.close(fig)
        self.image.value = buf.getvalue()

    def _ipython_display_(self):
        from IPython.display import display  # optional: interactive sessions only

        display(self.widget)


