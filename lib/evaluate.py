"""Evaluate folders of predicted label maps against truths: per-case table, summary, Table 2.

    python -m lib.evaluate --gt DIR --pred DIR --out DIR [--labels 1-25] [--hd95 pooled|max]
                           [--workers N] [--scheduler ADDRESS]

Files are matched by case id: a truth ``ID_seg.nii.gz`` (the CTSpine1K release) or ``ID.nii.gz``
pairs with the prediction ``ID.nii.gz`` (or one with the truth's own name). Every truth is a
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

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lib import metrics
from lib.core import labels as lab
from lib.core.parallel import CaseErrors, map_cases
from lib.io import NIFTI_SUFFIXES, load_volume, strip_nifti_suffix, write_text

AFFINE_ATOL_MM = 1e-3
"""Largest difference between truth and prediction affines accepted (mm), as ``lib.io.check_pair``."""

PER_CASE_CSV = "metrics_per_case.csv"
SUMMARY_JSON = "summary.json"
TABLE2_CSV = "table2.csv"
TABLE2_MD = "table2.md"

MEAN_OF_VERTEBRAE = "Mean of Vertebrae"
MEAN_OF_SPINE = "Mean of Spine"

PAPER_TABLE2: dict[str, dict[str, dict[str, float]]] = {
    "Test_public": {MEAN_OF_VERTEBRAE: {"DSC": 0.869, "HD95": 5.40},
                    MEAN_OF_SPINE: {"DSC": 0.985, "HD95": 1.0},
                    "L6": {"DSC": 0.0, "HD95": 66.21}, "C5": {"DSC": 0.573}},
    "Test_private": {MEAN_OF_VERTEBRAE: {"DSC": 0.840, "HD95": 6.41},
                     MEAN_OF_SPINE: {"DSC": 0.984, "HD95": 1.0},
                     "L6": {"DSC": 0.0, "HD95": 80.33}, "C4": {"DSC": 0.608}},
    "Test_VerSe": {MEAN_OF_VERTEBRAE: {"DSC": 0.766, "HD95": 6.06},
                   MEAN_OF_SPINE: {"DSC": 0.929, "HD95": 3.08},
                   "L6": {"DSC": 0.0, "HD95": 45.16}, "C1": {"DSC": 0.446}},
}
"""CTSpine1K Table 2 values quoted in DESIGN §6 (nnU-Net 3d_fullres); only those cells, no others."""

CONVENTIONS = {
    "absent_in_both": "not evaluated (no row)",
    "missed": "present in truth, absent in prediction: Dice 0, NSD 0, HD95/ASSD missing (null), "
              "not identified; counted in 'missed'",
    "false_positive": "absent in truth, present in prediction: a false-positive vertebra; no "
                      "metrics, counted in 'false_positive'",
    "missing_prediction": "a truth without prediction file is listed in 'missing_cases' and, with "
                          "missing='empty', scored as an empty prediction",
    "statistics": "per label over cases whose truth holds the label; sd with ddof=1; Mean of "
                  "Vertebrae = mean over labels of per-label means; Mean of Spine = binary mask "
                  "(label > 0)",
    "surface": "surface voxels = mask minus its 6-connected erosion; distances in mm between "
               "voxel centres with the image spacing",
    "assd": "mean of both directed surface-distance sets pooled",
    "nsd": "share of both surfaces' voxels within the tolerance of the other surface",
    "identification": "VerSe: the nearest predicted centroid to the true one carries the label "
                      "and is within the distance limit; centroids from the masks in world mm",
}

_ROW_COLUMNS = ["case_id", "label", "name", "status", "dice", "hd95", "assd", "nsd", "identified",
                "localisation_mm", "gt_voxels", "pred_voxels", "hd95_definition",
                "prediction_missing", "gt_centroid_x_mm", "gt_centroid_y_mm", "gt_centroid_z_mm",
                "pred_centroid_x_mm", "pred_centroid_y_mm", "pred_centroid_z_mm",
                "reference_file", "prediction_file"]


# ----------------------------------------------------------------------------- matching


def case_id_of(path: str | Path) -> str:
    """Case id of a truth or prediction file: the name without ``.nii(.gz)`` and ``_seg``."""
    stem = strip_nifti_suffix(path)
    return stem[: -len("_seg")] if stem.endswith("_seg") else stem


def _nifti_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))


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
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    truths: dict[str, Path] = {}
    for p in _nifti_files(gt_dir):
        cid = case_id_of(p)
        if cid in truths:
            raise ValueError(f"two truths for case {cid!r}: {truths[cid]} and {p}")
        truths[cid] = p
    preds: dict[str, Path] = {}
    for p in _nifti_files(pred_dir):
        cid = case_id_of(p)
        if cid in preds:
            raise ValueError(f"two predictions for case {cid!r}: {preds[cid]} and {p}")
        preds[cid] = p
    pairs = [(cid, truths[cid], preds.get(cid)) for cid in sorted(truths)]
    unmatched = [preds[c] for c in sorted(set(preds) - set(truths))]
    return pairs, unmatched


# ----------------------------------------------------------------------------- one case


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


def evaluate_pair(case_id: str, gt_path: str | Path, pred_path: str | Path | None,
                  labels: Iterable[int] = lab.CTSPINE1K_LABELS, hd95: str = "pooled",
                  nsd_tolerance_mm: float = metrics.DEFAULT_NSD_TOLERANCE_MM,
                  missing: str = "empty") -> list[dict]:
    """Load one truth/prediction pair and return its metric rows (see :func:`lib.metrics.evaluate_case`).

    Both files are read in RAS+ order; the prediction must lie on the truth's voxel grid: same
    shape and affine after that reorientation (within :data:`AFFINE_ATOL_MM`), so a prediction
    written in another axis order of the same grid is accepted. Centroids use the truth's
    affine (world mm).

    Args:
        case_id: id written into every row.
        gt_path: truth NIfTI.
        pred_path: prediction NIfTI; ``None`` or a path that does not exist = missing.
        labels, hd95, nsd_tolerance_mm: as :func:`lib.metrics.evaluate_case`.
        missing: ``"empty"`` scores a missing prediction as empty; ``"exclude"`` returns no rows.

    Raises:
        ValueError: shape or affine mismatch (naming both files), bad label values.
        lib.io.NiftiReadError: an unreadable file.
    """
    gt_path = Path(gt_path)
    gt_vol = load_volume(gt_path)
    gt = _label_array(gt_vol.array, gt_path)
    is_missing = pred_path is None or not Path(pred_path).exists()
    if is_missing:
        if missing == "exclude":
            return []
        pred = np.zeros(gt.shape, dtype=np.uint8)
    else:
        pred_path = Path(pred_path)
        pred_vol = load_volume(pred_path)
        if pred_vol.shape != gt_vol.shape:
            raise ValueError(f"prediction {pred_path} has shape {pred_vol.shape} but truth {gt_path} "
                             f"has {gt_vol.shape} (RAS+ order)")
        diff = float(np.abs(pred_vol.affine - gt_vol.affine).max())  # RAS+ grids: same world voxels
        if diff > AFFINE_ATOL_MM:
            raise ValueError(f"prediction {pred_path} affine differs from truth {gt_path} by up to "
                             f"{diff:.4g} mm (tolerance {AFFINE_ATOL_MM} mm)")
        pred = _label_array(pred_vol.array, pred_path)
    rows = metrics.evaluate_case(gt, pred, gt_vol.spacing, labels=labels, hd95=hd95,
                                 nsd_tolerance_mm=nsd_tolerance_mm, affine=gt_vol.affine)
    out = []
    for r in rows:
        row = {"case_id": case_id, **r, "prediction_missing": is_missing,
               "reference_file": str(gt_path), "prediction_file": "" if is_missing else str(pred_path)}
        for side in ("gt", "pred"):
            c = row.pop(f"{side}_centroid_mm", None)
            for k, axis in enumerate("xyz"):
                row[f"{side}_centroid_{axis}_mm"] = math.nan if c is None else c[k]
        out.append(row)
    return out


def _evaluate_task(task: dict) -> list[dict]:
    """Module-level worker for :func:`lib.parallel.map_cases` (picklable)."""
    return evaluate_pair(task["case_id"], task["gt"], task["pred"], labels=task["labels"],
                         hd95=task["hd95"], nsd_tolerance_mm=task["nsd_tolerance_mm"],
                         missing=task["missing"])


# ----------------------------------------------------------------------------- many cases


def evaluate_pairs(pairs: Sequence[tuple[str, str | Path, str | Path | None]],
                   labels: Iterable[int] = lab.CTSPINE1K_LABELS, hd95: str = "pooled",
                   nsd_tolerance_mm: float = metrics.DEFAULT_NSD_TOLERANCE_MM,
                   workers: int | None = None, scheduler: str | None = None,
                   missing: str = "empty", on_error: str = "raise",
                   progress: bool = True) -> tuple[pd.DataFrame, dict]:
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
        on_error: ``"raise"`` raises :class:`lib.parallel.CaseErrors` listing every failed case
            after all ran; ``"collect"`` lists them in ``summary["failed_cases"]``.
        progress: show a progress bar.

    Returns:
        ``(per_case, summary)``: the long table (one row per case and label, columns as
        ``metrics_per_case.csv``) and the summary dict written as ``summary.json``.
    """
    metrics.check_hd95_definition(hd95)
    if missing not in ("empty", "exclude"):
        raise ValueError(f"missing must be 'empty' or 'exclude', got {missing!r}")
    labels = [int(v) for v in labels]
    tasks = [{"case_id": str(cid), "gt": str(g), "pred": None if p is None else str(p),
              "labels": labels, "hd95": hd95, "nsd_tolerance_mm": float(nsd_tolerance_mm),
              "missing": missing} for cid, g, p in pairs]
    res = map_cases(_evaluate_task, tasks, ids=[t["case_id"] for t in tasks], workers=workers,
                    scheduler=scheduler, on_error="collect", desc="evaluate", progress=progress)
    if res.failures and on_error == "raise":
        raise CaseErrors(res.failures)
    rows = [r for t in tasks for r in res.values.get(t["case_id"], [])]
    df = pd.DataFrame(rows, columns=_ROW_COLUMNS)
    missing_ids = [t["case_id"] for t in tasks if t["pred"] is None or not Path(t["pred"]).exists()]
    summary = summarise(df, labels=labels, hd95=hd95, nsd_tolerance_mm=nsd_tolerance_mm,
                        cases=tasks, missing_cases=missing_ids,
                        failed_cases=[{"case_id": f.case_id, "message": f.message} for f in res.failures],
                        missing=missing)
    return df, summary


