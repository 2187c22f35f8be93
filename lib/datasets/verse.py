"""VerSe on disk: discovery of the releases, the pretraining selection, the benchmark's VerSe
sets, centroid files.

BIDS releases (``dataset-verse19training/``, ``dataset-verse20test/``, ... each with its own
``rawdata/`` + ``derivatives/``): ``rawdata/sub-X/sub-X[_split-Y][_dir-ax]_ct.nii.gz``,
``derivatives/sub-X/..._seg-vert_msk.nii.gz``, ``..._seg-subreg_ctd.json`` =
``[{"direction": ["P","I","R"]}, {"label": L, "X":.., "Y":.., "Z":..}]`` (voxel coordinates in the
stated axis directions). MICCAI challenge copies: flat ``verse012_CT-orient.nii.gz``,
``..._seg.nii.gz``, ``..._iso-ctd.json`` (1 mm isotropic ASL). VerSe 2019 and 2020 share scans:
:func:`discover_verse` keeps one copy of each.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel import orientations

from lib.core import labels as L
from lib.core.cases import Case
from lib.core.parallel import map_cases
from lib.core.paths import SPLITS
from lib.imaging.components import nonzero_extent
from lib.io.atomic import atomic_path
from lib.io.integrity import image_faults, load_checked, mask_faults
from lib.io.nifti import canonical_geometry, open_nifti, strip_nifti_suffix
from lib.metrics.centroids import body_centroids_mm

VERSE_COLUMNS = ["case_id", "subject", "release", "layout", "image", "mask", "centroids", "ctd_frame", "scan_key"]
"""Columns of the VerSe scan table (:func:`discover_verse`)."""

DUPLICATE_COLUMNS = ["scan_key", "case_id", "subject", "release", "layout", "image", "mask", "centroids", "kept"]

BIDS_PATTERNS = ("<dataset>/rawdata/sub-*/**/sub-*_ct.nii.gz",
                 "<dataset>/derivatives/sub-*/**/<stem>_seg-vert_msk.nii.gz",
                 "<dataset>/derivatives/sub-*/**/<stem>_seg-subreg_ctd.json (or _seg-vb_ctd.json)")
CHALLENGE_PATTERNS = ("<folder>/verseNNN[_verseMMM][_CT-xx].nii.gz (also glNNN...)",
                      "<folder>/<stem>_seg.nii.gz", "<folder>/<stem>_iso-ctd.json (or <stem>_ctd.json)")
"""What :func:`discover_verse` looks for; ``<dataset>`` is the root itself or any folder below
it holding ``rawdata/`` (``dataset-verse19training/``, ``dataset-verse20test/``, ...)."""

_CHALLENGE_RE = re.compile(r"^(?P<core>(?:verse|gl)\d+)(?:_(?P<split>(?:verse|gl)\d+))?"
                           r"(?:_(?P<acq>ct[-_][a-z0-9]+))?\.nii\.gz$", re.IGNORECASE)
_BIDS_MAX_DEPTH = 4


@dataclass
class VerseDiscovery:
    """VerSe as found under a root: one row per unique scan, the copies of duplicated scans.

    Attributes:
        root: the folder searched.
        scans: one row per scan kept (:data:`VERSE_COLUMNS`), sorted by release then case id.
        duplicates: one row per copy of a scan found more than once (:data:`DUPLICATE_COLUMNS`;
            ``kept`` marks the copy in ``scans``).
    """

    root: Path
    scans: pd.DataFrame
    duplicates: pd.DataFrame

    def per_release(self) -> dict[str, int]:
        """Scans kept per release."""
        return {str(k): int(v) for k, v in self.scans.groupby("release").size().items()}

    def not_found_message(self) -> str:
        """What was looked for and which folders exist under the root (for an empty result)."""
        if not self.root.is_dir():
            present = "the folder does not exist"
        else:
            names = sorted(p.name + "/" for p in self.root.iterdir() if p.is_dir())
            present = "folders there: " + (", ".join(names) if names else "none")
        return (f"{self.root}: no VerSe scan found ({present}). Looked for BIDS releases: "
                + "; ".join(BIDS_PATTERNS) + " -- and MICCAI challenge copies: " + "; ".join(CHALLENGE_PATTERNS)
                + ". Point verse_dir (params/<profile>/02_pretraining.yaml) or sources_dir (00_sources) at the "
                "folder holding the dataset-verse19*/dataset-verse20* folders.")


def _release_name(folder: Path, root: Path) -> str:
    """``dataset-verse19training`` -> ``verse19training``; nested folders joined by ``/``."""
    parts = folder.relative_to(root).parts or (root.name,)
    out: list[str] = []
    for p in parts:
        p = p.removeprefix("dataset-")
        if not out or out[-1] != p:
            out.append(p)
    return "/".join(out)


def _release_year(release: str) -> int:
    """2019 / 2020 from a release name (``verse19training``, ``VerSe20/01_training``), else 0."""
    m = re.search(r"verse[-_ ]?(19|20)(?!\d)|(?<!\d)20(19|20)(?!\d)", release, re.IGNORECASE)
    return 2000 + int(m.group(1) or m.group(2)) if m else 0


def _bids_folders(root: Path) -> list[Path]:
    """The root and every folder below it (depth <= 4) that holds ``rawdata/``; BIDS folders
    are not searched further."""
    found, todo = [], [(root, 0)]
    while todo:
        folder, depth = todo.pop()
        if (folder / "rawdata").is_dir():
            found.append(folder)
            continue
        if depth < _BIDS_MAX_DEPTH and folder.is_dir():
            todo += [(p, depth + 1) for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(found)


def _bids_entities(stem: str) -> dict[str, str]:
    """``sub-verse407_split-verse262_dir-ax`` -> ``{"sub": "verse407", "split": "verse262", "dir": "ax"}``."""
    return dict(part.split("-", 1) for part in stem.split("_") if "-" in part)


def _first_existing(folder: Path, names: Sequence[str]) -> Path:
    """The first of ``names`` that exists in ``folder``, else the first (the expected path)."""
    return next((folder / n for n in names if (folder / n).is_file()), folder / names[0])


def _bids_scans(dataset: Path, root: Path) -> list[dict]:
    """One row per ``rawdata/sub-*/**/*_ct.nii.gz`` of a BIDS folder."""
    rows, release = [], _release_name(dataset, root)
    for ct in sorted((dataset / "rawdata").glob("sub-*/**/*_ct.nii.gz")):
        stem = ct.name[: -len("_ct.nii.gz")]
        der = dataset / "derivatives" / ct.parent.relative_to(dataset / "rawdata")
        ent = _bids_entities(stem)
        rows.append({"case_id": stem, "subject": ct.relative_to(dataset / "rawdata").parts[0], "release": release,
                     "layout": "bids", "image": str(ct), "mask": str(der / f"{stem}_seg-vert_msk.nii.gz"),
                     "centroids": str(_first_existing(der, [f"{stem}_seg-subreg_ctd.json", f"{stem}_seg-vb_ctd.json"])),
                     "ctd_frame": "bids", "_split": ent.get("split", ""), "_acq": ent.get("dir", "")})
    return rows


def _challenge_scans(root: Path, bids: Sequence[Path]) -> list[dict]:
    """One row per challenge-layout CT (``verse012_CT-orient.nii.gz`` beside ``..._seg.nii.gz``)
    anywhere under ``root`` outside the BIDS folders."""
    rows = []
    for ct in sorted(root.rglob("*.nii.gz")) if root.is_dir() else []:
        m = _CHALLENGE_RE.match(ct.name)
        if not m or any(ct.is_relative_to(b / sub) for b in bids for sub in ("rawdata", "derivatives")):
            continue
        stem = ct.name[: -len(".nii.gz")]
        home = ct.parent.parent if ct.parent.name.lower() == m["core"].lower() else ct.parent
        ctd = _first_existing(ct.parent, [f"{stem}_iso-ctd.json", f"{stem}_ctd.json"])
        rows.append({"case_id": stem, "subject": f"sub-{m['core'].lower()}",
                     "release": _release_name(home, root), "layout": "challenge",
                     "image": str(ct), "mask": str(ct.parent / f"{stem}_seg.nii.gz"), "centroids": str(ctd),
                     "ctd_frame": "challenge_iso_asl" if ctd.name.endswith("_iso-ctd.json") else "auto",
                     "_split": (m["split"] or "").lower(), "_acq": (m["acq"] or "")[3:].lower()})
    return rows


def _scan_keys(rows: list[dict]) -> None:
    """Set ``scan_key``, one value per physical scan, on BIDS and challenge rows.

    A BIDS scan's key is its file stem (``sub-verse012``, ``sub-gl003_dir-ax``): the releases
    name a scan alike. A challenge copy takes the key of the BIDS scan it matches: same subject
    and ``split`` ID (a challenge ``verse262`` whose ID is a BIDS ``split-verse262`` takes that
    BIDS subject), and the same acquisition (``CT-ax`` = ``dir-ax``) or, when the subject has one
    scan on each side, that one (``verse012_CT-orient`` = ``sub-verse012``).
    """
    bids: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["layout"] == "bids":
            r["scan_key"] = r["case_id"]
            bids.setdefault((r["subject"], r["_split"]), []).append(r["case_id"])
    alias = {split: subject for subject, split in bids if split}
    challenge = [r for r in rows if r["layout"] == "challenge"]
    for r in challenge:
        core = r["subject"].removeprefix("sub-")
        if not r["_split"] and core in alias:
            r["subject"], r["_split"] = alias[core], core
    several = Counter((r["release"], r["subject"], r["_split"]) for r in challenge)
    for r in challenge:
        base = r["subject"] + (f"_split-{r['_split']}" if r["_split"] else "")
        own = base + (f"_dir-{r['_acq']}" if r["_acq"] else "")
        cands = sorted(set(bids.get((r["subject"], r["_split"]), [])))
        single = len(cands) == 1 and several[(r["release"], r["subject"], r["_split"])] == 1
        r["scan_key"] = own if own in cands or not single else cands[0]


def _preference(r: Mapping) -> tuple:
    """Sort key of the copies of one scan: image and mask present, BIDS before challenge, the
    newer release (VerSe 2020's labels were revised), then release name and path."""
    complete = Path(r["image"]).is_file() and Path(r["mask"]).is_file()
    return (not complete, r["layout"] != "bids", -_release_year(r["release"]), r["release"], r["image"])


def discover_verse(verse_root: str | Path) -> VerseDiscovery:
    """Every VerSe scan under ``verse_root``, duplicates across releases resolved.

    Looks for BIDS releases (the root itself or any folder below it with ``rawdata/``:
    ``dataset-verse19training/``, ``dataset-verse20validation/``, ...; :data:`BIDS_PATTERNS`) and
    MICCAI challenge copies in flat folders (:data:`CHALLENGE_PATTERNS`). ``release`` is the
    dataset folder without ``dataset-`` (the root's own name for a bare BIDS root); ``subject``
    is the BIDS ``sub-`` folder (challenge ``verse012`` -> ``sub-verse012``); ``ctd_frame`` says
    how the centroid file counts (``bids``: voxel indices in the file's ``direction``;
    ``challenge_iso_asl``: 1 mm isotropic ASL; ``auto``: decided from the file). Missing masks or
    centroid files keep their expected path (:func:`inspect_verse_case` reports them).

    The same scan in several releases (VerSe 2019 and 2020 share scans; challenge copies repeat
    BIDS ones) is kept once (:func:`_preference`: complete files, BIDS, the newer release); every
    copy is listed in ``duplicates``.
    """
    root = Path(verse_root)
    bids = _bids_folders(root) if root.is_dir() else []
    rows = [r for b in bids for r in _bids_scans(b, root)] + _challenge_scans(root, bids)
    _scan_keys(rows)
    by_key: dict[str, list[dict]] = {}
    for r in rows:
        by_key.setdefault(r["scan_key"], []).append(r)
    kept, dups = [], []
    for copies in by_key.values():
        copies.sort(key=_preference)
        kept.append(copies[0])
        if len(copies) > 1:
            dups += [{**c, "kept": i == 0} for i, c in enumerate(copies)]
    scans = pd.DataFrame(kept, columns=VERSE_COLUMNS).sort_values(["release", "case_id"], ignore_index=True)
    clash = scans["case_id"].duplicated(keep=False)
    scans.loc[clash, "case_id"] = scans.loc[clash, "case_id"] + "__" + scans.loc[clash, "release"].str.replace("/", "-")
    return VerseDiscovery(root, scans, pd.DataFrame(dups, columns=DUPLICATE_COLUMNS))


def find_verse_cases(verse_root: str | Path) -> list[dict[str, str]]:
    """The VerSe scans under ``verse_root`` (:func:`discover_verse`) as dicts with
    :data:`VERSE_COLUMNS` (``case_id``: the file stem, e.g. ``sub-verse004_dir-ax``).

    Raises:
        FileNotFoundError: no scan found; the message lists every pattern looked for and the
        folders that exist under the root.
    """
    found = discover_verse(verse_root)
    if found.scans.empty:
        raise FileNotFoundError(found.not_found_message())
    return found.scans.to_dict("records")


def inspect_verse_case(item: dict[str, Any]) -> dict[str, Any]:
    """Decide whether one VerSe scan may pretrain the model (the paper's rules; module level).

    A scan is used when (1) image and mask are readable, share shape, spacing and affine, and
    hold only vertebra labels (:func:`lib.io.check_pair`), and (2) its field of view is
    complete: the labelled spine runs from C1 down to the last lumbar vertebra without a gap
    (``lib.core.labels.ordered``; the variants T11 (no T12), T13, L4 last and L6 allowed), no labelled voxel lies within
    ``border_mm`` of any face of the volume (the spine is not cut, neither in z nor in-plane),
    and at least ``end_margin_mm`` of image lie above C1 and below the last vertebra (skull
    base and sacrum are in view). ``item`` may set ``border_mm`` (default 4) and
    ``end_margin_mm`` (default 15).

    Returns:
        ``item`` plus ``usable`` (bool), ``reason`` (why not, or ""), ``labels`` (present,
        craniocaudal, as names), ``n_vertebrae``, ``first``/``last`` label names, ``shape``,
        ``spacing_mm`` and ``mask_spacing_mm``.
    """

    row: dict[str, Any] = {**item, "usable": False, "reason": "", "fault": False, "labels": "", "n_vertebrae": 0,
                           "first": "", "last": "", "shape": "", "spacing_mm": "", "mask_spacing_mm": ""}
    border_mm = float(item.get("border_mm", 4.0))
    end_mm = float(item.get("end_margin_mm", 15.0))
    for key in ("image", "mask"):
        if not Path(item[key]).exists():
            row["reason"], row["fault"] = f"{key} missing: {item[key]}", True
            return row
    # each file read once: the CT as int16/float32, the mask slab by slab into uint8 (VerSe
    # stores float64 masks), its label values counted on the way (lib.io.read_mask)
    img, faults = load_checked(item["image"], canonical=False, kind="image")
    if img is None:
        row["reason"], row["fault"] = "; ".join(f.message for f in faults), True
        return row
    faults = image_faults(img, item["image"])
    img_ras = canonical_geometry(img.original_affine, img.shape)
    row["shape"] = "x".join(str(n) for n in img_ras[1])
    row["spacing_mm"] = " ".join(f"{v:.3g}" for v in img_ras[0])
    del img
    msk, read_faults = load_checked(item["mask"], canonical=True, kind="mask")
    if msk is None:
        row["reason"], row["fault"] = "; ".join(f.message for f in read_faults), True
        return row
    row["mask_spacing_mm"] = " ".join(f"{v:.3g}" for v in msk.spacing)
    image_grid = open_nifti(item["image"]).header_volume()
    faults += mask_faults(msk, image_grid, allowed_labels=L.VERSE_LABELS, path=item["mask"])
    if faults:
        row["fault"] = True
        if not np.allclose(msk.spacing, img_ras[0], atol=1e-3):
            row["reason"] = (f"mask spacing {row['mask_spacing_mm']} mm differs from image spacing "
                             f"{row['spacing_mm']} mm")
        else:
            row["reason"] = "; ".join(f.message for f in faults)
        return row
    m = msk.array
    present = L.ordered(v for v, n in msk.meta["label_scan"].counts.items() if v != 0 and n)
    row["labels"] = " ".join(L.name(v) for v in present)
    row["n_vertebrae"] = len(present)
    if not present:
        row["reason"], row["fault"] = "empty mask", True
        return row
    row["first"], row["last"] = L.name(present[0]), L.name(present[-1])
    if present[0] != 1:
        row["reason"] = f"cropped: the spine starts at {L.name(present[0])}, C1 not in the field of view"
        return row
    chain = L.ordered([v for v in L.LABELS if v <= present[-1] or (v == L.T13 and present[-1] >= 20)])
    gaps = [L.name(v) for v in chain if v not in present and v not in (L.T12, L.T13, L.L6)]  # T11 spines lack T12
    if present[-1] < 23:  # the lowest labelled vertebra is not lumbar (L4..L6)
        row["reason"] = f"cropped: the spine ends at {L.name(present[-1])}, no lumbosacral junction"
        return row
    if gaps:
        row["reason"] = f"labels missing inside the spine: {' '.join(gaps)}"
        return row
    first, last = nonzero_extent(m)
    sp = np.asarray(msk.spacing)
    lo = first * sp
    hi = (np.array(m.shape) - 1 - last) * sp
    touching = [f"{'RAS'[a]}-{'low' if lo[a] < border_mm else 'high'}" for a in range(3)
                if lo[a] < border_mm or hi[a] < border_mm]
    if touching:
        row["reason"] = f"cropped: labelled voxels within {border_mm:g} mm of the volume border ({', '.join(touching)})"
        return row
    if hi[2] < end_mm or lo[2] < end_mm:
        where = "above C1" if hi[2] < end_mm else f"below {L.name(present[-1])}"
        row["reason"] = f"cropped: less than {end_mm:g} mm of image {where}"
        return row
    row["usable"] = True
    return row


def select_pretraining_cases(verse_root: str | Path | VerseDiscovery, workers: int | None = 0, border_mm: float = 4.0,
                             end_margin_mm: float = 15.0, progress: bool = True):
    """Apply the paper's pretraining selection to every VerSe scan under ``verse_root`` (a folder,
    searched by :func:`discover_verse`, or a discovery already made).

    Returns:
        ``(usable, table)``: ``usable`` = ``[(case_id, image, mask), ...]`` of the complete scans
        whose image and mask agree; ``table`` = a pandas DataFrame with one row per scan
        (:data:`VERSE_COLUMNS` and the columns of :func:`inspect_verse_case`), unreadable scans
        included with their error.

    Raises:
        FileNotFoundError: no VerSe scan under the root (the message says what was looked for).
    """
    found = verse_root if isinstance(verse_root, VerseDiscovery) else discover_verse(verse_root)
    if found.scans.empty:
        raise FileNotFoundError(found.not_found_message())
    items = [{**it, "border_mm": border_mm, "end_margin_mm": end_margin_mm} for it in found.scans.to_dict("records")]
    res = map_cases(inspect_verse_case, items, ids=[it["case_id"] for it in items], workers=workers,
                    on_error="collect", desc="VerSe selection", progress=progress)
    rows = []
    for it in items:
        if it["case_id"] in res.values:
            rows.append(res.values[it["case_id"]])
        else:
            msg = next(f.message for f in res.failures if f.case_id == it["case_id"]).splitlines()[0]
            rows.append({**it, "usable": False, "reason": f"unreadable: {msg}", "fault": True})
    table = pd.DataFrame(rows).drop(columns=["border_mm", "end_margin_mm"], errors="ignore")
    usable = [(r["case_id"], r["image"], r["mask"]) for r in rows if r["usable"]]
    return usable, table


def write_verse_centroids(path: Path, centroids: Mapping[int, Sequence[float]], affine: np.ndarray,
                          shape: Sequence[int], direction: Sequence[str] = ("P", "I", "R"), decimals: int = 3) -> Path:
    """Write a VerSe ``_ctd.json``: ``[{"direction": [...]}, {"label", "X", "Y", "Z"}, ...]``.

    Args:
        path: output ``..._seg-subreg_ctd.json``.
        centroids: {label: (x, y, z)} in world mm (RAS).
        affine, shape: geometry of the CT file as stored (the json refers to its voxel grid).
        direction: axis codes of the coordinate system: X, Y, Z are voxel indices of the CT
            reoriented to these directions (a flipped axis counts ``n - 1 - i``).
    """
    ornt_img = orientations.io_orientation(affine)
    tr = orientations.ornt_transform(ornt_img, orientations.axcodes2ornt(tuple(direction)))
    inv = np.linalg.inv(np.asarray(affine, float))
    body: list[dict] = [{"direction": list(direction)}]
    for lab in sorted(centroids, key=lambda v: (19.5 if v == 28 else v)):
        vox = (inv @ np.array([*centroids[lab], 1.0]))[:3]
        out = np.zeros(3)
        for i in range(3):
            j, flip = int(tr[i, 0]), tr[i, 1]
            out[j] = vox[i] if flip > 0 else (shape[i] - 1) - vox[i]
        body.append({"label": int(lab), "X": round(float(out[0]), decimals), "Y": round(float(out[1]), decimals),
                     "Z": round(float(out[2]), decimals)})
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(body, indent=1))
    return path


