"""Checks of the real downloads (paper profile): are the sources where the params say, complete?

The layout of the four CTSpine1K sources (folder names, which files are CTs, what is ignored) is
read by :mod:`lib.datasets.ctspine1k.source_layout`, the same reading 01's discovery uses.
Every problem is one row naming its path; every entry not read is listed with the reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from pydicom import dcmread

from lib.datasets.ctspine1k.source_layout import (
    MSD_IMAGE_FOLDERS,
    Ignored,
    SourceLayoutError,
    expected_folder,
    folder_names,
    list_nifti_volumes,
    scan_dicom_source,
)
from lib.datasets.verse import discover_verse


@dataclass(frozen=True)
class SourceProblem:
    """One problem of a download: the source, the file or folder concerned, what is wrong."""

    source: str
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.source}: {self.path}: {self.problem}"


PROBLEM_COLUMNS = ["source", "path", "problem"]
IGNORED_COLUMNS = ["source", "path", "files", "reason"]


@dataclass
class VerifyReport:
    """Result of :func:`verify_sources`: a table per source, the problems (one per path) and
    every entry of the source folders that was not read (with the reason)."""

    table: pd.DataFrame
    issues: list[SourceProblem]
    ignored: list[Ignored] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues

    @property
    def problems(self) -> list[str]:
        """The problems as text, one per row (``source: path: problem``)."""
        return [str(p) for p in self.issues]

    def problems_table(self) -> pd.DataFrame:
        """One row per problem: source, path, problem."""
        return pd.DataFrame([vars(p) for p in self.issues], columns=PROBLEM_COLUMNS)

    def ignored_table(self) -> pd.DataFrame:
        """One row per entry not read: source, path, files it stands for, reason."""
        rows = [{"source": i.source, "path": str(i.path), "files": i.files, "reason": i.reason} for i in self.ignored]
        return pd.DataFrame(rows, columns=IGNORED_COLUMNS)

    def summary(self, max_listed: int = 20) -> str:
        """The problems (the first ``max_listed``) and a count of what was ignored, by reason."""
        lines = []
        if self.ignored:
            kinds = Counter((i.source, i.reason.split(": ", 1)[-1]) for i in self.ignored)
            lines.append(f"{len(self.ignored)} entr(y/ies) not read as source images (listed with paths):")
            lines += [f"  - {src}: {why} x{n}" for (src, why), n in sorted(kinds.items())]
        if self.ok:
            return "\n".join(["all sources present in the expected layout", *lines])
        more = len(self.issues) - max_listed
        head = [f"{len(self.issues)} problem(s):", *(f"  - {p}" for p in self.issues[:max_listed])]
        if more > 0:
            head.append(f"  ... and {more} more (every one in the problems table)")
        return "\n".join(head + lines)


def _row(src: str, folder: Path | None, expected: Mapping[str, int], found: int, ignored: int) -> dict:
    exp = int(expected.get(src, 0))
    return dict(source=src, folder=folder.name if folder is not None else "", expected=exp, found=found,
                missing=max(0, exp - found), ignored=ignored)


def _verify_dicom_source(root: Path, src: str, expected: Mapping[str, int], check_headers: bool
                         ) -> tuple[dict, list[SourceProblem], list[Ignored]]:
    """Table row, problems and ignored entries of a DICOM source (``<patient>/<study>/<series>/*.dcm``)."""
    tree = scan_dicom_source(root, src)
    problems: list[SourceProblem] = []
    folder = tree.folder or expected_folder(root, src)
    if tree.folder is None:
        problems.append(SourceProblem(src, str(folder), "missing folder (expected <patient>/<study>/<series>/*.dcm)"))
    for patient, files in tree.patients.items():
        if not files:
            problems.append(SourceProblem(src, str(folder / patient),
                                          "patient folder without DICOM files at <study>/<series>/"))
        elif check_headers:
            try:
                pydicom_dcmread(files[0])
            except Exception as exc:  # report any unreadable header with the file
                problems.append(SourceProblem(src, str(files[0]), f"unreadable DICOM header ({type(exc).__name__}: {exc})"))
    found = sum(1 for files in tree.patients.values() if files)
    row = _row(src, tree.folder, expected, found, len(tree.ignored))
    if found < row["expected"]:
        problems.append(SourceProblem(src, str(folder),
                                      f"expected {row['expected']} patients, found {found} ({row['missing']} missing)"))
    return row, problems, tree.ignored


def _nifti_header_problems(src: str, files: list[Path]) -> list[SourceProblem]:
    out = []
    for f in files:
        try:
            nib.load(str(f)).header.get_data_shape()
        except Exception as exc:  # truncated / corrupt header
            out.append(SourceProblem(src, str(f), f"unreadable NIfTI header ({type(exc).__name__}: {exc})"))
    return out


def _verify_nifti_source(root: Path, src: str, expected: Mapping[str, int], check_headers: bool
                         ) -> tuple[dict, list[SourceProblem], list[Ignored]]:
    """Table row, problems and ignored entries of a NIfTI source (MSD liver task, COVID-19)."""
    try:
        listing = list_nifti_volumes(root, src)
    except SourceLayoutError as exc:
        return _row(src, None, expected, 0, 0), [SourceProblem(src, str(exc.paths[0]), str(exc))], []
    problems: list[SourceProblem] = []
    folder = listing.folder or expected_folder(root, src)
    if listing.folder is None:
        problems.append(SourceProblem(src, str(folder), f"missing folder (expected {folder_names(src)} under {root})"))
    elif src == "MSD_T10" and len(listing.missing) == len(MSD_IMAGE_FOLDERS):
        problems.append(SourceProblem(src, str(listing.folder), f"neither {' nor '.join(MSD_IMAGE_FOLDERS)} found"))
    for used, other in listing.duplicates:
        problems.append(SourceProblem(src, str(other), f"same release ID as {used}: two copies of one volume"))
    if check_headers:
        problems += _nifti_header_problems(src, listing.volumes)
    found = len(listing.volumes)
    row = _row(src, listing.folder, expected, found, len(listing.ignored))
    if found < row["expected"]:
        absent = "".join(f"; {m.name}/ is missing" for m in listing.missing)
        problems.append(SourceProblem(src, str(folder), f"expected {row['expected']} CT volumes, found {found}{absent}"))
    return row, problems, listing.ignored


def _verify_verse(root: Path, expected: Mapping[str, int]) -> tuple[dict, list[SourceProblem]]:
    """Table row and problems of VerSe under ``root/VerSe``, found as 02 finds it
    (:func:`lib.datasets.verse.discover_verse`: any number of BIDS dataset folders --
    ``dataset-verse19training/`` ... ``dataset-verse20test/`` -- or one bare BIDS folder, and
    challenge copies; a scan in several releases counts once). One problem per scan without its
    mask or centroid file, naming the missing path; the row's ``detail`` gives the scans per
    release and the duplicates."""
    folder = root / "VerSe"
    found = discover_verse(folder)
    problems: list[SourceProblem] = []
    if found.scans.empty:
        problems.append(SourceProblem("VerSe", str(folder), found.not_found_message()))
    for r in found.scans.itertuples():
        for kind, path in (("mask", r.mask), ("centroid file", r.centroids)):
            if not Path(path).is_file():
                problems.append(SourceProblem("VerSe", str(path), f"scan {r.case_id} ({r.release}) has no {kind}"))
    releases = ", ".join(f"{k}: {v}" for k, v in found.per_release().items()) or "no release"
    n_dup = found.duplicates["scan_key"].nunique()
    detail = f"{releases}; {n_dup} scan(s) found in several releases, one copy kept"
    exp, n = int(expected.get("VerSe", 0)), len(found.scans)
    if n < exp:
        problems.append(SourceProblem("VerSe", str(folder), f"expected {exp} CT scans, found {n} unique ({detail})"))
    row = dict(source="VerSe", folder=folder.name, expected=exp, found=n, missing=max(0, exp - n), ignored=0,
               detail=detail)
    return row, problems


def verify_sources(root: Path, expected: Mapping[str, int], check_headers: bool = True) -> VerifyReport:
    """Check the user's downloads (paper profile) against the expected layout and counts.

    Expected layout under ``root`` (:mod:`lib.datasets.ctspine1k.source_layout`):
    ``COLONOG/<PatientID>/<study>/<series>/*.dcm``, ``HNSCC/<patient>/<study>/<series>/*.dcm``,
    ``Task03_Liver/`` (or ``MSD_T10/``) with ``imagesTr/`` and ``imagesTs/``,
    ``COVID19/**/volume-covid19-A-*.nii.gz`` (lesion masks beside them are ignored), and
    ``VerSe/`` (BIDS ``rawdata/`` + ``derivatives/``, in one or several dataset folders).

    Args:
        root: the sources folder named by the params.
        expected: minimum number of patients/volumes per source, e.g. ``{"COLONOG": 784}``.
        check_headers: open one DICOM header per patient and every NIfTI header (catches
            truncated downloads) - slower on the full data.

    Returns:
        :class:`VerifyReport`: one problem per path (``issues``; ``problems_table()``) and
        every entry not read, with the reason (``ignored``; ``ignored_table()``).
    """
    root = Path(root)
    issues: list[SourceProblem] = []
    ignored: list[Ignored] = []
    rows = []
    if not root.exists():
        issues.append(SourceProblem("all", str(root), "sources folder does not exist "
                                    "(set sources_dir in params/paper/00_sources.yaml)"))
    checks = [_verify_dicom_source(root, src, expected, check_headers) for src in ("COLONOG", "HNSCC")]
    checks += [_verify_nifti_source(root, src, expected, check_headers) for src in ("MSD_T10", "COVID19")]
    for row, found, skipped in checks:
        rows.append(row)
        issues += found
        ignored += skipped
    verse_row, verse_problems = _verify_verse(root, expected)
    rows.append(verse_row)
    issues += verse_problems
    table = pd.DataFrame(rows).fillna({"folder": "", "ignored": 0}).astype({"ignored": int})
    table["status"] = np.where(table["missing"] > 0, "incomplete", "ok")
    return VerifyReport(table=table, issues=issues, ignored=ignored)


def pydicom_dcmread(path: Path):
    """Read a DICOM header (no pixels); raises on a damaged file."""
    return dcmread(str(path), stop_before_pixels=True)