def evaluate_folders(gt_dir: str | Path, pred_dir: str | Path, out_dir: str | Path | None,
                     labels: Iterable[int] = lab.CTSPINE1K_LABELS, hd95: str = "pooled",
                     workers: int | None = None, scheduler: str | None = None,
                     nsd_tolerance_mm: float = metrics.DEFAULT_NSD_TOLERANCE_MM,
                     missing: str = "empty", on_error: str = "raise", set_name: str | None = None,
                     progress: bool = True) -> tuple[pd.DataFrame, dict]:
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
                                 on_error=on_error, progress=progress)
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
    write_text(paths["summary"], json.dumps(_json_ready(summary), indent=2, allow_nan=False) + "\n")
    name = set_name or summary.get("set_name") or "test"
    table = build_table2({name: summary})
    write_text(paths["table2_csv"], table.to_csv(float_format="%.4g"))
    write_text(paths["table2_md"], table2_markdown(table) + "\n")
    return paths


# ----------------------------------------------------------------------------- statistics


def _stat(values: Iterable[float]) -> dict:
    v = np.asarray([x for x in values if x is not None and not math.isnan(float(x))], dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else math.nan,
            "sd": float(v.std(ddof=1)) if v.size > 1 else math.nan, "n": int(v.size)}


def _label_stats(sub: pd.DataFrame) -> dict:
    present = sub[sub["status"].isin([metrics.DETECTED, metrics.MISSED])]
    out = {m: _stat(present[m]) for m in metrics.METRIC_COLUMNS}
    out["identification_rate"] = _stat(present["identified"])
    out["localisation_mm"] = _stat(present["localisation_mm"])
    out["n_in_truth"] = int(len(present))
    out["missed"] = int((sub["status"] == metrics.MISSED).sum())
    out["false_positive"] = int((sub["status"] == metrics.FALSE_POSITIVE).sum())
    return out


