"""Inference: Gaussian-weighted sliding windows, mirror TTA, post-processing, original geometry.

Typical use::

    from lib.ml import inference
    inference.predict_case(model_dir, "case.nii.gz", "case_seg.nii.gz")            # one case
    res = inference.predict_cases(model_dir, [(cid, img, out), ...], workers=2)   # lib.core.parallel
    res = inference.predict_folder(model_dir, in_dir, out_dir)                     # every *.nii.gz

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

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from lib.core.parallel import map_cases
from lib.imaging.components import postprocess_labels, spine_bbox
from lib.imaging.instances import split_at_necks
from lib.imaging.resampling import resample_image, resample_labels, resampled_shape
from lib.io.integrity import IntegrityError, image_faults
from lib.io.nifti import load_ct, save_like, strip_nifti_suffix
from lib.ml.checkpoint import load_weights
from lib.ml.device import resolve_device
from lib.ml.losses import level_from_ordinal
from lib.ml.networks import build_network
from lib.ml.plans import Plan, StagePlan, divisibility
from lib.ml.preprocessing import normalize_ct, pad_value
from lib.ml.sliding_window import sliding_window


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


def window_size(stage: StagePlan, plan: Plan, image_shape: Sequence[int]) -> list[int]:
    """Sliding-window size of a stage over an image of ``image_shape`` voxels.

    The training patch, enlarged by ``plan.inference["window_scale"][stage.name]`` (default 1)
    but never beyond the image rounded up to the network's divisibility: a fully convolutional
    network runs on larger windows with less overlap work (fewer, bigger convolutions).
    """
    scale = float(plan.inference.get("window_scale", {}).get(stage.name, 1.0))
    div = divisibility(stage.strides)
    out = []
    for p, d, n in zip(stage.patch_size, div, image_shape, strict=True):
        w = int(np.ceil(p * scale / d) * d)
        fit = int(np.ceil(n / d) * d)
        out.append(max(p, min(w, fit)))
    return out


def predict_stage_argmax(net, image: np.ndarray, stage: StagePlan, plan: Plan, n_classes: int, device,
                         tta: bool = False, transform=None) -> tuple[np.ndarray, dict[str, Any]]:
    """Class argmax (uint8, stage grid) of one stage over a whole normalised image (or a CT in HU
    with ``transform`` = its normalisation, applied window by window)."""
    out = np.zeros(image.shape, dtype=np.uint8)

    def consume(z0, z1, probs):
        out[..., z0:z1] = probs.argmax(0).astype(np.uint8)

    info = sliding_window(net, image, window_size(stage, plan, image.shape), n_classes, consume,
                          plan.inference.get("overlap", 0.25), plan.inference.get("gaussian_sigma_scale", 0.125),
                          pad_value(plan.normalization), device, plan.inference.get("tta_axes", [0]) if tta else (),
                          z_coord=stage.z_coord, transform=transform)
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


# --------------------------------------------------------------------------- whole volumes


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
        ct_hu: CT in HU, (x, y, z) RAS+ (as :func:`lib.io.load_ct` returns it).
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
    norm = None  # the normalised CT (float32, input grid): made when a stage needs it whole
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
        roi_shape = tuple(b.stop - b.start for b in box)
        shape_t = resampled_shape(roi_shape, spacing, st.spacing_mm)
        net, n_cls = m.nets[st.name], st.n_classes(plan)
        if st is last and st.task == "labels":  # single: memory-bounded argmax on the stage grid
            if tuple(shape_t) == roi_shape and min(np.subtract(roi_shape, window_size(st, plan, roi_shape))) >= 0:
                # the windows read the CT itself and normalise each window: no float32 copy of the volume
                img, transform = ct[box], partial(normalize_ct, normalization=plan.normalization)
            elif tuple(shape_t) != roi_shape:  # normalised slab by slab on the way to the stage grid
                img, transform = resample_image(ct[box], shape_t, transform=partial(
                    normalize_ct, normalization=plan.normalization)), None
            else:  # smaller than a window: padded, so normalised whole (a small image)
                img, transform = normalize_ct(ct[box], plan.normalization), None
            norm = None  # no later stage reads it: the input-grid float copy goes before the windows run
            cls, _ = predict_stage_argmax(net, img, st, plan, n_cls, m.device, tta, transform)
            del img
            sub = plan.class_to_label()[cls]
            del cls
            lab[box] = resample_labels(sub, roi_shape) if sub.shape != roi_shape else sub
            break
        if norm is None:
            norm = normalize_ct(ct, plan.normalization)
        roi = norm[box]
        img = resample_image(roi, shape_t) if tuple(shape_t) != roi_shape else roi
        del roi
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
        bb = spine_bbox(fg_t)
        if bb is not None:  # stage voxels -> input-grid voxels (edges aligned)
            scale = np.asarray(roi_shape) / np.asarray(shape_t)
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

    Raises:
        lib.io.IntegrityError: the image holds NaN/inf voxels (file and count named).
    """
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        return out_path
    vol = load_ct(image_path)  # int16 HU (float32 when the file's values are not int16)
    faults = image_faults(vol, image_path)  # NaN/inf would give an empty mask "successfully"
    if faults:
        raise IntegrityError(faults)
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
    if job.num_threads:
        torch.set_num_threads(int(job.num_threads))
    return str(predict_case(job.model_dir, job.image_path, job.out_path, tta=job.tta, overwrite=job.overwrite,
                            device=job.device))


def predict_cases(model_dir: str | Path, items: Iterable[Sequence[str]], *, workers: int | None = 0,
                  scheduler: str | None = None, tta: bool = False, overwrite: bool = False, device: str = "auto",
                  num_threads: int | None = None, on_error: str = "collect", progress: bool = True):
    """Predict many cases through :func:`lib.core.parallel.map_cases`.

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
        ``lib.core.parallel.MapResult``: ``values`` {case_id: output path}, ``failures``.
    """
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
    """``(case_id, truth mask, pred_dir/<case_id>.nii.gz)`` for :func:`lib.evaluation.folders.evaluate_pairs`
    from ``(case_id, image, mask)`` cases."""
    return [(str(c[0]), str(c[2]), str(Path(pred_dir) / f"{c[0]}.nii.gz")) for c in cases]


# --------------------------------------------------------------------------- figures
