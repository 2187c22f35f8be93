"""Checks of the real downloads (paper profile): are the sources where the params say, complete?"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from pydicom import dcmread


@dataclass
class VerifyReport:
    """Result of :func:`verify_sources`: a table per source and the precise problems."""

    table: pd.DataFrame
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return "all sources present in the expected layout"
        return f"{len(self.problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in self.problems)


def _dicom_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and (p.suffix.lower() == ".dcm" or p.suffix == "")]


def _listed(names, max_listed: int) -> str:
    """The first ``max_listed`` names (sorted), comma-separated, and how many more there are."""
    names = sorted(str(n) for n in names)
    more = f" ... and {len(names) - max_listed} more" if len(names) > max_listed else ""
    return ", ".join(names[:max_listed]) + more


def _scan_dicom_patients(d: Path, check_headers: bool) -> tuple[int, list[str], list[str]]:
    """``(patients with files, patient folders without files, unreadable headers)`` of a DICOM
    source folder; files count only at ``<patient>/<study>/<series>/``."""
    found, empty, broken = 0, [], []
    for pdir in sorted(x for x in d.iterdir() if x.is_dir()):
        files = [f for f in _dicom_files(pdir) if len(f.relative_to(pdir).parts) == 3]
        if not files:
            empty.append(pdir.name)
            continue
        found += 1
        if check_headers:
            try:
                pydicom_dcmread(files[0])
            except Exception as exc:  # report any unreadable header with the file
                broken.append(f"{files[0]} ({type(exc).__name__})")
    return found, empty, broken


def _verify_dicom_source(root: Path, src: str, expected: Mapping[str, int], check_headers: bool,
                         max_listed: int) -> tuple[dict, list[str]]:
    """Table row and problems of a DICOM source (``<patient>/<study>/<series>/*.dcm``)."""
    problems: list[str] = []
    d = root / src
    found = 0
    if not d.is_dir():
        problems.append(f"{d}: missing folder for {src} (expected <patient>/<study>/<series>/*.dcm)")
    else:
        found, empty, broken = _scan_dicom_patients(d, check_headers)
        if empty:
            problems.append(f"{src}: {len(empty)} patient folder(s) without DICOM files at <study>/<series>/: {_listed(empty, max_listed)}")
        if broken:
            problems.append(f"{src}: unreadable DICOM header(s): {_listed(broken, max_listed)}")
    exp = int(expected.get(src, 0))
    if found < exp:
        problems.append(f"{src}: expected {exp} patients, found {found} ({exp - found} missing) under {d}")
    return dict(source=src, expected=exp, found=found, missing=max(0, exp - found)), problems


def _verify_nifti_source(root: Path, src: str, pattern: str, sub: str, expected: Mapping[str, int],
                         check_headers: bool, max_listed: int) -> tuple[dict, list[str]]:
    """Table row and problems of a NIfTI source (files matching ``pattern`` in ``src/sub``)."""
    problems: list[str] = []
    d = root / src / sub if sub else root / src
    files = sorted(d.glob(pattern)) if d.is_dir() else []
    if not d.is_dir():
        problems.append(f"{d}: missing folder for {src} (expected {pattern})")
    broken = []
    if check_headers:
        for f in files:
            try:
                nib.load(str(f)).header.get_data_shape()
            except Exception as exc:  # truncated / corrupt header
                broken.append(f"{f.name} ({type(exc).__name__})")
    if broken:
        problems.append(f"{src}: unreadable NIfTI header(s): {_listed(broken, max_listed)}")
    exp = int(expected.get(src, 0))
    if len(files) < exp:
        problems.append(f"{src}: expected {exp} volumes matching {pattern}, found {len(files)} in {d}")
    return dict(source=src, expected=exp, found=len(files), missing=max(0, exp - len(files))), problems


def _verify_verse(root: Path, expected: Mapping[str, int], max_listed: int) -> tuple[dict, list[str]]:
    """Table row and problems of VerSe (BIDS rawdata scans, each with its mask and centroids)."""
    problems: list[str] = []
    raw, der = root / "VerSe" / "rawdata", root / "VerSe" / "derivatives"
    cts = sorted(raw.glob("sub-*/*_ct.nii.gz")) if raw.is_dir() else []
    if not raw.is_dir():
        problems.append(f"{raw}: missing VerSe rawdata folder (BIDS: rawdata/sub-X/sub-X[_dir-ax]_ct.nii.gz)")
    no_mask, no_ctd = [], []
    for ct in cts:
        stem = ct.name[: -len("_ct.nii.gz")]
        sub = ct.parent.name
        if not (der / sub / f"{stem}_seg-vert_msk.nii.gz").exists():
            no_mask.append(stem)
        if not (der / sub / f"{stem}_seg-subreg_ctd.json").exists():
            no_ctd.append(stem)
    if no_mask:
        problems.append(f"VerSe: {len(no_mask)} scan(s) without derivatives/<sub>/<stem>_seg-vert_msk.nii.gz: {_listed(no_mask, max_listed)}")
    if no_ctd:
        problems.append(f"VerSe: {len(no_ctd)} scan(s) without derivatives/<sub>/<stem>_seg-subreg_ctd.json: {_listed(no_ctd, max_listed)}")
    exp = int(expected.get("VerSe", 0))
    if len(cts) < exp:
        problems.append(f"VerSe: expected {exp} CT scans, found {len(cts)} in {raw}")
    return dict(source="VerSe", expected=exp, found=len(cts), missing=max(0, exp - len(cts))), problems


def verify_sources(root: Path, expected: Mapping[str, int], check_headers: bool = True,
                   max_listed: int = 20) -> VerifyReport:
    """Check the user's downloads (paper profile) against the expected layout and counts.

    Expected layout under ``root``: ``COLONOG/<PatientID>/<study>/<series>/*.dcm``,
    ``HNSCC/<patient>/<study>/<series>/*.dcm``, ``MSD_T10/imagesTr/*.nii.gz``,
    ``COVID19/volume-covid19-A-*.nii.gz``, ``VerSe/rawdata/sub-*/..._ct.nii.gz`` with
    ``VerSe/derivatives/sub-*/..._seg-vert_msk.nii.gz`` and ``..._seg-subreg_ctd.json``.

    Args:
        root: the sources folder named by the params.
        expected: minimum number of patients/volumes per source, e.g. ``{"COLONOG": 784}``.
        check_headers: open one DICOM header per patient and every NIfTI header (catches
            truncated downloads) - slower on the full data.
        max_listed: how many missing/broken names to list per problem.

    Returns:
        :class:`VerifyReport`; ``problems`` says precisely what is missing or broken.
    """
    root = Path(root)
    problems: list[str] = []
    rows = []
    if not root.exists():
        problems.append(f"{root}: sources folder does not exist (set sources_dir in params/paper/00_sources.yaml)")
    checks = [_verify_dicom_source(root, src, expected, check_headers, max_listed) for src in ("COLONOG", "HNSCC")]
    checks += [_verify_nifti_source(root, src, pattern, sub, expected, check_headers, max_listed)
               for src, pattern, sub in (("MSD_T10", "*.nii.gz", "imagesTr"), ("COVID19", "volume-covid19-A-*.nii.gz", ""))]
    checks.append(_verify_verse(root, expected, max_listed))
    for row, found in checks:
        rows.append(row)
        problems += found
    table = pd.DataFrame(rows)
    table["status"] = np.where(table["missing"] > 0, "incomplete", "ok")
    return VerifyReport(table=table, problems=problems)


def pydicom_dcmread(path: Path):
    """Read a DICOM header (no pixels); raises on a damaged file."""
    return dcmread(str(path), stop_before_pixels=True)
