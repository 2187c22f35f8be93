"""Where each CTSpine1K source sits in a download folder, and which of its files are CT volumes.

One reading of the layout, used by the source check of 00 (:mod:`lib.datasets.downloads`) and by
discovery in 01 (:mod:`lib.stages.curation.discover`), so the two never disagree:

* ``COLONOG/``, ``HNSCC/``: TCIA downloads, ``<PatientID>/<study>/<series>/*.dcm`` (folder names
  such as ``01-01-2000-1-Abdomen-12345/2.000000-Supine 1.0 B30f-67890``).
* The MSD liver task (source key ``MSD_T10``): the archive unpacks as ``Task03_Liver/`` with
  ``imagesTr/`` (``liver_0`` .. ``liver_130``), ``imagesTs/`` (``liver_132`` ..), ``labelsTr/``
  and ``dataset.json``; a folder named ``MSD_T10/`` (the synthetic profile's name) is read the
  same way, and both names at once are an error naming both. CTSpine1K draws its 150 liver
  volumes from both image folders; ``labelsTr/`` holds liver/tumour masks, not CTs.
* ``COVID19/``: NIfTI CTs at any depth (TCIA ``volume-covid19-A-0003.nii.gz``; the COVID-19-20
  challenge's ``Train/volume-covid19-A-0003_ct.nii.gz``). Lesion masks beside the CTs are not
  CTs: the COVID-19-20 ``*_seg.nii.gz`` and the MosMedData ``*_mask.nii.gz`` spellings (a file
  whose name without ``.nii[.gz]`` ends in ``_seg`` or ``_mask``, any case; nothing wider, so a
  CT is never taken for a mask).

Everything skipped is returned as an :class:`Ignored` (path and why), never dropped silently:
hidden entries (macOS ``._*`` AppleDouble companions, ``.DS_Store``, ``__MACOSX/``, any dot
name), masks, files that are not NIfTI, folders that hold no source images.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lib.datasets.ctspine1k.ids import DICOM_SOURCES, release_id_for
from lib.io.nifti import strip_nifti_suffix

SOURCE_FOLDERS: dict[str, tuple[str, ...]] = {
    "COLONOG": ("COLONOG",),
    "HNSCC": ("HNSCC",),
    "MSD_T10": ("Task03_Liver", "MSD_T10"),
    "COVID19": ("COVID19",),
}
"""Folder names each source may have under the sources folder (the first is the archive's own)."""

MSD_IMAGE_FOLDERS = ("imagesTr", "imagesTs")
"""The MSD task's CT folders; CTSpine1K needs both (40 of its 150 liver IDs are above liver_130)."""

MASK_SUFFIXES = {"_seg": "COVID-19-20 lesion mask (*_seg.nii.gz), not a CT",
                 "_mask": "MosMedData-style lesion mask (*_mask.nii.gz), not a CT"}
"""Name endings (before ``.nii[.gz]``, any case) of the lesion masks COVID-19 archives ship beside the CTs."""

_MSD_OTHER = {"labelsTr": "MSD liver/tumour label maps, not CT volumes",
              "dataset.json": "MSD task description (JSON), not a volume"}


class SourceLayoutError(ValueError):
    """The sources folder is ambiguous (e.g. ``Task03_Liver/`` and ``MSD_T10/`` both present);
    ``paths`` holds the folders found."""

    def __init__(self, message: str, paths: tuple[Path, ...] = ()):
        super().__init__(message)
        self.paths = paths


@dataclass(frozen=True)
class Ignored:
    """An entry of a source folder that is not read as a source image, and why.

    Attributes:
        source: the source key (``MSD_T10``, ``COVID19``, ...).
        path: the file or folder (a folder stands for the ``files`` below it).
        reason: why it is not a source image.
        files: how many files the entry stands for.
    """

    source: str
    path: Path
    reason: str
    files: int = 1


def hidden_reason(name: str) -> str | None:
    """Why a file or folder name is skipped as hidden, or None for an ordinary name."""
    if name.startswith("._"):
        return "macOS AppleDouble companion (._*), not an image"
    if name == ".DS_Store":
        return "macOS folder metadata (.DS_Store)"
    if name == "__MACOSX":
        return "macOS archive metadata folder (__MACOSX)"
    if name.startswith("."):
        return "hidden entry (dot name)"
    return None


def mask_reason(name: str) -> str | None:
    """Why a NIfTI file name is a lesion mask rather than a CT (:data:`MASK_SUFFIXES`), or None."""
    stem = strip_nifti_suffix(name).lower()
    return next((why for suf, why in MASK_SUFFIXES.items() if stem.endswith(suf)), None)


def is_nifti_name(name: str) -> bool:
    """A ``.nii`` or ``.nii.gz`` file name (any case)."""
    return name.lower().endswith((".nii", ".nii.gz"))


def count_files(path: Path) -> int:
    """Files at or below ``path``."""
    if not path.is_dir():
        return 1
    return sum(len(files) for _, _, files in os.walk(path))


def source_folder(root: str | Path, source: str) -> Path | None:
    """The folder of ``source`` under ``root`` (:data:`SOURCE_FOLDERS`), or None when absent.

    Raises:
        SourceLayoutError: two of the source's folder names exist, naming both.
    """
    root = Path(root)
    found = [root / n for n in SOURCE_FOLDERS.get(source, (source,)) if (root / n).is_dir()]
    if len(found) > 1:
        raise SourceLayoutError(f"{source}: {' and '.join(str(p) for p in found)} both exist; keep one "
                                f"(the archive unpacks as {SOURCE_FOLDERS[source][0]}/)", tuple(found))
    return found[0] if found else None


def folder_names(source: str) -> str:
    """The folder names a source may have, for messages (``Task03_Liver/ or MSD_T10/``)."""
    return " or ".join(f"{n}/" for n in SOURCE_FOLDERS.get(source, (source,)))


def expected_folder(root: str | Path, source: str) -> Path:
    """The folder a source is expected in when absent (the archive's own name), for messages."""
    return Path(root) / SOURCE_FOLDERS.get(source, (source,))[0]


@dataclass
class NiftiListing:
    """The CT volumes of a NIfTI source and everything else its folder holds.

    Attributes:
        folder: the source folder found (None: absent).
        volumes: CT files, sorted, one per release ID.
        ignored: entries not read, with the reason (duplicates included).
        missing: expected sub-folders that are absent (MSD ``imagesTr/``, ``imagesTs/``).
        duplicates: ``(used, other)`` file pairs with one release ID; ``other`` is not used.
    """

    source: str
    folder: Path | None
    volumes: list[Path] = field(default_factory=list)
    ignored: list[Ignored] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)


