"""Figures (layer 3): one style, ortho views, charts, galleries, 3D render, case browser, previews.

Every ``plot_*`` returns a matplotlib Figure; :func:`lib.viz.style.save_figure` is the only writer.
"""

from lib.viz.style import LABEL_VMAX, WINDOWS, label_cmap, save_figure, window_limits

__all__ = ["LABEL_VMAX", "WINDOWS", "label_cmap", "save_figure", "window_limits"]
