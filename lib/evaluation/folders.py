"""Evaluate folders of predicted label maps against truths: per-case table, summary, Table 2.

    spine1k evaluate --gt DIR --pred DIR --out DIR [--labels 1-25] [--hd95 pooled|max]
                           [--workers N] [--scheduler ADDRESS]

Files are matched by case id: a truth ``ID_seg.nii.gz`` (the CTSpine1K release),
``ID_seg-vert_msk.nii.gz`` (a VerSe derivative) or ``ID.nii.gz`` pairs with the prediction
``ID.nii.gz`` (or one with the truth's own name). Every truth is a case, and every case is in
every table and mean:

* a missing prediction is listed under ``missing_cases`` and, by default, scored as an empty
  prediction (every vertebra missed, Dice 0);
* a *failed* case - truth or prediction failing the io check (:mod:`lib.io.integrity`:
  unreadable, non-integer or negative labels, a truth label outside the evaluated ones, an
  empty truth, a prediction off the truth's grid) or an evaluation that raised - is scored
  exactly as a missing prediction, its rows marked ``status`` ``failed`` (``failed``,
  ``failure``), and listed under ``failed_cases`` with the file and the fault's kind. A broken
  file never scores better than no file.

Outputs in ``--out`` (written as one set, :func:`write_results`; read back with :func:`read_results`):

* ``metrics_per_case.csv`` - one row per case and label present in truth or prediction,
  plus a ``spine`` row (label 0) per case; metric definitions in :mod:`lib.metrics`.
* ``summary.json`` - nnU-Net style: every case's metrics plus means in one file, with the HD95
  definition used, the NSD tolerance, the conventions, missing and failed cases.
* ``table2.csv`` / ``table2.md`` - the paper's Table 2 layout for this test set.
* ``results_manifest.json`` - written last: each file's sha256 and size.

Statistics: per label, mean, sd (ddof 1) and n over the cases whose truth holds the label
(a missed vertebra contributes Dice 0 and NSD 0; its HD95/ASSD are missing and leave the
distance means, and it is counted in ``missed``). False-positive vertebrae (label only in the
prediction) are counted, not averaged. "Mean of Vertebrae" = mean over labels of the per-label
means; "Mean of Spine" = the same metrics on the binary mask (label > 0).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from lib import metrics
from lib.core import labels as lab
from lib.core.parallel import CaseFailure, CaseFailuresError, map_cases
from lib.datasets.verse import centroid_file_for, read_verse_centroids
from lib.evaluation.summary import FAILED, json_ready, summarise
from lib.evaluation.table2 import build_table2, table2_markdown
from lib.io import (
    DEFAULT_AFFINE_ATOL_MM,
    NIFTI_SUFFIXES,
    Fault,
    IntegrityError,
    Volume,
    label_counts,
    load_checked,
    mask_faults,
    strip_nifti_suffix,
    write_text,
)
from lib.io.integrity import GENERIC_FAULT

AFFINE_ATOL_MM = DEFAULT_AFFINE_ATOL_MM
"""Largest offset (mm) between the voxel positions that the truth's and the prediction's RAS+
affines give (:func:`lib.io.affine_offset_mm`), as ``lib.io.check_pair``."""

PER_CASE_CSV = "metrics_per_case.csv"
SUMMARY_JSON = "summary.json"
TABLE2_CSV = "table2.csv"
TABLE2_MD = "table2.md"
RESULTS_MANIFEST = "results_manifest.json"
"""Written last by :func:`write_results`: each result file's sha256 and size (:func:`read_results`)."""


_ROW_COLUMNS = ["case_id", "label", "name", "status", "dice", "hd95", "assd", "nsd", "identified",
                "localisation_mm", "gt_voxels", "pred_voxels", "hd95_definition",
                "prediction_missing", "failed", "failure", "gt_centroid_x_mm", "gt_centroid_y_mm", "gt_centroid_z_mm",
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


def _label_array(arr: np.ndarray) -> np.ndarray:
    """An integer label map from a mask that passed :func:`lib.io.mask_faults` (a float map
    holding integers is cast to the smallest unsigned integer type that holds it)."""
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        return arr
    top = float(arr.max()) if arr.size else 0.0
    return arr.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int64)