def summarise(per_case: pd.DataFrame, labels: Sequence[int], hd95: str,
              nsd_tolerance_mm: float, cases: Sequence[Mapping] = (),
              missing_cases: Sequence[str] = (), failed_cases: Sequence[Mapping] = (),
              missing: str = "empty") -> dict:
    """Summary dict of a per-case table (what ``summary.json`` holds).

    Keys: ``hd95_definition`` (+ ``_text``), ``nsd_tolerance_mm``, ``labels``, ``conventions``,
    counts, ``missing_cases``, ``failed_cases``, ``metric_per_case`` (per case: files and
    ``metrics`` by label name), ``mean`` (per label name: ``{metric: {mean, sd, n}}``, ``missed``,
    ``false_positive``), ``mean_of_vertebrae`` and ``mean_of_spine``.
    """
    df = per_case
    vert = df[df["label"] != metrics.SPINE_LABEL]
    mean: dict[str, dict] = {}
    for v in labels:
        sub = vert[vert["label"] == v]
        if len(sub):
            mean[lab.name(v) if v in lab.LABELS else str(v)] = {"label": int(v), **_label_stats(sub)}
    mov: dict = {}
    for m in (*metrics.METRIC_COLUMNS, "identification_rate", "localisation_mm"):
        mov[m] = _stat(e[m]["mean"] for e in mean.values())
    mov["missed"] = int(sum(e["missed"] for e in mean.values()))
    mov["false_positive"] = int(sum(e["false_positive"] for e in mean.values()))
    mov["n_vertebrae_in_truth"] = int(sum(e["n_in_truth"] for e in mean.values()))
    present = vert[vert["status"].isin([metrics.DETECTED, metrics.MISSED])]
    mov["identification_rate_pooled"] = _stat(present["identified"])["mean"]
    per_scan = present.groupby("case_id")["identified"].mean() if len(present) else pd.Series(dtype=float)
    mov["identification_rate_per_scan_mean"] = _stat(per_scan)["mean"]
    spine = df[df["label"] == metrics.SPINE_LABEL]
    mos = {"label": metrics.SPINE_LABEL, **_label_stats(spine)} if len(spine) else {}
    per_case_list = []
    by_case = {cid: g for cid, g in df.groupby("case_id", sort=False)}
    for t in cases:
        cid = t["case_id"]
        g = by_case.get(cid)
        entry = {"case_id": cid, "reference_file": t.get("gt"), "prediction_file": t.get("pred"),
                 "prediction_missing": cid in set(missing_cases), "metrics": {}}
        if g is not None:
            for r in g.to_dict("records"):
                key = metrics.SPINE_NAME if r["label"] == metrics.SPINE_LABEL else r["name"]
                entry["metrics"][key] = {k: r[k] for k in ("label", "status", "dice", "hd95", "assd", "nsd",
                                                           "identified", "localisation_mm",
                                                           "gt_voxels", "pred_voxels")}
            gv = g[(g["label"] != metrics.SPINE_LABEL) & g["status"].isin([metrics.DETECTED, metrics.MISSED])]
            entry["identification_rate"] = _stat(gv["identified"])["mean"]
        per_case_list.append(entry)
    return {
        "hd95_definition": hd95,
        "hd95_definition_text": metrics.HD95_DEFINITIONS[hd95],
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "identification_max_dist_mm": metrics.IDENTIFICATION_MAX_DIST_MM,
        "labels": [int(v) for v in labels],
        "missing_prediction_policy": missing,
        "conventions": CONVENTIONS,
        "n_cases": len(cases),
        "n_evaluated": int(df["case_id"].nunique()) if len(df) else 0,
        "n_missing_cases": len(missing_cases),
        "missing_cases": list(missing_cases),
        "n_failed_cases": len(failed_cases),
        "failed_cases": list(failed_cases),
        "mean": mean,
        "mean_of_vertebrae": mov,
        "mean_of_spine": mos,
        "metric_per_case": per_case_list,
    }


