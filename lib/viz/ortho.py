"""Orthogonal views: sagittal, coronal and axial CT slices with label overlays.

Arrays are ``(x, y, z)`` in RAS+ voxel order with spacing in mm per axis; every function returns
a matplotlib ``Figure`` (never ``plt.show``), so headless runs save what an interactive session
would display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from lib.core import labels as L
from lib.io.integrity import load_mask
from lib.io.nifti import load_ct
from lib.viz.style import LABEL_VMAX, label_cmap, window_limits


def default_slices(mask: np.ndarray | None, shape: Sequence[int],
                   centroids_vox: Mapping[int, Sequence[float]] | None = None) -> tuple[int, int, int]:
    """Slice indices (x, y, z) through the spine: the mask's centre, else the volume centre."""
    if mask is not None and mask.any():
        fg = np.nonzero(mask)
        # sagittal through the median of the spine, coronal through the vertebral bodies
        x = int(np.median(fg[0]))
        y = int(np.percentile(fg[1], 70))
        z = int(np.median(fg[2]))
        return x, y, z
    return tuple(int(s // 2) for s in shape)


def plot_ortho(ct: np.ndarray, mask: np.ndarray | None, spacing: Sequence[float],
               centroids: Mapping[int, Sequence[float]] | None = None, title: str = "",
               window: str | tuple[float, float] = "bone", slices: Sequence[int] | None = None,
               alpha: float = 0.35, affine: np.ndarray | None = None, figsize_in: float = 11.0,
               plain_row: bool = True) -> Figure:
    """Sagittal, coronal and axial CT slices with the label overlay.

    Args:
        ct: CT in HU, (x, y, z) RAS+ voxel order.
        mask: label map of the same shape (or None).
        spacing: voxel size (mm) per array axis; used for the aspect ratio.
        centroids: {label: (x, y, z)} either voxel indices (when ``affine`` is None) or world
            mm (when ``affine`` is given); drawn as dots with the label name in the sagittal view.
        title: figure title.
        window: ``"bone"``, ``"soft"``, ``"lung"``, ``"wide"`` or a (centre, width) pair in HU.
        slices: (x, y, z) indices of the sagittal, coronal and axial planes; default through
            the spine (:func:`default_slices`).
        alpha: overlay opacity.
        affine: voxel -> world matrix, needed only for world-mm centroids.
        figsize_in: figure width in inches.
        plain_row: add a first row with the same slices without overlay, so the CT itself can
            be judged (the overlay hides the bone it labels).

    Returns:
        A matplotlib Figure with three panels in radiological convention: coronal and axial
        views show the patient's right on the image left; sagittal shows anterior on the
        left; superior is up in sagittal/coronal and anterior is up in the axial view.
    """
    ct = np.asarray(ct)
    if mask is not None and mask.shape != ct.shape:
        raise ValueError(f"mask shape {mask.shape} differs from CT shape {ct.shape}")
    sx, sy, sz = (float(s) for s in spacing)
    ix, iy, iz = slices if slices is not None else default_slices(mask, ct.shape)
    vmin, vmax = window_limits(window)
    cmap = label_cmap()
    # panels: arrays shown with imshow(origin="lower"): rows = vertical axis
    # sagittal (y horizontal, anterior to the left; z vertical), coronal (x horizontal, patient
    # right on the left; z vertical), axial (x horizontal, right on the left; y vertical, anterior up)
    sag = ct[ix, ::-1, :].T
    cor = ct[::-1, iy, :].T
    axi = ct[::-1, :, iz].T
    msag = mask[ix, ::-1, :].T if mask is not None else None
    mcor = mask[::-1, iy, :].T if mask is not None else None
    maxi = mask[::-1, :, iz].T if mask is not None else None
    nx, ny, nz = ct.shape
    ext_sag = (0, ny * sy, 0, nz * sz)
    ext_cor = (0, nx * sx, 0, nz * sz)
    ext_axi = (0, nx * sx, 0, ny * sy)
    widths = [ny * sy, nx * sx, nx * sx]
    heights = max(nz * sz, ny * sy)
    rows = 2 if (plain_row and mask is not None) else 1
    fig = plt.figure(figsize=(figsize_in, rows * figsize_in * heights / sum(widths) + 0.6))
    gs = fig.add_gridspec(rows, 3, width_ratios=widths, wspace=0.04, hspace=0.08)
    panels = [(sag, msag, ext_sag, f"sagittal x={ix}"), (cor, mcor, ext_cor, f"coronal y={iy}"),
              (axi, maxi, ext_axi, f"axial z={iz}")]
    for row in range(rows):
        overlay = row == rows - 1
        axes = [fig.add_subplot(gs[row, i]) for i in range(3)]
        for ax, (img, m, ext, name) in zip(axes, panels, strict=True):
            ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", extent=ext, interpolation="nearest")
            if overlay and m is not None and m.any():
                ax.imshow(np.ma.masked_equal(m, 0), cmap=cmap, vmin=0, vmax=LABEL_VMAX, alpha=alpha,
                          origin="lower", extent=ext, interpolation="nearest")
            ax.set_title(name + ("" if overlay or rows == 1 else " (CT only)"), fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("black")
    if centroids:
        inv = np.linalg.inv(affine) if affine is not None else None
        for lab, c in centroids.items():
            v = np.asarray(c, float)
            if inv is not None:
                v = (inv @ np.array([*v, 1.0]))[:3]
            # sagittal panel coordinates: horizontal = (ny-1-y)*sy, vertical = z*sz
            axes[0].plot((ny - 1 - v[1] + 0.5) * sy, (v[2] + 0.5) * sz, "o", ms=3, color="yellow")
            name = L.LABELS[int(lab)].name if int(lab) in L.LABELS else str(lab)
            axes[0].text((ny - 1 - v[1] + 0.5) * sy + 4, (v[2] + 0.5) * sz, name, color="yellow", fontsize=6,
                         va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_prediction(image_path: str | Path, truth_path: str | Path | None, pred_path: str | Path,
                    title: str = "", window: str | tuple[float, float] = "bone") -> Figure:
    """Sagittal and coronal slices through the spine: CT, truth and prediction side by side.

    Args:
        image_path, truth_path, pred_path: NIfTI files on the same grid (truth may be None).
        title: figure title.
        window: a :data:`lib.viz.style.WINDOWS` name or a (centre, width) pair in HU.

    Returns:
        A matplotlib Figure (save it with :func:`lib.viz.style.save_figure`).
    """
    ct = load_ct(image_path)
    pred = load_mask(pred_path).array
    truth = load_mask(truth_path).array if truth_path is not None else None
    ref = truth if truth is not None and truth.any() else pred
    ix, iy, _ = default_slices(ref, ct.shape)
    sx, sy, sz = ct.spacing
    lo, hi = window_limits(window)
    cmap = label_cmap()
    vmax = LABEL_VMAX
    cols = [("CT", None), ("truth", truth), ("prediction", pred)] if truth is not None else [("CT", None), ("prediction", pred)]
    fig, axes = plt.subplots(2, len(cols), figsize=(3.2 * len(cols), 9), squeeze=False)
    views = [(lambda a: a[ix, ::-1, :].T, (0, ct.shape[1] * sy, 0, ct.shape[2] * sz), f"sagittal x={ix}"),
             (lambda a: a[::-1, iy, :].T, (0, ct.shape[0] * sx, 0, ct.shape[2] * sz), f"coronal y={iy}")]
    for r, (cut, ext, vname) in enumerate(views):
        for c, (name, lab) in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(cut(ct.array), cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=ext, interpolation="nearest")
            if lab is not None and lab.any():
                ax.imshow(np.ma.masked_equal(cut(lab), 0), cmap=cmap, vmin=0, vmax=vmax, alpha=0.45, origin="lower",
                          extent=ext, interpolation="nearest")
            ax.set_title(f"{name}, {vname}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
