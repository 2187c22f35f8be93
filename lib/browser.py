"""Interactive exploration: the case browser (ipywidgets) and 3D previews of predicted masks.

* :class:`CaseBrowser` — pick a case, move three slice sliders (sagittal, coronal, axial),
  switch window presets (bone, soft tissue), toggle the label overlay and its opacity, see
  truth and prediction side by side with the case's per-vertebra Dice. It renders with
  matplotlib into an image widget, so it works offline in JupyterLab 4. Headless runs call
  :func:`save_view` to write the same view as a PNG.
* :func:`render_3d` — an offline 3D surface render of a label map (marching cubes, colours
  from :mod:`lib.labels`) saved as a picture.
* :func:`preview_3d` — itkwidgets (image + label image) in interactive sessions when asked
  for; its viewer loads from the internet and blocks later cells of the kernel after ``view()``
  (also under papermill), so it is imported lazily, never in headless runs, and an offline
  preview is shown beside it or instead of it.
"""

from __future__ import annotations

import io as _io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use(matplotlib.get_backend())  # keep whatever the session chose (Agg when headless)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from lib.core import labels as L  # noqa: E402
from lib.io import load_volume  # noqa: E402
from lib.metrics.overlap import dice_per_label  # noqa: E402

WINDOWS = {"bone": (400.0, 1800.0), "soft tissue": (40.0, 400.0), "wide": (0.0, 2500.0)}
"""Window presets as (level, width) in HU."""

PLANES = ("sagittal", "coronal", "axial")


@dataclass(frozen=True)
class CaseFiles:
    """One case for the browser: image, and optionally truth and prediction masks."""

    case_id: str
    image: Path
    truth: Path | None = None
    pred: Path | None = None


def _label_cmap() -> ListedColormap:
    return ListedColormap(L.colour_lut(28))


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
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; expected one of {list(WINDOWS)}")
    level, width = WINDOWS[window]
    pos = [s // 2 for s in image.shape] if position is None else [int(p) for p in position]
    rows = [("truth", truth), ("prediction", pred)] if (truth is not None or pred is not None) else [("image", None)]
    rows = [(n, m) for n, m in rows if m is not None] or [("image", None)]
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 4.2 * len(rows)), squeeze=False)
    cmap = _label_cmap()
    for r, (name, mask) in enumerate(rows):
        for c, plane in enumerate(PLANES):
            ax = axes[r][c]
            idx = pos[c]
            ax.imshow(_slice(image, plane, idx), cmap="gray", vmin=level - width / 2, vmax=level + width / 2,
                      aspect=_aspect(spacing, plane), interpolation="nearest")
            if overlay and mask is not None:
                m = _slice(mask, plane, idx).astype(np.int32)
                ax.imshow(np.ma.masked_equal(m, 0), cmap=cmap, vmin=0, vmax=28, alpha=opacity,
                          aspect=_aspect(spacing, plane), interpolation="nearest")
            ax.set_title(f"{name} — {plane} {idx}", fontsize=9)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _load_case(case: CaseFiles):
    img = load_volume(case.image)
    truth = load_volume(case.truth).array.astype(np.uint8) if case.truth and Path(case.truth).exists() else None
    pred = load_volume(case.pred).array.astype(np.uint8) if case.pred and Path(case.pred).exists() else None
    return img, truth, pred


def save_view(case: CaseFiles, path: str | Path, **kwargs) -> Path:
    """Headless twin of the browser: write the same view of one case as a PNG."""
    from lib.io import atomic_path

    img, truth, pred = _load_case(case)
    fig = render_view(img.array, img.spacing, truth, pred, title=case.case_id, **kwargs)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return Path(path)


class CaseBrowser:
    """ipywidgets case browser; display it as the last expression of a cell (``browser.widget``)."""

    def __init__(self, cases: Sequence[CaseFiles]):
        import ipywidgets as W

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
            self._cache = {cid: _load_case(self.cases[cid])}  # keep one case in memory
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
        from IPython.display import display

        display(self.widget)


def render_3d(mask: np.ndarray, spacing, path: str | Path, title: str = "", step: int = 1) -> Path:
    """Offline 3D surface render of a label map (one colour per vertebra) saved as PNG.

    Args:
        mask: uint8 labels, (x, y, z) RAS+.
        spacing: mm per axis.
        step: marching-cubes step size (larger = coarser, faster).
    """
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection
    from skimage.measure import marching_cubes

    from lib.io import atomic_path

    fig = plt.figure(figsize=(5, 7))
    ax = fig.add_subplot(111, projection="3d")
    lut = L.colour_lut(28)
    present = [int(v) for v in np.unique(mask) if v and int(v) in L.LABELS]
    for v in present:
        m = np.pad(mask == v, 1)
        if m.sum() < 8:
            continue
        verts, faces, _, _ = marching_cubes(m.astype(np.float32), 0.5, spacing=tuple(float(s) for s in spacing),
                                            step_size=step)
        ax.add_collection3d(Poly3DCollection(verts[faces], facecolors=lut[v][:3], edgecolor="none", shade=True))
    ext = np.array(mask.shape) * np.asarray(spacing, dtype=float)
    ax.set_xlim(0, ext[0])
    ax.set_ylim(0, ext[1])
    ax.set_zlim(0, ext[2])
    ax.set_box_aspect(ext)
    ax.view_init(elev=10, azim=-60)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return Path(path)


def preview_3d(case: CaseFiles, interactive: bool, use_itkwidgets: bool, offline_png: str | Path | None = None):
    """3D preview of a predicted mask.

    In an interactive session with ``use_itkwidgets`` (you are online: its viewer loads from the
    internet), returns an itkwidgets viewer of the image with the prediction as label image.
    Otherwise says why and returns the offline preview: the case browser when interactive,
    else a PNG written by :func:`render_3d` (its path).
    """
    if interactive and use_itkwidgets:
        # lazy: importing itkwidgets costs seconds and its viewer needs an online frontend
        from itkwidgets import view

        img, _, pred = _load_case(case)
        return view(image=np.ascontiguousarray(img.array), label_image=np.ascontiguousarray(pred))
    print("itkwidgets 3D viewer not used: it loads from the internet and blocks later cells under "
          "papermill (set use_itkwidgets=True in an online interactive session). Offline preview instead.")
    if interactive:
        return CaseBrowser([case])
    img, _, pred = _load_case(case)
    if pred is None:
        raise ValueError(f"{case.case_id}: no prediction to preview ({case.pred})")
    return render_3d(pred, img.spacing, offline_png or Path(f"{case.case_id}_3d.png"), title=case.case_id)
