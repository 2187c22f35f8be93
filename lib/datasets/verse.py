"""VerSe on disk: discovery of the BIDS layout, the pretraining selection, centroid files.

BIDS: ``rawdata/sub-X/sub-X[_dir-orient]_ct.nii.gz``, ``derivatives/sub-X/..._seg-vert_msk.nii.gz``,
``..._seg-subreg_ctd.json`` = ``[{"direction": ["P","I","R"]}, {"label": L, "X":.., "Y":.., "Z":..}]``
(voxel coordinates in the stated axis directions).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel import orientations
from scipy import ndimage

from lib.core import labels as L
from lib.core.cases import Case
from lib.core.parallel import map_cases
from lib.core.paths import SPLITS
from lib.io.atomic import atomic_path, write_text
from lib.io.integrity import check_pair
from lib.io.nifti import load_volume, strip_nifti_suffix


def find_verse_cases(verse_root: str | Path) -> list[dict[str, str]]:
    """VerSe scans in BIDS layout: ``rawdata/sub-X/sub-X[_dir-ax]_ct.nii.gz`` with
    ``derivatives/sub-X/<stem>_seg-vert_msk.nii.gz`` (and ``_seg-subreg_ctd.json``).

    Returns:
        One dict per CT (sorted): ``case_id`` (the file stem, e.g. ``sub-verse004_dir-ax``),
        ``subject``, ``image``, ``mask`` and ``centroids`` paths (missing files keep their
        expected path; :func:`inspect_verse_case` reports them).

    Raises:
        FileNotFoundError: no ``rawdata`` folder under ``verse_root``.
    """
    root = Path(verse_root)
    raw, der = root / "rawdata", root / "derivatives"
    if not raw.is_dir():
        raise FileNotFoundError(f"{raw}: no VerSe rawdata folder (BIDS: rawdata/sub-X/sub-X[_dir-ax]_ct.nii.gz)")
    out = []
    for ct in sorted(raw.glob("sub-*/*_ct.nii.gz")):
        stem = ct.name[: -len("_ct.nii.gz")]
        sub = ct.parent.name
        out.append({"case_id": stem, "subject": sub, "image": str(ct),
                    "mask": str(der / sub / f"{stem}_seg-vert_msk.nii.gz"),
                    "centroids": str(der / sub / f"{stem}_seg-subreg_ctd.json")})
    return out


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

    row: dict[str, Any] = {**item, "usable": False, "reason": "", "labels": "", "n_vertebrae": 0, "first": "",
                           "last": "", "shape": "", "spacing_mm": "", "mask_spacing_mm": ""}
    border_mm = float(item.get("border_mm", 4.0))
    end_mm = float(item.get("end_margin_mm", 15.0))
    for key in ("image", "mask"):
        if not Path(item[key]).exists():
            row["reason"] = f"{key} missing: {item[key]}"
            return row
    faults = check_pair(item["image"], item["mask"], allowed_labels=L.VERSE_LABELS)
    img = load_volume(item["image"])
    row["shape"] = "x".join(str(n) for n in img.shape)
    row["spacing_mm"] = " ".join(f"{v:.3g}" for v in img.spacing)
    try:
        msk = load_volume(item["mask"])
        row["mask_spacing_mm"] = " ".join(f"{v:.3g}" for v in msk.spacing)
    except Exception as exc:  # reported through faults too
        row["reason"] = str(exc)
        return row
    if faults:
        if not np.allclose(msk.spacing, img.spacing, atol=1e-3):
            row["reason"] = (f"mask spacing {row['mask_spacing_mm']} mm differs from image spacing "
                             f"{row['spacing_mm']} mm")
        else:
            row["reason"] = "; ".join(f.message for f in faults)
        return row
    m = np.asarray(msk.array)
    present = L.ordered(int(v) for v in np.unique(m) if v != 0)
    row["labels"] = " ".join(L.name(v) for v in present)
    row["n_vertebrae"] = len(present)
    if not present:
        row["reason"] = "empty mask"
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
    idx = np.nonzero(m)
    sp = np.asarray(img.spacing)
    lo = np.array([int(i.min()) for i in idx]) * sp
    hi = (np.array(m.shape) - 1 - np.array([int(i.max()) for i in idx])) * sp
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


def select_pretraining_cases(verse_root: str | Path, workers: int | None = 0, border_mm: float = 4.0,
                             end_margin_mm: float = 15.0, progress: bool = True):
    """Apply the paper's pretraining selection to every VerSe scan under ``verse_root``.

    Returns:
        ``(usable, table)``: ``usable`` = ``[(case_id, image, mask), ...]`` of the complete scans
        whose image and mask agree; ``table`` = a pandas DataFrame with one row per scan
        (see :func:`inspect_verse_case`), unreadable scans included with their error.
    """
    items = [{**it, "border_mm": border_mm, "end_margin_mm": end_margin_mm} for it in find_verse_cases(verse_root)]
    res = map_cases(inspect_verse_case, items, ids=[it["case_id"] for it in items], workers=workers,
                    on_error="collect", desc="VerSe selection", progress=progress)
    rows = []
    for it in items:
        if it["case_id"] in res.values:
            rows.append(res.values[it["case_id"]])
        else:
            msg = next(f.message for f in res.failures if f.case_id == it["case_id"]).splitlines()[0]
            rows.append({**it, "usable": False, "reason": f"unreadable: {msg}"})
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


def read_verse_centroids(path: Path, affine: np.ndarray, shape: Sequence[int]) -> dict[int, tuple[float, float, float]]:
    """Read a VerSe ``_ctd.json`` into {label: (x, y, z) world mm, RAS} given the CT geometry.

    Raises:
        ValueError: no ``direction`` entry, or an entry without label/X/Y/Z; names the file.
    """
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "vertebralCentroids" in data:  # VerSe 2019 variant
        data = data["vertebralCentroids"]
    dirs = [d["direction"] for d in data if isinstance(d, dict) and "direction" in d]
    if not dirs:
        raise ValueError(f"{path}: no 'direction' entry")
    ornt_img = orientations.io_orientation(affine)
    tr = orientations.ornt_transform(ornt_img, orientations.axcodes2ornt(tuple(dirs[0])))
    aff = np.asarray(affine, float)
    out: dict[int, tuple[float, float, float]] = {}
    for d in data:
        if "direction" in d:
            continue
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
            vox[i] = coords[j] if flip > 0 else (shape[i] - 1) - coords[j]
        w = aff @ np.array([*vox, 1.0])
        out[lab] = (float(w[0]), float(w[1]), float(w[2]))
    return out


def export_verse_centroids(release_dir: str | Path, out_dir: str | Path,
                           direction: Sequence[str] = ("P", "I", "R")) -> list[Path]:
    """Write VerSe-style centroid files from the release masks.

    For every ``<split>/gt/<ID>_seg.nii.gz``: ``<out_dir>/<split>/<ID>_seg-subreg_ctd.json`` =
    ``[{"direction": [...]}, {"label": L, "X": .., "Y": .., "Z": ..}, ...]``: the centre of mass
    of each label in voxel coordinates of the image reoriented to ``direction`` (a reversed
    axis counts ``n - 1 - i``), labels in craniocaudal order. Atomic writes.
    """
    rd, out = Path(release_dir), Path(out_dir)
    written = []
    target = orientations.axcodes2ornt(tuple(direction))
    for split in SPLITS:
        for m in sorted((rd / split / "gt").glob("*_seg.nii.gz")):
            img = nib.load(str(m))
            arr = np.asarray(img.dataobj)
            tr = orientations.ornt_transform(orientations.io_orientation(img.affine), target)
            body: list[dict] = [{"direction": list(direction)}]
            present = [int(v) for v in np.unique(arr) if v in L.LABELS]
            coms = ndimage.center_of_mass(np.ones_like(arr, dtype=np.uint8), arr, present) if present else []
            for lab, com in sorted(zip(present, coms, strict=True), key=lambda t: L.level_index(t[0])):
                xyz = [0.0, 0.0, 0.0]
                for i in range(3):
                    j, flip = int(tr[i, 0]), tr[i, 1]
                    xyz[j] = com[i] if flip > 0 else (arr.shape[i] - 1) - com[i]
                body.append({"label": lab, "X": round(xyz[0], 3), "Y": round(xyz[1], 3), "Z": round(xyz[2], 3)})
            rid = strip_nifti_suffix(m)[: -len("_seg")]
            written.append(write_text(out / split / f"{rid}_seg-subreg_ctd.json", json.dumps(body, indent=1) + "\n"))
    return written


def test_verse_cases(split_csv: str | Path, selection_csv: str | Path) -> list[Case]:
    """Test_VerSe: every VerSe scan the pretraining did not train on whose mask shares the image
    grid -- the held-out complete scans and the cropped scans -- from 02_pretraining's
    ``tables/split.csv`` and ``tables/verse_selection.csv`` (``split`` of the cases: ``Test_VerSe``).

    Raises:
        FileNotFoundError: a table is missing (02 has not run), naming it.
    """
    for f in (split_csv, selection_csv):
        if not Path(f).exists():
            raise FileNotFoundError(f"{f}: missing; run 02_pretraining first")
    trained = set(pd.read_csv(split_csv).query("split == 'train'")["case_id"].astype(str))
    sel = pd.read_csv(selection_csv)
    keep = sel[~sel["case_id"].astype(str).isin(trained)
               & (sel["usable"].astype(bool) | sel["reason"].astype(str).str.startswith("cropped"))]
    return [Case(str(r.case_id), Path(r.image), Path(r.mask), "Test_VerSe") for r in keep.itertuples()]