def _scan_nifti(source: str, folder: Path, ignored: list[Ignored], recursive: bool) -> list[Path]:
    """NIfTI CT files in ``folder`` (below it too when ``recursive``); the rest to ``ignored``."""
    out: list[Path] = []
    for p in sorted(folder.iterdir()):
        why = hidden_reason(p.name)
        if why is None and p.is_dir():
            if recursive:
                out += _scan_nifti(source, p, ignored, recursive)
                continue
            why = "sub-folder of an image folder: not read"
        if why is None and not is_nifti_name(p.name):
            why = "not a NIfTI file (.nii / .nii.gz)"
        why = why or mask_reason(p.name)
        if why is None:
            out.append(p)
        else:
            ignored.append(Ignored(source, p, why, count_files(p)))
    return out


def _scan_msd(folder: Path, listing: NiftiListing) -> list[Path]:
    """The CTs of ``imagesTr/`` and ``imagesTs/``; every other entry of the task folder is listed."""
    for p in sorted(folder.iterdir()):
        if p.name in MSD_IMAGE_FOLDERS and p.is_dir():
            continue
        why = hidden_reason(p.name) or _MSD_OTHER.get(p.name) or \
            f"not an image folder (only {' and '.join(MSD_IMAGE_FOLDERS)} are read)"
        listing.ignored.append(Ignored("MSD_T10", p, why, count_files(p)))
    files: list[Path] = []
    for sub in MSD_IMAGE_FOLDERS:
        d = folder / sub
        if d.is_dir():
            files += _scan_nifti("MSD_T10", d, listing.ignored, recursive=False)
        else:
            listing.missing.append(d)
    return files


