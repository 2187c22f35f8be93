"""Patch sampling: deterministic batches of augmented patches from cached cases.

Every item is a pure function of ``(seed, stage, epoch, iteration, item)``: the same call gives the same patch in
any process, after any resume, for any number of DDP ranks. Labels are never interpolated: rotated or scaled
patches sample them nearest-neighbour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from lib.ml.augmentation import augment_intensity
from lib.ml.cache import CachedArrays
from lib.ml.plans import Plan, StagePlan
from lib.ml.preprocessing import pad_value


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
    vlo = [0, 0, 0] if valid_box is None else [max(int(v), 0) for v in valid_box[0]]
    vhi = list(image.shape) if valid_box is None else [min(int(v), n) for v, n in zip(valid_box[1], image.shape, strict=True)]
    if matrix is None:
        img_p, seg_p, z_src = _crop(image, seg, centre, patch, fill, vlo, vhi, return_z)
    else:
        img_p, seg_p, z_src = _resample(image, seg, centre, patch, spacing, fill, matrix, (vlo, vhi),
                                        valid_box is not None, return_z, seg_order)
    if flip_lr:
        img_p = np.ascontiguousarray(img_p[::-1])
        if seg_p is not None:
            seg_p = np.ascontiguousarray(seg_p[::-1])
        if z_src is not None:
            z_src = np.ascontiguousarray(z_src[::-1])
    if return_z:
        return img_p, seg_p, z_src
    return img_p, seg_p


def _crop(image: np.ndarray, seg: np.ndarray | None, centre: Sequence[float], patch: list[int], fill: float,
          vlo: list[int], vhi: list[int], return_z: bool):
    """:func:`extract_patch` without a matrix: a plain crop of the voxels inside ``vlo..vhi``.

    Returns:
        ``(image patch float32, seg patch uint8 or None, source z (voxels) per patch voxel or None)``.
    """
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
    z_src = None
    if return_z:
        z_src = np.broadcast_to(np.arange(start[2], start[2] + patch[2], dtype=np.float32), patch)
    return img_p, seg_p, z_src


def _resample(image: np.ndarray, seg: np.ndarray | None, centre: Sequence[float], patch: list[int],
              spacing: Sequence[float], fill: float, matrix: np.ndarray, valid: tuple[list[int], list[int]],
              blank_outside: bool, return_z: bool, seg_order: int):
    """:func:`extract_patch` with a matrix: the patch interpolated from the source voxels.

    Args:
        valid: ``(lo, hi)`` voxels of ``image`` the patch may read.
        blank_outside: patch voxels whose source lies outside ``valid`` become ``fill`` / background.
        image, seg, centre, patch, spacing, fill, matrix, return_z, seg_order: as in :func:`extract_patch`.

    Returns:
        ``(image patch float32, seg patch uint8 or None, source z (voxels) per patch voxel or None)``.
    """
    vlo, vhi = valid
    sp = np.asarray(spacing, dtype=np.float64)
    grids = [(np.arange(p, dtype=np.float64) - (p - 1) / 2) * s for p, s in zip(patch, sp, strict=True)]
    off = np.stack(np.meshgrid(*grids, indexing="ij"), axis=0).reshape(3, -1)  # mm offsets
    src_vox = (matrix @ off) / sp[:, None] + np.asarray(centre, dtype=np.float64)[:, None]
    z_src = src_vox[2].reshape(patch).astype(np.float32) if return_z else None
    lo = np.maximum(np.floor(src_vox.min(axis=1)).astype(int) - 1, vlo)
    hi = np.minimum(np.ceil(src_vox.max(axis=1)).astype(int) + 2, vhi)
    if np.any(hi <= lo):
        img_p = np.full(patch, fill, dtype=np.float32)
        seg_p = np.zeros(patch, dtype=np.uint8) if seg is not None else None
        return img_p, seg_p, z_src
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
    if blank_outside:
        outside = np.any((src_vox < np.asarray(vlo)[:, None] - 0.5) | (src_vox > np.asarray(vhi)[:, None] - 0.5),
                         axis=0).reshape(patch)
        img_p[outside] = fill
        if seg_p is not None:
            seg_p[outside] = 0
    return img_p, seg_p, z_src


class PatchSampler:
    """Deterministic batches of augmented patches from cached cases.

    Every item is a pure function of ``(seed, stage_index, epoch, iteration, item)``: the same
    call gives the same patch in any process, after any resume, for any number of DDP ranks.
    """

    def __init__(self, cases: list[CachedArrays], stage: StagePlan, plan: Plan, augment: dict[str, Any] | None,
                 seed: int, stage_index: int):
        if not cases:
            raise ValueError("PatchSampler: no cases")
        self.cases, self.stage, self.plan = cases, stage, plan
        self.aug = augment
        self.seed, self.stage_index = int(seed), int(stage_index)
        self.fill = pad_value(plan.normalization)

    def _region(self, case: CachedArrays, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        """Jittered region of interest ``(lo, hi)`` in voxels for ROI stages, else None."""
        if self.stage.roi_from is None or case.roi is None:
            return None
        sp = np.asarray(self.stage.spacing_mm, dtype=np.float64)
        lo_b, hi_b = np.asarray(case.roi[0], dtype=np.float64), np.asarray(case.roi[1], dtype=np.float64)
        j = self.stage.roi_jitter_mm / sp
        lo = lo_b - self.stage.roi_margin_mm / sp + rng.uniform(-j, j)
        hi = hi_b + self.stage.roi_margin_mm / sp + rng.uniform(-j, j)
        return np.floor(lo).astype(int), np.ceil(hi).astype(int)

    def _centre(self, case: CachedArrays, rng: np.random.Generator, region) -> np.ndarray:
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

    def case_of(self, epoch: int, iteration: int, item: int) -> str:
        """The case id :meth:`sample` draws for this item (the same seeded first draw)."""
        rng = np.random.default_rng([self.seed, self.stage_index, epoch, iteration, item])
        return self.cases[int(rng.integers(len(self.cases)))].case_id

    def batch_case_ids(self, epoch: int, iteration: int, rank: int = 0, world: int = 1) -> list[str]:
        """The case ids of this rank's share of a batch (what an error about the batch names)."""
        return [self.case_of(epoch, iteration, i) for i in list(range(self.stage.batch_size))[rank::world]]

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


class EpochBatches:
    """Map-style dataset of one epoch's batches (for DataLoader workers on GPUs)."""

    def __init__(self, sampler: PatchSampler, epoch: int, iterations: int, rank: int, world: int):
        self.sampler, self.epoch, self.iterations, self.rank, self.world = sampler, epoch, iterations, rank, world

    def __len__(self) -> int:
        return self.iterations

    def __getitem__(self, it: int):
        return self.sampler.batch(self.epoch, it, self.rank, self.world)
