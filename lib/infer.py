"""Inference: Gaussian-weighted sliding windows, mirror TTA, post-processing, original geometry.

Typical use::

    from lib import infer
    infer.predict_case(model_dir, "case.nii.gz", "case_seg.nii.gz")            # one case
    res = infer.predict_cases(model_dir, [(cid, img, out), ...], workers=2)   # lib.parallel
    res = infer.predict_folder(model_dir, in_dir, out_dir)                     # every *.nii.gz

What a prediction is:

* the image is read and reoriented to RAS+ (permutation only), HU normalised with the plan and
  resampled to each stage's spacing;
* each stage slides its patch over the volume with ``plan.inference["overlap"]`` and Gaussian
  importance weights (sigma = patch x ``gaussian_sigma_scale``), optionally averaging softmax
  outputs with left-right mirrored inputs (``tta=True``; only the axes in
  ``plan.inference["tta_axes"]``: never z, the network was not trained on flipped spines);
* memory stays bounded for 512 x 512 x 800 volumes: windows are processed slab by slab along z
  and a slab's class probabilities are reduced (argmax) as soon as no later window touches it,
  so at most about two patch heights of all-class probabilities exist at once (float16 when
  that buffer would exceed 1 GiB);
* ``single`` plans: class argmax on the network grid, then labels resampled to the input grid
  (each label linearly then argmax); ``label_transfer`` plans: the coarse stage's probabilities
  are kept on its small grid, the fine stage runs only in the box around the coarse spine
  (``roi_margin_mm``), its spine probability is resampled to the input grid and thresholded
  at 0.5, and each spine voxel takes the vertebra label whose coarse probability, trilinearly
  interpolated at that voxel, is highest;
* post-processing (``plan.inference["postprocess"]``): per label, only the largest connected
  component is kept; spine components smaller than ``min_component_mm3`` are removed;
* the mask is written as uint8 NIfTI in the input's original voxel order and affine (same shape
  and affine as the image file, whatever its orientation, oblique included).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from lib.imaging.instances import split_at_necks
from lib.io import load_volume, save_like, strip_nifti_suffix
from lib.model import Plan, StagePlan, build_network
from lib.train import (
    level_from_ordinal,
    load_weights,
    normalize_ct,
    pad_value,
    resample_image,
    resample_labels,
    resampled_shape,
    z_channel,
)

FLOAT16_ABOVE_BYTES = 1 << 30


@dataclass
class LoadedModel:
    """A trained model ready for inference.

    Attributes:
        plan: the plan it was trained with.
        nets: stage name -> network in eval mode on ``device``.
        device: torch device.
        model_dir: where it was loaded from.
    """

    plan: Plan
    nets: dict[str, Any]
    device: Any
    model_dir: Path | None = None
    stats: dict[str, float] = field(default_factory=dict)


_MODEL_CACHE: dict[tuple, LoadedModel] = {}


def load_model(model_dir: str | Path, device: str = "auto") -> LoadedModel:
    """Load ``model.pt`` + plan from a training output folder (cached per process).

    Raises:
        FileNotFoundError: no ``model.pt`` in ``model_dir``.
    """
    from lib.core.runinfo import resolve_device

    model_dir = Path(model_dir)
    path = model_dir / "model.pt" if model_dir.is_dir() else model_dir
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained model (model.pt) found")
    dev = resolve_device(device)
    key = (str(path.resolve()), path.stat().st_mtime_ns, str(dev))
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    plan, weights = load_weights(path)
    nets = {}
    for st in plan.stages:
        if st.name not in weights:
            raise ValueError(f"{path}: no weights for stage {st.name!r}")
        net = build_network(plan, st)
        net.load_state_dict(weights[st.name])
        net.to(dev).eval()
        nets[st.name] = net
    lm = LoadedModel(plan, nets, dev, path.parent)
    _MODEL_CACHE.clear()
    _MODEL_CACHE[key] = lm
    return lm


def _as_model(model: LoadedModel | str | Path, device: str) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, device)


# --------------------------------------------------------------------------- sliding window


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
            :func:`lib.train.z_channel`) as the network's second input.

    Returns:
        ``{"windows": int, "max_buffer_z": int, "buffer_dtype": str}`` (for tests and benchmarks).
    """
    import torch

    device = device or next(net.parameters()).device
    shape = np.asarray(image.shape)
    patch = [int(p) for p in patch]
    padded = np.maximum(shape, patch)
    off = (padded - shape) // 2  # an image smaller than the patch sits in its centre, as in training
    if np.any(padded != shape):
        img = np.full(tuple(padded), fill, dtype=np.float32)
        img[off[0]:off[0] + shape[0], off[1]:off[1] + shape[1], off[2]:off[2] + shape[2]] = image
    else:
        img = np.asarray(image, dtype=np.float32)
    X, Y, Z = (int(v) for v in padded)
    zc = z_channel(np.arange(Z) - off[2], 0, int(shape[2])) if z_coord else None
    starts = [window_starts(int(padded[a]), patch[a], overlap) for a in range(3)]
    weight = torch.from_numpy(gaussian_importance(patch, sigma_scale)).to(device)
    est_bytes = n_classes * X * Y * (patch[2] * 2) * 4
    acc_dtype = torch.float16 if est_bytes > FLOAT16_ABOVE_BYTES else torch.float32
    buf_lo = 0
    acc = torch.zeros((n_classes, X, Y, 0), dtype=acc_dtype, device=device)
    wsum = torch.zeros((X, Y, 0), dtype=torch.float32, device=device)
    use_amp = amp and getattr(device, "type", str(device)) == "cuda"
    if activation == "softmax":
        def act(t):
            return torch.softmax(t, 1)
    elif activation == "sigmoid":
        act = torch.sigmoid
    else:
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    n_win, max_buf = 0, 0
    zs = starts[2]
    emitted = 0
    for gi, z0 in enumerate(zs):
        need_hi = z0 + patch[2]
        cur_hi = buf_lo + acc.shape[3]
        if need_hi > cur_hi:
            extra = need_hi - cur_hi
            acc = torch.cat([acc, torch.zeros((n_classes, X, Y, extra), dtype=acc_dtype, device=device)], dim=3)
            wsum = torch.cat([wsum, torch.zeros((X, Y, extra), dtype=torch.float32, device=device)], dim=2)
        max_buf = max(max_buf, acc.shape[3])
        for x0, y0 in itertools.product(starts[0], starts[1]):
            tile = img[x0:x0 + patch[0], y0:y0 + patch[1], z0:z0 + patch[2]]
            if zc is not None:
                tile = np.stack([tile, np.broadcast_to(zc[z0:z0 + patch[2]], tile.shape)])
            else:
                tile = tile[None]
            x = torch.from_numpy(np.ascontiguousarray(tile))[None].to(device)
            with torch.no_grad(), torch.autocast(device_type=getattr(device, "type", "cpu"), dtype=torch.float16,
                                                 enabled=use_amp):
                prob = act(net(x).float())[0]
                for ax in tta_axes:
                    flipped = net(torch.flip(x, dims=[2 + int(ax)])).float()
                    prob = prob + torch.flip(act(flipped)[0], dims=[1 + int(ax)])
                if tta_axes:
                    prob = prob / (1 + len(tta_axes))
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


