"""The synthetic truth ("oracle"): masks, centroids, variants and planted identifiers.

Written by :mod:`lib.synthetic.generate` under ``data/<profile>/oracle/`` and read **only** by the
simulated annotators and by evaluation, never as a pipeline input, so the synthetic study
stays as blind as a real one:

* ``index.csv`` - one row per generated series/volume: ``source``, ``patient_id``,
  ``source_key`` (SeriesInstanceUID for DICOM, file stem for NIfTI), counts, variant, FOV,
  spacing, quality flag and reason, ``mask_path`` and ``centroids_path`` (relative to the
  oracle folder), ``image_path`` (relative to the sources folder).
* ``<SOURCE>/<source_key>_seg.nii.gz`` - the truth label map in the same world geometry as
  the source volume (for DICOM: the series' own grid, every slice including dropped ones).
* ``<SOURCE>/<source_key>_ctd.json`` - truth centroids in world mm (RAS): ``centroids`` (centre of
  mass of each label) and ``body_centroids`` (vertebral-body centroids, VerSe's convention),
  each ``{label: [x, y, z]}``.
* ``phi_planted.json`` - every planted identifying string, for curation's PHI audit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.paths import ProfilePaths
from lib.imaging.resampling import resample_labels_to
from lib.io import Volume, load_mask, save_volume, write_text

INDEX_COLUMNS = (
    "source", "patient_id", "source_key", "series_description", "time_point", "n_thoracic", "n_lumbar",
    "variant", "sacralization", "fov", "spacing_x_mm", "spacing_y_mm", "spacing_z_mm", "slice_thickness_mm",
    "shape", "quality", "quality_reason", "metal", "contrast_phase", "labels", "seed", "scan_seed",
    "mask_path", "centroids_path", "image_path",
)


class OracleError(LookupError):
    """Missing or inconsistent truth; the message names the source, key and file."""


def truth_paths(oracle_root: Path, source: str, source_key: str) -> tuple[Path, Path]:
    """(mask path, centroid json path) of one source volume in the oracle folder."""
    d = Path(oracle_root) / source
    return d / f"{source_key}_seg.nii.gz", d / f"{source_key}_ctd.json"


def write_truth(oracle_root: Path, source: str, source_key: str, mask: np.ndarray, affine: np.ndarray,
                centroids: dict[int, tuple[float, float, float]],
                body_centroids: dict[int, tuple[float, float, float]] | None = None) -> tuple[Path, Path]:
    """Write a truth mask (uint8, array order of ``affine``) and its world centroids atomically:
    ``centroids`` (each label's centre of mass) and ``body_centroids`` (the true vertebral-body
    centroids, VerSe's convention), both ``{label: [x, y, z]}`` in RAS world mm."""
    mpath, cpath = truth_paths(oracle_root, source, source_key)
    save_volume(np.asarray(mask, np.uint8), affine, mpath)

    def as_json(c):
        return {str(int(k)): [round(float(x), 4) for x in v] for k, v in sorted(c.items())}

    doc = {"space": "RAS world mm", "centroids": as_json(centroids)}
    if body_centroids is not None:
        doc["body_centroids"] = as_json(body_centroids)
    write_text(cpath, json.dumps(doc, indent=1))
    return mpath, cpath


def read_index(paths: ProfilePaths) -> pd.DataFrame:
    """The oracle index (one row per generated series/volume).

    Raises:
        OracleError: when ``oracle/index.csv`` does not exist (00_sources has not run).
    """
    path = Path(paths.oracle) / "index.csv"
    if not path.exists():
        raise OracleError(f"{path}: no oracle index; run notebooks/00_sources.ipynb for profile {paths.profile!r}")
    return pd.read_csv(path, dtype={"patient_id": str, "source_key": str, "time_point": str})


def _row(paths: ProfilePaths, source: str, source_key: str) -> pd.Series:
    df = read_index(paths)
    hit = df[(df["source"] == source) & (df["source_key"].astype(str) == str(source_key))]
    if hit.empty:
        raise OracleError(f"{Path(paths.oracle) / 'index.csv'}: no truth for source={source!r} source_key={source_key!r}")
    return hit.iloc[0]


def load_centroids(paths: ProfilePaths, source: str, source_key: str,
                   kind: str = "mass") -> dict[int, tuple[float, float, float]]:
    """Truth centroids {label: (x, y, z) world mm, RAS} of one source volume: ``kind="mass"``
    each label's centre of mass, ``"body"`` the true vertebral-body centroids.

    Raises:
        OracleError: no truth for the volume, or no body centroids in its file (an oracle
        written before they were recorded: re-run 00_sources).
    """
    row = _row(paths, source, source_key)
    path = Path(paths.oracle) / row["centroids_path"]
    data = json.loads(path.read_text())
    key = {"mass": "centroids", "body": "body_centroids"}[kind]
    if key not in data:
        raise OracleError(f"{path}: no {key!r}; re-run 00_sources for profile {paths.profile!r}")
    return {int(k): tuple(float(c) for c in v) for k, v in data[key].items()}


def load_truth(paths: ProfilePaths, source: str, source_key: str, target: Volume) -> np.ndarray:
    """Truth mask of one source volume on the canonical grid of ``target``.

    When the target grid coincides with the truth grid up to an axis permutation/flip (the
    curated image is the source volume, possibly reoriented), the mask is copied exactly.
    Otherwise every target voxel takes the truth label at the nearest truth voxel by world
    coordinates (labels are never interpolated); voxels outside the truth grid get 0.

    Args:
        paths: profile paths (``paths.oracle``).
        source: ``COLONOG``, ``HNSCC``, ``MSD_T10``, ``COVID19`` or ``VerSe``.
        source_key: SeriesInstanceUID (DICOM) or file stem (NIfTI) as in ``index.csv``.
        target: the image the mask must match, as loaded by :func:`lib.io.load_volume`
            (canonical RAS+ array; ``target.affine`` is the canonical affine).

    Returns:
        uint8 array of ``target.shape``.
    """
    row = _row(paths, source, source_key)
    mpath = Path(paths.oracle) / row["mask_path"]
    truth = load_mask(mpath, canonical=True)
    return resample_labels_to(truth.array, truth.affine, target.shape, target.affine)


def read_phi_planted(paths: ProfilePaths) -> dict:
    """The planted identifiers (``tokens`` and ``values`` with source, key, keyword, value)."""
    path = Path(paths.oracle) / "phi_planted.json"
    if not path.exists():
        raise OracleError(f"{path}: no planted-identifier list; run 00_sources for profile {paths.profile!r}")
    return json.loads(path.read_text())


def variant_coverage(index: pd.DataFrame, split_of: dict) -> pd.DataFrame:
    """Variant counts per split, for checking a split (evaluation side; reads the truth).

    Args:
        index: :func:`read_index` output.
        split_of: ``{(source, patient_id): split}`` or ``{source_key: split}`` as chosen by
            curation (one entry per released case).

    Returns:
        Table split x variant with the number of patients (good-quality volumes only,
        one count per patient) and columns ``L6`` / ``L5_missing`` totals per split.
    """
    ok = index[index["quality"] == "ok"]
    rows = []
    for _, r in ok.iterrows():
        split = split_of.get((r["source"], r["patient_id"]), split_of.get(r["source_key"]))
        if split is not None:
            rows.append(dict(split=split, source=r["source"], patient_id=r["patient_id"], variant=r["variant"]))
    df = pd.DataFrame(rows, columns=["split", "source", "patient_id", "variant"]).drop_duplicates(
        ["split", "source", "patient_id"])
    if df.empty:
        return pd.DataFrame(columns=["split", "patients", "L6", "L5_missing"])
    table = df.groupby("split").agg(
        patients=("patient_id", "size"),
        L6=("variant", lambda v: int(v.str.split("+").apply(lambda p: "L6" in p).sum())),
        L5_missing=("variant", lambda v: int(v.str.split("+").apply(lambda p: "L5_missing" in p or "L4" in p).sum())),
    )
    return table.reset_index()