def truth_faults(vol: Volume, labels: Iterable[int], path: str | Path | None = None) -> list[Fault]:
    """The io check of a truth as the evaluation needs it: finite integer labels, none negative,
    none outside ``labels`` (``unknown_label``: a vertebra the table cannot report would silently
    leave it), not empty (``empty``: a case with nothing to score would vanish)."""
    return mask_faults(vol, allowed_labels=labels, require_nonempty=True, path=path)


def _read_truth(gt_path: Path, labels: Sequence[int]) -> Volume:
    """The truth in RAS+ order, checked (:func:`truth_faults`); raises :class:`lib.io.IntegrityError`."""
    vol, faults = load_checked(gt_path, kind="mask")  # smallest integer type, values scanned on the way
    if vol is not None:
        faults = truth_faults(vol, labels, gt_path)
    if faults:
        raise IntegrityError(faults)
    return vol


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


def _load_prediction(pred_path: Path, gt_vol: Volume) -> np.ndarray:
    """The prediction's label map, checked (readable, finite integers, none negative) and on the
    truth's grid in RAS+ order (shape; affine within :data:`AFFINE_ATOL_MM` mm); labels outside the
    table are no fault (they count as false positives). Raises :class:`lib.io.IntegrityError`."""
    pred_vol, faults = load_checked(pred_path, kind="mask")
    if pred_vol is not None:
        faults = mask_faults(pred_vol, gt_vol, affine_atol_mm=AFFINE_ATOL_MM, grid="ras", path=pred_path)
    if faults:
        raise IntegrityError(faults)
    return _label_array(pred_vol.array)


def evaluate_pair(case_id: str, gt_path: str | Path, pred_path: str | Path | None,
                  labels: Iterable[int] = lab.CTSPINE1K_LABELS, hd95: str = "pooled",
                  nsd_tolerance_mm: float = metrics.DEFAULT_NSD_TOLERANCE_MM,
                  missing: str = "empty", identification_rule: str = metrics.DEFAULT_IDENTIFICATION_RULE,
                  centroids: str = "body", centroid_files: bool = True) -> list[dict]:
    """Load one truth/prediction pair and return its metric rows (see :func:`lib.metrics.evaluate_case`).

    Both files are read in RAS+ order and checked with the io check (:mod:`lib.io.integrity`): the
    truth must be readable, hold finite integer labels, none negative, none outside ``labels``,
    and not be empty (:func:`truth_faults`); the prediction must be readable, hold finite
    non-negative integers and lie on the truth's voxel grid: same shape and affine after that
    reorientation (within :data:`AFFINE_ATOL_MM` mm), so a prediction written in another axis
    order of the same grid is accepted. Prediction labels outside ``labels`` are false positives,
    not faults. Centroids are in world mm: the truth's from its VerSe centroid file when
    ``centroid_files`` and one lies beside it (:func:`truth_centroids`), else estimated from the
    mask as the prediction's are (``centroids``: ``"body"`` = vertebral-body centroids, ``"mass"``
    = whole-label centres). Each row's ``gt_centroid_source`` says which.

    Args:
        case_id: id written into every row.
        gt_path: truth NIfTI.
        pred_path: prediction NIfTI; ``None`` or a path that does not exist = missing.
        labels, hd95, nsd_tolerance_mm, identification_rule, centroids: as
            :func:`lib.metrics.evaluate_case`.
        missing: ``"empty"`` scores a missing prediction as empty; ``"exclude"`` returns no rows.
        centroid_files: read the truth's centroid file when there is one.

    Raises:
        lib.io.IntegrityError: (a ``ValueError``) a fault of the truth or the prediction; its
            ``faults`` name the file and the kind (unreadable, not_integer, shape, affine, ...).
        ValueError: a bad centroid file.
    """
    gt_path = Path(gt_path)
    labels = [int(v) for v in labels]
    gt_vol = _read_truth(gt_path, labels)
    gt = _label_array(gt_vol.array)
    is_missing = _is_missing(pred_path)
    if is_missing and missing == "exclude":
        return []
    pred = np.zeros(gt.shape, dtype=np.uint8) if is_missing else _load_prediction(Path(pred_path), gt_vol)
    gt_c, source = truth_centroids(gt_path, centroid_files)
    rows = metrics.evaluate_case(gt, pred, gt_vol.spacing, labels=labels, hd95=hd95,
                                 nsd_tolerance_mm=nsd_tolerance_mm, affine=gt_vol.affine,
                                 identification_rule=identification_rule, centroids=centroids,
                                 gt_centroids=gt_c)
    out = []
    for r in rows:
        row = {"case_id": case_id, **r, "prediction_missing": is_missing, "failed": False, "failure": "",
               "reference_file": str(gt_path), "prediction_file": "" if is_missing else str(pred_path),
               "gt_centroid_source": source if gt_c is None or r["label"] in gt_c else "mask"}
        for side in ("gt", "pred"):
            c = row.pop(f"{side}_centroid_mm", None)
            for k, axis in enumerate("xyz"):
                row[f"{side}_centroid_{axis}_mm"] = math.nan if c is None else c[k]
        out.append(row)
    return out