CTD_FRAMES = ("auto", "bids", "challenge_iso_asl")
"""Coordinate frames of VerSe centroid files (:func:`read_verse_centroids`)."""


def _ctd_entries(path: Path) -> tuple[list, list]:
    """``(directions, centroid entries)`` of a centroid file (the VerSe 2019 dict variant too)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable centroid json ({exc})") from None
    if isinstance(data, dict):
        data = data.get("vertebralCentroids", data.get("centroids", []))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of centroid entries")
    dirs = [d["direction"] for d in data if isinstance(d, dict) and "direction" in d]
    return dirs, [d for d in data if not (isinstance(d, dict) and "direction" in d)]


def _resolve_frame(path: Path, frame: str, dirs: list) -> tuple[tuple[str, ...], bool]:
    """``(axis codes, coordinates in mm)`` of a centroid file in ``frame``."""
    if frame not in CTD_FRAMES:
        raise ValueError(f"unknown centroid frame {frame!r}; expected one of {CTD_FRAMES}")
    if frame == "auto":
        frame = "bids" if dirs else ("challenge_iso_asl" if Path(path).name.endswith("iso-ctd.json") else "")
    if frame == "bids":
        if not dirs:
            raise ValueError(f"{path}: no 'direction' entry (a BIDS VerSe _ctd.json starts with one)")
        return tuple(dirs[0]), False
    if frame == "challenge_iso_asl":
        return ("A", "S", "L"), True
    raise ValueError(f"{path}: no 'direction' entry and not a challenge '_iso-ctd.json'; pass frame=")


def read_verse_centroids(path: Path, affine: np.ndarray, shape: Sequence[int],
                         frame: str = "auto") -> dict[int, tuple[float, float, float]]:
    """Read a VerSe centroid file into {label: (x, y, z) world mm, RAS} given the CT geometry.

    Frames: ``"bids"`` (the BIDS releases' ``_seg-subreg_ctd.json``: a ``direction`` entry, then
    X, Y, Z = voxel indices of the CT reoriented to those axis codes, a reversed axis counting
    ``n - 1 - i``); ``"challenge_iso_asl"`` (the MICCAI challenge copies'
    ``_iso-ctd.json``: X, Y, Z in mm of the CT reoriented to ASL and resampled to 1 mm, i.e.
    millimetres from the first voxel's centre along A, S, L); ``"auto"`` picks ``bids`` when the
    file has a direction entry and ``challenge_iso_asl`` for an ``*iso-ctd.json`` without one.
    Entries with non-finite coordinates are skipped.

    Raises:
        ValueError: unreadable json, an unknown frame, no frame to be found, or an entry without
        label/X/Y/Z; names the file.
    """
    dirs, entries = _ctd_entries(path)
    codes, in_mm = _resolve_frame(path, frame, dirs)
    ornt_img = orientations.io_orientation(affine)
    tr = orientations.ornt_transform(ornt_img, orientations.axcodes2ornt(codes))
    aff = np.asarray(affine, float)
    zooms = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    out: dict[int, tuple[float, float, float]] = {}
    for d in entries:
        try:
            coords = np.array([float(d["X"]), float(d["Y"]), float(d["Z"])])
            lab = int(d["label"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: bad centroid entry {d!r} ({exc})") from None
        if not np.all(np.isfinite(coords)):
            continue
        vox = np.zeros(3)
        for i in range(3):
            j, flip = int(tr[i, 0]), tr[i, 1]
            c = coords[j] / zooms[i] if in_mm else coords[j]
            vox[i] = c if flip > 0 else (shape[i] - 1) - c
        w = aff @ np.array([*vox, 1.0])
        out[lab] = (float(w[0]), float(w[1]), float(w[2]))
    return out


def centroid_file_for(mask_path: str | Path) -> Path | None:
    """The centroid file that belongs to a truth mask, if it exists beside it.

    ``<stem>_seg-vert_msk.nii.gz`` -> ``<stem>_seg-subreg_ctd.json`` or ``<stem>_seg-vb_ctd.json``
    (BIDS releases);
    ``<stem>_seg.nii.gz`` -> ``<stem>_iso-ctd.json`` (challenge copies), ``<stem>_seg-subreg_ctd.json``
    or ``<stem>_ctd.json``. None when there is none.
    """
    mask_path = Path(mask_path)
    name = strip_nifti_suffix(mask_path)
    for suffix in ("_seg-vert_msk", "_seg"):
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            break
    else:
        stem = name
    for cand in (f"{stem}_seg-subreg_ctd.json", f"{stem}_seg-vb_ctd.json", f"{stem}_iso-ctd.json", f"{stem}_ctd.json"):
        if (mask_path.parent / cand).is_file():
            return mask_path.parent / cand
    return None


def export_verse_centroids(release_dir: str | Path, out_dir: str | Path,
                           direction: Sequence[str] = ("P", "I", "R")) -> list[Path]:
    """Write VerSe-style centroid files from the release masks.

    For every ``<split>/gt/<ID>_seg.nii.gz``: ``<out_dir>/<split>/<ID>_seg-subreg_ctd.json`` =
    ``[{"direction": [...]}, {"label": L, "X": .., "Y": .., "Z": ..}, ...]``: VerSe's convention,
    the vertebral-body centroid of each label (:func:`lib.metrics.body_centroids_mm`) in voxel
    coordinates of the image reoriented to ``direction`` (a reversed axis counts ``n - 1 - i``),
    labels in craniocaudal order. Atomic writes.
    """
    rd, out = Path(release_dir), Path(out_dir)
    written = []
    for split in SPLITS:
        for m in sorted((rd / split / "gt").glob("*_seg.nii.gz")):
            img = nib.load(str(m))
            arr = np.asarray(img.dataobj)
            cents = {v: c for v, c in body_centroids_mm(arr, img.affine).items() if v in L.LABELS}
            rid = strip_nifti_suffix(m)[: -len("_seg")]
            written.append(write_verse_centroids(out / split / f"{rid}_seg-subreg_ctd.json", cents, img.affine,
                                                 arr.shape, direction=direction))
    return written


def verse_subject(case_id: str) -> str:
    """The subject of a VerSe scan from its case id alone: ``sub-verse407_split-verse262`` ->
    ``sub-verse407``, challenge ``verse012_CT-orient`` -> ``sub-verse012`` (the selection table's
    ``subject`` column is the authority; this is the fallback for tables without one)."""
    head = str(case_id).split("_")[0]
    return head if head.startswith("sub-") else f"sub-{head.lower()}"


def split_by_subject(cases: Sequence[Sequence[str]], subjects: Mapping[str, str], n_holdout: int,
                     seed: int = 0) -> tuple[list, list]:
    """Seeded hold-out that keeps every scan of a subject on one side.

    Subjects (in order of first appearance, ``subjects[case_id]``, else :func:`verse_subject`)
    are taken in a seeded order until at least ``n_holdout`` scans are held out; at least one
    subject always trains. With one scan per subject this is :func:`lib.core.cases.split_cases`.

    Returns:
        ``(train, held_out)``, input order kept.
    """
    cases = list(cases)
    subj = [subjects.get(c[0]) or verse_subject(c[0]) for c in cases]
    order = list(dict.fromkeys(subj))
    per_subject = Counter(subj)
    held: set[str] = set()
    n_held = 0
    for i in np.random.default_rng(seed).permutation(len(order)).tolist():
        if n_held >= n_holdout or len(held) >= len(order) - 1:
            break
        held.add(order[i])
        n_held += per_subject[order[i]]
    return [c for c, s in zip(cases, subj, strict=True) if s not in held], [c for c, s in zip(cases, subj, strict=True) if s in held]


TEST_VERSE, VERSE_CROPPED = "Test_VerSe", "VerSe_cropped"
"""The benchmark's VerSe sets: the paper's Test_VerSe and, for information, the cropped scans."""
TEST_SET_COLUMNS = ["set", "case_id", "subject", "release", "layout", "image", "mask", "why"]


def _subjects(df: pd.DataFrame) -> pd.Series:
    """The ``subject`` column, or the subjects derived from the case ids for older tables."""
    if "subject" in df:
        return df["subject"].astype(str)
    return df["case_id"].astype(str).map(verse_subject)


def verse_test_sets(split_csv: str | Path, selection_csv: str | Path, pretrained_on_verse: bool) -> pd.DataFrame:
    """Every VerSe scan with the benchmark set it belongs to and why (``set`` "" = not evaluated).

    From 02_pretraining's ``tables/split.csv`` and ``tables/verse_selection.csv``:

    * ``pretrained_on_verse`` False (the benchmark model never saw VerSe, as the paper's nnU-Net
      trained from scratch on the CTSpine1K trainset): ``Test_VerSe`` = every usable scan
      (complete, uncropped, image and mask on one grid) -- the paper's definition, its 41 scans.
    * True (the model starts from the VerSe-pretrained one): ``Test_VerSe`` = the usable scans of
      subjects 02 never trained on (its held-out scans); the scans it trained on are left out.

    ``VerSe_cropped`` = the cropped scans (of subjects the model never trained on), evaluated for
    information; never part of Test_VerSe. Scans whose mask is on another grid or unreadable are
    in neither set.

    Raises:
        FileNotFoundError: a table is missing (02 has not run), naming it.
    """
    for f in (split_csv, selection_csv):
        if not Path(f).exists():
            raise FileNotFoundError(f"{f}: missing; run 02_pretraining first")
    sel = pd.read_csv(selection_csv, dtype={"case_id": str})
    split = pd.read_csv(split_csv, dtype={"case_id": str})
    sel = sel.assign(subject=_subjects(sel), reason=sel["reason"].fillna("").astype(str))
    for col in ("release", "layout"):
        sel[col] = sel[col].fillna("") if col in sel else ""
    train = split[split["split"] == "train"]
    seen = (sel["case_id"].isin(set(train["case_id"])) | sel["subject"].isin(set(_subjects(train)))
            if pretrained_on_verse else pd.Series(False, index=sel.index))
    usable = sel["usable"].astype(bool)
    cropped = sel["reason"].str.startswith("cropped")
    conds = [usable & ~seen, cropped & ~seen, usable & seen, cropped & seen]
    sets = np.select(conds, [TEST_VERSE, VERSE_CROPPED, "", ""], "")
    never = ("held out by 02_pretraining, its subject never trained on" if pretrained_on_verse
             else "the benchmark model never saw VerSe")
    why = np.select(conds, [f"usable (complete, one grid); {never}", "cropped, for information: " + sel["reason"],
                            "usable, but trained 02_pretraining's model (the benchmark model starts from it)",
                            "cropped, but its subject trained 02_pretraining's model"],
                    "not evaluated: " + sel["reason"])
    return sel.assign(set=sets, why=why)[TEST_SET_COLUMNS]


def test_verse_definition(table: pd.DataFrame, pretrained_on_verse: bool) -> str:
    """Which Test_VerSe a :func:`verse_test_sets` table holds, in words (run record, Table 2)."""
    sets = table["set"].fillna("")
    test, crop = table[sets == TEST_VERSE], table[sets == VERSE_CROPPED]
    n_sub = test["subject"].nunique()
    head = f"Test_VerSe: {len(test)} usable VerSe scan(s) of {n_sub} subject{'' if n_sub == 1 else 's'}"
    if pretrained_on_verse:
        n_seen = int(table["why"].astype(str).str.startswith("usable, but trained").sum())
        text = (f"{head}, those 02_pretraining held out: the benchmark model starts from the VerSe-pretrained "
                f"one, so the {n_seen} usable scans 02 trained on are left out (the paper's Test_VerSe "
                "is every usable scan, 41 in VerSe: its nnU-Net was trained from scratch)")
    else:
        text = (f"{head} (complete, uncropped, image and mask on one grid): the paper's definition (41 in VerSe); "
                "the benchmark model, trained from scratch on the CTSpine1K trainset, saw none of them")
    return text + f". VerSe_cropped: {len(crop)} cropped scans, for information, never in Test_VerSe."


def verse_cases(table: pd.DataFrame) -> list[Case]:
    """The evaluated scans of a :func:`verse_test_sets` table as cases (``case.split`` = the set)."""
    keep = table[table["set"].fillna("") != ""]
    return [Case(str(r.case_id), Path(r.image), Path(r.mask), str(r.set)) for r in keep.itertuples()]
