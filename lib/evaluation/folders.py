"""Evaluate folders of predicted label maps against truths: per-case table, summary, Table 2.

    spine1k evaluate --gt DIR --pred DIR --out DIR [--labels 1-25] [--hd95 pooled|max]
                           [--workers N] [--scheduler ADDRESS]

Files are matched by case id: a truth ``ID_seg.nii.gz`` (the CTSpine1K release),
``ID_seg-vert_msk.nii.gz`` (a VerSe derivative) or ``ID.nii.gz`` pairs with the prediction
``ID.nii.gz`` (or one with the truth's own name). Every truth is a
case: a missing prediction is listed under ``missing_cases`` and, by default, scored as an
empty prediction (every vertebra missed, Dice 0), so it is counted, never skipped. A
prediction whose shape or affine differs from its truth is an error naming both files.

Outputs in ``--out``:

* ``metrics_per_case.csv`` - one row per case and label present in truth or prediction,
  plus a ``spine`` row (label 0) per case; metric definitions in :mod:`lib.metrics`.
* ``summary.json`` - nnU-Net style: every case's metrics plus means in one file, with the HD95
  definition used, the NSD tolerance, the conventions, missing and failed cases.
* ``table2.csv`` / ``table2.md`` - the paper's Table 2 layout for this test set.

Statistics: per label, mean, sd (ddof 1) and n over the cases whose truth holds the label
(a missed vertebra contributes Dice 0 and NSD 0; its HD95/ASSD are missing and leave the
distance means, and it is counted in ``missed``). False-positive vertebrae (label only in the
prediction) are counted, not averaged. "Mean of Vertebrae" = mean over labels of the per-label
means; "Mean of Spine" = the same metrics on the binary mask (label > 0).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from lib import metrics
from lib.core import labels as lab
from lib.core.parallel import CaseFailuresError, map_cases
from lib.datasets.verse import centroid_file_for, read_verse_centroids
from lib.evaluation.summary import json_ready, summarise
from lib.evaluation.table2 import build_table2, table2_markdown
from lib.io import NIFTI_SUFFIXES, load_volume, strip_nifti_suffix, write_text

AFFINE_ATOL_MM = 1e-3
"""Largest difference between truth and prediction affines accepted (mm), as ``lib.io.check_pair``."""

PER_CASE_CSV = "metrics_per_case.csv"
SUMMARY_JSON = "summary.json"
TABLE2_CSV = "table2.csv"
TABLE2_MD = "table2.md"


_ROW_COLUMNS = ["case_id", "label", "name", "status", "dice", "hd95", "assd", "nsd", "identified",
                "localisation_mm", "gt_voxels", "pred_voxels", "hd95_definition",
                "prediction_missing", "gt_centroid_x_mm", "gt_centroid_y_mm", "gt_centroid_z_mm",
                "pred_centroid_x_mm", "pred_centroid_y_mm", "pred_centroid_z_mm",
                "gt_centroid_source", "reference_file", "prediction_file"]


def case_id_of(path: str | Path) -> str:
    """Case id of a truth or prediction file: the name without ``.nii(.gz)`` and the mask suffix
    (``_seg``, VerSe's ``_seg-vert_msk``)."""
    stem = strip_nifti_suffix(path)
    for suffix in ("_seg-vert_msk", "_seg"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _nifti_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))


def _files_by_case(folder: Path, what: str) -> dict[str, Path]:
    """The folder's NIfTI files by case id; two files with one case id are an error naming both."""
    by_case: dict[str, Path] = {}
    for p in _nifti_files(folder):
        cid = case_id_of(p)
        if cid in by_case:
            raise ValueError(f"two {what} for case {cid!r}: {by_case[cid]} and {p}")
        by_case[cid] = p
    return by_case


def match_cases(gt_dir: str | Path, pred_dir: str | Path) -> tuple[list[tuple[str, Path, Path | None]], list[Path]]:
    """Pair every truth in ``gt_dir`` with its prediction in ``pred_dir`` by case id.

    A truth ``ID_seg.nii.gz`` or ``ID.nii.gz`` matches a prediction ``ID.nii.gz``, ``ID.nii``,
    ``ID_seg.nii.gz`` or ``ID_seg.nii``.

    Returns:
        ``(pairs, unmatched)``: ``pairs`` = ``[(case_id, gt_path, pred_path or None)]`` sorted by
        case id (``None`` = prediction missing); ``unmatched`` = predictions with no truth.

    Raises:
        FileNotFoundError: a folder does not exist.
        ValueError: two truths or two predictions claim the same case id (both files named).
    """
    truths = _files_by_case(Path(gt_dir), "truths")
    preds = _files_by_case(Path(pred_dir), "predictions")
    pairs = [(cid, truths[cid], preds.get(cid)) for cid in sorted(truths)]
    unmatched = [preds[c] for c in sorted(set(preds) - set(truths))]
    return pairs, unmatched