def _is_missing(pred_path: str | Path | None) -> bool:
    return pred_path is None or not Path(pred_path).exists()


def failure_record(case_id: str, exc: BaseException | str) -> dict:
    """``summary["failed_cases"]`` entry of a case that could not be scored: ``case_id``, ``file``
    (the first faulty file; empty when unknown), ``kind`` (:data:`lib.io.FAULT_KINDS`, or
    ``"error"`` for any other exception) and ``message`` (every fault, each naming its file)."""
    if isinstance(exc, IntegrityError) and exc.faults:
        first = exc.faults[0]
        return {"case_id": case_id, "file": first.path, "kind": first.kind,
                "message": "; ".join(str(f) for f in exc.faults)}
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return {"case_id": case_id, "file": "", "kind": GENERIC_FAULT, "message": text.strip()}


def failed_rows(case_id: str, gt_path: str | Path, pred_path: str | Path | None, labels: Iterable[int],
                hd95: str, failure: dict) -> list[dict]:
    """The rows of a failed case, scored as a missing prediction: every label of ``labels`` the
    truth holds (as far as it can be read) missed (Dice 0, NSD 0, not identified, HD95/ASSD NaN),
    plus the spine row with Dice 0; ``status`` ``"failed"``, ``failed`` True and ``failure`` the
    message on every row. An unreadable truth gives the spine row alone."""
    vol, _ = load_checked(gt_path, canonical=False)
    counts = label_counts(vol.array) if vol is not None else {}
    base = {"case_id": case_id, "status": FAILED, "dice": 0.0, "hd95": math.nan, "assd": math.nan, "nsd": 0.0,
            "localisation_mm": math.nan, "pred_voxels": 0, "hd95_definition": hd95,
            "prediction_missing": _is_missing(pred_path), "failed": True, "failure": failure["message"],
            "gt_centroid_source": "", "reference_file": str(gt_path),
            "prediction_file": "" if _is_missing(pred_path) else str(pred_path),
            **{f"{side}_centroid_{axis}_mm": math.nan for side in ("gt", "pred") for axis in "xyz"}}
    rows = [{**base, "label": v, "name": lab.name(v) if v in lab.LABELS else str(v), "identified": 0.0,
             "gt_voxels": int(counts[v])} for v in dict.fromkeys(int(x) for x in labels) if counts.get(v)]
    spine_voxels = int(sum(n for v, n in counts.items() if v > 0))
    rows.append({**base, "label": metrics.SPINE_LABEL, "name": metrics.SPINE_NAME, "identified": math.nan,
                 "gt_voxels": spine_voxels})
    return rows


