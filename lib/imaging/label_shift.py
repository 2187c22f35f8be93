"""Label shifts (the paper's "dislocations"): detection, the truth's variant, and our correction.

* :func:`label_shift_table` pairs every predicted vertebra with the truth label it overlaps most
  and gives the offset in levels; a case is *dislocated* when two or more consecutive predicted
  vertebrae are off by the same non-zero offset (:func:`dislocation`).
* :func:`correspondence`, :func:`level_offsets`, :func:`relabel` and :func:`variant_of` are the
  mask arithmetic of the simulated annotators and the analysis (which truth vertebra a predicted
  label covers, by how many levels it is off, a spine relabelled by offsets, L6 / T13 / missing L5).
* :func:`correct_label_shift` is our post-processor: it splits the prediction into vertebra
  instances ordered along the spine (:mod:`lib.imaging.instances`); an instance holding two
  vertebrae under one label is cut at the disc and all are relabelled consecutively; otherwise the
  count is anchored at landmarks the image shows (:mod:`lib.imaging.landmarks`: the skull base and
  the last rib-bearing vertebra, T12) instead of trusting a count that a network may have made from
  the sacrum (wrong whenever there is an L6 or no L5).

Arrays are ``(x, y, z)`` RAS+ label maps (uint8) with the image's ``affine``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from lib.core import labels as L
from lib.core.labels import label_at_level, level_index
from lib.imaging.instances import (
    Instance,
    consecutive_labels,
    spine_sequence,
    split_merged_instances,
    vertebra_instances,
)
from lib.imaging.landmarks import detect_ribs, detect_skull, rib_anchor


def _centroids_world(mask: np.ndarray, affine: np.ndarray, values) -> dict[int, np.ndarray]:
    idx = ndimage.center_of_mass(np.ones_like(mask, dtype=np.uint8), mask, list(values))
    return {v: (affine @ np.r_[np.asarray(c, float), 1.0])[:3] for v, c in zip(values, idx, strict=True)}


def label_shift_table(truth: np.ndarray, pred: np.ndarray, affine: np.ndarray) -> pd.DataFrame:
    """One row per predicted vertebra label, craniocaudal order (by world z of its centroid).

    Columns: ``pred_label``, ``pred_name``, ``truth_label`` (the truth label covering most of
    the predicted vertebra, 0 if it lies on background), ``truth_name``, ``overlap`` (that
    fraction), ``offset`` (predicted level minus true level; NaN on background), ``z_mm``.
    """
    k = 32
    hist = np.bincount(pred.astype(np.int64).ravel() * k + truth.astype(np.int64).ravel(),
                       minlength=k * k).reshape(k, k)
    present = [v for v in range(1, k) if hist[v].sum() and v in L.LABELS]
    cents = _centroids_world(pred, affine, present) if present else {}
    rows = []
    for v in present:
        row = hist[v].copy()
        total = row.sum()
        row[0] = 0
        t = int(np.argmax(row)) if row.max() > 0 else 0
        frac = float(row[t] / total) if t else float(hist[v, 0] / total)
        rows.append({"pred_label": v, "pred_name": L.name(v), "truth_label": t,
                     "truth_name": L.name(t) if t in L.LABELS else "background", "overlap": frac,
                     "offset": level_index(v) - level_index(t) if t in L.LABELS else np.nan,
                     "z_mm": float(cents[v][2])})
    df = pd.DataFrame(rows, columns=["pred_label", "pred_name", "truth_label", "truth_name", "overlap",
                                     "offset", "z_mm"])
    return df.sort_values("z_mm", ascending=False, ignore_index=True)


@dataclass(frozen=True)
class Dislocation:
    """Whether a case is dislocated, by which offset, and over how many vertebrae."""

    dislocated: bool
    offset: float
    run_length: int
    shifted_labels: tuple[str, ...]


def dislocation(table: pd.DataFrame, min_run: int = 2) -> Dislocation:
    """A case is dislocated when ``min_run`` or more consecutive predicted vertebrae (in
    craniocaudal order) share the same non-zero offset. Returns the longest such run."""
    best = (0, 0.0, ())
    run, off, names = 0, 0.0, []
    for _, r in table.iterrows():
        o = r["offset"]
        if pd.notna(o) and o != 0 and o == off:
            run += 1
            names.append(r["pred_name"])
        elif pd.notna(o) and o != 0:
            run, off, names = 1, o, [r["pred_name"]]
        else:
            run, off, names = 0, 0.0, []
        if run > best[0]:
            best = (run, off, tuple(names))
    return Dislocation(best[0] >= min_run, float(best[1]) if best[0] >= min_run else 0.0, best[0], best[2])


def correspondence(truth: np.ndarray, pred: np.ndarray) -> dict[int, int]:
    """For each truth vertebra, the predicted label covering most of it (0 = missed)."""
    k = 32
    hist = np.bincount(truth.astype(np.int64).ravel() * k + pred.astype(np.int64).ravel(), minlength=k * k).reshape(k, k)
    out = {}
    for v in (int(x) for x in np.flatnonzero(hist.sum(axis=1)) if x):
        row = hist[v].copy()
        row[0] = 0
        out[v] = int(np.argmax(row)) if row.max() > 0.2 * hist[v].sum() else 0
    return out


def level_offsets(truth: np.ndarray, pred: np.ndarray) -> dict[int, float]:
    """Per truth vertebra: predicted level minus true level (a label shift is a run of equal
    non-zero offsets). Missed vertebrae take the offset of their nearest labelled neighbour."""
    corr = correspondence(truth, pred)
    offs: dict[int, float | None] = {v: (level_index(p) - level_index(v) if p else None) for v, p in corr.items()}
    known = {v: o for v, o in offs.items() if o is not None}
    for v, o in offs.items():
        if o is None:
            if known:
                nearest = min(known, key=lambda u: abs(level_index(u) - level_index(v)))
                offs[v] = known[nearest]
            else:
                offs[v] = 0.0
    return {v: float(o) for v, o in offs.items()}


def relabel(truth: np.ndarray, offsets: dict[int, float]) -> np.ndarray:
    """Truth geometry with each vertebra v labelled at level(v) + offset."""
    lut = np.arange(256, dtype=np.uint8)
    for v, o in offsets.items():
        lut[v] = label_at_level(level_index(v) + o) if o else v
    return lut[truth]


def variant_of(truth: np.ndarray) -> str:
    """``"L6"``, ``"missing_L5"``, ``"T13"`` or ``""`` from a truth mask's label set.

    Missing L5 is called when L4 is the last lumbar vertebra and the mask also holds L3 (so the
    lumbar spine is in the field of view down to its end): a lumbar sacralisation.
    """
    present = set(np.unique(truth).tolist())
    if L.L6 in present:
        return "L6"
    if L.T13 in present:
        return "T13"
    if 23 in present and 22 in present and L.L5 not in present:
        return "missing_L5"
    return ""


@dataclass
class Correction:
    """What :func:`correct_label_shift` did."""

    applied: bool
    anchor: str
    shift: float
    labels_before: list[str]
    labels_after: list[str]
    ribs: list[bool]
    skull: bool = False


ANCHOR_POLICIES = ("both", "any")


def correct_label_shift(ct: np.ndarray, pred: np.ndarray, affine: np.ndarray, min_changed: int = 2,
                        min_consistent: float = 0.6,
                        rib_kwargs: dict | None = None, skull_kwargs: dict | None = None,
                        anchors: str = "both", split_merged: bool = True,
                        split_kwargs: dict | None = None, min_agree: float = 0.5) -> tuple[np.ndarray, Correction]:
    """Relabel predicted vertebrae consecutively, anchored at landmarks the image shows.

    Instances are ordered cranial -> caudal (:func:`vertebra_instances`). First, with
    ``split_merged``, an instance that holds two vertebrae under one label is split
    (:func:`split_merged_instances`: the usual form of the L6 failure, L5 + L6 called "L5");
    when one is, all instances are relabelled consecutively (C1..T12, L1..L6) from the start
    that agrees with the most predicted voxels (:func:`consecutive_labels`): the labels the
    network got right keep the count, and the vertebrae after the merge move down one level,
    so a sixth lumbar vertebra becomes L6. Without a split, the landmarks decide. Anchors:

    * the skull base right above the top instance -> that instance is C1;
    * the last vertebra of the longest run of rib-bearing instances with rib-free instances
      below it -> T12 (the thoracolumbar junction).

    With both, the number of instances between them gives the thoracic count (11, 12 or 13,
    so T13 is labelled 28); with one, the count runs from it with 12 thoracic vertebrae; with
    none, labels are only made consecutive around the network's majority offset. A sixth lumbar
    vertebra thus becomes L6 and a missing L5 leaves L4 last, whatever the network counted from
    the sacrum. The relabelling is applied only when it changes at least ``min_changed``
    instances, every instance gets a label, and at least ``min_consistent`` of the instances
    move by one and the same non-zero offset (a dislocation, not a scramble), so a correct
    prediction — or one too poor to be a shifted spine — is left as it is.

    ``anchors="both"`` (default) relabels only when the skull base and the last rib are both
    found and agree on a thoracic count of 11-13: one landmark alone has no second opinion,
    and on the synthetic benchmark's predictions a rib-only anchor moved correct labels more
    often than wrong ones (L1 looked rib-bearing in 4 of 22 cases). ``"any"`` uses whichever
    landmark is found (the sacrum-counted shift of an abdominal L6 scan needs it).

    Returns:
        (corrected mask, :class:`Correction` record).
    """
    insts = vertebra_instances(pred, affine)
    before = [L.name(i.label) for i in insts]
    if len(insts) < 2:
        return pred.copy(), Correction(False, "none", 0.0, before, before, [])
    if anchors not in ANCHOR_POLICIES:
        raise ValueError(f"anchors={anchors!r}: expected one of {ANCHOR_POLICIES}")
    if split_merged:
        done = _relabel_after_split(pred, affine, insts, split_kwargs, min_agree)
        if done is not None:
            return done
    ribs = detect_ribs(ct, pred, affine, insts, **(rib_kwargs or {}))
    skull = detect_skull(ct, pred, affine, insts[0], **(skull_kwargs or {}))
    seq, pos0, anchor = _anchor(insts, ribs, skull)
    unchanged = pred.copy()
    if anchors == "both" and not anchor.startswith("C1 + last rib"):
        return unchanged, Correction(False, anchor + " (one landmark: not applied)", 0.0, before, before, ribs, skull)
    positions = [pos0 + k for k in range(len(insts))]
    if min(positions) < 0 or max(positions) >= len(seq):
        return unchanged, Correction(False, anchor + " (out of range)", 0.0, before, before, ribs, skull)
    new_labels = [seq[p] for p in positions]
    changed = sum(1 for inst, nl in zip(insts, new_labels, strict=True) if nl != inst.label)
    if changed < min_changed:
        return unchanged, Correction(False, anchor, 0.0, before, before, ribs, skull)
    # only a dislocation is corrected: most instances must move by one and the same offset
    deltas = [level_index(nl) - level_index(i.label) for i, nl in zip(insts, new_labels, strict=True)]
    vals, counts = np.unique(deltas, return_counts=True)
    if counts.max() < min_consistent * len(insts) or vals[np.argmax(counts)] == 0:
        return unchanged, Correction(False, anchor + " (labels not a consistent shift)", 0.0, before, before,
                                     ribs, skull)
    return _apply(pred, insts, new_labels), Correction(True, anchor, float(np.median(deltas)), before,
                                                        [L.name(v) for v in new_labels], ribs, skull)


def _apply(pred: np.ndarray, insts: list[Instance], new_labels: list[int]) -> np.ndarray:
    """``pred`` with every instance's voxels set to its new label."""
    out = pred.copy().ravel()
    for inst, nl in zip(insts, new_labels, strict=True):
        out[inst.index] = nl
    return out.reshape(pred.shape)


