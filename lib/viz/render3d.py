"""Offline 3D surface render of a label map (marching cubes, colours from :mod:`lib.core.labels`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from mpl_toolkits.mplot3d.art3d import Poly3DCollection
from skimage.measure import marching_cubes

from lib.core import labels as L
from lib.viz.style import LABEL_VMAX


def plot_3d(mask: np.ndarray, spacing, title: str = "", step: int = 1) -> Figure:
    """Offline 3D surface render of a label map (one colour per vertebra).

    Args:
        mask: uint8 labels, (x, y, z) RAS+.
        spacing: mm per axis.
        step: marching-cubes step size (larger = coarser, faster).
    """
    fig = plt.figure(figsize=(5, 7))
    ax = fig.add_subplot(111, projection="3d")
    lut = L.colour_lut(LABEL_VMAX)
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
    return fig