def _label_array(arr: np.ndarray, path: Path) -> np.ndarray:
    """An integer label map from what the file holds; float maps must hold integers."""
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        if np.issubdtype(arr.dtype, np.signedinteger) and arr.size and arr.min() < 0:
            raise ValueError(f"{path}: negative label values (min {int(arr.min())})")
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{path}: label map of dtype {arr.dtype} is not numeric")
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: label map contains NaN/inf")
    if not np.array_equal(arr, np.round(arr)):
        raise ValueError(f"{path}: label map has non-integer values (dtype {arr.dtype})")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{path}: negative label values (min {arr.min():g})")
    top = float(arr.max()) if arr.size else 0.0
    return arr.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int64)


def truth_centroids(gt_path: Path, use_file: bool = True) -> tuple[dict[int, tuple[float, ...]] | None, str]:
    """The truth's own centroids and where they come from: its VerSe centroid file when one lies
    beside it (:func:`lib.datasets.verse.centroid_file_for`; read with the mask file's stored
    geometry, which for an evaluated VerSe scan is the CT's: 02's selection requires one grid),
    else ``(None, "mask")`` (the evaluation estimates them from the mask)."""
    ctd = centroid_file_for(gt_path) if use_file else None
    if ctd is None:
        return None, "mask"
    hdr = nib.load(str(gt_path))
    return read_verse_centroids(ctd, hdr.affine, hdr.shape[:3]), ctd.name


def _load_prediction(pred_path: Path, gt_vol, gt_path: Path) -> np.ndarray:
    """The prediction's label map, checked to lie on the truth's grid (RAS+ order)."""
    pred_vol = load_volume(pred_path)
    if pred_vol.shape != gt_vol.shape:
        raise ValueError(f"prediction {pred_path} has shape {pred_vol.shape} but truth {gt_path} "
                         f"has {gt_vol.shape} (RAS+ order)")
    diff = float(np.abs(pred_vol.affine - gt_vol.affine).max())  # RAS+ grids: same world voxels
    if diff > AFFINE_ATOL_MM:
        raise ValueError(f"prediction {pred_path} affine differs from truth {gt_path} by up to "
                         f"{diff:.4g} mm (tolerance {AFFINE_ATOL_MM} mm)")
    return _label_array(pred_vol.array, pred_path)


def evaluate_pair(case_id: str, gt_path: str | Path, pred_path: str | Path | None,
                  labels: Iterable[int] = lab.CTSPINE1K_LABELS, hd95: str = "pooled",
                  nsd_tolerance_mm: float = metrics.DEFAULT_NSD_TOLERANCE_MM,
                  missing: str = "empty", identification_rule: str = metrics.DEFAULT_IDENTIFICATION_RULE,
                  centroids: str = "body", centroid_files: bool = True) -> list[dict]:
    """Load one truth/prediction pair and return its metric rows (see :func:`lib.metrics.evaluate_case`).

    Both files are read in RAS+ order; the prediction must lie on the truth's voxel grid: same
    shape and affine after that reorientation (within :data:`AFFINE_ATOL_MM`), so a prediction
    written in another axis order of the same grid is accepted. Centroids are in world mm:
    the truth's from its VerSe centroid file when ``centroid_files`` and one lies beside it
    (:func:`truth_centroids`), else estimated from the mask as the prediction's are
    (``centroids``: ``"body"`` = vertebral-body centroids, ``"mass"`` = whole-label centres).
    Each row's ``gt_centroid_source`` says which.

    Args:
        case_id: id written into every row.
        gt_path: truth NIfTI.
        pred_path: prediction NIfTI; ``None`` or a path that does not exist = missing.
        labels, hd95, nsd_tolerance_mm, identification_rule, centroids: as
            :func:`lib.metrics.evaluate_case`.
        missing: ``"empty"`` scores a missing prediction as empty; ``"exclude"`` returns no rows.
        centroid_files: read the truth's centroid file when there is one.

    Raises:
        ValueError: shape or affine mismatch (naming both files), bad label values, a bad
            centroid file.
        lib.io.NiftiReadError: an unreadable file.
    """
    gt_path = Path(gt_path)
    gt_vol = load_volume(gt_path)
    gt = _label_array(gt_vol.array, gt_path)
    is_missing = pred_path is None or not Path(pred_path).exists()
    if is_missing and missing == "exclude":
        return []
    pred = np.zeros(gt.shape, dtype=np.uint8) if is_missing else _load_prediction(Path(pred_path), gt_vol, gt_path)
    gt_c, source = truth_centroids(gt_path, centroid_files)
    rows = metrics.evaluate_case(gt, pred, gt_vol.spacing, labels=labels, hd95=hd95,
                                 nsd_tolerance_mm=nsd_tolerance_mm, affine=gt_vol.affine,
                                 identification_rule=identification_rule, centroids=centroids,
                                 gt_centroids=gt_c)
    out = []
    for r in rows:
        row = {"case_id": case_id, **r, "prediction_missing": is_missing, "reference_file": str(gt_path),
               "prediction_file": "" if is_missing else str(pred_path),
               "gt_centroid_source": source if gt_c is None or r["label"] in gt_c else "mask"}
        for side in ("gt", "pred"):
            c = row.pop(f"{side}_centroid_mm", None)
            for k, axis in enumerate("xyz"):
                row[f"{side}_centroid_{axis}_mm"] = math.nan if c is None else c[k]
        out.append(row)
    return out