def _json_ready(obj):
    """NaN/inf -> None and numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


# ----------------------------------------------------------------------------- Table 2


def paper_set_name(set_name: str) -> str | None:
    """The paper's test-set name for ``set_name`` (``"test_public"`` -> ``"Test_public"``), or None."""
    key = re.sub(r"[^a-z]", "", set_name.lower())
    key = key[4:] if key.startswith("test") else key
    return {"public": "Test_public", "private": "Test_private", "verse": "Test_VerSe"}.get(key)


def build_table2(summaries: Mapping[str, Mapping], with_paper: bool = True) -> pd.DataFrame:
    """Table 2 in the paper's layout from one summary per test set.

    Rows: C1..L6 (plus T13 when a summary evaluates it), "Mean of Vertebrae", "Mean of Spine".
    Columns per set: ``<set> DSC``, ``<set> DSC (paper)``, ``<set> HD95``, ``<set> HD95 (paper)``,
    ``<set> ASSD``, ``<set> NSD``, ``<set> ID rate``. Paper cells come from
    :data:`PAPER_TABLE2` only (DESIGN §6); every other paper cell is empty (NaN), as are the
    paper columns of a set the paper does not have. Means are over cases (per label) and over
    labels (Mean of Vertebrae); HD95 in mm under the definition each summary states
    (``df.attrs["hd95_definition"]``).
    """
    row_labels = list(lab.CTSPINE1K_LABELS)
    for s in summaries.values():
        row_labels += [v for v in s.get("labels", []) if v in lab.LABELS and v not in row_labels]
    index = [lab.name(v) for v in lab.ordered(row_labels)] + [MEAN_OF_VERTEBRAE, MEAN_OF_SPINE]
    table = pd.DataFrame(index=index)
    table.index.name = "Vertebra"
    defs = {}
    for set_name, s in summaries.items():
        defs[set_name] = s.get("hd95_definition")
        paper = PAPER_TABLE2.get(paper_set_name(set_name) or "", {}) if with_paper else None

        def cell(entry, metric):
            return entry.get(metric, {}).get("mean", math.nan) if entry else math.nan

        cols: dict[str, list] = {c: [] for c in ("DSC", "DSC (paper)", "HD95", "HD95 (paper)",
                                                 "ASSD", "NSD", "ID rate")}
        for row in index:
            if row == MEAN_OF_VERTEBRAE:
                entry = s.get("mean_of_vertebrae", {})
            elif row == MEAN_OF_SPINE:
                entry = s.get("mean_of_spine", {})
            else:
                entry = s.get("mean", {}).get(row, {})
            cols["DSC"].append(cell(entry, "dice"))
            cols["HD95"].append(cell(entry, "hd95"))
            cols["ASSD"].append(cell(entry, "assd"))
            cols["NSD"].append(cell(entry, "nsd"))
            cols["ID rate"].append(cell(entry, "identification_rate") if row != MEAN_OF_SPINE else math.nan)
            ref = (paper or {}).get(row, {})
            cols["DSC (paper)"].append(ref.get("DSC", math.nan))
            cols["HD95 (paper)"].append(ref.get("HD95", math.nan))
        for c, vals in cols.items():
            if "(paper)" in c and not with_paper:
                continue
            table[f"{set_name} {c}"] = pd.to_numeric(pd.Series(vals, index=index), errors="coerce")
    table.attrs["hd95_definition"] = defs
    return table


