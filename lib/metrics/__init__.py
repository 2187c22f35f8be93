"""Segmentation metrics (layer 1), one file per family, pure functions on arrays with spacing in mm.

* :mod:`lib.metrics.overlap` - the one Dice (per label, mean over vertebrae);
* :mod:`lib.metrics.surface` - surface distances, HD95 (``pooled`` | ``max``), ASSD, NSD;
* :mod:`lib.metrics.centroids` - label centroids in world mm;
* :mod:`lib.metrics.identification` - VerSe identification rate and localisation error;
* :mod:`lib.metrics.case` - every metric of one case per label and for the binary spine;
* :mod:`lib.metrics.conventions` - row statuses (detected / missed / false positive), spine row.

Arrays are label maps of any integer (or bool) dtype, axes ``(x, y, z)`` as loaded by
:func:`lib.io.load_volume` (RAS+); spacing is mm per array axis.
"""

from lib.metrics.case import evaluate_case
from lib.metrics.centroids import CENTROID_METHODS, body_centroids_mm, centroids_mm
from lib.metrics.conventions import (
    DETECTED,
    FALSE_POSITIVE,
    METRIC_COLUMNS,
    MISSED,
    SPINE_LABEL,
    SPINE_NAME,
)
from lib.metrics.identification import (
    DEFAULT_IDENTIFICATION_RULE,
    IDENTIFICATION_MAX_DIST_MM,
    IDENTIFICATION_RULES,
    check_identification_rule,
    identification,
    identification_rate,
)
from lib.metrics.overlap import dice, dice_from_counts, dice_per_label, mean_vertebra_dice
from lib.metrics.surface import (
    DEFAULT_NSD_TOLERANCE_MM,
    HD95_DEFINITIONS,
    METHODS,
    assd_from_distances,
    check_hd95_definition,
    compare_masks,
    hd95_from_distances,
    nsd_from_distances,
    surface_distances,
    surface_voxels,
)

__all__ = [
    "CENTROID_METHODS", "DEFAULT_IDENTIFICATION_RULE", "DEFAULT_NSD_TOLERANCE_MM", "DETECTED", "FALSE_POSITIVE", "HD95_DEFINITIONS", "IDENTIFICATION_MAX_DIST_MM", "IDENTIFICATION_RULES", "check_identification_rule",
    "METHODS", "METRIC_COLUMNS", "MISSED", "SPINE_LABEL", "SPINE_NAME", "assd_from_distances",
    "body_centroids_mm", "centroids_mm", "check_hd95_definition", "compare_masks", "dice", "dice_from_counts", "dice_per_label",
    "evaluate_case", "hd95_from_distances", "identification", "identification_rate", "mean_vertebra_dice",
    "nsd_from_distances", "surface_distances", "surface_voxels",
]
