"""Training: preprocessing cache, patch sampling with augmentation, the loop, checkpoints, DDP.

Typical use (a notebook or a later stage)::

    from lib import model, train
    plan = model.plan_experiment(cases, "synthetic")           # or model.load_plan(prev_dir)
    res = train.train(cases, out_dir, plan, max_epochs=40, time_budget_s=200, seed=0)
    res.model_dir            # model.pt + plan.json, read by lib.infer
    train.train(new_cases, out_dir2, init_from=res.model_dir, max_epochs=6)   # fine-tune

What happens, in nnU-Net's order:

1. **Cache.** Every case is read once, reoriented to RAS+, resampled to each stage's spacing
   (image linear, labels per class linearly then argmax), CT clipped to the plan's foreground
   0.5/99.5 percentiles and z-scored with the foreground mean/std, and stored as uncompressed
   ``.npy`` (image float16, classes uint8) with sampled foreground coordinates per class, so an
   epoch never decompresses gzip. A case whose source file changed is redone; others are reused.
2. **Patches.** Each batch item is drawn from a generator seeded by ``(seed, stage, epoch,
   iteration, item)``: a case uniformly, a centre (``foreground_oversample`` of the items on a
   voxel of a random class present, the rest anywhere), then augmentation: rotation, scaling,
   left-right mirroring (never along z, the craniocaudal axis, nor anterior-posterior, which
   would change what a vertebra looks like), Gaussian noise and blur, brightness, contrast,
   gamma, and optionally thick-slice simulation (slabs averaged along z and re-interpolated).
   Labels are never interpolated: rotated/scaled patches sample them nearest-neighbour.
3. **Loop.** DiceCE loss (batch Dice without background + cross-entropy) on every deep
   supervision output (weights 1, 1/2, 1/4 ... normalised); poly learning rate
   ``lr * (1 - progress) ** 0.9`` with progress = epoch / epochs, or elapsed / time budget when
   a budget is given; gradient clipping; AMP on CUDA; a checkpoint (model, optimiser, scaler,
   RNG states, log rows) written atomically after every epoch; ``resume=True`` continues from it.
4. **Outputs** in ``out_dir``: ``model.pt`` (all stage weights + plan), ``plan.json``,
   ``train_log.csv`` (one row per stage and epoch), ``training_curves.png``,
   ``train_result.json``; per stage ``stage_<name>/checkpoint.pt`` and ``final.pt``.

Determinism: on CPU, ``torch.use_deterministic_algorithms(True)`` and fixed seeds make the
same call give the same weights bit for bit, and a run killed at any point and resumed gives
the weights of the uninterrupted run (time budgets are the exception: where a run stops then
depends on the clock). Multi-GPU: launch ``torchrun --nproc_per_node N -m lib.train --job
job.json``; each process takes every N-th item of every batch (so the global batch is the
same for any N), gradients are averaged by DDP (gloo on CPU, NCCL on GPUs), rank 0 writes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from lib.core.seeding import stable_rng
from lib.datasets.verse import find_verse_cases, inspect_verse_case, select_pretraining_cases  # noqa: F401  (temporary)
from lib.imaging.resampling import resample_image, resample_labels, resampled_shape
from lib.imaging.thick_slices import thick_slice_augment
from lib.io import atomic_path, load_volume, write_text
from lib.metrics.overlap import dice, dice_per_label
from lib.model import Plan, StagePlan, build_network, plan_from_dict, plan_to_dict, save_plan

CACHE_VERSION = 4
MAX_FG_SAMPLES = 4000  # stored foreground coordinates per class and case


# =========================================================================== resampling


# =========================================================================== preprocessing cache


def normalize_ct(hu: np.ndarray, normalization: dict[str, Any]) -> np.ndarray:
    """Clip HU to ``clip_hu`` and z-score with the plan's foreground ``mean``/``std`` (float32)."""
    lo, hi = normalization["clip_hu"]
    out = np.clip(np.asarray(hu, dtype=np.float32), lo, hi)
    out -= np.float32(normalization["mean"])
    out /= np.float32(normalization["std"])
    return out


def pad_value(normalization: dict[str, Any]) -> float:
    """Normalised value of the lowest clipped HU: what lies outside the scanned volume."""
    return float((normalization["clip_hu"][0] - normalization["mean"]) / normalization["std"])


def label_lookup(plan: Plan, task: str) -> np.ndarray:
    """uint8 lookup (256 entries) from mask values to class indices; 255 marks unknown values.
    ``levels``: rungs of :meth:`lib.model.Plan.level_ladder` (0 for labels off the ladder)."""
    lut = np.full(256, 255, dtype=np.uint8)
    lut[0] = 0
    ladder = plan.level_ladder() if task == "levels" else None
    for src in range(1, 256):
        v = plan.label_map.get(src, src)
        if v == 0:
            lut[src] = 0
        elif v in plan.labels:
            if task == "foreground":
                lut[src] = 1
            elif ladder is not None:  # off the ladder (T13): filled from its neighbours by encode_levels
                lut[src] = ladder.index(v) + 1 if v in ladder else 0
            else:
                lut[src] = plan.labels.index(v) + 1
    return lut


def mask_to_classes(mask: np.ndarray, plan: Plan, task: str, path: str | Path = "<mask>") -> np.ndarray:
    """Map mask label values to class indices of a stage's task.

    Raises:
        ValueError: values that are neither in the plan's labels nor mapped away, naming the file.
    """
    m = np.asarray(mask)
    if m.min() < 0 or m.max() > 255:
        raise ValueError(f"{path}: mask values {int(m.min())}..{int(m.max())} outside 0..255")
    lut = label_lookup(plan, task)
    out = lut[m.astype(np.int64)]
    if (out == 255).any():
        bad = sorted(int(v) for v in np.unique(m[out == 255]))
        raise ValueError(f"{path}: label values {bad} are not in the plan's labels {plan.labels} "
                         f"(map them with label_map)")
    return out


def preprocess_arrays(ct: np.ndarray, mask: np.ndarray | None, spacing: Sequence[float], plan: Plan,
                      stage: StagePlan, mask_path: str | Path = "<mask>") -> tuple[np.ndarray, np.ndarray | None]:
    """Resample and normalise one case (RAS arrays) for a stage.

    Returns:
        ``(image float32, classes uint8 or None)`` on the stage's grid.
    """
    new_shape = resampled_shape(ct.shape, spacing, stage.spacing_mm)
    img = normalize_ct(ct, plan.normalization)
    if tuple(img.shape) != new_shape:
        img = resample_image(img, new_shape)
    seg = None
    if mask is not None:
        seg = mask_to_classes(mask, plan, stage.task, mask_path)
        if tuple(seg.shape) != new_shape:
            seg = resample_labels(seg, new_shape)
    return img, seg