def table2_markdown(table: pd.DataFrame) -> str:
    """Markdown of :func:`build_table2`: DSC/NSD/ID rate to 3 decimals, mm to 2, NaN left empty."""
    cols = list(table.columns)
    lines = ["| " + " | ".join([table.index.name or ""] + cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for name, row in table.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("")
            elif "HD95" in c or "ASSD" in c:
                cells.append(f"{v:.2f}")
            else:
                cells.append(f"{v:.3f}")
        lines.append("| " + " | ".join([str(name)] + cells) + " |")
    defs = table.attrs.get("hd95_definition", {})
    if defs:
        lines.append("")
        lines.append("HD95 definition: " + "; ".join(f"{k}: {v}" for k, v in defs.items())
                     + ". Paper columns: CTSpine1K Table 2 (nnU-Net 3d_fullres), only the cells quoted in DESIGN §6.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: evaluate two folders and write the tables. Returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m lib.evaluate",
                                 description="Per-vertebra Dice, HD95, ASSD, NSD and identification "
                                             "of predicted label maps against truths.")
    ap.add_argument("--gt", required=True, help="folder of truths (ID_seg.nii.gz or ID.nii.gz)")
    ap.add_argument("--pred", required=True, help="folder of predictions (ID.nii.gz)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--labels", default="1-25", help="labels to report, e.g. 1-25, C1-L6, 1-25,28")
    ap.add_argument("--hd95", default="pooled", choices=sorted(metrics.HD95_DEFINITIONS),
                    help="HD95 definition: pooled (medpy, nnU-Net v1) or max (MONAI, surface-distance)")
    ap.add_argument("--nsd-tolerance-mm", type=float, default=metrics.DEFAULT_NSD_TOLERANCE_MM)
    ap.add_argument("--workers", type=int, default=None, help="local processes (0 = in process)")
    ap.add_argument("--scheduler", default=None, help="Dask distributed scheduler address")
    ap.add_argument("--missing", default="empty", choices=("empty", "exclude"),
                    help="score a missing prediction as empty (default) or only list it")
    ap.add_argument("--set-name", default=None, help="test-set name for Table 2 (default: from --gt)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        labels = lab.parse_label_range(args.labels)
        df, summary = evaluate_folders(args.gt, args.pred, args.out, labels=labels, hd95=args.hd95,
                                       workers=args.workers, scheduler=args.scheduler,
                                       nsd_tolerance_mm=args.nsd_tolerance_mm, missing=args.missing,
                                       on_error="collect", set_name=args.set_name,
                                       progress=not args.no_progress)
    except (ValueError, FileNotFoundError, CaseErrors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mov, mos = summary["mean_of_vertebrae"], summary["mean_of_spine"]
    print(f"{summary['n_cases']} cases ({summary['n_missing_cases']} missing predictions, "
          f"{summary['n_failed_cases']} failed); HD95 definition: {summary['hd95_definition']}")
    print(f"Mean of Vertebrae: DSC {mov['dice']['mean']:.3f}  HD95 {mov['hd95']['mean']:.2f} mm  "
          f"ID rate {mov['identification_rate_pooled']:.3f}  missed {mov['missed']}  "
          f"false positives {mov['false_positive']}")
    if mos:
        print(f"Mean of Spine:     DSC {mos['dice']['mean']:.3f}  HD95 {mos['hd95']['mean']:.2f} mm")
    for cid in summary["missing_cases"]:
        print(f"missing prediction: {cid}", file=sys.stderr)
    for f in summary["failed_cases"]:
        print(f"failed: {f['case_id']}: {f['message'].splitlines()[0]}", file=sys.stderr)
    print(f"wrote {Path(args.out) / PER_CASE_CSV}, {SUMMARY_JSON}, {TABLE2_CSV}, {TABLE2_MD}")
    return 1 if summary["failed_cases"] else 0


if __name__ == "__main__":
    sys.exit(main())
