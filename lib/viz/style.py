"""One style for every figure: the CT window table, the label colormap, and the one PNG writer.

Arrays are ``(x, y, z)`` RAS+ (as :func:`lib.io.load_volume` returns them); label colours come
from :mod:`lib.core.labels`. Every ``plot_*`` of :mod:`lib.viz` returns a matplotlib Figure;
only :func:`save_figure` writes files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from lib.core import labels as L
from lib.io.atomic import atomic_path

WINDOWS: dict[str, tuple[float, float]] = {
    "bone": (400.0, 1800.0),  # centre, width (HU)
    "soft": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "wide": (300.0, 2500.0),
}
"""CT display windows as (centre, width) in HU: the one window table of the workspace."""

LABEL_VMAX = 28
"""Largest label value a label overlay maps (T13 = 28); pass ``vmin=0, vmax=LABEL_VMAX``."""


def window_limits(window: str | tuple[float, float] = "bone") -> tuple[float, float]:
    """``(vmin, vmax)`` in HU of a window name (:data:`WINDOWS`) or a (centre, width) pair."""
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"unknown window {window!r}; expected one of {list(WINDOWS)}")
        c, w = WINDOWS[window]
    else:
        c, w = window
    return c - w / 2, c + w / 2


def label_cmap(max_value: int = LABEL_VMAX) -> ListedColormap:
    """Colormap indexed by label value (0 and unknown transparent), from :mod:`lib.core.labels`."""
    return ListedColormap(L.colour_lut(max_value), name="spine1k_labels")


def spine_sagittal_index(mask: np.ndarray | None, shape: Sequence[int]) -> int:
    """Sagittal slice through the labelled spine: the median x of the voxels labelled > 0
    (the volume centre when the mask is empty or None)."""
    if mask is not None:
        xs = np.flatnonzero((np.asarray(mask) > 0).any(axis=(1, 2)))
        if xs.size:
            return int(np.median(xs))
    return int(shape[0]) // 2


def show_sagittal(ax, ct: np.ndarray, mask: np.ndarray | None, x: int, spacing: Sequence[float],
                  window: str | tuple[float, float] = "bone", alpha: float = 0.5) -> None:
    """Sagittal slice ``x`` of a CT (superior up, anterior right) with a label overlay, mm aspect."""
    _, sy, sz = (float(s) for s in spacing)
    vmin, vmax = window_limits(window)
    ax.imshow(np.rot90(ct[x]), cmap="gray", vmin=vmin, vmax=vmax, aspect=sz / sy)
    if mask is not None:
        ax.imshow(np.ma.masked_equal(np.rot90(mask[x]).astype(int), 0), cmap=label_cmap(), vmin=0, vmax=LABEL_VMAX,
                  alpha=alpha, aspect=sz / sy, interpolation="nearest")
    ax.axis("off")


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Save a figure atomically as PNG and close it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", facecolor="white", format="png")
    plt.close(fig)
    return path
