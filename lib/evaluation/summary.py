"""Statistics over a per-case table: the ``summary.json`` of an evaluation, and per-case scores.

Per label: mean, sd (ddof 1) and n over the cases whose truth holds the label (a missed vertebra
contributes Dice 0 and NSD 0; its HD95/ASSD are missing and leave the distance means, and it is
counted in ``missed``). False-positive vertebrae are counted, not averaged. "Mean of Vertebrae" =
mean over labels of the per-label means; "Mean of Spine" = the same metrics on the binary mask.
Rows of a failed case (``status`` :data:`FAILED`: scored as missed) count like missed rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from lib import metrics
from lib.core import labels as lab

FAILED = "failed"
"""``status`` of the rows of a failed case (truth or prediction unusable): scored as missed."""

SCORED_STATUSES = (metrics.DETECTED, metrics.MISSED, FAILED)
"""Row statuses of labels present in the truth: the rows every per-label statistic is over."""

CONVENTIONS = {
    "absent_in_both": "not evaluated (no row)",
    "missed": "present in truth, absent in prediction: Dice 0, NSD 0, HD95/ASSD missing (null), "
              "not identified; counted in 'missed'",
    "false_positive": "absent in truth, present in prediction: a false-positive vertebra; no "
                      "metrics, counted in 'false_positive'",
    "missing_prediction": "a truth without prediction file is listed in 'missing_cases' and, with "
                          "missing='empty', scored as an empty prediction",
    "failed_case": "a case whose truth or prediction fails the integrity check (unreadable, "
                   "non-integer, negative or unknown labels, empty truth, prediction off the truth's "
                   "grid) or whose evaluation raised: listed in 'failed_cases' (file, kind, message) "
                   "and scored as a missing prediction (its rows status 'failed': Dice 0, NSD 0, not "
                   "identified, HD95/ASSD missing), counted in 'missed' and 'failed' and in every mean",
    "statistics": "per label over cases whose truth holds the label; sd with ddof=1; Mean of "
                  "Vertebrae = mean over labels of per-label means; Mean of Spine = binary mask "
                  "(label > 0)",
    "surface": "surface voxels = mask minus its 6-connected erosion; distances in mm between "
               "voxel centres with the image spacing",
    "assd": "mean of both directed surface-distance sets pooled",
    "nsd": "share of both surfaces' voxels within the tolerance of the other surface",
    "identification": "VerSe (default rule verse_get_hits, the official evaluator's): among labels in "
                      "both masks, the true centroid nearest to each predicted one carries its label "
                      "and lies within the distance limit; vertebral-body centroids in world mm (the "
                      "truth's centroid file when it has one); see 'identification' for this run's "
                      "rule and centroids",
}


def _stat(values: Iterable[float]) -> dict:
    v = np.asarray([x for x in values if x is not None and not math.isnan(float(x))], dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else math.nan,
            "sd": float(v.std(ddof=1)) if v.size > 1 else math.nan, "n": int(v.size)}


def _label_stats(sub: pd.DataFrame) -> dict:
    present = sub[sub["status"].isin(SCORED_STATUSES)]
    out = {m: _stat(present[m]) for m in metrics.METRIC_COLUMNS}
    out["identification_rate"] = _stat(present["identified"])
    out["localisation_mm"] = _stat(present["localisation_mm"])
    out["n_in_truth"] = int(len(present))
    out["missed"] = int(sub["status"].isin([metrics.MISSED, FAILED]).sum())
    out["failed"] = int((sub["status"] == FAILED).sum())
    out["false_positive"] = int((sub["status"] == metrics.FALSE_POSITIVE).sum())
    return out


def summarise(per_case: pd.DataFrame, labels: Sequence[int], hd95: str,
              nsd_tolerance_mm: float, cases: Sequence[Mapping] = (),
              missing_cases: Sequence[str] = (), failed_cases: Sequence[Mapping] = (),
              missing: str = "empty") -> dict:
    """Summary dict of a per-case table (what ``summary.json`` holds).

    Keys: ``hd95_definition`` (+ ``_text``), ``nsd_tolerance_mm``, ``labels``, ``conventions``,
    counts (``n_cases``, ``n_failed``, ``n_missing``; also as ``n_failed_cases``,
    ``n_missing_cases``), ``missing_cases`` (ids), ``failed_cases`` (``{case_id, file, kind,
    message}``), ``metric_per_case`` (per case: files, ``failed``, ``failure`` and ``metrics`` by
    label name), ``mean`` (per label name: ``{metric: {mean, sd, n}}``, ``missed`` (failed rows
    included), ``failed``, ``false_positive``), ``mean_of_vertebrae`` and ``mean_of_spine``. Rows
    of failed cases are in every statistic.
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
    mov["failed"] = int(sum(e["failed"] for e in mean.values()))
    mov["false_positive"] = int(sum(e["false_positive"] for e in mean.values()))
    mov["n_vertebrae_in_truth"] = int(sum(e["n_in_truth"] for e in mean.values()))
    present = vert[vert["status"].isin(SCORED_STATUSES)]
    mov["identification_rate_pooled"] = _stat(present["identified"])["mean"]
    per_scan = present.groupby("case_id")["identified"].mean() if len(present) else pd.Series(dtype=float)
    mov["identification_rate_per_scan_mean"] = _stat(per_scan)["mean"]
    spine = df[df["label"] == metrics.SPINE_LABEL]
    mos = {"label": metrics.SPINE_LABEL, **_label_stats(spine)} if len(spine) else {}
    per_case_list = []
    by_case = {cid: g for cid, g in df.groupby("case_id", sort=False)}
    missing_set = set(missing_cases)
    failure_of = {str(f.get("case_id")): f for f in failed_cases}
    for t in cases:
        cid = t["case_id"]
        g = by_case.get(cid)
        entry = {"case_id": cid, "reference_file": t.get("gt"), "prediction_file": t.get("pred"),
                 "prediction_missing": cid in missing_set, "failed": cid in failure_of,
                 "failure": failure_of.get(cid, {}).get("message", ""), "metrics": {}}
        if g is not None:
            for r in g.to_dict("records"):
                key = metrics.SPINE_NAME if r["label"] == metrics.SPINE_LABEL else r["name"]
                entry["metrics"][key] = {k: r[k] for k in ("label", "status", "dice", "hd95", "assd", "nsd",
                                                           "identified", "localisation_mm",
                                                           "gt_voxels", "pred_voxels")}
            gv = g[(g["label"] != metrics.SPINE_LABEL) & g["status"].isin(SCORED_STATUSES)]
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
        "n_missing": len(missing_cases),
        "n_missing_cases": len(missing_cases),
        "missing_cases": list(missing_cases),
        "n_failed": len(failed_cases),
        "n_failed_cases": len(failed_cases),
        "failed_cases": [dict(f) for f in failed_cases],
        "mean": mean,
        "mean_of_vertebrae": mov,
        "mean_of_spine": mos,
        "metric_per_case": per_case_list,
    }


