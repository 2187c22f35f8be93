"""3D previews of predicted masks: itkwidgets when asked for in an online interactive session,
an offline view otherwise (the case browser when interactive, a saved render when headless).

itkwidgets' viewer loads from the internet and, after ``view()``, blocks later cells of the kernel
(also under papermill): it is imported lazily and never used in headless runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lib.core.cases import Case
from lib.viz.browser import CaseBrowser, load_case
from lib.viz.render3d import plot_3d
from lib.viz.style import save_figure


def preview_3d(case: Case, interactive: bool, use_itkwidgets: bool, offline_png: str | Path | None = None):
    """3D preview of a predicted mask.

    In an interactive session with ``use_itkwidgets`` (you are online: its viewer loads from the
    internet), returns an itkwidgets viewer of the image with the prediction as label image.
    Otherwise says why and returns the offline preview: the case browser when interactive,
    else a PNG written by :func:`render_3d` (its path).
    """
    if interactive and use_itkwidgets:
        from itkwidgets import view  # optional heavy dependency (online viewer)

        img, _, pred = load_case(case)
        return view(image=np.ascontiguousarray(img.array), label_image=np.ascontiguousarray(pred))
    print("itkwidgets 3D viewer not used: it loads from the internet and blocks later cells under "
          "papermill (set use_itkwidgets=True in an online interactive session). Offline preview instead.")
    if interactive:
        return CaseBrowser([case])
    img, _, pred = load_case(case)
    if pred is None:
        raise ValueError(f"{case.case_id}: no prediction to preview ({case.pred})")
    return save_figure(plot_3d(pred, img.spacing, title=case.case_id), offline_png or Path(f"{case.case_id}_3d.png"), dpi=90)
