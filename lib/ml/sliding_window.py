"""Gaussian-weighted sliding windows over a volume, slab by slab along z (memory bounded).

A slab's class probabilities are handed on as soon as no later window touches it, so one patch height of
all-class probabilities exists at once (one fixed buffer, shifted in place; float16 when it would exceed 1 GiB
as float32), and they are handed on a few slices at a time (:data:`EMIT_VOXELS`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lib.ml.sampling import z_channel

FLOAT16_ABOVE_BYTES = 1 << 30
"""An all-class accumulation buffer larger than this (as float32) is kept in float16."""
EMIT_VOXELS = 1 << 24
"""Class-probability values handed to ``consume`` at once (float32: 64 MiB)."""


def _shift(buf, k: int, dim: int) -> None:
    """Move ``buf``'s slices ``k..`` along ``dim`` to the front, in place, and zero the last ``k``
    (pieces of at most ``k`` slices, front to back, so no copy reads what it overwrote)."""
    n = buf.shape[dim]
    k = min(int(k), n)
    for i in range(0, n - k, k):
        m = min(k, n - k - i)
        buf.narrow(dim, i, m).copy_(buf.narrow(dim, i + k, m))
    buf.narrow(dim, n - k, k).zero_()


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
                   z_coord: bool = False, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
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
        transform: applied to each window of ``image`` before the network sees it (elementwise,
            e.g. the CT normalisation, so an int16 CT needs no float32 copy of the whole volume);
            ``image`` must then be at least ``patch`` in every axis (no padding).

    Returns:
        ``{"windows": int, "max_buffer_z": int, "buffer_dtype": str}`` (for tests and benchmarks).
    """
    device = device or next(net.parameters()).device
    shape = np.asarray(image.shape)
    patch = [int(p) for p in patch]
    if transform is not None:
        if np.any(shape < np.asarray(patch)):
            raise ValueError(f"sliding_window: transform needs an image of at least the patch {patch}, got "
                             f"{tuple(int(n) for n in shape)}")
        img, off = image, np.zeros(3, dtype=int)
    else:
        img, off = _pad_to_patch(image, patch, fill)
    padded = np.asarray(img.shape)
    nx, ny, nz = (int(v) for v in padded)
    zc = z_channel(np.arange(nz) - off[2], 0, int(shape[2])) if z_coord else None
    starts = [window_starts(int(padded[a]), patch[a], overlap) for a in range(3)]
    weight = torch.from_numpy(gaussian_importance(patch, sigma_scale)).to(device)
    depth = patch[2]  # after each row of windows the finished slices leave: patch[2] slices are ever needed
    est_bytes = n_classes * nx * ny * depth * 4
    acc_dtype = torch.float16 if est_bytes > FLOAT16_ABOVE_BYTES else torch.float32
    acc = torch.zeros((n_classes, nx, ny, depth), dtype=acc_dtype, device=device)
    wsum = torch.zeros((nx, ny, depth), dtype=torch.float32, device=device)
    emit_z = max(1, EMIT_VOXELS // max(1, n_classes * int(shape[0]) * int(shape[1])))
    use_amp = amp and getattr(device, "type", str(device)) == "cuda"
    act = _activation(activation)
    n_win, buf_lo, emitted = 0, 0, 0
    zs = starts[2]
    for gi, z0 in enumerate(zs):
        for x0, y0 in itertools.product(starts[0], starts[1]):
            tile = img[x0:x0 + patch[0], y0:y0 + patch[1], z0:z0 + patch[2]]
            if transform is not None:
                tile = transform(np.ascontiguousarray(tile))
            if zc is not None:
                tile = np.stack([tile, np.broadcast_to(zc[z0:z0 + patch[2]], tile.shape)])
            else:
                tile = tile[None]
            x = torch.from_numpy(np.ascontiguousarray(tile))[None].to(device)
            prob = _predict_tile(net, x, act, tta_axes, device, use_amp)
            zl = z0 - buf_lo
            acc[:, x0:x0 + patch[0], y0:y0 + patch[1], zl:zl + patch[2]] += prob.mul_(weight).to(acc_dtype)
            wsum[x0:x0 + patch[0], y0:y0 + patch[1], zl:zl + patch[2]] += weight
            del prob
            n_win += 1
        done_hi = zs[gi + 1] if gi + 1 < len(zs) else buf_lo + depth
        k = done_hi - buf_lo
        # padded slices buf_lo..buf_lo+k hold image slices buf_lo-off..: emit the image part, a few at a time
        lo, hi = max(buf_lo, int(off[2])), min(buf_lo + k, int(off[2] + shape[2]))
        for c0 in range(lo, hi, emit_z):
            c1 = min(hi, c0 + emit_z)
            a, b = c0 - buf_lo, c1 - buf_lo
            part = acc[:, off[0]:off[0] + shape[0], off[1]:off[1] + shape[1], a:b].to(torch.float32, copy=True)
            part /= wsum[off[0]:off[0] + shape[0], off[1]:off[1] + shape[1], a:b].clamp_min(1e-8)
            consume(c0 - int(off[2]), c1 - int(off[2]), part.cpu().numpy())
            emitted = c1 - int(off[2])
        _shift(acc, k, dim=3)
        _shift(wsum, k, dim=2)
        buf_lo += k
    if emitted != int(shape[2]):  # pragma: no cover - guarded by construction
        raise RuntimeError(f"sliding window emitted {emitted} of {shape[2]} slices")
    return {"windows": n_win, "max_buffer_z": depth, "buffer_dtype": str(acc_dtype).replace("torch.", "")}
