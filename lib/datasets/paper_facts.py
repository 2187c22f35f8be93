"""Facts from the papers (DESIGN §6), the one place tables and reports read them from.

CTSpine1K (Deng et al.): Table 1 per source and split, labelled-vertebra totals, the variants;
Table 2 (nnU-Net 3d_fullres): only the cells DESIGN quotes. VerSe 2020 (Liebl et al.): variant
counts of the thoracic and lumbar spine.
"""

from __future__ import annotations

from typing import Any

PAPER_SPLIT_COUNTS: dict[str, dict[str, int]] = {
    "COLONOG": {"trainset": 480, "test_public": 152, "test_private": 152},
    "HNSCC": {"trainset": 20, "test_public": 5, "test_private": 6},
    "MSD_T10": {"trainset": 90, "test_public": 30, "test_private": 30},
    "COVID19": {"trainset": 20, "test_public": 10, "test_private": 10},
}
"""CTSpine1K Table 1: patients per source and split (total 610 / 197 / 198)."""


PAPER_TABLE1: dict[str, dict[str, Any]] = {
    "COLONOG": {"patients": 784, "spacing_mm": (0.75, 0.75, 0.81), "size": (512, 512, 542)},
    "HNSCC": {"patients": 31, "spacing_mm": (1.09, 1.09, 2.0), "size": (512, 512, 202)},
    "MSD_T10": {"patients": 150, "spacing_mm": (0.77, 0.77, 1.55), "size": (512, 512, 478)},
    "COVID19": {"patients": 40, "spacing_mm": (0.79, 0.79, 4.5), "size": (512, 512, 93)},
    "VerSe": {"patients": 300, "spacing_mm": (0.81, 0.81, 0.88), "size": None},
}
"""CTSpine1K Table 1 per source: patients, mean spacing (x, y, z) mm, mean matrix size."""


PAPER_TOTALS = {"patients": 1005, "vertebrae": 11172, "cervical": 419, "thoracic": 5942, "lumbar": 4712,
                "L6_cases": 17, "sacralization_cases": 11}
"""Paper totals: labelled vertebrae by region, sacral lumbarization (L6) and lumbar sacralization."""


PAPER_VARIANTS = {
    "CTSpine1K": dict(cases=1005, sacral_lumbarization_L6=17, lumbar_sacralization_L5_missing=11),
    "VerSe2020_lumbar": {4: 3, 5: 165, 6: 85},
    "VerSe2020_thoracic": {11: 8, 12: 131, 13: 6},
}
"""Variant rates reported by the papers."""

MEAN_OF_VERTEBRAE = "Mean of Vertebrae"
MEAN_OF_SPINE = "Mean of Spine"

PAPER_TABLE2: dict[str, dict[str, dict[str, float]]] = {
    "Test_public": {MEAN_OF_VERTEBRAE: {"DSC": 0.869, "HD95": 5.40},
                    MEAN_OF_SPINE: {"DSC": 0.985, "HD95": 1.0},
                    "L6": {"DSC": 0.0, "HD95": 66.21}, "C5": {"DSC": 0.573}},
    "Test_private": {MEAN_OF_VERTEBRAE: {"DSC": 0.840, "HD95": 6.41},
                     MEAN_OF_SPINE: {"DSC": 0.984, "HD95": 1.0},
                     "L6": {"DSC": 0.0, "HD95": 80.33}, "C4": {"DSC": 0.608}},
    "Test_VerSe": {MEAN_OF_VERTEBRAE: {"DSC": 0.766, "HD95": 6.06},
                   MEAN_OF_SPINE: {"DSC": 0.929, "HD95": 3.08},
                   "L6": {"DSC": 0.0, "HD95": 45.16}, "C1": {"DSC": 0.446}},
}
"""CTSpine1K Table 2 values quoted in DESIGN §6 (nnU-Net 3d_fullres); only those cells, no others."""


VERSE_CHALLENGE_BEST = {"identification_rate": 0.956, "localisation_mm_below": 2.0, "dice": 0.917}
"""VerSe 2020's best challenge entry (DESIGN §6): identification rate, mean localisation error
(below this many mm) and Dice, to set beside a Test_VerSe column."""