def _relabel_after_split(pred: np.ndarray, affine: np.ndarray, insts: list[Instance], split_kwargs: dict | None,
                         min_agree: float) -> tuple[np.ndarray, Correction] | None:
    """Split merged instances and relabel the chain consecutively when at least ``min_agree``
    of the instances keep their label; None when nothing was split or the chain is a scramble."""
    parts, notes = split_merged_instances(pred, affine, insts, **(split_kwargs or {}))
    new_labels = consecutive_labels(pred, parts, spine_sequence(12)) if notes else None
    kept = np.mean([i.label == nl for i, nl in zip(parts, new_labels, strict=True)]) if new_labels else 0.0
    if new_labels is None or kept < min_agree:
        return None
    deltas = [level_index(nl) - level_index(i.label) for i, nl in zip(parts, new_labels, strict=True)]
    return _apply(pred, parts, new_labels), Correction(True, "merged vertebra split: " + "; ".join(notes),
                                                       float(np.median(deltas)), [L.name(i.label) for i in parts],
                                                       [L.name(v) for v in new_labels], [])


def _anchor(insts: list[Instance], ribs: list[bool], skull: bool) -> tuple[list[int], int, str]:
    """The label sequence, the sequence position of the top instance and the anchor's name:
    skull base + last rib (thoracic count 11-13), skull base alone, last rib alone, or the
    network's majority offset."""
    rib_idx = rib_anchor(ribs)
    seq, pos0, anchor = spine_sequence(12), None, "majority"
    n_thor = rib_idx + 1 - 7 if rib_idx is not None else None
    if skull and n_thor in (11, 12, 13):
        seq, pos0, anchor = spine_sequence(n_thor), 0, f"C1 + last rib ({n_thor} thoracic)"
    elif skull:  # the skull base is the more robust landmark when the two disagree
        pos0, anchor = 0, "skull base (C1)"
    elif rib_idx is not None:
        if insts[rib_idx].label == L.T13:  # the network itself called the last rib T13
            seq = spine_sequence(13)
            pos0, anchor = seq.index(L.T13) - rib_idx, "last rib (T13 as predicted)"
        else:
            pos0, anchor = seq.index(L.T12) - rib_idx, "last rib (T12)"
    if pos0 is None:  # consecutive around the most common (sequence position - index)
        votes = [seq.index(i.label) - k for k, i in enumerate(insts) if i.label in seq]
        vals, counts = np.unique(votes, return_counts=True)
        pos0 = int(vals[np.argmax(counts)])
    return seq, pos0, anchor
