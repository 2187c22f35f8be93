"""Gaussian-weighted sliding windows over a volume, slab by slab along z (memory bounded).

A slab's class probabilities are handed on as soon as no later window touches it, so at most about two patch
heights of all-class probabilities exist at once (float16 when that buffer would exceed 1 GiB).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lib.ml.sampling import z_channel

FLOAT16_ABOVE_BYTES = 1 << 30


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spaced window starts covering ``size`` voxels with at least ``overlap`` overlap."""
    if size <= patch:
        return [0]
    step = max(int(patch * (1 - overlap)), 1)
    n = int(np.ceil((size - patch) / step)) + 1
    return sorted({int(round(x)) for x in np.linspace(0, size - patch, n)})


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weights over a patch (max 1, floored at 1e-3 so that border voxels covered by a
    single window keep a usable weight, also in float16), nnU-Net's sigma = patch / 8."""
    grids = []
    for p in patch:
        x = np.arange(p, dtype=np.float64) - (p - 1) / 2
        s = max(p * sigma_scale, 1e-3)
        grids.append(np.exp(-0.5 * (x / s) ** 2))
    w = grids[0][:, None, None] * grids[1][None, :, None] * grids[2][None, None, :]
    w /= w.max()
    w = np.maximum(w, 1e-3)
    return w.astype(np.float32)


def _pad_to_patch(image: np.ndarray, patch: Sequence[int], fill: float) -> tuple[np.ndarray, np.ndarray]:
    """The image as float32, padded with ``fill`` to at least ``patch`` (centred, as in training),
    and the offset (voxels) of the image inside the padded array."""
    shape = np.asarray(image.shape)
    padded = np.maximum(shape, patch)
    off = (padded - shape) // 2
    if not np.any(padded != shape):
        return np.asarray(image, dtype=np.float32), off
    img = np.full(tuple(padded), fill, dtype=np.float32)
    img[off[0]:off[0] + shape[0], off[1]:off[1] + shape[1], off[2]:off[2] + shape[2]] = image
    return img, off


def _activation(name: str) -> Callable:
    """Softmax over channels or a per-channel sigmoid."""
    if name == "softmax":
        def act(t):
            return torch.softmax(t, 1)
        return act
    if name == "sigmoid":
        return torch.sigmoid
    raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {name!r}")


def _predict_tile(net, x, act: Callable, tta_axes: Sequence[int], device, use_amp: bool):
    """Class probabilities ``(n_classes, x, y, z)`` of one window, averaged over the mirrors."""
    with torch.no_grad(), torch.autocast(device_type=getattr(device, "type", "cpu"), dtype=torch.float16,
                                         enabled=use_amp):
        prob = act(net(x).float())[0]
        for ax in tta_axes:
            flipped = net(torch.flip(x, dims=[2 + int(ax)])).float()
            prob = prob + torch.flip(act(flipped)[0], dims=[1 + int(ax)])
        if tta_axes:
            prob = prob / (1 + len(tta_axes))
    return prob