def _stage_key(plan: Plan, stage: StagePlan) -> str:
    payload = json.dumps({"v": CACHE_VERSION, "spacing": stage.spacing_mm, "task": stage.task,
                          "soft": stage.soft_targets, "roi": [stage.roi_from, stage.roi_margin_mm, stage.roi_jitter_mm],
                          "norm": plan.normalization, "labels": plan.labels,
                          "map": {str(k): v for k, v in plan.label_map.items()}}, sort_keys=True)
    return f"{stage.name}_{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def _source_stamp(path: str | Path) -> dict[str, Any]:
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass(frozen=True)
class CacheJob:
    """One case to cache for some stages (picklable for :func:`lib.parallel.map_cases`)."""

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
    img_v = load_volume(job.image_path)
    msk_v = load_volume(job.mask_path)
    if img_v.shape != msk_v.shape:
        raise ValueError(f"{job.mask_path}: mask shape {msk_v.shape} differs from image shape {img_v.shape}")
    spacing = img_v.spacing
    norm = normalize_ct(img_v.array, plan.normalization)
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


SOFT_MAX = 255
"""``foreground`` targets are stored as the spine fraction of each voxel x 255 (uint8): with a
majority (hard) target at 3 mm the spine Dice on a 2 mm grid cannot exceed ~0.90; with the
fraction it can reach ~0.97 (the network learns partial volume; its probability, interpolated
to the image grid and thresholded at 0.5, follows the surface)."""

LEVEL_NEAR_MM = 15.0
"""``levels`` targets: the ordinal outputs are trained within this distance of the spine (mm)."""

LEVEL_FG = 128
"""``levels`` targets: bit 7 set = spine voxel; the low 7 bits = level (class index) of the
nearest labelled voxel, 0 = outside the region (ignored by the ordinal loss)."""


def encode_levels(classes: np.ndarray, max_dist_vox: float | None = None) -> np.ndarray:
    """Encode class indices (0 = background) as ``levels`` targets (uint8, see :data:`LEVEL_FG`).

    Voxels within ``max_dist_vox`` of the spine (all voxels when None) get the level of the
    nearest labelled voxel, so the ordinal outputs are trained around the spine too, where a
    fine-grid spine voxel may fall; farther voxels get 0 (ignored).
    """
    cls = np.asarray(classes, dtype=np.uint8)
    if cls.max() >= LEVEL_FG:
        raise ValueError(f"levels targets hold at most {LEVEL_FG - 1} labels, got class {int(cls.max())}")
    if not cls.any():
        return np.zeros_like(cls)
    dist, ind = ndimage.distance_transform_edt(cls == 0, return_indices=True)
    near = cls[tuple(ind)]
    if max_dist_vox is not None:
        near = np.where(dist <= max_dist_vox, near, 0).astype(np.uint8)
    return (near | np.where(cls > 0, LEVEL_FG, 0)).astype(np.uint8)


def decode_levels(target: np.ndarray) -> np.ndarray:
    """Class indices (0 = background) of encoded ``levels`` targets."""
    t = np.asarray(target)
    return np.where(t >= LEVEL_FG, t - LEVEL_FG, 0).astype(np.uint8)


def build_caches(cases: Sequence[Sequence[str]], plan: Plan, stages: Sequence[str], cache_dir: str | Path,
                 workers: int | None = 0, progress: bool = True) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """Preprocess ``(case_id, image_path, mask_path)`` cases for several stages (one read per case).

    Re-runs skip cases whose cache matches the source files' size and modification time.

    Returns:
        ``{stage: (folder, metas)}``: each stage's cache folder and per-case metadata (input order).

    Raises:
        lib.parallel.CaseErrors: listing every case that could not be preprocessed.
    """
    from lib.core.parallel import map_cases

    stages = list(stages)
    folders = tuple(str(Path(cache_dir) / _stage_key(plan, plan.stage(s))) for s in stages)
    pd = plan_to_dict(plan)
    jobs = [CacheJob(str(c[0]), str(c[1]), str(c[2]), folders, pd, tuple(stages)) for c in cases]
    res = map_cases(cache_case, jobs, ids=[j.case_id for j in jobs], workers=workers, on_error="raise",
                    desc="cache", progress=progress)
    return {s: (Path(f), [res.values[j.case_id][s] for j in jobs]) for s, f in zip(stages, folders, strict=True)}


def build_cache(cases: Sequence[Sequence[str]], plan: Plan, stage: str, cache_dir: str | Path,
                workers: int | None = 0, progress: bool = True) -> tuple[Path, list[dict[str, Any]]]:
    """:func:`build_caches` for one stage: ``(folder, metas)``."""
    return build_caches(cases, plan, [stage], cache_dir, workers, progress)[stage]


@dataclass
class CachedCase:
    """A cached case opened read-only (memory-mapped)."""

    case_id: str
    image: np.ndarray  # float16 (x, y, z), normalised
    seg: np.ndarray    # uint8 class indices
    fg: np.ndarray     # int32 (n, 4): class, x, y, z
    classes: list[int]
    roi: list[list[int]] | None = None  # labelled bounding box [lo, hi) (ROI stages)


def open_cache(folder: Path, metas: Sequence[dict[str, Any]]) -> list[CachedCase]:
    """Memory-map the cached arrays of ``metas``."""
    out = []
    for m in metas:
        out.append(CachedCase(m["case_id"], np.load(folder / m["image"], mmap_mode="r"),
                              np.load(folder / m["seg"], mmap_mode="r"), np.load(folder / m["fg"]),
                              list(m["classes"]), m.get("roi")))
    return out


# =========================================================================== VerSe selection


# =========================================================================== patches + augmentation