def window_size(stage: StagePlan, plan: Plan, image_shape: Sequence[int]) -> list[int]:
    """Sliding-window size of a stage over an image of ``image_shape`` voxels.

    The training patch, enlarged by ``plan.inference["window_scale"][stage.name]`` (default 1)
    but never beyond the image rounded up to the network's divisibility: a fully convolutional
    network runs on larger windows with less overlap work (fewer, bigger convolutions).
    """
    from lib.model import divisibility

    scale = float(plan.inference.get("window_scale", {}).get(stage.name, 1.0))
    div = divisibility(stage.strides)
    out = []
    for p, d, n in zip(stage.patch_size, div, image_shape, strict=True):
        w = int(np.ceil(p * scale / d) * d)
        fit = int(np.ceil(n / d) * d)
        out.append(max(p, min(w, fit)))
    return out


def predict_stage_argmax(net, image: np.ndarray, stage: StagePlan, plan: Plan, n_classes: int, device,
                         tta: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Class argmax (uint8, stage grid) of one stage over a whole normalised image."""
    out = np.zeros(image.shape, dtype=np.uint8)

    def consume(z0, z1, probs):
        out[..., z0:z1] = probs.argmax(0).astype(np.uint8)

    info = sliding_window(net, image, window_size(stage, plan, image.shape), n_classes, consume,
                          plan.inference.get("overlap", 0.25), plan.inference.get("gaussian_sigma_scale", 0.125),
                          pad_value(plan.normalization), device, plan.inference.get("tta_axes", [0]) if tta else (),
                          z_coord=stage.z_coord)
    return out, info


def predict_stage_probs(net, image: np.ndarray, stage: StagePlan, plan: Plan, n_classes: int, device,
                        tta: bool = False, channels: Sequence[int] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Class probabilities (float32 ``(len(channels), x, y, z)``) of one stage (small grids only).

    ``levels`` stages give sigmoids: channel k - 1 is P(level > k)."""
    chans = list(range(n_classes)) if channels is None else list(channels)
    out = np.zeros((len(chans), *image.shape), dtype=np.float32)

    def consume(z0, z1, probs):
        out[..., z0:z1] = probs[chans]

    info = sliding_window(net, image, window_size(stage, plan, image.shape), n_classes, consume,
                          plan.inference.get("overlap", 0.25), plan.inference.get("gaussian_sigma_scale", 0.125),
                          pad_value(plan.normalization), device, plan.inference.get("tta_axes", [0]) if tta else (),
                          activation="sigmoid" if stage.task == "levels" else "softmax", z_coord=stage.z_coord)
    return out, info


# --------------------------------------------------------------------------- post-processing


def postprocess_labels(labels: np.ndarray, spacing: Sequence[float], largest_component: bool = True,
                       min_component_mm3: float = 0.0, relabel_fragments: bool = True) -> np.ndarray:
    """Clean a label map (uint8, (x, y, z)).

    Args:
        labels: label values.
        spacing: voxel size (mm) for the volume threshold.
        largest_component: keep only the largest 26-connected component of each label.
        min_component_mm3: remove connected components of the spine (label > 0) smaller than this.
        relabel_fragments: a fragment cut off its label by ``largest_component`` but touching the
            spine takes the label of the nearest kept voxel (a piece of L3 called L4 becomes L3)
            instead of becoming background; the spine mask is then unchanged by this step.

    Returns:
        A cleaned copy (removed voxels become 0).
    """
    out = np.asarray(labels, dtype=np.uint8).copy()
    if not out.any():
        return out
    struct = np.ones((3, 3, 3), dtype=bool)
    if largest_component:
        dropped = np.zeros(out.shape, dtype=bool)
        objs = ndimage.find_objects(out)
        for v, sl in enumerate(objs, start=1):
            if sl is None:
                continue
            sub = out[sl]
            comp, n = ndimage.label(sub == v, structure=struct)
            if n > 1:
                sizes = np.bincount(comp.ravel())
                sizes[0] = 0
                keep = int(np.argmax(sizes))
                drop = (comp > 0) & (comp != keep)
                sub[drop] = 0
                dropped[sl] |= drop
        if relabel_fragments and dropped.any() and out.any():
            box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(dropped | (out > 0)))
            sub, dsub = out[box], dropped[box]
            frag, nf = ndimage.label(dsub, structure=struct)
            touching = np.unique(frag[ndimage.binary_dilation(sub > 0, structure=struct) & (frag > 0)])
            dsub = np.isin(frag, touching[touching > 0])  # fragments attached to the kept spine
            if dsub.any():
                _, ind = ndimage.distance_transform_edt(sub == 0, return_indices=True)
                sub[dsub] = sub[tuple(i[dsub] for i in ind)]
    if min_component_mm3 > 0:
        vox = float(np.prod(spacing))
        comp, n = ndimage.label(out > 0, structure=struct)
        if n > 0:
            sizes = np.bincount(comp.ravel()) * vox
            small = np.nonzero(sizes < min_component_mm3)[0]
            small = small[small > 0]
            if small.size:
                out[np.isin(comp, small)] = 0
    return out