def sliding_window(net, image: np.ndarray, patch: Sequence[int], n_classes: int, consume: Callable,
                   overlap: float = 0.25, sigma_scale: float = 0.125, fill: float = 0.0, device=None,
                   tta_axes: Sequence[int] = (), amp: bool = True, activation: str = "softmax",
                   z_coord: bool = False) -> dict[str, Any]:
    """Run ``net`` over ``image`` and hand finished z-slabs of class probabilities to ``consume``.

    Args:
        net: network in eval mode returning ``(b, n_classes, x, y, z)`` logits.
        image: normalised (x, y, z) float32 image on the network's grid.
        patch: window size in voxels.
        n_classes: output channels.
        consume: called as ``consume(z0, z1, probs)`` with ``probs`` float32 ``(n_classes, X, Y,
            z1 - z0)`` probabilities of image slices ``z0..z1`` (ascending, each slice once).
        overlap: fraction of a window shared with its neighbour.
        sigma_scale: Gaussian sigma as a fraction of the patch.
        fill: value padding an image smaller than the patch.
        device: torch device (default: the network's).
        tta_axes: also predict on inputs mirrored along these axes and average.
        amp: float16 autocast on CUDA.
        activation: ``"softmax"`` over channels, or ``"sigmoid"`` per channel (``levels`` stages).
        z_coord: add the craniocaudal coordinate channel (-1..1 over the image's z extent, see
            :func:`lib.ml.sampling.z_channel`) as the network's second input.

    Returns:
        ``{"windows": int, "max_buffer_z": int, "buffer_dtype": str}`` (for tests and benchmarks).
    """
    device = device or next(net.parameters()).device
    shape = np.asarray(image.shape)
    patch = [int(p) for p in patch]
    img, off = _pad_to_patch(image, patch, fill)
    padded = np.asarray(img.shape)
    nx, ny, nz = (int(v) for v in padded)
    zc = z_channel(np.arange(nz) - off[2], 0, int(shape[2])) if z_coord else None
    starts = [window_starts(int(padded[a]), patch[a], overlap) for a in range(3)]
    weight = torch.from_numpy(gaussian_importance(patch, sigma_scale)).to(device)
    est_bytes = n_classes * nx * ny * (patch[2] * 2) * 4
    acc_dtype = torch.float16 if est_bytes > FLOAT16_ABOVE_BYTES else torch.float32
    buf_lo = 0
    acc = torch.zeros((n_classes, nx, ny, 0), dtype=acc_dtype, device=device)
    wsum = torch.zeros((nx, ny, 0), dtype=torch.float32, device=device)
    use_amp = amp and getattr(device, "type", str(device)) == "cuda"
    act = _activation(activation)
    n_win, max_buf = 0, 0
    zs = starts[2]
    emitted = 0
    for gi, z0 in enumerate(zs):
        need_hi = z0 + patch[2]
        cur_hi = buf_lo + acc.shape[3]
        if need_hi > cur_hi:
            extra = need_hi - cur_hi
            acc = torch.cat([acc, torch.zeros((n_classes, nx, ny, extra), dtype=acc_dtype, device=device)], dim=3)
            wsum = torch.cat([wsum, torch.zeros((nx, ny, extra), dtype=torch.float32, device=device)], dim=2)
        max_buf = max(max_buf, acc.shape[3])
        for x0, y0 in itertools.product(starts[0], starts[1]):
            tile = img[x0:x0 + patch[0], y0:y0 + patch[1], z0:z0 + patch[2]]
            if zc is not None:
                tile = np.stack([tile, np.broadcast_to(zc[z0:z0 + patch[2]], tile.shape)])
            else:
                tile = tile[None]
            x = torch.from_numpy(np.ascontiguousarray(tile))[None].to(device)
            prob = _predict_tile(net, x, act, tta_axes, device, use_amp)
            zl = z0 - buf_lo
            acc[:, x0:x0 + patch[0], y0:y0 + patch[1], zl:zl + patch[2]] += (prob * weight).to(acc_dtype)
            wsum[x0:x0 + patch[0], y0:y0 + patch[1], zl:zl + patch[2]] += weight
            n_win += 1
        done_hi = zs[gi + 1] if gi + 1 < len(zs) else buf_lo + acc.shape[3]
        k = done_hi - buf_lo
        if k > 0:
            # padded slices buf_lo..buf_lo+k hold image slices buf_lo-off..: emit the image part
            lo, hi = max(buf_lo, int(off[2])), min(buf_lo + k, int(off[2] + shape[2]))
            if hi > lo:
                probs = (acc[..., lo - buf_lo:hi - buf_lo].float()
                         / wsum[..., lo - buf_lo:hi - buf_lo].clamp_min(1e-8)).cpu().numpy()
                consume(lo - int(off[2]), hi - int(off[2]),
                        probs[:, off[0]:off[0] + shape[0], off[1]:off[1] + shape[1]])
                emitted = hi - int(off[2])
            acc = acc[..., k:]
            wsum = wsum[..., k:]
            buf_lo += k
    if emitted != int(shape[2]):  # pragma: no cover - guarded by construction
        raise RuntimeError(f"sliding window emitted {emitted} of {shape[2]} slices")
    return {"windows": n_win, "max_buffer_z": max_buf, "buffer_dtype": str(acc_dtype).replace("torch.", "")}