def _evaluate_task(task: dict) -> list[dict]:
    """Module-level worker for :func:`lib.core.parallel.map_cases` (picklable)."""
    return evaluate_pair(task["case_id"], task["gt"], task["pred"], labels=task["labels"],
                         hd95=task["hd95"], nsd_tolerance_mm=task["nsd_tolerance_mm"],
                         missing=task["missing"], identification_rule=task["identification_rule"],
                         centroids=task["centroids"], centroid_files=task["centroid_files"])


def evaluate_pairs(pairs: Sequence[tuple[str, str | Path, str | Path | None]],
                   labels: Iterable[int] = lab.CTSPINE1K_LABELS, hd95: str = "pooled",
                   nsd_tolerance_mm: float = metrics.DEFAULT_NSD_TOLERANCE_MM,
                   workers: int | None = None, scheduler: str | None = None,
                   missing: str = "empty", on_error: str = "raise",
                   progress: bool = True, identification_rule: str = metrics.DEFAULT_IDENTIFICATION_RULE,
                   centroids: str = "body", centroid_files: bool = True) -> tuple[pd.DataFrame, dict]:
    """Evaluate ``(case_id, gt_path, pred_path)`` pairs in memory (nothing written).

    Args:
        pairs: cases; ``pred_path`` may be ``None`` or not exist (a missing prediction).
        labels: vertebra labels reported per label (default C1..L6).
        hd95: ``"pooled"`` or ``"max"`` (:data:`lib.metrics.HD95_DEFINITIONS`).
        nsd_tolerance_mm: NSD tolerance (mm).
        workers: local processes (0 = in this process; None = all CPUs).
        scheduler: Dask distributed scheduler address; overrides ``workers``.
        missing: ``"empty"`` (score a missing prediction as empty) or ``"exclude"`` (list and
            count it only).
        on_error: ``"raise"`` raises :class:`lib.core.parallel.CaseFailuresError` listing every failed case
            after all ran; ``"collect"`` lists them in ``summary["failed_cases"]``.
        progress: show a progress bar.
        identification_rule, centroids, centroid_files: as :func:`evaluate_pair`; the summary
            records them (``identification``).

    Returns:
        ``(per_case, summary)``: the long table (one row per case and label, columns as
        ``metrics_per_case.csv``) and the summary dict written as ``summary.json``.
    """
    metrics.check_hd95_definition(hd95)
    metrics.check_identification_rule(identification_rule)
    if centroids not in metrics.CENTROID_METHODS:
        raise ValueError(f"unknown centroid method {centroids!r}; expected one of {metrics.CENTROID_METHODS}")
    if missing not in ("empty", "exclude"):
        raise ValueError(f"missing must be 'empty' or 'exclude', got {missing!r}")
    labels = [int(v) for v in labels]
    tasks = [{"case_id": str(cid), "gt": str(g), "pred": None if p is None else str(p),
              "labels": labels, "hd95": hd95, "nsd_tolerance_mm": float(nsd_tolerance_mm),
              "missing": missing, "identification_rule": identification_rule, "centroids": centroids,
              "centroid_files": bool(centroid_files)} for cid, g, p in pairs]
    res = map_cases(_evaluate_task, tasks, ids=[t["case_id"] for t in tasks], workers=workers,
                    scheduler=scheduler, on_error="collect", desc="evaluate", progress=progress)
    if res.failures and on_error == "raise":
        raise CaseFailuresError(res.failures)
    rows = [r for t in tasks for r in res.values.get(t["case_id"], [])]
    df = pd.DataFrame(rows, columns=_ROW_COLUMNS)
    missing_ids = [t["case_id"] for t in tasks if t["pred"] is None or not Path(t["pred"]).exists()]
    summary = summarise(df, labels=labels, hd95=hd95, nsd_tolerance_mm=nsd_tolerance_mm,
                        cases=tasks, missing_cases=missing_ids,
                        failed_cases=[{"case_id": f.case_id, "message": f.message} for f in res.failures],
                        missing=missing)
    summary["identification"] = identification_record(df, identification_rule, centroids, centroid_files)
    return df, summary