def _evaluate_task(task: dict) -> dict:
    """Module-level worker for :func:`lib.core.parallel.map_cases` (picklable): the case's rows and,
    when it failed, its failure record (its rows then scored as missed, :func:`failed_rows`)."""
    try:
        rows = evaluate_pair(task["case_id"], task["gt"], task["pred"], labels=task["labels"],
                             hd95=task["hd95"], nsd_tolerance_mm=task["nsd_tolerance_mm"],
                             missing=task["missing"], identification_rule=task["identification_rule"],
                             centroids=task["centroids"], centroid_files=task["centroid_files"])
    except Exception as exc:  # a failed case: scored as missed, listed, never dropped
        failure = failure_record(task["case_id"], exc)
        return {"rows": failed_rows(task["case_id"], task["gt"], task["pred"], task["labels"], task["hd95"], failure),
                "failure": failure}
    return {"rows": rows, "failure": None}


def _check_options(hd95: str, identification_rule: str, centroids: str, missing: str, on_error: str) -> None:
    metrics.check_hd95_definition(hd95)
    metrics.check_identification_rule(identification_rule)
    if centroids not in metrics.CENTROID_METHODS:
        raise ValueError(f"unknown centroid method {centroids!r}; expected one of {metrics.CENTROID_METHODS}")
    if missing not in ("empty", "exclude"):
        raise ValueError(f"missing must be 'empty' or 'exclude', got {missing!r}")
    if on_error not in ("raise", "collect"):
        raise ValueError(f"on_error must be 'raise' or 'collect', got {on_error!r}")


def evaluate_pairs(pairs: Sequence[tuple[str, str | Path, str | Path | None]],
                   labels: Iterable[int] = lab.CTSPINE1K_LABELS, hd95: str = "pooled",
                   nsd_tolerance_mm: float = metrics.DEFAULT_NSD_TOLERANCE_MM,
                   workers: int | None = None, scheduler: str | None = None,
                   missing: str = "empty", on_error: str = "raise",
                   progress: bool = True, identification_rule: str = metrics.DEFAULT_IDENTIFICATION_RULE,
                   centroids: str = "body", centroid_files: bool = True) -> tuple[pd.DataFrame, dict]:
    """Evaluate ``(case_id, gt_path, pred_path)`` pairs in memory (nothing written).

    Every case is in the result. A case whose truth or prediction fails the io check
    (:func:`evaluate_pair`), or whose evaluation raises, is a *failed* case: scored exactly as a
    missing prediction (:func:`failed_rows`: its vertebrae missed, Dice 0) with ``status``
    ``"failed"``, ``failed`` True and ``failure`` (the message naming file and fault) on its rows,
    which count in every mean; it is listed in ``summary["failed_cases"]``
    (:func:`failure_record`: ``case_id``, ``file``, ``kind``, ``message``). So a broken file never
    scores better than no file.

    Args:
        pairs: cases; ``pred_path`` may be ``None`` or not exist (a missing prediction).
        labels: vertebra labels reported per label (default C1..L6); a truth label outside
            them is a fault (``unknown_label``).
        hd95: ``"pooled"`` or ``"max"`` (:data:`lib.metrics.HD95_DEFINITIONS`).
        nsd_tolerance_mm: NSD tolerance (mm).
        workers: local processes (0 = in this process; None = all CPUs).
        scheduler: Dask distributed scheduler address; overrides ``workers``.
        missing: ``"empty"`` (score a missing prediction as empty) or ``"exclude"`` (list and
            count it only; a failed case is never excluded).
        on_error: ``"raise"`` raises :class:`lib.core.parallel.CaseFailuresError` listing every
            failed case after all ran; ``"collect"`` only lists them in ``summary["failed_cases"]``.
        progress: show a progress bar.
        identification_rule, centroids, centroid_files: as :func:`evaluate_pair`; the summary
            records them (``identification``).

    Returns:
        ``(per_case, summary)``: the long table (one row per case and label, columns as
        ``metrics_per_case.csv``) and the summary dict written as ``summary.json``
        (``n_cases``, ``n_failed``, ``n_missing``, ``failed_cases``, ``missing_cases``, ...).
    """
    _check_options(hd95, identification_rule, centroids, missing, on_error)
    labels = [int(v) for v in labels]
    tasks = [{"case_id": str(cid), "gt": str(g), "pred": None if p is None else str(p),
              "labels": labels, "hd95": hd95, "nsd_tolerance_mm": float(nsd_tolerance_mm),
              "missing": missing, "identification_rule": identification_rule, "centroids": centroids,
              "centroid_files": bool(centroid_files)} for cid, g, p in pairs]
    res = map_cases(_evaluate_task, tasks, ids=[t["case_id"] for t in tasks], workers=workers,
                    scheduler=scheduler, on_error="collect", desc="evaluate", progress=progress)
    crashed = {f.case_id: f.message for f in res.failures}  # the worker itself failed (died, ...)
    rows, failures = [], []
    for t in tasks:
        out = res.values.get(t["case_id"])
        if out is None:
            failure = failure_record(t["case_id"], crashed.get(t["case_id"], "no result"))
            out = {"rows": failed_rows(t["case_id"], t["gt"], t["pred"], labels, hd95, failure), "failure": failure}
        rows += out["rows"]
        if out["failure"] is not None:
            failures.append(out["failure"])
    if failures and on_error == "raise":
        raise CaseFailuresError([CaseFailure(f["case_id"], f["message"]) for f in failures])
    df = pd.DataFrame(rows, columns=_ROW_COLUMNS)
    failed_ids = {f["case_id"] for f in failures}
    missing_ids = [t["case_id"] for t in tasks if _is_missing(t["pred"]) and t["case_id"] not in failed_ids]
    summary = summarise(df, labels=labels, hd95=hd95, nsd_tolerance_mm=nsd_tolerance_mm,
                        cases=tasks, missing_cases=missing_ids, failed_cases=failures, missing=missing)
    summary["identification"] = identification_record(df, identification_rule, centroids, centroid_files)
    return df, summary


