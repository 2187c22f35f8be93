"""The preprocessing cache: every case read once, resampled per stage, stored as uncompressed ``.npy``.

Image float16, classes uint8, sampled foreground coordinates per class, so an epoch never decompresses
gzip. A case whose source file changed (size, mtime, and for ``.gz`` files the gzip trailer: CRC-32
and length of the whole uncompressed content) is redone; others are reused. Every pair is checked
with :func:`lib.io.check_pair` before it is cached (NaN/inf in the CT, a mask on another grid or
affine, non-integer or unknown label values): a bad pair raises :class:`lib.io.IntegrityError`
naming the file and the fault, before any training step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lib.core.parallel import CaseFailuresError, map_cases
from lib.core.seeding import stable_rng
from lib.imaging.resampling import resample_image, resample_labels, resampled_shape
from lib.io.atomic import atomic_path, write_text
from lib.io.integrity import Fault, IntegrityError, check_pair, load_pair
from lib.ml.plans import Plan, StagePlan, plan_from_dict, plan_to_dict
from lib.ml.preprocessing import (
    LEVEL_NEAR_MM,
    SOFT_MAX,
    encode_levels,
    mask_to_classes,
    normalize_ct,
)

CACHE_VERSION = 4


MAX_FG_SAMPLES = 4000  # stored foreground coordinates per class and case


def _stage_key(plan: Plan, stage: StagePlan) -> str:
    payload = json.dumps({"v": CACHE_VERSION, "spacing": stage.spacing_mm, "task": stage.task,
                          "soft": stage.soft_targets, "roi": [stage.roi_from, stage.roi_margin_mm, stage.roi_jitter_mm],
                          "norm": plan.normalization, "labels": plan.labels,
                          "map": {str(k): v for k, v in plan.label_map.items()}}, sort_keys=True)
    return f"{stage.name}_{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def _source_stamp(path: str | Path) -> dict[str, Any]:
    """What identifies a source file's content cheaply: path, size, mtime and, for gzip files,
    the 8-byte trailer (CRC-32 and length of the uncompressed data), which changes with the
    content even when a copy keeps the size and mtime (``cp -p``, ``rsync -a``)."""
    p = Path(path)
    st = p.stat()
    stamp = {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if p.name.endswith(".gz") and st.st_size >= 8:
        with p.open("rb") as fh:
            fh.seek(-8, 2)
            stamp["gz_trailer"] = fh.read(8).hex()
    return stamp


def allowed_mask_values(plan: Plan) -> list[int]:
    """Mask values a plan accepts: its labels and the values ``label_map`` sends to them or to 0."""
    return [v for v in range(1, 256) if plan.label_map.get(v, v) == 0 or plan.label_map.get(v, v) in plan.labels]


@dataclass(frozen=True)
class CacheJob:
    """One case to cache for some stages (picklable for :func:`lib.core.parallel.map_cases`)."""

    case_id: str
    image_path: str
    mask_path: str
    folders: tuple[str, ...]
    plan: dict[str, Any]
    stages: tuple[str, ...]


def _cached_meta(folder: Path, case_id: str, stamps: dict[str, Any]) -> dict[str, Any] | None:
    meta_path = folder / f"{case_id}_meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError):
        return None
    if meta.get("sources") == stamps and all((folder / meta[k]).exists() for k in ("image", "seg", "fg")):
        return meta
    return None


def cache_case(job: CacheJob) -> dict[str, dict[str, Any]]:
    """Preprocess one case for each of ``job.stages`` unless its cache is there and up to date.

    The image is read once for all stages. Stages with ``roi_from`` keep only the labelled
    bounding box plus ``roi_margin_mm + roi_jitter_mm`` (all that stage ever sees at inference),
    cropped on the input grid before resampling, as at inference.

    Returns:
        ``{stage: metadata}``: ``case_id``, ``shape``, ``classes`` (present class indices),
        ``offset`` (input-grid voxel where the stored crop starts), ``roi`` (labelled bounding
        box ``[lo, hi)`` in stored voxels, or None), file names and the source stamps.
    """
    stamps = {"image": _source_stamp(job.image_path), "mask": _source_stamp(job.mask_path)}
    out: dict[str, dict[str, Any]] = {}
    todo = []
    for folder, sname in zip(job.folders, job.stages, strict=True):
        meta = _cached_meta(Path(folder), job.case_id, stamps)
        if meta is not None:
            out[sname] = meta
        else:
            todo.append((Path(folder), sname))
    if not todo:
        return out
    plan = plan_from_dict(job.plan)
    # each file read once (CT int16/float32, mask uint8) and checked against the plan's label set
    img_v, msk_v = load_pair(job.image_path, job.mask_path, allowed_labels=allowed_mask_values(plan))
    spacing = img_v.spacing
    norm = normalize_ct(img_v.array, plan.normalization, job.image_path)
    for folder, sname in todo:
        stage = plan.stage(sname)
        cls = mask_to_classes(msk_v.array, plan, stage.task, job.mask_path)
        offset = [0, 0, 0]
        img_o, cls_o = norm, cls
        if stage.roi_from is not None and cls.any():
            idx = np.nonzero(cls)
            pad = np.ceil((stage.roi_margin_mm + stage.roi_jitter_mm) / np.asarray(spacing) - 1e-3).astype(int) \
                + np.ceil(np.asarray(stage.spacing_mm) / np.asarray(spacing) - 1e-3).astype(int)
            lo_c = np.maximum([int(i.min()) for i in idx] - pad, 0)
            hi_c = np.minimum([int(i.max()) + 1 for i in idx] + pad, cls.shape)
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo_c, hi_c, strict=True))
            img_o, cls_o = norm[box], cls[box]
            offset = [int(v) for v in lo_c]
        new_shape = resampled_shape(img_o.shape, spacing, stage.spacing_mm)
        img = resample_image(img_o, new_shape) if tuple(new_shape) != img_o.shape else np.asarray(img_o, np.float32)
        seg = resample_labels(cls_o, new_shape) if tuple(new_shape) != cls_o.shape else np.asarray(cls_o, np.uint8)
        roi = None
        if stage.roi_from is not None and seg.any():
            idx = np.nonzero(seg)
            roi = [[int(i.min()) for i in idx], [int(i.max()) + 1 for i in idx]]
        if stage.task == "levels":
            stored = encode_levels(seg, LEVEL_NEAR_MM / min(stage.spacing_mm))
        elif stage.task == "foreground" and stage.soft_targets:  # the spine fraction of each voxel
            frac = (resample_image(cls_o.astype(np.float32), new_shape) if tuple(new_shape) != cls_o.shape
                    else cls_o.astype(np.float32))
            stored = np.rint(np.clip(frac, 0, 1) * SOFT_MAX).astype(np.uint8)
        else:
            stored = seg
        rng = stable_rng(job.case_id, digest="crc32")
        fg_rows = []
        classes = [int(c) for c in np.unique(seg) if c != 0]
        for c in classes:
            pts = np.argwhere(seg == c)
            if len(pts) > MAX_FG_SAMPLES:
                pts = pts[np.sort(rng.choice(len(pts), MAX_FG_SAMPLES, replace=False))]
            fg_rows.append(np.concatenate([np.full((len(pts), 1), c), pts], axis=1))
        fg = np.concatenate(fg_rows).astype(np.int32) if fg_rows else np.zeros((0, 4), np.int32)
        names = {"image": f"{job.case_id}_img.npy", "seg": f"{job.case_id}_seg.npy", "fg": f"{job.case_id}_fg.npy"}
        folder.mkdir(parents=True, exist_ok=True)
        for key, arr in (("image", img.astype(np.float16)), ("seg", stored.astype(np.uint8)), ("fg", fg)):
            with atomic_path(folder / names[key]) as tmp:
                np.save(tmp, arr, allow_pickle=False)
        meta = {"case_id": job.case_id, "shape": list(img.shape), "classes": classes, "offset": offset,
                "roi": roi, **names, "sources": stamps}
        write_text(folder / f"{job.case_id}_meta.json", json.dumps(meta, indent=1) + "\n")
        out[sname] = meta
    return out


def build_caches(cases: Sequence[Sequence[str]], plan: Plan, stages: Sequence[str], cache_dir: str | Path,
                 workers: int | None = 0, progress: bool = True) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """Preprocess ``(case_id, image_path, mask_path)`` cases for several stages (one read per case).

    Re-runs skip cases whose cache matches the source files (see :func:`_source_stamp`); the
    others are checked (:func:`lib.io.load_pair` against :func:`allowed_mask_values`) and preprocessed.

    Returns:
        ``{stage: (folder, metas)}``: each stage's cache folder and per-case metadata (input order).

    Raises:
        IntegrityError: some pair failed the integrity check; every such fault (file and fault)
            is listed, and the :class:`CaseFailuresError` of all failed cases is its cause.
        lib.core.parallel.CaseFailuresError: listing every case that could not be preprocessed.
    """
    stages = list(stages)
    folders = tuple(str(Path(cache_dir) / _stage_key(plan, plan.stage(s))) for s in stages)
    pd = plan_to_dict(plan)
    jobs = [CacheJob(str(c[0]), str(c[1]), str(c[2]), folders, pd, tuple(stages)) for c in cases]
    res = map_cases(cache_case, jobs, ids=[j.case_id for j in jobs], workers=workers, on_error="collect",
                    desc="cache", progress=progress)
    if res.failures:
        _raise_failures(res.failures, {j.case_id: j for j in jobs}, plan)
    return {s: (Path(f), [res.values[j.case_id][s] for j in jobs]) for s, f in zip(stages, folders, strict=True)}


def _raise_failures(failures, jobs: dict[str, CacheJob], plan: Plan) -> None:
    """Raise :class:`IntegrityError` with the faults of the cases that failed the integrity check
    (checked again here: workers report text), else :class:`CaseFailuresError`."""
    error = CaseFailuresError(failures)
    faults: list[Fault] = []
    for f in failures:
        if f.message.startswith(f"{IntegrityError.__name__}: "):
            job = jobs[f.case_id]
            faults += check_pair(job.image_path, job.mask_path, allowed_labels=allowed_mask_values(plan)) \
                or [Fault(job.image_path, f.message.split(": ", 1)[1].splitlines()[0])]
    if faults:
        raise IntegrityError(faults) from error
    raise error


def build_cache(cases: Sequence[Sequence[str]], plan: Plan, stage: str, cache_dir: str | Path,
                workers: int | None = 0, progress: bool = True) -> tuple[Path, list[dict[str, Any]]]:
    """:func:`build_caches` for one stage: ``(folder, metas)``."""
    return build_caches(cases, plan, [stage], cache_dir, workers, progress)[stage]


@dataclass
class CachedArrays:
    """The preprocessed arrays of one case for one stage, opened read-only (memory-mapped)."""

    case_id: str
    image: np.ndarray  # float16 (x, y, z), normalised
    seg: np.ndarray    # uint8 class indices
    fg: np.ndarray     # int32 (n, 4): class, x, y, z
    classes: list[int]
    roi: list[list[int]] | None = None  # labelled bounding box [lo, hi) (ROI stages)


def open_cache(folder: Path, metas: Sequence[dict[str, Any]]) -> list[CachedArrays]:
    """Memory-map the cached arrays of ``metas``."""
    out = []
    for m in metas:
        out.append(CachedArrays(m["case_id"], np.load(folder / m["image"], mmap_mode="r"),
                                np.load(folder / m["seg"], mmap_mode="r"), np.load(folder / m["fg"]),
                                list(m["classes"]), m.get("roi")))
    return out
