"""Tiny VerSe downloads laid out and named as the real ones.

BIDS release folders (``dataset-verse19training/`` ... each with ``rawdata/sub-X/`` and
``derivatives/sub-X/``) and a MICCAI challenge copy (flat ``verse012_CT-orient.nii.gz``,
``..._seg.nii.gz``, ``..._iso-ctd.json``). Volumes are 8 x 8 x 66 voxels of 2 mm: a complete spine
(C1..L5, two slices per vertebra, 18 mm of image above C1 and 16 mm below L5) or a cropped one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lib.io import save_volume

FULL = list(range(1, 25))  # C1..L5
CROPPED = FULL[17:]  # T11..L5: C1 not in view
SHAPE = (8, 8, 66)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def spine_volumes(labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(CT, mask): one 2-slice slab per label from the top (superior, +z) down, 9 slices above."""
    ct = np.zeros(SHAPE, np.int16)
    m = np.zeros(SHAPE, np.uint8)
    z = SHAPE[2] - 9
    for v in labels:
        m[2:6, 2:6, z - 2:z] = v
        ct[2:6, 2:6, z - 2:z] = 500
        z -= 2
    return ct, m


def write_bids_scan(dataset: Path, stem: str, labels: list[int], mask: bool = True, centroids: bool = True) -> Path:
    """``<dataset>/rawdata/sub-X/<stem>_ct.nii.gz`` with its derivatives; returns the CT path."""
    sub = stem.split("_")[0]
    ct, m = spine_volumes(labels)
    image = save_volume(ct, AFFINE, dataset / "rawdata" / sub / f"{stem}_ct.nii.gz")
    der = dataset / "derivatives" / sub
    if mask:
        save_volume(m, AFFINE, der / f"{stem}_seg-vert_msk.nii.gz")
    if centroids:
        der.mkdir(parents=True, exist_ok=True)
        body = [{"direction": ["P", "I", "R"]}] + [{"label": v, "X": 3.5, "Y": 50.0 - 2 * i, "Z": 3.5}
                                                  for i, v in enumerate(labels)]
        (der / f"{stem}_seg-subreg_ctd.json").write_text(json.dumps(body))
    return Path(image)


def write_challenge_scan(folder: Path, stem: str, labels: list[int]) -> Path:
    """``<folder>/<stem>.nii.gz``, ``<stem>_seg.nii.gz`` and ``<stem>_iso-ctd.json`` (no direction
    entry: mm in the 1 mm ASL frame); returns the CT path."""
    ct, m = spine_volumes(labels)
    image = save_volume(ct, AFFINE, folder / f"{stem}.nii.gz")
    save_volume(m, AFFINE, folder / f"{stem}_seg.nii.gz")
    (folder / f"{stem}_iso-ctd.json").write_text(json.dumps([{"label": v, "X": 7.0, "Y": 100.0 - 4 * i, "Z": 7.0}
                                                             for i, v in enumerate(labels)]))
    return Path(image)


def write_downloads(root: Path) -> dict[str, Path]:
    """The test downloads under ``root``; returns the CT path of each copy by a short name.

    * ``dataset-verse19training``: sub-verse004 (complete), sub-verse012 (complete)
    * ``dataset-verse19validation``: sub-verse020 (CT only: no mask, no centroids)
    * ``dataset-verse20training``: sub-verse012 again (the same scan), sub-gl003_dir-ax and
      sub-gl003_dir-sag (two complete scans of one subject), sub-verse033 (cropped)
    * ``verse20_miccai/training`` (challenge layout): verse012_CT-orient (a third copy),
      verse040_CT-orient (cropped, only there)

    7 unique scans (one duplicated, three copies), 4 usable of 3 subjects, 2 cropped.
    """
    v19, v19val, v20 = root / "dataset-verse19training", root / "dataset-verse19validation", root / "dataset-verse20training"
    ch = root / "verse20_miccai" / "training"
    return {
        "004": write_bids_scan(v19, "sub-verse004", FULL),
        "012_v19": write_bids_scan(v19, "sub-verse012", FULL),
        "020": write_bids_scan(v19val, "sub-verse020", FULL, mask=False, centroids=False),
        "012_v20": write_bids_scan(v20, "sub-verse012", FULL),
        "gl003_ax": write_bids_scan(v20, "sub-gl003_dir-ax", FULL),
        "gl003_sag": write_bids_scan(v20, "sub-gl003_dir-sag", FULL),
        "033": write_bids_scan(v20, "sub-verse033", CROPPED),
        "012_challenge": write_challenge_scan(ch, "verse012_CT-orient", FULL),
        "040": write_challenge_scan(ch, "verse040_CT-orient", CROPPED),
    }