def identification_record(per_case: pd.DataFrame, rule: str, centroids: str, centroid_files: bool) -> dict:
    """What the identification rate of an evaluation means: the rule, the centroids, the files used."""
    vert = per_case[(per_case["label"] != metrics.SPINE_LABEL) & (per_case["status"] != FAILED)]
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
        out_dir: where ``metrics_per_case.csv``, ``summary.json``, ``table2.csv``, ``table2.md``
            and ``results_manifest.json`` go (one set, :func:`write_results`); ``None`` writes nothing.
        set_name: test-set name for Table 2 (default: the truth folder's name, or its parent's
            when it is called ``gt``), e.g. ``test_public``.
        Others: as :func:`evaluate_pairs`.

    Returns:
        ``(per_case, summary)`` as :func:`evaluate_pairs`; the summary also lists
        ``unmatched_predictions``.

    Raises:
        FileNotFoundError: a folder does not exist.
        ValueError: two files claim one case id.
        lib.core.parallel.CaseFailuresError: ``on_error="raise"`` and some case failed (after
            every case ran; nothing written).
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


class ResultsError(ValueError):
    """A results folder whose files do not match its manifest (or that has none); names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _move_into_place(src: Path, dst: Path) -> None:
    """Rename a staged file into the results folder (same file system: atomic)."""
    os.replace(src, dst)


def _result_texts(per_case: pd.DataFrame, summary: dict, set_name: str | None) -> dict[str, str]:
    name = set_name or summary.get("set_name") or "test"
    table = build_table2({name: summary})
    return {PER_CASE_CSV: per_case.to_csv(index=False, float_format="%.6g"),
            SUMMARY_JSON: json.dumps(json_ready(summary), indent=2, allow_nan=False) + "\n",
            TABLE2_CSV: table.to_csv(float_format="%.4g"),
            TABLE2_MD: table2_markdown(table) + "\n"}


def _swap_in(staged: dict[str, Path], out: Path, backup: Path) -> None:
    """Move the staged files into ``out``; on any error put the previous set (and its manifest)
    back, so the folder holds one consistent set either way."""
    backup.mkdir()
    names = [RESULTS_MANIFEST, *staged]
    for name in names:  # the old set out of the way, manifest first: no manifest over mixed files
        if (out / name).exists():
            os.replace(out / name, backup / name)
    placed: list[str] = []
    try:
        for name, src in staged.items():
            _move_into_place(src, out / name)
            placed.append(name)
    except BaseException:
        for name in placed:
            (out / name).unlink(missing_ok=True)
        for name in names:
            if (backup / name).exists():
                os.replace(backup / name, out / name)
        raise


def write_results(per_case: pd.DataFrame, summary: dict, out_dir: str | Path,
                  set_name: str | None = None) -> dict[str, Path]:
    """Write the per-case CSV, the summary JSON and Table 2 (CSV + Markdown) as one set.

    All four are written into a staging folder inside ``out_dir``, then moved into place; the
    ``results_manifest.json`` (each file's sha256 and size) is written last. A write that fails
    midway puts the previous set back; one killed midway leaves no manifest, so
    :func:`read_results` refuses the folder: a manifest never lists mixed files.

    Returns:
        The paths by key: ``per_case``, ``summary``, ``table2_csv``, ``table2_md``, ``manifest``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = _result_texts(per_case, summary, set_name)
    stage = Path(tempfile.mkdtemp(prefix=".results_staging.", dir=out))
    try:
        staged = {}
        for name, text in texts.items():
            staged[name] = stage / name
            with open(staged[name], "wb") as fh:
                fh.write(text.encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
        files = {name: {"sha256": _sha256(path), "size": path.stat().st_size} for name, path in staged.items()}
        _swap_in(staged, out, stage / "previous")
        manifest = {"files": files, "set_name": set_name or summary.get("set_name"),
                    "n_cases": summary.get("n_cases"), "n_failed": summary.get("n_failed")}
        write_text(out / RESULTS_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"per_case": out / PER_CASE_CSV, "summary": out / SUMMARY_JSON, "table2_csv": out / TABLE2_CSV,
            "table2_md": out / TABLE2_MD, "manifest": out / RESULTS_MANIFEST}


def verify_results(out_dir: str | Path) -> dict:
    """Check a results folder against its manifest; returns the manifest.

    Raises:
        ResultsError: no manifest (never written, or a write was interrupted), or a listed file
            missing or with another size or sha256 (the file named).
    """
    out = Path(out_dir)
    path = out / RESULTS_MANIFEST
    if not path.is_file():
        raise ResultsError(f"{path}: no results manifest (results never written, or a write was interrupted)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ResultsError(f"{path}: unreadable results manifest ({type(exc).__name__}: {exc})") from exc
    for name in (PER_CASE_CSV, SUMMARY_JSON, TABLE2_CSV, TABLE2_MD):
        f, entry = out / name, files.get(name)
        if entry is None:
            raise ResultsError(f"{f}: not listed in the results manifest {path}")
        if not f.is_file():
            raise ResultsError(f"{f}: listed in the results manifest but missing")
        if f.stat().st_size != entry["size"] or _sha256(f) != entry["sha256"]:
            raise ResultsError(f"{f}: does not match the results manifest {path} (size or sha256 differ: "
                               f"the file was changed or comes from another run)")
    return manifest


def read_results(out_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """The per-case table and the summary of a results folder (:func:`write_results`), after
    checking every file against the manifest (:func:`verify_results`; raises :class:`ResultsError`)."""
    out = Path(out_dir)
    verify_results(out)
    per_case = pd.read_csv(out / PER_CASE_CSV, keep_default_na=True)
    if "failure" in per_case:
        per_case["failure"] = per_case["failure"].fillna("")
    return per_case, json.loads((out / SUMMARY_JSON).read_text(encoding="utf-8"))
