"""Helpers shared by the tests split from tests/test_sources.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

REPO = Path(__file__).resolve().parents[2]


def _sitk_read(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    m = np.eye(4)
    m[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    m[:3, 3] = img.GetOrigin()
    return arr, np.diag([-1.0, -1.0, 1.0, 1.0]) @ m  # LPS -> RAS


def _tiny_cfg() -> dict:
    cfg = yaml.safe_load((REPO / "params" / "ci" / "00_sources.yaml").read_text())
    cfg.update(inplane_mm=4.0, z_colonog_mm=4.0, z_hnscc_mm=4.0, z_msd_choices_mm=[4.0, 5.0], z_verse_mm=4.0)
    return cfg


