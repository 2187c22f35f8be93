"""Plans: everything training and inference agree on (labels, normalisation, stages), as JSON.

A :class:`Plan` is derived by :mod:`lib.ml.planning` and saved beside every trained model; inference reads it back.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lib.core.labels import level_index, ordered
from lib.io.atomic import write_text

PLAN_VERSION = 2  # 2: "levels" stages count Plan.level_ladder() (T13 off the ladder)


PROFILE_KINDS = ("synthetic", "paper")


TASKS = ("labels", "levels", "foreground")


COMBINES = ("single", "label_transfer")


@dataclass
class StagePlan:
    """One network of a plan.

    Attributes:
        name: ``"3d_fullres"``, ``"locate"``, ``"coarse"`` or ``"fine"``.
        task: ``"labels"`` (softmax over background + every vertebra label of the plan),
            ``"levels"`` (ordinal logits "caudal to label k", k = 1..K-1, for the K craniocaudally
            ordered labels, CORAL-style: the level is 1 + the expected number of thresholds
            passed, rounded; no spine output: foreground stages say where the spine is) or
            ``"foreground"`` (background / spine).
        spacing_mm: voxel size the network works at, RAS axis order (mm).
        patch_size: training patch and sliding-window size in voxels ``(x, y, z)``.
        batch_size: patches per optimiser step (over all DDP processes together).
        kernels: per resolution level, the kernel size per axis.
        strides: per resolution level, the stride per axis (first entry is the input block, 1).
        filters: feature channels per resolution level.
        deep_supervision: extra supervised decoder outputs (0 = off).
        res_block: residual convolution blocks.
        foreground_oversample: fraction of patches centred on a labelled voxel (nnU-Net: 1/3).
        whole_volume: the patch is meant to cover the stage's whole region (the field of view,
            or the region of interest): training centres the patch on that region.
        roi_from: name of an earlier stage whose predicted spine (bounding box + ``roi_margin_mm``)
            limits this stage at inference; in training the labelled bounding box, jittered by
            ``roi_jitter_mm``, plays that part and everything outside it is blanked. None = the
            whole field of view.
        roi_margin_mm: margin added around the region of interest on every side (mm).
        roi_jitter_mm: training-time random change of each side of the region (mm), so the
            network tolerates an imprecise localisation.
        budget_share: fraction of the training budget (epochs and time) this stage gets.
        soft_targets: ``foreground`` stages only: train on the spine fraction of each voxel
            (partial volume) instead of the majority label; for the stage whose probability
            becomes the final spine mask on a finer grid (see :data:`lib.ml.preprocessing.SOFT_MAX`).
        z_coord: a second input channel holds the craniocaudal position within the region the
            stage sees (-1 at its inferior end, +1 at its superior end): a region cue that lets a
            small network tell levels apart long before it has learned to count them.
    """

    name: str
    task: str
    spacing_mm: list[float]
    patch_size: list[int]
    batch_size: int
    kernels: list[list[int]]
    strides: list[list[int]]
    filters: list[int]
    deep_supervision: int = 2
    res_block: bool = False
    foreground_oversample: float = 0.33
    whole_volume: bool = False
    roi_from: str | None = None
    roi_margin_mm: float = 20.0
    roi_jitter_mm: float = 0.0
    budget_share: float = 1.0
    soft_targets: bool = False
    z_coord: bool = False

    @property
    def in_channels(self) -> int:
        """Network input channels: CT, plus the z coordinate when ``z_coord``."""
        return 1 + int(self.z_coord)

    def n_classes(self, plan: Plan) -> int:
        """Output channels: 2 for ``foreground``; 1 + number of plan labels for ``labels``;
        rungs of :meth:`Plan.level_ladder` - 1 (ordinal thresholds) for ``levels``."""
        if self.task == "foreground":
            return 2
        return 1 + len(plan.labels) if self.task == "labels" else max(len(plan.level_ladder()) - 1, 1)


@dataclass
class Plan:
    """Everything training and inference agree on (JSON-serialisable via :func:`plan_to_dict`).

    Attributes:
        profile_kind: ``"synthetic"`` or ``"paper"``.
        labels: label values predicted; output channel ``i`` (``i >= 1``) is ``labels[i - 1]``.
        label_map: mask value -> training value applied when a mask is read (e.g.
            ``{28: 0}`` to ignore VerSe's T13); values not in ``labels`` after mapping are an error.
        normalization: CT normalisation: HU clipped to ``clip_hu`` then ``(x - mean) / std``
            (foreground statistics of the fingerprint, nnU-Net's CT scheme).
        stages: the networks, in training order.
        combine: ``"single"`` (one stage) or ``"label_transfer"`` (coarse labels + fine spine).
        training: optimiser and schedule (``optimizer``, ``lr``, ``momentum``, ``weight_decay``,
            ``poly_exponent``, ``max_epochs``, ``iterations_per_epoch``, ``amp``, ``num_workers``,
            ``val_patches``).
        augmentation: default augmentation (see :func:`lib.ml.planning.default_augmentation`).
        inference: sliding-window ``overlap``, ``gaussian_sigma_scale``, ``tta_axes`` (mirror axes
            for test-time augmentation: 0 = left-right only), ``postprocess``.
        fingerprint: the dataset fingerprint summary the plan came from (no per-case samples).
        version: plan format version.
    """

    profile_kind: str
    labels: list[int]
    normalization: dict[str, Any]
    stages: list[StagePlan]
    combine: str = "single"
    label_map: dict[int, int] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    augmentation: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def stage(self, name: str) -> StagePlan:
        """The stage called ``name``."""
        for st in self.stages:
            if st.name == name:
                return st
        raise KeyError(f"plan has no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def class_to_label(self) -> np.ndarray:
        """Lookup array: output channel index -> label value (uint8), channel 0 -> 0."""
        return np.array([0, *self.labels], dtype=np.uint8)

    def level_ladder(self) -> list[int]:
        """The labels a ``levels`` stage counts, craniocaudally: the plan's labels on whole
        levels (:func:`lib.core.labels.level_index`), i.e. without T13.

        A count from the top cannot name T13: in a normal spine L1 follows T12 one level down,
        in a T13 spine two. With T13 on the ladder, a normal spine's L1 had to jump two rungs
        and a small network, smoothing, called it T13 and shifted every vertebra below (the
        -1 dislocation seen on every abdominal scan). Off the ladder, T13 voxels are trained as
        their nearest neighbour's level and a T13 spine comes out like a normal one with one
        extra vertebra -- a variant the model misses, as nnU-Net misses it.
        """
        return [v for v in self.labels if float(level_index(v)).is_integer()]

    def level_to_label(self) -> np.ndarray:
        """Lookup array: ``levels`` class index (1 = the ladder's first rung) -> label value."""
        return np.array([0, *self.level_ladder()], dtype=np.uint8)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """JSON-ready dict of a plan (label_map keys become strings)."""
    d = asdict(plan)
    d["label_map"] = {str(k): int(v) for k, v in plan.label_map.items()}
    return d


def plan_from_dict(d: dict[str, Any]) -> Plan:
    """Inverse of :func:`plan_to_dict`; validates the fields.

    Raises:
        ValueError: unknown version, profile kind, task or combine mode.
    """
    d = copy.deepcopy(d)
    if int(d.get("version", 0)) != PLAN_VERSION:
        raise ValueError(f"plan version {d.get('version')} is not supported (expected {PLAN_VERSION})")
    stages = [StagePlan(**s) for s in d.pop("stages")]
    d["label_map"] = {int(k): int(v) for k, v in d.get("label_map", {}).items()}
    plan = Plan(stages=stages, **d)
    validate_plan(plan)
    return plan


def validate_plan(plan: Plan) -> None:
    """Check a plan's internal consistency.

    Raises:
        ValueError: naming the field at fault.
    """
    _check_labels_and_combine(plan)
    _check_stage_order(plan)
    _check_stage_shapes(plan)


def _check_labels_and_combine(plan: Plan) -> None:
    """Profile kind, combine mode, labels, and the stage tasks the combine mode needs."""
    if plan.profile_kind not in PROFILE_KINDS:
        raise ValueError(f"plan.profile_kind {plan.profile_kind!r} not in {PROFILE_KINDS}")
    if plan.combine not in COMBINES:
        raise ValueError(f"plan.combine {plan.combine!r} not in {COMBINES}")
    if not plan.labels or len(set(plan.labels)) != len(plan.labels) or min(plan.labels) < 1 or max(plan.labels) > 255:
        raise ValueError(f"plan.labels must be distinct values 1..255, got {plan.labels}")
    tasks = [s.task for s in plan.stages]
    if "levels" in tasks and list(plan.labels) != ordered(plan.labels):
        raise ValueError(f"a 'levels' stage needs plan.labels in craniocaudal order {ordered(plan.labels)}, got {plan.labels}")
    if plan.combine == "label_transfer":
        n_lab = tasks.count("labels") + tasks.count("levels")
        if n_lab != 1 or tasks[-1] != "foreground":
            raise ValueError(f"combine 'label_transfer' needs one labels/levels stage and a final foreground stage, got {tasks}")
    elif tasks[-1] != "labels" or tasks.count("labels") != 1:
        raise ValueError(f"combine 'single' needs one labels stage, the last one, got {tasks}")


def _check_stage_order(plan: Plan) -> None:
    """Distinct stage names; regions of interest and the inference gate from earlier, spine-output stages."""
    names = [s.name for s in plan.stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be distinct, got {names}")
    for i, st in enumerate(plan.stages):
        if st.roi_from is not None and st.roi_from not in names[:i]:
            raise ValueError(f"stage {st.name}: roi_from {st.roi_from!r} is not an earlier stage ({names[:i]})")
        if st.roi_from is not None and plan.stage(st.roi_from).task == "levels":
            raise ValueError(f"stage {st.name}: roi_from {st.roi_from!r} is a 'levels' stage, which has no spine output")
    gate = (plan.inference.get("gate") or {}).get("stage")
    if gate is not None and (gate not in names or plan.stage(gate).task != "foreground"):
        raise ValueError(f"plan.inference['gate']['stage'] = {gate!r} is not a foreground stage of the plan")


def _check_stage_shapes(plan: Plan) -> None:
    """Every stage's task, and network levels that match each other and divide the patch."""
    for st in plan.stages:
        if st.task not in TASKS:
            raise ValueError(f"stage {st.name}: task {st.task!r} not in {TASKS}")
        if len(st.strides) != len(st.kernels) or len(st.filters) != len(st.strides):
            raise ValueError(f"stage {st.name}: kernels/strides/filters lengths differ")
        div = divisibility(st.strides)
        bad = [p for p, d in zip(st.patch_size, div, strict=True) if p % d]
        if bad:
            raise ValueError(f"stage {st.name}: patch {st.patch_size} not divisible by {div}")


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write a plan as JSON (atomic)."""
    return write_text(path, json.dumps(plan_to_dict(plan), indent=2) + "\n")


def load_plan(path: str | Path) -> Plan:
    """Read a plan from ``plan.json`` or from a model folder containing one.

    Raises:
        FileNotFoundError: naming the path.
        ValueError: the file is not a valid plan (message names the file).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "plan.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no plan found")
    try:
        return plan_from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: not a valid plan ({exc})") from exc


def divisibility(strides: Sequence[Sequence[int]]) -> list[int]:
    """What each patch axis must be a multiple of for ``strides``."""
    return [int(np.prod([s[a] for s in strides])) for a in range(3)]