def _rotation(angles_rad: Sequence[float]) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def extract_patch(image: np.ndarray, seg: np.ndarray | None, centre: Sequence[float], patch: Sequence[int],
                  spacing: Sequence[float], fill: float, matrix: np.ndarray | None = None,
                  flip_lr: bool = False, valid_box: tuple[Sequence[int], Sequence[int]] | None = None,
                  return_z: bool = False, seg_order: int = 0):
    """Cut a patch centred on ``centre`` (voxel coordinates), optionally rotated/scaled.

    Args:
        image: (x, y, z) array (any float dtype, may be memory-mapped).
        seg: class indices on the same grid, or None.
        centre: patch centre in voxel coordinates of ``image``.
        patch: patch size in voxels.
        spacing: voxel size (mm), so rotations are rigid in mm even on anisotropic grids.
        fill: image value outside the volume (labels get 0).
        matrix: 3x3 map from patch mm offsets to source mm offsets (rotation / scale), or None
            for a plain crop.
        flip_lr: mirror the patch along x (left-right).
        valid_box: ``(lo, hi)`` voxel box of ``image``; outside it the patch is ``fill`` and
            background, as if the volume had been cropped there (region-of-interest stages).
        seg_order: interpolation of ``seg`` when rotating/scaling: 0 (labels, nearest) or 1
            (soft targets such as spine fractions).

    Returns:
        ``(image patch float32, seg patch uint8 or None)``, plus with ``return_z`` the source
        z coordinate (voxels, float32) of every patch voxel.
    """
    patch = [int(p) for p in patch]
    z_src = None
    vlo = [0, 0, 0] if valid_box is None else [max(int(v), 0) for v in valid_box[0]]
    vhi = list(image.shape) if valid_box is None else [min(int(v), n) for v, n in zip(valid_box[1], image.shape, strict=True)]
    if matrix is None:
        start = [int(round(c - p / 2)) for c, p in zip(centre, patch, strict=True)]
        img_p = np.full(patch, fill, dtype=np.float32)
        seg_p = np.zeros(patch, dtype=np.uint8) if seg is not None else None
        src, dst = [], []
        for a in range(3):
            s0, s1 = max(start[a], vlo[a]), min(start[a] + patch[a], vhi[a])
            if s1 <= s0:
                src = None
                break
            src.append(slice(s0, s1))
            dst.append(slice(s0 - start[a], s1 - start[a]))
        if src is not None:
            img_p[tuple(dst)] = image[tuple(src)]
            if seg is not None:
                seg_p[tuple(dst)] = seg[tuple(src)]
        if return_z:
            z_src = np.broadcast_to(np.arange(start[2], start[2] + patch[2], dtype=np.float32), patch)
    else:
        sp = np.asarray(spacing, dtype=np.float64)
        grids = [(np.arange(p, dtype=np.float64) - (p - 1) / 2) * s for p, s in zip(patch, sp, strict=True)]
        off = np.stack(np.meshgrid(*grids, indexing="ij"), axis=0).reshape(3, -1)  # mm offsets
        src_vox = (matrix @ off) / sp[:, None] + np.asarray(centre, dtype=np.float64)[:, None]
        if return_z:
            z_src = src_vox[2].reshape(patch).astype(np.float32)
        lo = np.maximum(np.floor(src_vox.min(axis=1)).astype(int) - 1, vlo)
        hi = np.minimum(np.ceil(src_vox.max(axis=1)).astype(int) + 2, vhi)
        if np.any(hi <= lo):
            img_p = np.full(patch, fill, dtype=np.float32)
            seg_p = np.zeros(patch, dtype=np.uint8) if seg is not None else None
        else:
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
            local = src_vox - lo[:, None]
            img_c = np.asarray(image[box], dtype=np.float32)
            img_p = ndimage.map_coordinates(img_c, local, order=1, mode="constant", cval=fill,
                                            prefilter=False).reshape(patch).astype(np.float32)
            seg_p = None
            if seg is not None:
                seg_c = np.asarray(seg[box])
                seg_p = ndimage.map_coordinates(seg_c.astype(np.float32) if seg_order else seg_c, local,
                                                order=seg_order, mode="constant", cval=0, prefilter=False)
                seg_p = np.rint(seg_p).reshape(patch).astype(np.uint8)
            if valid_box is not None:
                outside = np.any((src_vox < np.asarray(vlo)[:, None] - 0.5) | (src_vox > np.asarray(vhi)[:, None] - 0.5),
                                 axis=0).reshape(patch)
                img_p[outside] = fill
                if seg_p is not None:
                    seg_p[outside] = 0
    if flip_lr:
        img_p = np.ascontiguousarray(img_p[::-1])
        if seg_p is not None:
            seg_p = np.ascontiguousarray(seg_p[::-1])
        if z_src is not None:
            z_src = np.ascontiguousarray(z_src[::-1])
    if return_z:
        return img_p, seg_p, z_src
    return img_p, seg_p


def augment_intensity(img: np.ndarray, aug: dict[str, Any], rng: np.random.Generator,
                      spacing: Sequence[float]) -> np.ndarray:
    """nnU-Net-style intensity augmentation on a normalised patch (float32, same shape)."""
    if rng.random() < aug.get("thick_slice_prob", 0.0):
        t = float(rng.uniform(*aug.get("thick_slice_mm", (3.0, 6.0))))
        img = thick_slice_augment(img, float(spacing[2]), t, float(rng.uniform(0, max(t / spacing[2], 1.0))))
    if rng.random() < aug.get("p_noise", 0.0):
        img = img + rng.normal(0, float(rng.uniform(0, aug.get("noise_std", 0.1))), img.shape).astype(np.float32)
    if rng.random() < aug.get("p_blur", 0.0):
        img = ndimage.gaussian_filter(img, float(rng.uniform(*aug.get("blur_sigma", (0.5, 1.0)))))
    if rng.random() < aug.get("p_brightness", 0.0):
        img = img * np.float32(rng.uniform(*aug.get("brightness", (0.75, 1.25))))
    if rng.random() < aug.get("p_contrast", 0.0):
        mean, lo, hi = img.mean(), img.min(), img.max()
        img = np.clip((img - mean) * np.float32(rng.uniform(*aug.get("contrast", (0.75, 1.25)))) + mean, lo, hi)
    if rng.random() < aug.get("p_gamma", 0.0):
        lo, hi = float(img.min()), float(img.max())
        rngw = max(hi - lo, 1e-6)
        img = ((img - lo) / rngw) ** np.float32(rng.uniform(*aug.get("gamma", (0.7, 1.5)))) * rngw + lo
    return img.astype(np.float32, copy=False)