def json_ready(obj):
    """NaN/inf -> None and numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def case_scores(per_case: pd.DataFrame) -> pd.DataFrame:
    """Per case (``set``, ``case_id``): mean vertebra Dice (labels in the truth), spine Dice,
    identification rate, vertebrae, ``failed`` and ``failure``, from the per-case rows of several
    sets (a ``set`` column). Every case is in it: a failed case scores 0 (its rows are missed)."""
    keys = ["set", "case_id"]
    failed = per_case["failed"].astype(bool) if "failed" in per_case else pd.Series(False, index=per_case.index)
    failure = per_case["failure"].fillna("").astype(str) if "failure" in per_case else pd.Series("", index=per_case.index)
    cases = per_case.assign(failed=failed, failure=failure).groupby(keys)
    out = pd.DataFrame({"failed": cases["failed"].any(), "failure": cases["failure"].max()})
    vert = per_case[(per_case["label"] > 0) & per_case["status"].isin(SCORED_STATUSES)]
    g = vert.groupby(keys)
    out = out.join(pd.DataFrame({"mean_vertebra_dice": g["dice"].mean(), "identification_rate": g["identified"].mean(),
                                 "vertebrae": g.size()}))
    for col in ("mean_vertebra_dice", "identification_rate"):  # a failed case with no readable vertebra: 0
        out.loc[out["failed"] & out[col].isna(), col] = 0.0
    out["vertebrae"] = out["vertebrae"].fillna(0).astype(int)
    spine = per_case[per_case["label"] == 0].set_index(keys)["dice"].rename("spine_dice")
    out = out.join(spine)
    cols = ["mean_vertebra_dice", "identification_rate", "vertebrae", "spine_dice", "failed", "failure"]
    return out[cols].reset_index()