def identification_record(per_case: pd.DataFrame, rule: str, centroids: str, centroid_files: bool) -> dict:
    """What the identification rate of an evaluation means: the rule, the centroids, the files used."""
    vert = per_case[per_case["label"] != metrics.SPINE_LABEL]
    from_files = sorted(set(vert.loc[vert["gt_centroid_source"] != "mask", "case_id"].astype(str)))
    what = {"body": "vertebral-body centroids estimated from the masks (lib.metrics.body_centroids_mm)",
            "mass": "centres of mass of the whole labels"}[centroids]
    return {"rule": rule, "max_dist_mm": metrics.IDENTIFICATION_MAX_DIST_MM, "centroids": centroids,
            "centroid_files": bool(centroid_files), "cases_with_truth_centroid_file": from_files,
            "text": f"{rule} rule within {metrics.IDENTIFICATION_MAX_DIST_MM:g} mm; prediction: {what}; truth: "
                    + (f"its centroid file for {len(from_files)} case(s), otherwise the same estimate"
                       if from_files else "the same estimate (no centroid file)")}


def evaluate_folders(gt_dir: str | Path, pred_dir: str | Path, out_dir: str | Path | None,
                     labels: Iterable[int] = lab.CTSPINE1K_LABELS, hd95: str = "pooled",
                     workers: int | None = None, scheduler: str | None = None,
                     nsd_tolerance_mm: float = metrics.DEFAULT_NSD_TOLERANCE_MM,
                     missing: str = "empty", on_error: str = "raise", set_name: str | None = None,
                     progress: bool = True, identification_rule: str = metrics.DEFAULT_IDENTIFICATION_RULE,
                     centroids: str = "body", centroid_files: bool = True) -> tuple[pd.DataFrame, dict]:
    """Evaluate a folder of predictions against a folder of truths and write the results.

    Args:
        gt_dir: truths (``ID_seg.nii.gz`` or ``ID.nii.gz``).
        pred_dir: predictions (``ID.nii.gz`` or the truth's name).
        out_dir: where ``metrics_per_case.csv``, ``summary.json``, ``table2.csv`` and
            ``table2.md`` go (atomic writes); ``None`` writes nothing.
        set_name: test-set name for Table 2 (default: the truth folder's name, or its parent's
            when it is called ``gt``), e.g. ``test_public``.
        Others: as :func:`evaluate_pairs`.

    Returns:
        ``(per_case, summary)`` as :func:`evaluate_pairs`; the summary also lists
        ``unmatched_predictions``.
    """
    pairs, unmatched = match_cases(gt_dir, pred_dir)
    df, summary = evaluate_pairs(pairs, labels=labels, hd95=hd95, nsd_tolerance_mm=nsd_tolerance_mm,
                                 workers=workers, scheduler=scheduler, missing=missing,
                                 on_error=on_error, progress=progress, identification_rule=identification_rule,
                                 centroids=centroids, centroid_files=centroid_files)
    summary["unmatched_predictions"] = [str(p) for p in unmatched]
    summary["gt_dir"], summary["pred_dir"] = str(gt_dir), str(pred_dir)
    if set_name is None:
        g = Path(gt_dir).resolve()
        set_name = g.parent.name if g.name == "gt" else g.name
    summary["set_name"] = set_name
    if out_dir is not None:
        write_results(df, summary, out_dir, set_name=set_name)
    return df, summary


def write_results(per_case: pd.DataFrame, summary: dict, out_dir: str | Path,
                  set_name: str | None = None) -> dict[str, Path]:
    """Write the per-case CSV, the summary JSON and Table 2 (CSV + Markdown) atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"per_case": out / PER_CASE_CSV, "summary": out / SUMMARY_JSON,
             "table2_csv": out / TABLE2_CSV, "table2_md": out / TABLE2_MD}
    write_text(paths["per_case"], per_case.to_csv(index=False, float_format="%.6g"))
    write_text(paths["summary"], json.dumps(json_ready(summary), indent=2, allow_nan=False) + "\n")
    name = set_name or summary.get("set_name") or "test"
    table = build_table2({name: summary})
    write_text(paths["table2_csv"], table.to_csv(float_format="%.4g"))
    write_text(paths["table2_md"], table2_markdown(table) + "\n")
    return paths