def list_nifti_volumes(root: str | Path, source: str) -> NiftiListing:
    """The CT volumes of a NIfTI source (``MSD_T10``, ``COVID19``) in a sources folder.

    MSD: ``<Task03_Liver|MSD_T10>/imagesTr/`` and ``imagesTs/`` (flat). COVID-19: every NIfTI
    file at any depth of ``COVID19/``. Hidden entries, lesion masks, non-NIfTI files and other
    folders are listed in ``ignored``; of two files with one release ID (``liver_3.nii`` and
    ``liver_3.nii.gz``, or TCIA's ``..-0003.nii.gz`` beside COVID-19-20's ``..-0003_ct.nii.gz``)
    the first by path is used and the other listed.

    Raises:
        SourceLayoutError: two folder names of the source exist (naming both).
    """
    folder = source_folder(root, source)
    listing = NiftiListing(source, folder)
    if folder is None:
        return listing
    files = _scan_msd(folder, listing) if source == "MSD_T10" else \
        _scan_nifti(source, folder, listing.ignored, recursive=True)
    seen: dict[str, Path] = {}
    for f in sorted(files):
        rid = release_id_for(source, strip_nifti_suffix(f))
        if rid in seen:
            listing.duplicates.append((seen[rid], f))
            listing.ignored.append(Ignored(source, f, f"same release ID {rid} as {seen[rid]}: not used"))
            continue
        seen[rid] = f
        listing.volumes.append(f)
    return listing


@dataclass
class DicomTree:
    """A DICOM source folder: the files each patient holds at ``<study>/<series>/`` and the rest.

    Attributes:
        folder: the source folder found (None: absent).
        patients: ``{patient folder name: [DICOM files at <study>/<series>/, sorted]}``; an
            empty list is a patient folder without series files.
        ignored: hidden entries, files at other depths, non-DICOM names - hidden or misplaced
            files are grouped per folder (one entry: the folder, how many, why).
    """

    source: str
    folder: Path | None
    patients: dict[str, list[Path]] = field(default_factory=dict)
    ignored: list[Ignored] = field(default_factory=list)


def _looks_dicom(name: str) -> bool:
    """TCIA file names: ``1-001.dcm`` (or no extension, older downloads)."""
    suffix = Path(name).suffix.lower()
    return suffix == ".dcm" or suffix == "" or suffix.strip(".").isdigit()


def _group(source: str, folder: Path, names: list[str], why: str, ignored: list[Ignored]) -> None:
    if names:
        kinds = Counter(hidden_reason(n) or why for n in names)
        text = "; ".join(f"{k} ({v})" if len(kinds) > 1 else k for k, v in kinds.items())
        ignored.append(Ignored(source, folder, f"{len(names)} file(s): {text}", len(names)))


def _patient_files(source: str, pdir: Path, ignored: list[Ignored]) -> list[Path]:
    """DICOM files at ``<study>/<series>/`` of one patient folder; the rest to ``ignored``."""
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(pdir):
        here = Path(dirpath)
        for n in sorted(d for d in dirnames if hidden_reason(d)):
            ignored.append(Ignored(source, here / n, hidden_reason(n), count_files(here / n)))
        dirnames[:] = sorted(d for d in dirnames if not hidden_reason(d))
        names = sorted(filenames)
        _group(source, here, [n for n in names if hidden_reason(n)], "", ignored)
        shown = [n for n in names if not hidden_reason(n)]
        if len(here.relative_to(pdir).parts) != 2:
            _group(source, here, shown, "outside <study>/<series>/: not counted as a series", ignored)
            continue
        _group(source, here, [n for n in shown if not _looks_dicom(n)], "not a DICOM file name (.dcm)", ignored)
        files += [here / n for n in shown if _looks_dicom(n)]
    return files


def scan_dicom_source(root: str | Path, source: str) -> DicomTree:
    """Patients and their series files of a DICOM source (``COLONOG``, ``HNSCC``); one walk of
    the tree, no file opened. Entries of the source folder that are not patient folders (hidden
    ones, files such as a ``LICENSE``) are listed in ``ignored``."""
    if source not in DICOM_SOURCES:
        raise ValueError(f"{source}: not a DICOM source (expected one of {DICOM_SOURCES})")
    folder = source_folder(root, source)
    tree = DicomTree(source, folder)
    if folder is None:
        return tree
    for p in sorted(folder.iterdir()):
        why = hidden_reason(p.name)
        if why is None and not p.is_dir():
            why = "a file where patient folders are expected (<PatientID>/<study>/<series>/)"
        if why is not None:
            tree.ignored.append(Ignored(source, p, why, count_files(p)))
            continue
        tree.patients[p.name] = _patient_files(source, p, tree.ignored)
    return tree