class PatchSampler:
    """Deterministic batches of augmented patches from cached cases.

    Every item is a pure function of ``(seed, stage_index, epoch, iteration, item)``: the same
    call gives the same patch in any process, after any resume, for any number of DDP ranks.
    """

    def __init__(self, cases: list[CachedCase], stage: StagePlan, plan: Plan, augment: dict[str, Any] | None,
                 seed: int, stage_index: int):
        if not cases:
            raise ValueError("PatchSampler: no cases")
        self.cases, self.stage, self.plan = cases, stage, plan
        self.aug = augment
        self.seed, self.stage_index = int(seed), int(stage_index)
        self.fill = pad_value(plan.normalization)

    def _region(self, case: CachedCase, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        """Jittered region of interest ``(lo, hi)`` in voxels for ROI stages, else None."""
        if self.stage.roi_from is None or case.roi is None:
            return None
        sp = np.asarray(self.stage.spacing_mm, dtype=np.float64)
        lo_b, hi_b = np.asarray(case.roi[0], dtype=np.float64), np.asarray(case.roi[1], dtype=np.float64)
        j = self.stage.roi_jitter_mm / sp
        lo = lo_b - self.stage.roi_margin_mm / sp + rng.uniform(-j, j)
        hi = hi_b + self.stage.roi_margin_mm / sp + rng.uniform(-j, j)
        return np.floor(lo).astype(int), np.ceil(hi).astype(int)

    def _centre(self, case: CachedCase, rng: np.random.Generator, region) -> np.ndarray:
        shape = np.asarray(case.image.shape, dtype=np.float64)
        patch = np.asarray(self.stage.patch_size, dtype=np.float64)
        if self.stage.whole_volume and region is not None:
            lo = np.maximum(region[0], 0)
            hi = np.minimum(region[1], shape)
            return (lo + hi) / 2 + rng.uniform(-1, 1, 3) * np.maximum(patch - (hi - lo), 0) * 0.25
        if len(case.fg) and rng.random() < self.stage.foreground_oversample:
            c = case.classes[int(rng.integers(len(case.classes)))]
            rows = case.fg[case.fg[:, 0] == c]
            vox = rows[int(rng.integers(len(rows))), 1:].astype(np.float64)
            return vox + rng.uniform(-patch / 4, patch / 4)
        lo = np.where(shape >= patch, patch / 2, shape - patch / 2)
        hi = np.where(shape >= patch, shape - patch / 2, patch / 2)
        return rng.uniform(np.minimum(lo, hi), np.maximum(lo, hi))

    def sample(self, epoch: int, iteration: int, item: int, augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """One ``(input (channels, x, y, z) float32, target (x, y, z) uint8)`` patch."""
        rng = np.random.default_rng([self.seed, self.stage_index, epoch, iteration, item])
        case = self.cases[int(rng.integers(len(self.cases)))]
        region = self._region(case, rng)
        aug = self.aug if (augment and self.aug) else {}
        if region is not None and self.stage.whole_volume and rng.random() < aug.get("p_fov_crop", 0.0):
            region = crop_region_z(region, rng, aug.get("fov_crop_fraction", (0.3, 0.7)))
        centre = self._centre(case, rng, region)
        matrix = None
        rot = rng.random() < aug.get("p_rotate", 0.0)
        scl = rng.random() < aug.get("p_scale", 0.0)
        if rot or scl:
            angles = [math.radians(float(rng.uniform(-d, d))) for d in aug.get("rotate_deg", (15, 10, 10))] \
                if rot else [0.0, 0.0, 0.0]
            # angles: about z (axial plane), y, x; stored as (z, y, x) degrees in the plan
            matrix = _rotation([angles[2], angles[1], angles[0]])
            if scl:
                matrix = matrix / float(rng.uniform(*aug.get("scale", (0.85, 1.2))))
        flip = rng.random() < aug.get("p_flip_lr", 0.0)
        valid = region if (region is not None and self.stage.whole_volume) else None
        img, seg, z_src = extract_patch(case.image, case.seg, centre, self.stage.patch_size, self.stage.spacing_mm,
                                        self.fill, matrix, flip, valid, return_z=True,
                                        seg_order=1 if self.stage.soft_targets else 0)
        if aug:
            img = augment_intensity(img, aug, rng, self.stage.spacing_mm)
        if self.stage.z_coord:
            lo, hi = (0, case.image.shape[2]) if region is None else (max(region[0][2], 0),
                                                                       min(region[1][2], case.image.shape[2]))
            img = np.stack([img, z_channel(z_src, lo, hi)])
        else:
            img = img[None]
        return img, seg

    def batch(self, epoch: int, iteration: int, rank: int = 0, world: int = 1,
              augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of a batch: items ``rank, rank + world, ...`` of ``batch_size``.

        Returns:
            ``(images (b, 1, x, y, z) float32, classes (b, 1, x, y, z) int64)``.
        """
        items = list(range(self.stage.batch_size))[rank::world]
        pairs = [self.sample(epoch, iteration, i, augment) for i in items]
        imgs = np.stack([p[0] for p in pairs])
        segs = np.stack([p[1] for p in pairs])[:, None].astype(np.int64)
        return imgs, segs


def crop_region_z(region: tuple[np.ndarray, np.ndarray], rng: np.random.Generator,
                  fraction: Sequence[float] = (0.3, 0.7)) -> tuple[np.ndarray, np.ndarray]:
    """Field-of-view augmentation: keep a random craniocaudal part of a region of interest.

    The whole-spine stage is trained on complete scans, but it meets scans that show only
    the neck, the chest or the lumbar spine (CTSpine1K's sources, cropped VerSe). Cutting the
    region to ``fraction`` (a range) of its length at a random position, with everything
    outside it filled as if the scan ended there, teaches the network that the ends of its
    region are not always C1 and the sacrum (and that the ``z_coord`` input is relative).
    """
    lo, hi = np.array(region[0], dtype=int), np.array(region[1], dtype=int)
    length = int(hi[2] - lo[2])
    keep = max(int(round(length * float(rng.uniform(*fraction)))), 1)
    start = int(lo[2]) + int(rng.integers(0, max(length - keep, 0) + 1))
    lo[2], hi[2] = start, start + keep
    return lo, hi


def z_channel(z_vox: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Craniocaudal coordinate input: -1 at the inferior edge of voxels ``lo..hi``, +1 at the
    superior edge (continued linearly outside), float32."""
    return (2.0 * (np.asarray(z_vox, dtype=np.float32) - lo + 0.5) / max(hi - lo, 1) - 1.0).astype(np.float32)


class _EpochBatches:
    """Map-style dataset of one epoch's batches (for DataLoader workers on GPUs)."""

    def __init__(self, sampler: PatchSampler, epoch: int, iterations: int, rank: int, world: int):
        self.sampler, self.epoch, self.iterations, self.rank, self.world = sampler, epoch, iterations, rank, world

    def __len__(self) -> int:
        return self.iterations

    def __getitem__(self, it: int):
        return self.sampler.batch(self.epoch, it, self.rank, self.world)


# =========================================================================== loop helpers


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        model_dir: folder with ``model.pt`` and ``plan.json`` (pass it to lib.infer / init_from).
        model_path: ``model_dir / "model.pt"``.
        plan_path: ``model_dir / "plan.json"``.
        log_csv: per-epoch log (stage, epoch, lr, loss, Dice, seconds).
        curve_png: loss / Dice curves.
        seconds: training wall time of all stages (resumed runs: summed over sessions).
        epochs: epochs trained per stage.
        final_metrics: last log row per stage.
        stopped_by: per stage ``"epochs"`` or ``"time"``.
        resumed_from: per stage, the epoch a checkpoint let this call start from (0 = fresh;
            a stage finished earlier counts as its last epoch).
    """

    model_dir: Path
    model_path: Path
    plan_path: Path
    log_csv: Path
    curve_png: Path
    seconds: float
    epochs: dict[str, int] = field(default_factory=dict)
    final_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    stopped_by: dict[str, str] = field(default_factory=dict)
    resumed_from: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (1 process: 0, 1, 0)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _poly_lr(lr0: float, progress: float, exponent: float) -> float:
    return lr0 * max(1.0 - min(progress, 1.0), 0.0) ** exponent


def _ds_weights(n: int) -> list[float]:
    w = np.array([1 / 2 ** i for i in range(n)])
    return (w / w.sum()).tolist()


def dice_scores(pred: np.ndarray, gt: np.ndarray, n_classes: int) -> tuple[float, float]:
    """(foreground Dice, mean Dice over classes present in gt or pred, background excluded);
    1.0 for what is empty in both (a patch without spine scores perfectly)."""
    per_class = dice_per_label(pred, gt, range(1, n_classes))
    return dice(pred > 0, gt > 0, empty=1.0), float(np.mean(list(per_class.values()))) if per_class else 1.0


def _config_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_torch(obj: Any, path: Path) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _load_torch(path: Path) -> Any:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


LOG_FIELDS = ["stage", "epoch", "lr", "train_loss", "train_dice_fg", "train_dice_mean", "val_loss",
              "val_dice_fg", "val_dice_mean", "epoch_s", "cpu_s", "elapsed_s"]


def write_log(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write the per-epoch log rows as CSV (atomic)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return write_text(path, buf.getvalue())


def plot_training_curves(log_csv: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """Loss and Dice per epoch, one column per stage, saved as PNG (atomic)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(log_csv)
    stages = list(dict.fromkeys(df["stage"])) or ["-"]
    fig, axes = plt.subplots(2, len(stages), figsize=(4.2 * len(stages), 6), squeeze=False)
    for j, st in enumerate(stages):
        d = df[df["stage"] == st]
        ax = axes[0, j]
        ax.plot(d["epoch"], d["train_loss"], label="train loss")
        if d["val_loss"].notna().any():
            ax.plot(d["epoch"], d["val_loss"], label="val loss")
        ax.set_title(f"{st}: loss")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax = axes[1, j]
        for col, lab in (("train_dice_fg", "train Dice spine"), ("train_dice_mean", "train Dice mean class"),
                         ("val_dice_fg", "val Dice spine"), ("val_dice_mean", "val Dice mean class")):
            if col in d and d[col].notna().any():
                ax.plot(d["epoch"], d[col], label=lab, ls="-" if col.startswith("val") else ":")
        ax.set_ylim(0, 1)
        ax.set_xlabel("epoch")
        ax.set_title(f"{st}: Dice (patches)")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from lib.viz import save_figure

    out_png = Path(out_png)
    save_figure(fig, out_png)
    return out_png


def load_weights(model_dir: str | Path) -> tuple[Plan, dict[str, dict[str, Any]]]:
    """Plan and per-stage state dicts of a trained model folder (``model.pt`` + ``plan.json``)."""
    model_dir = Path(model_dir)
    path = model_dir / "model.pt" if model_dir.is_dir() else model_dir
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained model (model.pt) found")
    blob = _load_torch(path)
    return plan_from_dict(blob["plan"]), blob["weights"]


def _init_state(net, state: dict[str, Any], source: str) -> list[str]:
    """Load matching tensors of ``state`` into ``net``; return the names skipped (shape differs)."""
    own = net.state_dict()
    skipped = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    own.update({k: v for k, v in state.items() if k in own and own[k].shape == v.shape})
    net.load_state_dict(own)
    missing = [k for k in own if k not in state]
    if missing and len(missing) == len(own):
        raise ValueError(f"{source}: no weights match the network")
    return skipped + missing


# =========================================================================== train


def train(cases: Sequence[Sequence[str]], out_dir: str | Path, plan: Plan | None = None, *,
          val_cases: Sequence[Sequence[str]] | None = None, max_epochs: int | None = None,
          iterations_per_epoch: int | None = None, time_budget_s: float | None = None, seed: int = 0,
          init_from: str | Path | None = None, augment: dict[str, Any] | bool | None = None,
          lr: float | None = None, device: str = "auto", resume: bool = True,
          cache_dir: str | Path | None = None, workers: int | None = 0, num_threads: int | None = None,
          stages: Sequence[str] | None = None, progress: bool = True) -> TrainResult:
    """Train (or fine-tune) the plan's networks on ``cases``.

    Args:
        cases: ``(case_id, image_path, mask_path)`` triples; NIfTI CT in HU and integer masks on
            the same grid, any orientation (reoriented to RAS+ when cached).
        out_dir: where the model, logs, curves and checkpoints go (created).
        plan: from :func:`lib.model.plan_experiment`; default: the plan of ``init_from``, else a
            synthetic plan fingerprinted from ``cases``.
        val_cases: optional held-out cases; fixed validation patches are scored every epoch.
        max_epochs: epochs over all stages together (each stage gets ``round(max_epochs *
            budget_share)``, at least 1); default ``plan.training["max_epochs"]``.
        iterations_per_epoch: optimiser steps per epoch (default from the plan).
        time_budget_s: wall-clock budget over all stages (split by ``budget_share``); training
            stops after the epoch that would overrun it and the poly schedule follows elapsed
            time. Not deterministic; use epochs for reproducible runs.
        seed: seeds network initialisation, case order and augmentation.
        init_from: a trained model folder to fine-tune from: its weights initialise every stage
            of the same name (tensors whose shape differs, e.g. a head for another label set,
            start fresh); its plan is used when ``plan`` is None.
        augment: overrides merged into ``plan.augmentation`` (e.g. ``{"thick_slice_prob": 0.3}``);
            ``False`` disables all augmentation.
        lr: initial learning rate override (fine-tuning often uses a lower one).
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda:1"``...
        resume: continue from existing checkpoints in ``out_dir`` (ignored when their config
            differs: they are then discarded); False starts over.
        cache_dir: preprocessing cache (default ``out_dir/cache``); share it across runs that
            use the same plan to skip preprocessing.
        workers: processes for preprocessing (``lib.parallel``); 0 = this process.
        num_threads: ``torch.set_num_threads`` for this run (CPU); None leaves it.
        stages: train only these stages (default all); with ``init_from`` the other stages keep
            their weights, so ``model.pt`` stays complete (e.g. fine-tune only ``["coarse"]``).
        progress: show progress bars.

    Returns:
        :class:`TrainResult`. A finished run called again with the same arguments returns the
        stored result without training.
    """
    import torch

    from lib.core.runinfo import resolve_device

    t_call = time.perf_counter()
    rank, world, local_rank = _dist_info()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = [tuple(str(x) for x in c) for c in cases]
    val_cases = [tuple(str(x) for x in c) for c in (val_cases or [])]
    if not cases:
        raise ValueError("train: no training cases")
    init_plan = None
    if init_from is not None:
        init_plan, init_weights = load_weights(init_from)
    if plan is None:
        if init_plan is not None:
            plan = init_plan
        else:
            from lib.model import plan_experiment

            plan = plan_experiment(cases, "synthetic", workers=workers)
    tr = dict(plan.training)
    max_epochs = int(max_epochs or tr["max_epochs"])
    iters = int(iterations_per_epoch or tr["iterations_per_epoch"])
    lr0 = float(lr or tr["lr"])
    if augment is False:
        aug: dict[str, Any] = {}
    else:
        aug = {**plan.augmentation, **(augment or {})}
    stage_names = [s.name for s in plan.stages] if stages is None else list(stages)
    for s in stage_names:
        plan.stage(s)
    dev = resolve_device(device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
    if num_threads:
        torch.set_num_threads(int(num_threads))
    deterministic = dev.type == "cpu"
    if deterministic:
        torch.use_deterministic_algorithms(True)
    elif dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ddp = world > 1
    if ddp:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    config = {"cases": cases, "val": val_cases, "plan": plan_to_dict(plan), "epochs": max_epochs, "iters": iters,
              "lr": lr0, "seed": seed, "aug": aug, "init": str(init_from) if init_from else None,
              "budget": time_budget_s, "stages": stage_names, "world": world}
    chash = _config_hash(config)
    result_path = out_dir / "train_result.json"
    if resume and result_path.exists() and (out_dir / "model.pt").exists():
        with contextlib.suppress(ValueError, KeyError, OSError):
            stored = json.loads(result_path.read_text())
            if stored.get("config_hash") == chash:
                return _result_from_json(stored["result"])
    if rank == 0:
        save_plan(plan, out_dir / "plan.json")
    cache_root = Path(cache_dir) if cache_dir else out_dir / "cache"

    all_rows: list[dict[str, Any]] = []
    weights: dict[str, dict[str, Any]] = {}
    epochs_done: dict[str, int] = {}
    stopped: dict[str, str] = {}
    resumed: dict[str, int] = {}
    total_seconds = 0.0
    shares = [plan.stage(s).budget_share for s in stage_names]
    budget_left = time_budget_s
    caches: dict[str, tuple[Path, list[dict[str, Any]]]] = {}
    vcaches: dict[str, tuple[Path, list[dict[str, Any]]]] = {}
    try:
        for si, sname in enumerate(stage_names):
            st = plan.stage(sname)
            sdir = out_dir / f"stage_{sname}"
            sdir.mkdir(exist_ok=True)
            final_path, ckpt_path = sdir / "final.pt", sdir / "checkpoint.pt"
            stage_epochs = max(1, int(round(max_epochs * st.budget_share))) if len(stage_names) > 1 else max_epochs
            stage_budget = None
            if budget_left is not None:
                stage_budget = budget_left * st.budget_share / max(sum(shares[si:]), 1e-9)
            if not resume:
                for p in (final_path, ckpt_path):
                    if rank == 0 and p.exists():
                        p.unlink()
            if resume and final_path.exists():
                blob = _load_torch(final_path)
                if blob.get("config_hash") == chash:
                    weights[sname] = blob["model"]
                    all_rows.extend(blob["rows"])
                    epochs_done[sname] = blob["epoch"]
                    stopped[sname] = blob["stopped_by"]
                    resumed[sname] = blob["epoch"]
                    total_seconds += blob["elapsed_s"]
                    if budget_left is not None:
                        budget_left -= blob["elapsed_s"]
                    continue
            # ---- data (every remaining stage cached in one pass over the cases)
            if sname not in caches:
                todo = stage_names[si:]
                if rank == 0:
                    caches.update(build_caches(cases, plan, todo, cache_root, workers, progress))
                    if val_cases:
                        vcaches.update(build_caches(val_cases, plan, todo, cache_root, workers, progress))
                if ddp:
                    torch.distributed.barrier()
                if rank != 0:
                    caches.update(build_caches(cases, plan, todo, cache_root, 0, False))
                    if val_cases:
                        vcaches.update(build_caches(val_cases, plan, todo, cache_root, 0, False))
            folder, metas = caches[sname]
            vfolder, vmetas = vcaches.get(sname, (None, []))
            sampler = PatchSampler(open_cache(folder, metas), st, plan, aug, seed, si)
            vsampler = PatchSampler(open_cache(vfolder, vmetas), st, plan, None, seed + 7919, si) if vmetas else None
            # ---- network
            torch.manual_seed(int(seed) * 1000 + si)
            net = build_network(plan, st)
            if init_from is not None and sname in init_weights:
                _init_state(net, init_weights[sname], str(init_from))
            net.to(dev)
            model = net
            if ddp:
                from torch.nn.parallel import DistributedDataParallel

                model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
            opt = _make_optimizer(net, tr, lr0)
            use_amp = bool(tr.get("amp", True)) and dev.type == "cuda"
            scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
            start_epoch, rows, elapsed = 0, [], 0.0
            if resume and ckpt_path.exists():
                ck = _load_torch(ckpt_path)
                if ck.get("config_hash") == chash:
                    net.load_state_dict(ck["model"])
                    opt.load_state_dict(ck["optimizer"])
                    scaler.load_state_dict(ck["scaler"])
                    start_epoch, rows, elapsed = int(ck["epoch"]), list(ck["rows"]), float(ck["elapsed_s"])
                    torch.set_rng_state(ck["rng"]["torch"])
                    np.random.set_state(ck["rng"]["numpy"])
                    random.setstate(ck["rng"]["python"])
                elif rank == 0:
                    print(f"{ckpt_path}: checkpoint of another configuration, starting {sname} over")
            resumed[sname] = start_epoch
            loss_fn = _make_loss("soft" if st.soft_targets else st.task)
            n_classes = 1 + len(plan.level_ladder()) if st.task == "levels" else st.n_classes(plan)
            stop_reason = "epochs"
            epoch = start_epoch
            bar = tqdm(total=stage_epochs, initial=start_epoch, desc=f"train {sname}", disable=not progress or rank != 0,
                       leave=False)
            epoch_times = [r["epoch_s"] for r in rows]
            while epoch < stage_epochs:
                if stage_budget is not None and epoch_times and elapsed + float(np.mean(epoch_times[-3:])) > stage_budget:
                    stop_reason = "time"
                    break
                t0, c0 = time.perf_counter(), time.process_time()
                progress_frac = epoch / stage_epochs
                if stage_budget is not None:
                    progress_frac = max(progress_frac, elapsed / stage_budget)
                cur_lr = _poly_lr(lr0, progress_frac, float(tr.get("poly_exponent", 0.9)))
                for g in opt.param_groups:
                    g["lr"] = cur_lr
                model.train()
                losses, dfg, dmean = [], [], []
                batches = _iterate_batches(sampler, epoch, iters, rank, world, int(tr.get("num_workers", 0)), dev)
                for it, (x_np, y_np) in enumerate(batches):
                    x = torch.as_tensor(x_np).to(dev, non_blocking=True)
                    y = torch.as_tensor(y_np).to(dev, non_blocking=True)
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
                        out = model(x)
                        loss = _deep_loss(loss_fn, out, y, st.deep_supervision)
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(net.parameters(), float(tr.get("grad_clip", 12.0)))
                    scaler.step(opt)
                    scaler.update()
                    losses.append(float(loss.detach()))
                    if it == iters - 1 or it % 5 == 0:
                        head = out[:, 0] if out.dim() == 6 else out
                        f, m = dice_scores(predicted_classes(head.detach().float().cpu().numpy(), st.task,
                                                             y_np[:, 0]),
                                           target_classes(y_np[:, 0], "soft" if st.soft_targets else st.task),
                                           n_classes)
                        dfg.append(f)
                        dmean.append(m)
                mean_loss = float(np.mean(losses))
                if ddp:
                    tl = torch.tensor([mean_loss], dtype=torch.float64)
                    torch.distributed.all_reduce(tl)
                    mean_loss = float(tl.item()) / world
                row = {"stage": sname, "epoch": epoch + 1, "lr": cur_lr, "train_loss": mean_loss,
                       "train_dice_fg": float(np.mean(dfg)), "train_dice_mean": float(np.mean(dmean))}
                if vsampler is not None:
                    row.update(_validate(net, vsampler, loss_fn, n_classes, int(tr.get("val_patches", 4)), dev, use_amp,
                                         st.task, st.soft_targets))
                epoch_s = time.perf_counter() - t0
                elapsed += epoch_s
                epoch_times.append(epoch_s)
                row.update({"epoch_s": round(epoch_s, 3), "cpu_s": round(time.process_time() - c0, 3),
                            "elapsed_s": round(elapsed, 3)})
                rows.append(row)
                epoch += 1
                if rank == 0:
                    _save_torch({"config_hash": chash, "stage": sname, "epoch": epoch, "model": net.state_dict(),
                                 "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rows": rows,
                                 "elapsed_s": elapsed,
                                 "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                         "python": random.getstate()}}, ckpt_path)
                    write_log(all_rows + rows, out_dir / "train_log.csv")
                if ddp:
                    torch.distributed.barrier()
                bar.update()
                bar.set_postfix(loss=f"{mean_loss:.3f}", dice=f"{row['train_dice_mean']:.2f}")
            bar.close()
            state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            if rank == 0:
                _save_torch({"config_hash": chash, "model": state, "rows": rows, "epoch": epoch,
                             "stopped_by": stop_reason, "elapsed_s": elapsed}, final_path)
            weights[sname] = state
            all_rows.extend(rows)
            epochs_done[sname] = epoch
            stopped[sname] = stop_reason
            total_seconds += elapsed
            if budget_left is not None:
                budget_left -= elapsed
        # ---- outputs
        model_dir = out_dir
        if init_from is not None:  # stages not trained here keep the weights they started from
            for name, state in init_weights.items():
                if name not in weights and any(st.name == name for st in plan.stages):
                    weights[name] = state
        if rank == 0:
            _save_torch({"plan": plan_to_dict(plan), "weights": weights, "config_hash": chash}, out_dir / "model.pt")
            log_csv = write_log(all_rows, out_dir / "train_log.csv")
            curve = plot_training_curves(log_csv, out_dir / "training_curves.png",
                                         title=f"{out_dir.name}: {len(cases)} cases, seed {seed}")
        else:
            log_csv, curve = out_dir / "train_log.csv", out_dir / "training_curves.png"
        finals = {}
        for r in all_rows:
            finals[r["stage"]] = {k: v for k, v in r.items() if k != "stage"}
        result = TrainResult(model_dir, out_dir / "model.pt", out_dir / "plan.json", log_csv, curve,
                             round(total_seconds, 2), epochs_done, finals, stopped, resumed)
        if rank == 0:
            write_text(result_path, json.dumps({"config_hash": chash, "result": result.to_json(),
                                                "call_seconds": round(time.perf_counter() - t_call, 2)},
                                               indent=2) + "\n")
        if ddp:
            torch.distributed.barrier()
        return result
    finally:
        if deterministic:
            torch.use_deterministic_algorithms(False)


def _result_from_json(d: dict[str, Any]) -> TrainResult:
    return TrainResult(Path(d["model_dir"]), Path(d["model_path"]), Path(d["plan_path"]), Path(d["log_csv"]),
                       Path(d["curve_png"]), float(d["seconds"]), dict(d["epochs"]), dict(d["final_metrics"]),
                       dict(d["stopped_by"]), dict(d.get("resumed_from", {})))


def _make_optimizer(net, tr: dict[str, Any], lr0: float):
    import torch

    if tr.get("optimizer", "sgd") == "sgd":
        return torch.optim.SGD(net.parameters(), lr=lr0, momentum=float(tr.get("momentum", 0.99)),
                               weight_decay=float(tr.get("weight_decay", 3e-5)), nesterov=True)
    return torch.optim.AdamW(net.parameters(), lr=lr0, weight_decay=float(tr.get("weight_decay", 1e-4)))


def _make_loss(task: str = "labels"):
    from monai.losses import DiceCELoss

    if task == "levels":
        return LevelsLoss()
    if task == "soft":
        return SoftForegroundLoss()
    return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                      smooth_nr=1e-5, smooth_dr=1e-5)


class SoftForegroundLoss:
    """DiceCE (batch Dice without background + cross-entropy) against soft spine fractions
    (targets ``0..255``, see :data:`SOFT_MAX`)."""

    def __init__(self):
        from monai.losses import DiceCELoss

        self.loss = DiceCELoss(include_background=False, to_onehot_y=False, softmax=True, batch=True,
                               smooth_nr=1e-5, smooth_dr=1e-5)

    def __call__(self, logits, target):
        import torch

        f = target.float() / SOFT_MAX
        return self.loss(logits, torch.cat([1 - f, f], 1))


class LevelsLoss:
    """Loss of the ordinal ``levels`` task: for thresholds ``k = 1..K-1`` ("level > k"), binary
    cross-entropy summed over the thresholds (an error of one level costs the same whatever K
    is; averaging over K would make it 1/K and the network would hardly learn to count),
    averaged over the voxels with a known nearest level (see :func:`encode_levels`) with every
    level weighted equally (a cervical vertebra has a tenth of a lumbar one's voxels; unweighted,
    the C1..C4 thresholds were never learned)."""

    def __call__(self, logits, target):
        import torch
        import torch.nn.functional as F

        t = target.long()
        level = torch.where(t >= LEVEL_FG, t - LEVEL_FG, t)
        k1 = logits.shape[1]
        ks = torch.arange(1, k1 + 1, device=logits.device).view(1, k1, *([1] * (logits.dim() - 2)))
        ordinal = (level > ks).float()
        bce = F.binary_cross_entropy_with_logits(logits, ordinal, reduction="none")
        counts = torch.bincount(level.flatten(), minlength=k1 + 2).float()
        present = (counts[1:] > 0).sum().clamp_min(1)
        w = torch.where(counts > 0, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))
        w[0] = 0.0
        vox_w = w[level] / present  # every present level contributes 1 / (number of levels)
        return (bce * vox_w).sum()


def predicted_classes(logits: np.ndarray, task: str, target: np.ndarray | None = None) -> np.ndarray:
    """Class indices from network outputs ``(b, c, ...)``: argmax, or for ``levels``
    :func:`level_from_ordinal` of the ordinal sigmoids on the spine voxels of ``target`` (a
    levels stage has no spine output of its own)."""
    if task != "levels":
        return logits.argmax(1)
    lev = level_from_ordinal(1 / (1 + np.exp(-logits.astype(np.float64))), axis=1)
    fg = decode_levels(target) > 0 if target is not None else np.ones(lev.shape, bool)
    return np.where(fg, lev, 0)


def level_from_ordinal(probs: np.ndarray, axis: int = 0) -> np.ndarray:
    """Level (class index >= 1) from ordinal probabilities P(level > k), k = 1..K-1, along
    ``axis``: 1 + the expected number of thresholds passed, rounded (robust to one noisy output)."""
    return (1 + np.floor(np.sum(probs, axis=axis) + 0.5)).astype(np.int64)


def target_classes(target: np.ndarray, task: str) -> np.ndarray:
    """Class indices of training targets (decodes ``levels`` targets, and spine fractions for
    ``task="soft"``)."""
    if task == "levels":
        return decode_levels(target)
    if task == "soft":
        return (np.asarray(target) >= (SOFT_MAX + 1) // 2).astype(np.uint8)
    return np.asarray(target)


def _deep_loss(loss_fn, out, y, deep_supervision: int):
    if out.dim() == 6:  # (b, heads, c, x, y, z)
        heads = out.unbind(1)
        w = _ds_weights(len(heads))
        return sum(wi * loss_fn(h.float(), y) for wi, h in zip(w, heads, strict=True))
    return loss_fn(out.float(), y)


def _iterate_batches(sampler: PatchSampler, epoch: int, iters: int, rank: int, world: int, num_workers: int, dev):
    if num_workers <= 0:
        for it in range(iters):
            yield sampler.batch(epoch, it, rank, world)
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(_EpochBatches(sampler, epoch, iters, rank, world), batch_size=None, shuffle=False,
                        num_workers=num_workers, pin_memory=dev.type == "cuda")
    yield from loader


def _validate(net, vsampler: PatchSampler, loss_fn, n_classes: int, n_patches: int, dev, use_amp: bool,
              task: str = "labels", soft: bool = False) -> dict[str, float]:
    import torch

    net.eval()
    losses, fgs, means = [], [], []
    with torch.no_grad():
        for i in range(n_patches):
            img, seg = vsampler.sample(0, 0, i, augment=False)
            x = torch.as_tensor(img[None]).to(dev)
            y = torch.as_tensor(seg[None, None].astype(np.int64)).to(dev)
            with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
                out = net(x)
            losses.append(float(loss_fn(out.float(), y)))
            f, m = dice_scores(predicted_classes(out.float().cpu().numpy(), task, seg[None])[0],
                               target_classes(seg, "soft" if soft else task), n_classes)
            fgs.append(f)
            means.append(m)
    net.train()
    return {"val_loss": float(np.mean(losses)), "val_dice_fg": float(np.mean(fgs)), "val_dice_mean": float(np.mean(means))}


# =========================================================================== CLI (torchrun)


def write_job(path: str | Path, cases: Sequence[Sequence[str]], out_dir: str | Path, plan: Plan | None = None,
              **kwargs: Any) -> Path:
    """Write a JSON job file for ``python -m lib.train --job FILE`` / ``torchrun ... -m lib.train``.

    ``kwargs`` are :func:`train` keyword arguments (JSON-serialisable values).
    """
    job = {"cases": [list(map(str, c)) for c in cases], "out_dir": str(out_dir),
           "plan": plan_to_dict(plan) if plan is not None else None, "kwargs": kwargs}
    return write_text(path, json.dumps(job, indent=1, default=str) + "\n")


def run_job(path: str | Path) -> TrainResult:
    """Run a job file written by :func:`write_job` (in every torchrun process)."""
    job = json.loads(Path(path).read_text())
    plan = plan_from_dict(job["plan"]) if job.get("plan") else None
    kwargs = dict(job.get("kwargs", {}))
    if kwargs.get("val_cases"):
        kwargs["val_cases"] = [tuple(c) for c in kwargs["val_cases"]]
    return train([tuple(c) for c in job["cases"]], job["out_dir"], plan, **kwargs)


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.train",
                                 description="Train from a job file; multi-GPU: torchrun --nproc_per_node N -m lib.train --job FILE")
    ap.add_argument("--job", required=True, help="JSON job file written by lib.train.write_job")
    args = ap.parse_args(list(argv) if argv is not None else None)
    res = run_job(args.job)
    rank, world, _ = _dist_info()
    if rank == 0:
        print(json.dumps(res.to_json()))
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def copy_model(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Copy a trained model's ``model.pt``, ``plan.json`` (and log/curves) to another folder."""
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("model.pt", "plan.json", "train_log.csv", "training_curves.png"):
        if (src / name).exists():
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)
    return dst


if __name__ == "__main__":
    raise SystemExit(main())
