"""Helpers shared by the tests split from tests/test_model.py."""

from __future__ import annotations

import numpy as np

from lib.ml import planning


def _fp(spacings, shapes, labels=(1, 2, 3)):
    rng = np.random.default_rng(0)
    per = [{"case_id": f"c{i}", "shape": list(sh), "spacing_mm": list(sp), "labels": list(labels),
            "fg_samples": rng.normal(300, 100, 500).tolist()} for i, (sp, sh) in enumerate(zip(spacings, shapes, strict=False))]
    return planning.summarise_fingerprint(per)