# --------------------------------------------------------------------------- whole volumes


def _spine_bbox(fg: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounding box ``(lo, hi)`` of the largest 26-connected component of ``fg`` and of every
    other component at least a tenth of its size (a spine split by a gap stays whole)."""
    comp, n = ndimage.label(fg, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return None
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    keep = np.nonzero(sizes >= 0.1 * sizes.max())[0]
    idx = np.nonzero(np.isin(comp, keep))
    return np.array([int(i.min()) for i in idx]), np.array([int(i.max()) + 1 for i in idx])


@dataclass
class _StageOutput:
    box: tuple[slice, ...]          # region of the input grid the stage saw
    shape: tuple[int, ...]          # stage grid shape of that region
    probs: np.ndarray | None        # all-class probabilities (labels stages on small grids)
    fg_prob: np.ndarray | None      # spine probability (foreground stages)
    bbox: tuple[np.ndarray, np.ndarray] | None  # spine bounding box on the input grid


def predict_volume(model: LoadedModel | str | Path, ct_hu: np.ndarray, spacing: Sequence[float], tta: bool = False,
                   postprocess: bool | None = None, device: str = "auto") -> np.ndarray:
    """Predict a label map for a CT volume in RAS+ voxel order.

    Args:
        model: a :class:`LoadedModel` or a model folder.
        ct_hu: CT in HU, (x, y, z) RAS+ (as :func:`lib.io.load_volume` returns it).
        spacing: voxel size (mm) of ``ct_hu``.
        tta: mirror test-time augmentation (left-right).
        postprocess: apply the plan's post-processing (default True).
        device: when ``model`` is a folder.

    Returns:
        uint8 label values (plan labels, 0 = background), same shape as ``ct_hu``.
    """
    m = _as_model(model, device)
    plan = m.plan
    t0 = time.perf_counter()
    spacing = [float(s) for s in spacing]
    ct = np.asarray(ct_hu)
    norm = normalize_ct(ct, plan.normalization)
    outs: dict[str, _StageOutput] = {}
    lab = np.zeros(ct.shape, dtype=np.uint8)
    last = plan.stages[-1]
    for st in plan.stages:
        if st.roi_from is None:
            box = tuple(slice(0, n) for n in ct.shape)
        else:
            prev = outs[st.roi_from].bbox
            if prev is None:  # no spine found upstream
                box = None
                break
            margin = np.ceil(st.roi_margin_mm / np.asarray(spacing) - 1e-3).astype(int)  # float32 headers
            lo = np.maximum(prev[0] - margin, 0)
            hi = np.minimum(prev[1] + margin, ct.shape)
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        roi = norm[box]
        shape_t = resampled_shape(roi.shape, spacing, st.spacing_mm)
        img = resample_image(roi, shape_t) if tuple(shape_t) != roi.shape else roi
        net, n_cls = m.nets[st.name], st.n_classes(plan)
        if st is last and st.task == "labels":  # single: memory-bounded argmax on the stage grid
            cls, _ = predict_stage_argmax(net, img, st, plan, n_cls, m.device, tta)
            sub = plan.class_to_label()[cls]
            lab[box] = resample_labels(sub, roi.shape) if sub.shape != roi.shape else sub
            break
        if st.task == "labels":
            probs, _ = predict_stage_probs(net, img, st, plan, n_cls, m.device, tta)
            fg_t, fg_prob = probs[0] < 0.5, None
        elif st.task == "levels":  # no spine output: foreground stages say where the spine is
            probs, _ = predict_stage_probs(net, img, st, plan, n_cls, m.device, tta)
            fg_t, fg_prob = np.zeros(probs.shape[1:], bool), None
        else:
            probs = None
            fg_prob = predict_stage_probs(net, img, st, plan, n_cls, m.device, tta, channels=[1])[0][0]
            fg_t = fg_prob > 0.5
        bb = _spine_bbox(fg_t)
        if bb is not None:  # stage voxels -> input-grid voxels (edges aligned)
            scale = np.asarray(roi.shape) / np.asarray(shape_t)
            start = np.array([b.start for b in box])
            bb = (np.floor(start + bb[0] * scale + 1e-3).astype(int), np.ceil(start + bb[1] * scale - 1e-3).astype(int))
        outs[st.name] = _StageOutput(box, tuple(shape_t), probs, fg_prob, bb)
    else:
        if plan.combine == "label_transfer":
            lab = _transfer_labels(plan, outs, ct.shape)
            if plan.inference.get("split_necks") and lab.any():
                lab = split_at_necks(lab, spacing, float(plan.inference["split_necks"]))
    pp = plan.inference.get("postprocess", {}) if postprocess is not False else {}
    if pp and lab.any():
        lab = postprocess_labels(lab, spacing, bool(pp.get("largest_component", True)),
                                 float(pp.get("min_component_mm3", 0.0)), bool(pp.get("relabel_fragments", True)))
    m.stats["last_seconds"] = time.perf_counter() - t0
    return lab


def _transfer_labels(plan: Plan, outs: dict[str, _StageOutput], shape: tuple[int, ...]) -> np.ndarray:
    """Spine of the last (foreground) stage, each voxel labelled by the labels stage's
    probabilities trilinearly interpolated at its position (``labels``: the most probable
    label; ``levels``: ``plan.inference["level_decoder"]`` = ``"median"``, 1 + the number of
    thresholds with probability > 0.5 (default: small probabilities on the far thresholds do
    not add up and pull C1 and L5 towards the middle), or ``"expected"``, 1 + their sum)."""
    lab = np.zeros(shape, dtype=np.uint8)
    fine = outs[plan.stages[-1].name]
    lstage = next(s for s in plan.stages if s.task in ("labels", "levels"))
    coarse = outs[lstage.name]
    roi_shape = tuple(b.stop - b.start for b in fine.box)
    prob = fine.fg_prob if fine.fg_prob.shape == roi_shape else resample_image(fine.fg_prob, roi_shape)
    pts = np.nonzero(prob > float(plan.inference.get("spine_threshold", 0.5)))
    if pts[0].size == 0:
        return lab
    c_roi = [b.stop - b.start for b in coarse.box]
    coords = np.empty((3, pts[0].size), dtype=np.float64)
    for a in range(3):
        i = pts[a] + fine.box[a].start - coarse.box[a].start  # input voxel relative to the coarse region
        coords[a] = (i + 0.5) * coarse.shape[a] / c_roi[a] - 0.5
    gate = plan.inference.get("gate") or {}
    if gate.get("stage") in outs and gate.get("threshold", 0) > 0:
        # a whole-FOV stage saw the whole spine: drop fine spine voxels it calls background
        g = outs[gate["stage"]]
        g_roi = [b.stop - b.start for b in g.box]
        gc = np.empty_like(coords)
        for a in range(3):
            i = pts[a] + fine.box[a].start - g.box[a].start
            gc[a] = (i + 0.5) * g.shape[a] / g_roi[a] - 0.5
        pg = ndimage.map_coordinates(g.fg_prob, gc, order=1, mode="constant", cval=0.0, prefilter=False)
        keep = pg >= float(gate["threshold"])
        pts = tuple(p[keep] for p in pts)
        coords = coords[:, keep]
        if pts[0].size == 0:
            return lab
    if lstage.task == "levels":
        median = plan.inference.get("level_decoder", "median") == "median"
        total = np.zeros(pts[0].size, dtype=np.float64)
        for k in range(coarse.probs.shape[0]):
            pk = ndimage.map_coordinates(coarse.probs[k], coords, order=1, mode="nearest", prefilter=False)
            total += (pk > 0.5) if median else pk
        arg = np.clip(1 + total if median else level_from_ordinal(total[None]), 1, len(plan.level_ladder())).astype(np.uint8)
    else:
        best = np.full(pts[0].size, -1.0, dtype=np.float32)
        arg = np.zeros(pts[0].size, dtype=np.uint8)
        for c in range(1, coarse.probs.shape[0]):
            pc = ndimage.map_coordinates(coarse.probs[c], coords, order=1, mode="nearest", prefilter=False)
            win = pc > best
            best[win] = pc[win]
            arg[win] = c
    sub = np.zeros(roi_shape, dtype=np.uint8)
    sub[pts] = (plan.level_to_label() if lstage.task == "levels" else plan.class_to_label())[arg]
    lab[fine.box] = sub
    return lab


# --------------------------------------------------------------------------- cases and folders


def predict_case(model: LoadedModel | str | Path, image_path: str | Path, out_path: str | Path, tta: bool = False,
                 overwrite: bool = False, device: str = "auto", postprocess: bool | None = None) -> Path:
    """Predict one NIfTI image and save the mask beside it in the image's own geometry.

    Args:
        model: a :class:`LoadedModel` or a model folder (``model.pt`` + ``plan.json``).
        image_path: CT in HU, any orientation (RAS, LPS, oblique).
        out_path: output ``.nii.gz``; uint8 labels, same shape, voxel order and affine as the image.
        tta: left-right mirror test-time augmentation.
        overwrite: redo an existing output (default: skip it, so re-runs resume).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        postprocess: apply the plan's post-processing (default True).

    Returns:
        ``out_path``.
    """
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        return out_path
    vol = load_volume(image_path)
    lab = predict_volume(model, vol.array, vol.spacing, tta=tta, postprocess=postprocess, device=device)
    return save_like(lab, vol, out_path, dtype=np.uint8)


@dataclass(frozen=True)
class PredictJob:
    """One case for :func:`predict_cases` (picklable)."""

    case_id: str
    image_path: str
    out_path: str
    model_dir: str
    tta: bool = False
    overwrite: bool = False
    device: str = "auto"
    num_threads: int = 1


def run_predict_job(job: PredictJob) -> str:
    """Worker function of :func:`predict_cases` (module level so processes can run it)."""
    import torch

    if job.num_threads:
        torch.set_num_threads(int(job.num_threads))
    return str(predict_case(job.model_dir, job.image_path, job.out_path, tta=job.tta, overwrite=job.overwrite,
                            device=job.device))


def predict_cases(model_dir: str | Path, items: Iterable[Sequence[str]], *, workers: int | None = 0,
                  scheduler: str | None = None, tta: bool = False, overwrite: bool = False, device: str = "auto",
                  num_threads: int | None = None, on_error: str = "collect", progress: bool = True):
    """Predict many cases through :func:`lib.parallel.map_cases`.

    Args:
        model_dir: trained model folder.
        items: ``(case_id, image_path, out_path)`` triples.
        workers: 0 = this process (the model is loaded once); N = N processes (each loads it once).
        scheduler: a Dask scheduler address instead of local processes.
        tta: mirror test-time augmentation.
        overwrite: redo existing outputs.
        device: torch device per worker.
        num_threads: torch threads per worker (default 1 with workers, unchanged in-process).
        on_error: ``"collect"`` (failures listed in the result) or ``"raise"``.
        progress: progress bar.

    Returns:
        ``lib.parallel.MapResult``: ``values`` {case_id: output path}, ``failures``.
    """
    from lib.core.parallel import map_cases

    items = [tuple(str(x) for x in it) for it in items]
    threads = num_threads if num_threads is not None else (1 if (workers or scheduler) else 0)
    jobs = [PredictJob(c, i, o, str(model_dir), tta, overwrite, device, int(threads)) for c, i, o in items]
    return map_cases(run_predict_job, jobs, ids=[j.case_id for j in jobs], workers=workers, scheduler=scheduler,
                     on_error=on_error, desc="predict", progress=progress)


def predict_folder(model_dir: str | Path, in_dir: str | Path, out_dir: str | Path, *, pattern: str = "*.nii.gz",
                   suffix: str = "_seg", **kwargs: Any):
    """Predict every image in ``in_dir`` into ``out_dir/<name><suffix>.nii.gz``.

    ``suffix="_seg"`` matches the CTSpine1K release (``ID.nii.gz`` -> ``ID_seg.nii.gz``); other
    keyword arguments go to :func:`predict_cases`.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    images = sorted(p for p in in_dir.glob(pattern) if not p.name.startswith("."))
    if not images:
        raise FileNotFoundError(f"{in_dir}: no images matching {pattern}")
    items = [(strip_nifti_suffix(p), str(p), str(out_dir / f"{strip_nifti_suffix(p)}{suffix}.nii.gz")) for p in images]
    out_dir.mkdir(parents=True, exist_ok=True)
    return predict_cases(model_dir, items, **kwargs)


def prediction_items(cases: Iterable[Sequence[str]], pred_dir: str | Path) -> list[tuple[str, str, str]]:
    """``(case_id, image, pred_dir/<case_id>.nii.gz)`` for :func:`predict_cases` from
    ``(case_id, image, ...)`` cases."""
    return [(str(c[0]), str(c[1]), str(Path(pred_dir) / f"{c[0]}.nii.gz")) for c in cases]


def evaluation_pairs(cases: Iterable[Sequence[str]], pred_dir: str | Path) -> list[tuple[str, str, str]]:
    """``(case_id, truth mask, pred_dir/<case_id>.nii.gz)`` for :func:`lib.evaluate.evaluate_pairs`
    from ``(case_id, image, mask)`` cases."""
    return [(str(c[0]), str(c[2]), str(Path(pred_dir) / f"{c[0]}.nii.gz")) for c in cases]


def default_workers_for_inference() -> int:
    """Processes for inference on CPU: ``$SPINE1K_WORKERS`` or the available cores."""
    env = os.environ.get("SPINE1K_WORKERS")
    if env:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- figures


def plot_prediction(image_path: str | Path, truth_path: str | Path | None, pred_path: str | Path,
                    title: str = "", window: tuple[float, float] = (400.0, 1800.0)):
    """Sagittal and coronal slices through the spine: CT, truth and prediction side by side.

    Args:
        image_path, truth_path, pred_path: NIfTI files on the same grid (truth may be None).
        title: figure title.
        window: CT display (centre, width) in HU.

    Returns:
        A matplotlib Figure (save it with :func:`lib.viz.save_figure`).
    """
    import matplotlib.pyplot as plt

    from lib.core import labels as L
    from lib.viz import default_slices, label_cmap

    ct = load_volume(image_path)
    pred = load_volume(pred_path).array
    truth = load_volume(truth_path).array if truth_path is not None else None
    ref = truth if truth is not None and truth.any() else pred
    ix, iy, _ = default_slices(ref, ct.shape)
    sx, sy, sz = ct.spacing
    lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    cmap = label_cmap()
    vmax = len(L.colour_lut()) - 1
    cols = [("CT", None), ("truth", truth), ("prediction", pred)] if truth is not None else [("CT", None), ("prediction", pred)]
    fig, axes = plt.subplots(2, len(cols), figsize=(3.2 * len(cols), 9), squeeze=False)
    views = [(lambda a: a[ix, ::-1, :].T, (0, ct.shape[1] * sy, 0, ct.shape[2] * sz), f"sagittal x={ix}"),
             (lambda a: a[::-1, iy, :].T, (0, ct.shape[0] * sx, 0, ct.shape[2] * sz), f"coronal y={iy}")]
    for r, (cut, ext, vname) in enumerate(views):
        for c, (name, lab) in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(cut(ct.array), cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=ext, interpolation="nearest")
            if lab is not None and lab.any():
                ax.imshow(np.ma.masked_equal(cut(lab), 0), cmap=cmap, vmin=0, vmax=vmax, alpha=0.45, origin="lower",
                          extent=ext, interpolation="nearest")
            ax.set_title(f"{name}, {vname}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_dice_per_label(per_case, title: str = ""):
    """Bar chart of the mean Dice per vertebra (with case counts) from a ``lib.evaluate`` table.

    Args:
        per_case: the per-case DataFrame of :func:`lib.evaluate.evaluate_pairs` (columns
            ``label``, ``name``, ``status``, ``dice``); label 0 is the binary spine.
        title: figure title.

    Returns:
        A matplotlib Figure: one bar per vertebra in craniocaudal order, coloured by
        :mod:`lib.labels`, the binary spine as a line.
    """
    import matplotlib.pyplot as plt

    from lib.core import labels as L

    df = per_case[per_case["status"].isin(["detected", "missed"])] if "status" in per_case else per_case
    vert = df[df["label"] > 0]
    spine = df[df["label"] == 0]["dice"].mean() if (df["label"] == 0).any() else float("nan")
    labs = L.ordered(sorted(set(int(v) for v in vert["label"])))
    means = [float(vert[vert["label"] == v]["dice"].mean()) for v in labs]
    counts = [int((vert["label"] == v).sum()) for v in labs]
    fig, ax = plt.subplots(figsize=(max(6, 0.38 * len(labs) + 2), 3.6))
    colours = [np.array(L.LABELS[v].rgb) / 255 for v in labs]
    ax.bar(range(len(labs)), means, color=colours, edgecolor="black", linewidth=0.4)
    for i, (m, n) in enumerate(zip(means, counts, strict=True)):
        ax.text(i, min(m + 0.02, 1.02), str(n), ha="center", fontsize=6)
    if np.isfinite(spine):
        ax.axhline(spine, color="black", ls="--", lw=0.8, label=f"binary spine {spine:.3f}")
        ax.legend(fontsize=8, loc="lower left")
    ax.set_xticks(range(len(labs)), [L.name(v) for v in labs], rotation=90, fontsize=7)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("Dice (mean over cases)")
    mv = float(np.nanmean(means)) if means else float("nan")
    ax.set_title(title or f"mean of vertebrae {mv:.3f} (numbers: cases with the vertebra)", fontsize=9)
    fig.tight_layout()
    return fig
