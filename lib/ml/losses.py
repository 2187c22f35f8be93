"""Losses and what they score: DiceCE, the soft-target and ordinal-levels losses, deep supervision,
class decoding of network outputs and the patch Dice of the training log."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from lib.metrics.overlap import dice, dice_per_label
from lib.ml.preprocessing import LEVEL_FG, SOFT_MAX, decode_levels


def ds_weights(n: int) -> list[float]:
    w = np.array([1 / 2 ** i for i in range(n)])
    return (w / w.sum()).tolist()


def dice_scores(pred: np.ndarray, gt: np.ndarray, n_classes: int) -> tuple[float, float]:
    """(foreground Dice, mean Dice over classes present in gt or pred, background excluded);
    1.0 for what is empty in both (a patch without spine scores perfectly)."""
    per_class = dice_per_label(pred, gt, range(1, n_classes))
    return dice(pred > 0, gt > 0, empty=1.0), float(np.mean(list(per_class.values()))) if per_class else 1.0


def make_loss(task: str = "labels"):
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
            self.loss = DiceCELoss(include_background=False, to_onehot_y=False, softmax=True, batch=True,
                               smooth_nr=1e-5, smooth_dr=1e-5)

    def __call__(self, logits, target):
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


def deep_loss(loss_fn, out, y, deep_supervision: int):
    if out.dim() == 6:  # (b, heads, c, x, y, z)
        heads = out.unbind(1)
        w = ds_weights(len(heads))
        return sum(wi * loss_fn(h.float(), y) for wi, h in zip(w, heads, strict=True))
    return loss_fn(out.float(), y)


class NonFiniteError(RuntimeError):
    """Training met a non-finite input batch or loss: the stage, epoch, step and cases are named;
    the step was not taken, so the weights and the last checkpoint on disk are the last good ones."""

    def __init__(self, stage: str, epoch: int, step: int, case_ids: Sequence[str], what: str):
        self.stage, self.epoch, self.step, self.case_ids = stage, epoch, step, list(case_ids)
        super().__init__(f"training stopped: {what} in stage {stage!r}, epoch {epoch + 1}, step {step} "
                         f"(batch cases: {', '.join(dict.fromkeys(self.case_ids))}); no step was taken with it "
                         f"and the last checkpoint is the last good state")
