"""The human round trip: pre-annotations exported for ITK-SNAP, edited masks validated and imported.

An imported mask must be readable, on the image's grid and hold only vertebra labels: the
CTSpine1K labels, plus T13 (28) for the cases whose data may hold it (VerSe-style labels,
``t13_cases``); a refused one names the file and the fault and its case stays queued.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.core import labels as L
from lib.datasets.label_tables import write_itksnap_labels
from lib.imaging.label_shift import variant_of
from lib.io import check_pair, load_volume, save_like, write_text
from lib.metrics.overlap import mean_vertebra_dice
from lib.stages.annotation.ledger import Ledger, now
from lib.stages.annotation.tiers import relabelled_vertebrae


def case_labels(case_id: str, allowed_labels: Iterable[int] = L.CTSPINE1K_LABELS,
                t13_cases: Collection[str] = ()) -> list[int]:
    """The labels a case's mask may hold: ``allowed_labels``, plus T13 (28) when the case's data
    may hold it (``case_id`` in ``t13_cases``: VerSe-style labels), in craniocaudal order."""
    values = {int(v) for v in allowed_labels} | ({L.T13} if case_id in t13_cases else set())
    return L.ordered(values)


def export_for_itksnap(out_dir: str | Path, cases: Sequence[tuple[str, Path, Path]],
                       t13_cases: Collection[str] = ()) -> Path:
    """Write a round's work for human annotators using ITK-SNAP.

    For each ``(case_id, image_path, preannotation_path)``: ``<out>/<case_id>/`` with the image,
    ``<case_id>_preannotation_seg.nii.gz`` and ``labels.txt`` (ITK-SNAP label description of the
    labels :func:`import_edited` accepts for the case: C1..L6, and T13 for ``t13_cases``). The
    annotator saves the edited mask as ``<case_id>_seg.nii.gz`` in the same folder.
    """
    out = Path(out_dir)
    for cid, img, pre in cases:
        d = out / cid
        d.mkdir(parents=True, exist_ok=True)
        for src, name in ((img, f"{cid}.nii.gz"), (pre, f"{cid}_preannotation_seg.nii.gz")):
            if not (d / name).exists():
                shutil.copyfile(src, d / name)
        write_itksnap_labels(d / "labels.txt", case_labels(cid, t13_cases=t13_cases))
    write_text(out / "README.txt",
               "Open <ID>.nii.gz in ITK-SNAP, load <ID>_preannotation_seg.nii.gz as segmentation and\n"
               "labels.txt as label descriptions (Segmentation > Import Label Descriptions).\n"
               "Correct the vertebra labels and boundaries, then save as <ID>_seg.nii.gz in the same folder.\n")
    return out


@dataclass(frozen=True)
class ImportOutcome:
    accepted: list[str]
    refused: dict[str, str]  # case id -> reason
    waiting: list[str]       # no edited mask yet


def _t13_hint(faults: Sequence, allowed: Collection[int]) -> str:
    """A note for a refused mask holding T13 where the case may not hold it."""
    if L.T13 in allowed or not any(f.kind == "unknown_label" and re.search(rf"\b{L.T13}\b", f.message) for f in faults):
        return ""
    return (f" (T13 = {L.T13} is accepted only for cases whose data may hold it: VerSe-style labels, "
            f"import_edited(t13_cases=...))")


def import_edited(ledger: Ledger, round_: int, export_dir: str | Path, gt_dirs: dict[str, Path],
                  model_version: int, allowed_labels: Iterable[int] = L.CTSPINE1K_LABELS,
                  t13_cases: Collection[str] = ()) -> ImportOutcome:
    """Import masks edited by people; validate each before accepting it.

    A mask whose shape or affine differs from the image, or that holds a label outside the
    case's labels (:func:`case_labels`: ``allowed_labels``, plus T13 = 28 for a case in
    ``t13_cases``), is refused with a message naming the file; the refusal is logged and the
    case stays queued.

    Args:
        gt_dirs: ``{case_id: release gt folder}`` where accepted masks are written.
        t13_cases: cases whose data may hold T13 (VerSe-style labels).
    """
    export_dir = Path(export_dir)
    accepted, refused, waiting = [], {}, []
    base = list(allowed_labels)
    for cid in sorted(gt_dirs):
        d = export_dir / cid
        edited, image = d / f"{cid}_seg.nii.gz", d / f"{cid}.nii.gz"
        if not edited.exists():
            waiting.append(cid)
            continue
        allowed = case_labels(cid, base, t13_cases)
        faults = check_pair(image, edited, allowed_labels=allowed)
        if faults:
            msg = "; ".join(str(f) for f in faults) + _t13_hint(faults, allowed)
            refused[cid] = msg
            ledger.log_event("refused", msg, cid, round_)
            continue
        img = load_volume(image)
        new = load_volume(edited).array.astype(np.uint8)
        pre = load_volume(d / f"{cid}_preannotation_seg.nii.gz").array.astype(np.uint8)
        target = Path(gt_dirs[cid]) / f"{cid}_seg.nii.gz"
        save_like(new, img, target, dtype=np.uint8)
        voxel_ml = float(np.prod(img.spacing)) / 1000.0
        n = int((new != pre).sum())
        t = now()
        row = dict(case_id=cid, round=round_, tier="human", actor="human", started_at=t, finished_at=t,
                   minutes=None, voxels_changed=n, ml_changed=n * voxel_ml,
                   vertebrae_relabelled=relabelled_vertebrae(pre, new), dice_before=None, dice_after=None,
                   hard_case=0, variant=variant_of(new), sent_to_expert=0, model_version=model_version,
                   note=f"imported from {edited}")
        ledger.record_case(cid, round_, [row], str(target), mean_vertebra_dice(new, pre))
        accepted.append(cid)
    return ImportOutcome(accepted, refused, waiting)
