"""The release folder: its images and masks, the special cases and the readme, cases for stages.

Special cases from the masks: ``L6`` (sacral lumbarization, label 25 present) and lumbar
sacralization (L4 lowest, L5/L6 absent, the scan reaching below).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from lib.core import labels as L
from lib.core.cases import Case
from lib.core.paths import SPLITS, ProfilePaths
from lib.datasets.ctspine1k.ids import count_by_source_split, infer_source
from lib.io.atomic import write_text
from lib.io.integrity import load_mask
from lib.io.nifti import NiftiReadError, canonical_geometry, strip_nifti_suffix


def find_special_cases(release_dir: str | Path, min_gap_mm: float = 20.0) -> dict[str, list[str]]:
    """Special cases from the release masks (``gt/<ID>_seg.nii.gz``).

    * ``L6``: sacral lumbarization, label 25 (L6) present.
    * ``lumbar_sacralization``: L4 present, L5 and L6 absent, and the scan reaches at least
      ``min_gap_mm`` below L4 (so L5 would have been in the field of view).

    Returns:
        ``{"L6": [...], "lumbar_sacralization": [...], "masks": [...all IDs with a mask]}``.
    """
    out: dict[str, list[str]] = {"L6": [], "lumbar_sacralization": [], "masks": []}
    for split in SPLITS:
        for m in sorted((Path(release_dir) / split / "gt").glob("*_seg.nii.gz")):
            rid = strip_nifti_suffix(m)[: -len("_seg")]
            st = mask_stats(m, min_gap_mm)
            out["masks"].append(rid)
            if st["L6"]:
                out["L6"].append(rid)
            if st["sacralization"]:
                out["lumbar_sacralization"].append(rid)
    return {k: sorted(v) for k, v in out.items()}


def mask_stats(mask_path: Path, min_gap_mm: float = 20.0) -> dict[str, Any]:
    v = load_mask(mask_path)
    arr = np.asarray(v.array)
    present = sorted(x for x, n in v.meta["label_scan"].counts.items() if n and x in L.LABELS)
    regions = Counter(L.region(x) for x in present)
    sacral = False
    if 23 in present and 24 not in present and 25 not in present:
        k_lowest = int(np.flatnonzero((arr == 23).any(axis=(0, 1)))[0])
        sacral = k_lowest * v.spacing[2] >= min_gap_mm
    return {"labels": present, "vertebrae": len(present), "cervical": regions.get("cervical", 0),
            "thoracic": regions.get("thoracic", 0), "lumbar": regions.get("lumbar", 0), "L6": 25 in present,
            "sacralization": sacral}


def write_readme(release_dir: str | Path, assignment: Mapping[str, str] | None = None,
                 patterns: Mapping[str, Sequence[str]] | None = None, special: Mapping[str, list[str]] | None = None
                 ) -> Path:
    """``readme.txt`` of the release: layout, sources and counts per split, special cases.

    The special cases (L6 / lumbar sacralization) are read from the masks when ``gt/`` holds
    any (or taken from ``special``); before annotation the section says they are pending.
    """
    release_dir = Path(release_dir)
    if assignment is None:
        assignment = {strip_nifti_suffix(f): s for s in SPLITS for f in (release_dir / s / "data").glob("*.nii.gz")}
    counts = count_by_source_split(assignment, patterns)
    special = dict(special) if special is not None else find_special_cases(release_dir)
    lines = [
        "CTSpine1K-style release (curated by the spine1k workspace, stage 01_curation)",
        "",
        "Layout:",
        "  {trainset,test_public,test_private}/data/<ID>.nii.gz   CT, int16 Hounsfield units",
        "  {trainset,test_public,test_private}/gt/<ID>_seg.nii.gz  vertebra labels 1-25 (C1-C7, T1-T12, L1-L6)",
        "  metadata_colonog.xlsx, metadata_neck.xlsx               non-identifying acquisition tags",
        "  data_split.txt                                          the split, official format",
        "",
        "IDs keep the sources' spellings: COLONOG 1.3.6.1.4.1.9328.50.4.0xxx (or CTC-xxxxxxxxxx),",
        "HNSCC HN_Pxxx, MSD T10 liver_xxx, COVID-19 volume-covid19-A-0xxx_ct.",
        "Images are de-identified: no names, dates, institutions or accession numbers in file",
        "names, NIfTI headers or sheets (checked by a byte-level audit of every output file).",
        "",
        "Cases per source and split:",
        counts.to_string(index=False),
        "",
        "Labels: " + ", ".join(f"{v}={L.name(v)}" for v in L.CTSPINE1K_LABELS),
        "",
        "Special cases:",
    ]
    if not special.get("masks"):
        lines.append("  pending: listed here once the annotation rounds have filled gt/")
    else:
        lines.append(f"  masks present for {len(special['masks'])} case(s)")
        lines.append(f"  sacral lumbarization (L6 labelled as 25): {len(special['L6'])}")
        lines += [f"    {r}" for r in special["L6"]]
        lines.append(f"  lumbar sacralization (no L5: L4 lowest, scan reaches below): {len(special['lumbar_sacralization'])}")
        lines += [f"    {r}" for r in special["lumbar_sacralization"]]
    return write_text(release_dir / "readme.txt", "\n".join(lines) + "\n")


def release_dir_of(paths_or_release_dir: ProfilePaths | str | Path) -> Path:
    return paths_or_release_dir.release if isinstance(paths_or_release_dir, ProfilePaths) else Path(paths_or_release_dir)


def release_inventory(paths_or_release_dir: ProfilePaths | str | Path, with_masks: bool = False,
                      patterns: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """One row per release image: ID, split, source, spacing and size in RAS order (from the
    NIfTI header only), and with ``with_masks`` the mask's vertebra counts."""
    rd = release_dir_of(paths_or_release_dir)
    rows = []
    for split in SPLITS:
        for f in sorted((rd / split / "data").glob("*.nii.gz")):
            rid = strip_nifti_suffix(f)
            try:
                img = nib.load(str(f))
            except Exception as exc:
                raise NiftiReadError(f"{f}: unreadable NIfTI header ({exc})") from exc
            sp, sh = canonical_geometry(img.affine, img.shape[:3])
            row = {"release_id": rid, "split": split, "source": infer_source(rid, patterns),
                   "spacing_x_mm": sp[0], "spacing_y_mm": sp[1], "spacing_z_mm": sp[2],
                   "size_x": sh[0], "size_y": sh[1], "size_z": sh[2]}
            if with_masks:
                m = rd / split / "gt" / f"{rid}_seg.nii.gz"
                row["has_mask"] = m.exists()
                if m.exists():
                    st = mask_stats(m)
                    row.update({k: st[k] for k in ("vertebrae", "cervical", "thoracic", "lumbar")})
                    row["L6"], row["sacralization"] = st["L6"], st["sacralization"]
            rows.append(row)
    return pd.DataFrame(rows)


def has_masks(paths_or_release_dir: ProfilePaths | str | Path) -> bool:
    """True when any ``<split>/gt/*_seg.nii.gz`` exists in the release."""
    rd = release_dir_of(paths_or_release_dir)
    return any(next((rd / s / "gt").glob("*_seg.nii.gz"), None) is not None for s in SPLITS)


def release_cases(paths: ProfilePaths, splits: Sequence[str] = SPLITS) -> list[Case]:
    """Every image of the release as a :class:`lib.core.cases.Case`, split from its folder, mask
    path ``<split>/gt/<ID>_seg.nii.gz`` (which exists once annotated)."""
    cases = []
    for split in splits:
        for img in sorted(paths.split_dir(split, "data").glob("*.nii.gz")):
            cid = strip_nifti_suffix(img)
            cases.append(Case(cid, img, paths.split_dir(split, "gt") / f"{cid}_seg.nii.gz", split))
    if not cases:
        raise FileNotFoundError(f"{paths.release}: no release images; run 01_curation first")
    return cases


def annotated_cases(paths: ProfilePaths, splits: Sequence[str]) -> list[Case]:
    """Release cases of ``splits`` whose mask exists; a missing mask is an error naming it."""
    cases = release_cases(paths, splits)
    missing = [c for c in cases if not c.mask.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} case(s) without a mask (run 03_annotation): "
                                + ", ".join(str(m.mask) for m in missing[:5]))
    return cases
