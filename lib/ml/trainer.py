"""Training: preprocessing cache, patch sampling with augmentation, the loop, checkpoints, DDP.

Typical use (a notebook or a later stage)::

    from lib.ml import planning, trainer
    plan = planning.plan_experiment(cases, "synthetic")           # or model.load_plan(prev_dir)
    res = trainer.train(cases, out_dir, plan, max_epochs=40, time_budget_s=200, seed=0)
    res.model_dir            # model.pt + plan.json, read by lib.ml.inference
    trainer.train(new_cases, out_dir2, init_from=res.model_dir, max_epochs=6)   # fine-tune

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
   ``train_log.csv`` (one row per stage and epoch),
   ``train_result.json``; per stage ``stage_<name>/checkpoint.pt`` and ``final.pt``.

Determinism: on CPU, ``torch.use_deterministic_algorithms(True)`` and fixed seeds make the
same call give the same weights bit for bit, and a run killed at any point and resumed gives
the weights of the uninterrupted run (time budgets are the exception: where a run stops then
depends on the clock). Multi-GPU: launch ``torchrun --nproc_per_node N -m lib.ml.ddp --job
job.json``; each process takes every N-th item of every batch (so the global batch is the
same for any N), gradients are averaged by DDP (gloo on CPU, NCCL on GPUs), rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lib.io.atomic import write_text
from lib.ml import losses as _losses
from lib.ml.cache import build_caches, open_cache
from lib.ml.checkpoint import (
    config_hash,
    init_state,
    load_torch,
    load_weights,
    save_torch,
    write_log,
)
from lib.ml.device import dist_info, resolve_device
from lib.ml.losses import deep_loss, dice_scores, make_loss, predicted_classes, target_classes
from lib.ml.networks import build_network
from lib.ml.planning import plan_experiment
from lib.ml.plans import Plan, StagePlan, plan_to_dict, save_plan
from lib.ml.sampling import EpochBatches, PatchSampler


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        model_dir: folder with ``model.pt`` and ``plan.json`` (pass it to lib.ml.inference / init_from).
        model_path: ``model_dir / "model.pt"``.
        plan_path: ``model_dir / "plan.json"``.
        log_csv: per-epoch log (stage, epoch, lr, loss, Dice, seconds); plot it with
            :func:`lib.viz.charts.plot_training_curves`.
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
    seconds: float
    epochs: dict[str, int] = field(default_factory=dict)
    final_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    stopped_by: dict[str, str] = field(default_factory=dict)
    resumed_from: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


@dataclass
class _Run:
    """One :func:`train` call's resolved configuration, read by every step.

    The fields are :func:`train`'s arguments with their defaults filled in (``tr`` is
    ``plan.training``, ``iters`` the steps per epoch, ``lr0`` the initial learning rate, ``aug``
    the augmentation, empty for none; ``init_weights`` those of ``init_from``, per stage), plus
    the DDP ``rank`` / ``world``, the device and ``chash``, the configuration's hash: checkpoints
    of another hash are discarded. ``time_budget_s`` is in seconds.
    """

    out_dir: Path
    cases: list[tuple[str, ...]]
    val_cases: list[tuple[str, ...]]
    plan: Plan
    tr: dict[str, Any]
    max_epochs: int
    iters: int
    lr0: float
    aug: dict[str, Any]
    stage_names: list[str]
    seed: int
    init_from: str | Path | None
    init_weights: dict[str, dict[str, Any]]
    time_budget_s: float | None
    resume: bool
    cache_root: Path
    workers: int | None
    progress: bool
    rank: int
    world: int
    dev: torch.device
    chash: str = ""

    @property
    def ddp(self) -> bool:
        """Several processes train together (DDP)."""
        return self.world > 1

    @property
    def deterministic(self) -> bool:
        """CPU runs use deterministic algorithms (bit-identical weights)."""
        return self.dev.type == "cpu"


@dataclass
class _Totals:
    """What the finished stages produced (``weights``, ``epochs``, ``stopped``, ``resumed``,
    ``seconds`` as in :class:`TrainResult`; ``rows``: their log rows), the time budget left for
    the others (s, or None) and the caches built (per stage ``(folder, case metadata)`` of the
    training / validation cases)."""

    budget_left: float | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)
    epochs: dict[str, int] = field(default_factory=dict)
    stopped: dict[str, str] = field(default_factory=dict)
    resumed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    caches: dict[str, tuple[Path, list[dict[str, Any]]]] = field(default_factory=dict)
    vcaches: dict[str, tuple[Path, list[dict[str, Any]]]] = field(default_factory=dict)

    def add_stage(self, name: str, state: dict[str, Any], rows: list[dict[str, Any]], epoch: int,
                  stopped_by: str, elapsed_s: float) -> None:
        """Record a finished stage (``elapsed_s`` in seconds also leaves the time budget)."""
        self.weights[name] = state
        self.rows.extend(rows)
        self.epochs[name] = epoch
        self.stopped[name] = stopped_by
        self.seconds += elapsed_s
        if self.budget_left is not None:
            self.budget_left -= elapsed_s


@dataclass
class _Stage:
    """One stage of the run: its position (seeds the network and the patches), name, plan,
    ``stage_<name>/final.pt`` and ``checkpoint.pt``, epochs and time budget (s, or None)."""

    index: int
    name: str
    plan: StagePlan
    final_path: Path
    ckpt_path: Path
    epochs: int
    budget: float | None


@dataclass
class _Fit:
    """A stage's network (``net``: its ``state_dict`` is what is saved; ``model``: ``net`` or
    its DDP wrapper, what the forward pass calls), optimiser and AMP scaler (off unless CUDA)."""

    net: torch.nn.Module
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_amp: bool


@dataclass
class _Data:
    """A stage's training patches, fixed validation patches (or None), loss, and the number of
    classes its Dice scores count."""

    sampler: PatchSampler
    vsampler: PatchSampler | None
    loss_fn: Any
    n_classes: int


@dataclass
class _Progress:
    """Where a stage's epoch loop stands: epochs done, their log rows, training seconds (summed
    over sessions) and seconds per epoch (rounded for those of earlier sessions)."""

    epoch: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    epoch_times: list[float] = field(default_factory=list)


def _poly_lr(lr0: float, progress: float, exponent: float) -> float:
    return lr0 * max(1.0 - min(progress, 1.0), 0.0) ** exponent


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
        plan: from :func:`lib.ml.planning.plan_experiment`; default: the plan of ``init_from``, else a
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
        workers: processes for preprocessing (``lib.core.parallel``); 0 = this process.
        num_threads: ``torch.set_num_threads`` for this run (CPU); None leaves it.
        stages: train only these stages (default all); with ``init_from`` the other stages keep
            their weights, so ``model.pt`` stays complete (e.g. fine-tune only ``["coarse"]``).
        progress: show progress bars.

    Returns:
        :class:`TrainResult`. A finished run called again with the same arguments returns the
        stored result without training.
    """
    t_call = time.perf_counter()
    run = _resolve_run(cases, out_dir, plan, val_cases=val_cases, max_epochs=max_epochs,
                       iterations_per_epoch=iterations_per_epoch, time_budget_s=time_budget_s, seed=seed,
                       init_from=init_from, augment=augment, lr=lr, device=device, resume=resume,
                       cache_dir=cache_dir, workers=workers, num_threads=num_threads, stages=stages,
                       progress=progress)
    _prepare_torch(run)
    run.chash = config_hash(_config(run))
    try:  # deterministic mode is switched off again however train() returns
        stored = _stored_result(run)
        if stored is not None:
            return stored
        if run.rank == 0:
            save_plan(run.plan, run.out_dir / "plan.json")
        totals = _Totals(budget_left=time_budget_s)
        for si, sname in enumerate(run.stage_names):
            _train_stage(run, totals, si, sname)
        return _write_outputs(run, totals, t_call)
    finally:
        if run.deterministic:
            torch.use_deterministic_algorithms(False)


def _resolve_run(cases: Sequence[Sequence[str]], out_dir: str | Path, plan: Plan | None, *,
                 val_cases: Sequence[Sequence[str]] | None, max_epochs: int | None,
                 iterations_per_epoch: int | None, time_budget_s: float | None, seed: int,
                 init_from: str | Path | None, augment: dict[str, Any] | bool | None, lr: float | None,
                 device: str, resume: bool, cache_dir: str | Path | None, workers: int | None,
                 num_threads: int | None, stages: Sequence[str] | None, progress: bool) -> _Run:
    """:func:`train`'s arguments resolved: the plan, the defaults it gives, the stages, the device.

    Raises:
        ValueError: no training cases.
        KeyError: a stage of ``stages`` is not in the plan.
    """
    rank, world, local_rank = dist_info()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = [tuple(str(x) for x in c) for c in cases]
    val_cases = [tuple(str(x) for x in c) for c in (val_cases or [])]
    if not cases:
        raise ValueError("train: no training cases")
    init_plan, init_weights = None, {}
    if init_from is not None:
        init_plan, init_weights = load_weights(init_from)
    if plan is None:
        plan = init_plan if init_plan is not None else plan_experiment(cases, "synthetic", workers=workers)
    tr = dict(plan.training)
    aug: dict[str, Any] = {} if augment is False else {**plan.augmentation, **(augment or {})}
    stage_names = [s.name for s in plan.stages] if stages is None else list(stages)
    for s in stage_names:
        plan.stage(s)
    dev = resolve_device(device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
    if num_threads:
        torch.set_num_threads(int(num_threads))
    return _Run(out_dir=out_dir, cases=cases, val_cases=val_cases, plan=plan, tr=tr,
                max_epochs=int(max_epochs or tr["max_epochs"]),
                iters=int(iterations_per_epoch or tr["iterations_per_epoch"]), lr0=float(lr or tr["lr"]),
                aug=aug, stage_names=stage_names, seed=seed, init_from=init_from, init_weights=init_weights,
                time_budget_s=time_budget_s, resume=resume,
                cache_root=Path(cache_dir) if cache_dir else out_dir / "cache", workers=workers,
                progress=progress, rank=rank, world=world, dev=dev)


def _prepare_torch(run: _Run) -> None:
    """Deterministic algorithms on CPU, cuDNN autotuning on CUDA; the process group under torchrun."""
    if run.deterministic:
        torch.use_deterministic_algorithms(True)
    elif run.dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if run.ddp and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if run.dev.type == "cuda" else "gloo")


def _config(run: _Run) -> dict[str, Any]:
    """Everything the weights depend on (its hash tells a checkpoint of this run from another's)."""
    return {"cases": run.cases, "val": run.val_cases, "plan": plan_to_dict(run.plan), "epochs": run.max_epochs,
            "iters": run.iters, "lr": run.lr0, "seed": run.seed, "aug": run.aug,
            "init": str(run.init_from) if run.init_from else None, "budget": run.time_budget_s,
            "stages": run.stage_names, "world": run.world}


def _stored_result(run: _Run) -> TrainResult | None:
    """The result of a finished run of the same configuration in ``out_dir`` (with ``resume``), else None."""
    result_path = run.out_dir / "train_result.json"
    if run.resume and result_path.exists() and (run.out_dir / "model.pt").exists():
        with contextlib.suppress(ValueError, KeyError, OSError):
            stored = json.loads(result_path.read_text())
            if stored.get("config_hash") == run.chash:
                return _result_from_json(stored["result"])
    return None


def _train_stage(run: _Run, totals: _Totals, si: int, sname: str) -> None:
    """Train stage ``sname`` (or take it from an earlier session) and add it to ``totals``."""
    stage = _stage(run, totals, si, sname)
    if not run.resume:
        _discard_stage_files(run, stage)
    if run.resume and _restore_finished_stage(run, totals, stage):
        return
    _ensure_caches(run, totals, si)
    sampler, vsampler = _samplers(run, totals, stage)
    fit = _build_fit(run, stage)
    prog = _restore_checkpoint(run, stage, fit)
    totals.resumed[sname] = prog.epoch
    st = stage.plan
    n_classes = 1 + len(run.plan.level_ladder()) if st.task == "levels" else st.n_classes(run.plan)
    data = _Data(sampler, vsampler, make_loss("soft" if st.soft_targets else st.task), n_classes)
    stop_reason = _run_epochs(run, totals, stage, fit, data, prog)
    _finish_stage(run, totals, stage, fit.net, prog, stop_reason)


def _stage(run: _Run, totals: _Totals, si: int, sname: str) -> _Stage:
    """Stage ``sname``'s folder (created), files, epochs and share of the time budget left."""
    st = run.plan.stage(sname)
    sdir = run.out_dir / f"stage_{sname}"
    sdir.mkdir(exist_ok=True)
    n_stages = len(run.stage_names)
    epochs = max(1, int(round(run.max_epochs * st.budget_share))) if n_stages > 1 else run.max_epochs
    budget = None
    if totals.budget_left is not None:
        shares = [run.plan.stage(s).budget_share for s in run.stage_names]
        budget = totals.budget_left * st.budget_share / max(sum(shares[si:]), 1e-9)
    return _Stage(si, sname, st, sdir / "final.pt", sdir / "checkpoint.pt", epochs, budget)


def _discard_stage_files(run: _Run, stage: _Stage) -> None:
    """``resume=False``: rank 0 deletes the stage's final weights and checkpoint."""
    for p in (stage.final_path, stage.ckpt_path):
        if run.rank == 0 and p.exists():
            p.unlink()


def _restore_finished_stage(run: _Run, totals: _Totals, stage: _Stage) -> bool:
    """Take a stage finished by an earlier session of this configuration from its ``final.pt``.

    Returns:
        Whether the stage was finished (and added to ``totals``).
    """
    if not stage.final_path.exists():
        return False
    blob = load_torch(stage.final_path)
    if blob.get("config_hash") != run.chash:
        return False
    totals.add_stage(stage.name, blob["model"], blob["rows"], blob["epoch"], blob["stopped_by"], blob["elapsed_s"])
    totals.resumed[stage.name] = blob["epoch"]
    return True


def _ensure_caches(run: _Run, totals: _Totals, si: int) -> None:
    """Cache every remaining stage in one pass over the cases, unless this stage's cache is built.

    Rank 0 preprocesses (with ``workers``); the other ranks wait for it and then only read the
    cache's metadata.
    """
    if run.stage_names[si] in totals.caches:
        return
    todo = run.stage_names[si:]
    if run.rank == 0:
        totals.caches.update(build_caches(run.cases, run.plan, todo, run.cache_root, run.workers, run.progress))
        if run.val_cases:
            totals.vcaches.update(build_caches(run.val_cases, run.plan, todo, run.cache_root, run.workers,
                                               run.progress))
    if run.ddp:
        torch.distributed.barrier()
    if run.rank != 0:
        totals.caches.update(build_caches(run.cases, run.plan, todo, run.cache_root, 0, False))
        if run.val_cases:
            totals.vcaches.update(build_caches(run.val_cases, run.plan, todo, run.cache_root, 0, False))


def _samplers(run: _Run, totals: _Totals, stage: _Stage) -> tuple[PatchSampler, PatchSampler | None]:
    """Training patches (augmented) and validation patches (fixed, another seed; None without val cases)."""
    folder, metas = totals.caches[stage.name]
    vfolder, vmetas = totals.vcaches.get(stage.name, (None, []))
    sampler = PatchSampler(open_cache(folder, metas), stage.plan, run.plan, run.aug, run.seed, stage.index)
    vsampler = None
    if vmetas:
        vsampler = PatchSampler(open_cache(vfolder, vmetas), stage.plan, run.plan, None, run.seed + 7919, stage.index)
    return sampler, vsampler


def _build_fit(run: _Run, stage: _Stage) -> _Fit:
    """The stage's network (seeded by seed and stage; ``init_from`` weights where they fit) on the
    device, its DDP wrapper, optimiser and gradient scaler."""
    torch.manual_seed(int(run.seed) * 1000 + stage.index)
    net = build_network(run.plan, stage.plan)
    if run.init_from is not None and stage.name in run.init_weights:
        init_state(net, run.init_weights[stage.name], str(run.init_from))
    net.to(run.dev)
    model = net
    if run.ddp:
        model = DistributedDataParallel(net, device_ids=[run.dev.index] if run.dev.type == "cuda" else None)
    opt = _make_optimizer(net, run.tr, run.lr0)
    use_amp = bool(run.tr.get("amp", True)) and run.dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    return _Fit(net, model, opt, scaler, use_amp)


def _restore_checkpoint(run: _Run, stage: _Stage, fit: _Fit) -> _Progress:
    """Continue from the stage's checkpoint of this configuration (weights, optimiser, scaler, RNG
    states, log rows); a fresh start without one."""
    prog = _Progress()
    if run.resume and stage.ckpt_path.exists():
        ck = load_torch(stage.ckpt_path)
        if ck.get("config_hash") == run.chash:
            fit.net.load_state_dict(ck["model"])
            fit.opt.load_state_dict(ck["optimizer"])
            fit.scaler.load_state_dict(ck["scaler"])
            prog = _Progress(int(ck["epoch"]), list(ck["rows"]), float(ck["elapsed_s"]))
            torch.set_rng_state(ck["rng"]["torch"])
            np.random.set_state(ck["rng"]["numpy"])
            random.setstate(ck["rng"]["python"])
        elif run.rank == 0:
            print(f"{stage.ckpt_path}: checkpoint of another configuration, starting {stage.name} over")
    prog.epoch_times = [r["epoch_s"] for r in prog.rows]
    return prog


def _run_epochs(run: _Run, totals: _Totals, stage: _Stage, fit: _Fit, data: _Data, prog: _Progress) -> str:
    """The stage's epoch loop, a checkpoint after every epoch.

    Returns:
        Why it stopped: ``"epochs"``, or ``"time"`` when the next epoch (the mean of the last
        three) would overrun the stage's budget.
    """
    bar = tqdm(total=stage.epochs, initial=prog.epoch, desc=f"train {stage.name}",
               disable=not run.progress or run.rank != 0, leave=False)
    stop_reason = "epochs"
    while prog.epoch < stage.epochs:
        if stage.budget is not None and prog.epoch_times \
                and prog.elapsed + float(np.mean(prog.epoch_times[-3:])) > stage.budget:
            stop_reason = "time"
            break
        row = _run_epoch(run, stage, fit, data, prog)
        if run.rank == 0:
            _write_checkpoint(run, totals, stage, fit, prog)
        if run.ddp:
            torch.distributed.barrier()
        bar.update()
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", dice=f"{row['train_dice_mean']:.2f}")
    bar.close()
    return stop_reason


def _run_epoch(run: _Run, stage: _Stage, fit: _Fit, data: _Data, prog: _Progress) -> dict[str, Any]:
    """Train one epoch (poly learning rate), validate, time it; its log row (train loss averaged
    over ranks) is appended to ``prog`` and returned."""
    t0, c0 = time.perf_counter(), time.process_time()
    progress_frac = prog.epoch / stage.epochs
    if stage.budget is not None:
        progress_frac = max(progress_frac, prog.elapsed / stage.budget)
    cur_lr = _poly_lr(run.lr0, progress_frac, float(run.tr.get("poly_exponent", 0.9)))
    for g in fit.opt.param_groups:
        g["lr"] = cur_lr
    fit.model.train()
    losses, dfg, dmean = _train_batches(run, stage.plan, fit, data, prog.epoch)
    mean_loss = float(np.mean(losses))
    if run.ddp:
        tl = torch.tensor([mean_loss], dtype=torch.float64)
        torch.distributed.all_reduce(tl)
        mean_loss = float(tl.item()) / run.world
    row = {"stage": stage.name, "epoch": prog.epoch + 1, "lr": cur_lr, "train_loss": mean_loss,
           "train_dice_fg": float(np.mean(dfg)), "train_dice_mean": float(np.mean(dmean))}
    if data.vsampler is not None:
        row.update(_validate(fit.net, data.vsampler, data.loss_fn, data.n_classes, int(run.tr.get("val_patches", 4)),
                             run.dev, fit.use_amp, stage.plan.task, stage.plan.soft_targets))
    epoch_s = time.perf_counter() - t0
    prog.elapsed += epoch_s
    prog.epoch_times.append(epoch_s)
    row.update({"epoch_s": round(epoch_s, 3), "cpu_s": round(time.process_time() - c0, 3),
                "elapsed_s": round(prog.elapsed, 3)})
    prog.rows.append(row)
    prog.epoch += 1
    return row


def _train_batches(run: _Run, st: StagePlan, fit: _Fit, data: _Data,
                   epoch: int) -> tuple[list[float], list[float], list[float]]:
    """The optimiser steps of one epoch on this rank's share of every batch.

    Returns:
        ``(loss per step, foreground Dice, mean Dice)``, the Dice scores of every 5th and the last step.
    """
    losses, dfg, dmean = [], [], []
    batches = _iterate_batches(data.sampler, epoch, run.iters, run.rank, run.world,
                               int(run.tr.get("num_workers", 0)), run.dev)
    for it, (x_np, y_np) in enumerate(batches):
        out, loss, norm = _train_step(run, st, fit, data.loss_fn, x_np, y_np)
        if not (math.isfinite(value := float(loss.detach())) and math.isfinite(norm)):  # no step was taken
            bad = int((~np.isfinite(x_np)).sum())  # a NaN input gives a NaN loss
            what = f"{bad} non-finite input voxels" if bad else f"gradient norm {norm}" if math.isfinite(value) else f"loss {value}"
            raise _losses.NonFiniteError(st.name, epoch, it, data.sampler.batch_case_ids(epoch, it, run.rank, run.world), what)
        losses.append(value)
        if it == run.iters - 1 or it % 5 == 0:
            head = out[:, 0] if out.dim() == 6 else out
            f, m = dice_scores(predicted_classes(head.detach().float().cpu().numpy(), st.task, y_np[:, 0]),
                               target_classes(y_np[:, 0], "soft" if st.soft_targets else st.task),
                               data.n_classes)
            dfg.append(f)
            dmean.append(m)
    return losses, dfg, dmean


NonFiniteError = _losses.NonFiniteError  # also lib.ml.trainer.NonFiniteError


def _train_step(run: _Run, st: StagePlan, fit: _Fit, loss_fn: Any, x_np: np.ndarray,
                y_np: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimiser step (AMP on CUDA, deep supervision, gradient clipping); ``(output, loss, gradient
    norm)`` (norm 0 when not computed or with AMP, whose scaler skips non-finite gradients itself);
    none with a non-finite loss or norm (the caller raises :class:`lib.ml.losses.NonFiniteError`)."""
    x = torch.as_tensor(x_np).to(run.dev, non_blocking=True)
    y = torch.as_tensor(y_np).to(run.dev, non_blocking=True)
    fit.opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=run.dev.type, dtype=torch.float16, enabled=fit.use_amp):
        out = fit.model(x)
        loss = deep_loss(loss_fn, out, y, st.deep_supervision)
    if not torch.isfinite(loss.detach()).all():
        return out, loss, 0.0
    fit.scaler.scale(loss).backward()
    fit.scaler.unscale_(fit.opt)
    norm = torch.nn.utils.clip_grad_norm_(fit.net.parameters(), float(run.tr.get("grad_clip", 12.0)))
    if math.isfinite(norm := 0.0 if fit.use_amp else float(norm)):  # else the caller raises, no step
        fit.scaler.step(fit.opt)
        fit.scaler.update()
    return out, loss, norm


def _write_checkpoint(run: _Run, totals: _Totals, stage: _Stage, fit: _Fit, prog: _Progress) -> None:
    """Write the stage's checkpoint (atomic) and the log so far (rank 0 calls it)."""
    save_torch({"config_hash": run.chash, "stage": stage.name, "epoch": prog.epoch, "model": fit.net.state_dict(),
                "optimizer": fit.opt.state_dict(), "scaler": fit.scaler.state_dict(), "rows": prog.rows,
                "elapsed_s": prog.elapsed,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate()}}, stage.ckpt_path)
    write_log(totals.rows + prog.rows, run.out_dir / "train_log.csv")


def _finish_stage(run: _Run, totals: _Totals, stage: _Stage, net: torch.nn.Module, prog: _Progress,
                  stop_reason: str) -> None:
    """Keep the stage's weights (CPU copies), write its ``final.pt`` (rank 0), add it to ``totals``."""
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if run.rank == 0:
        save_torch({"config_hash": run.chash, "model": state, "rows": prog.rows, "epoch": prog.epoch,
                    "stopped_by": stop_reason, "elapsed_s": prog.elapsed}, stage.final_path)
    totals.add_stage(stage.name, state, prog.rows, prog.epoch, stop_reason, prog.elapsed)


def _write_outputs(run: _Run, totals: _Totals, t_call: float) -> TrainResult:
    """Write ``model.pt``, ``train_log.csv`` and ``train_result.json`` (rank 0; all ranks wait)
    and return the run's :class:`TrainResult`; ``t_call`` is the call's start (``perf_counter``, s)."""
    out_dir = run.out_dir
    if run.init_from is not None:  # stages not trained here keep the weights they started from
        for name, state in run.init_weights.items():
            if name not in totals.weights and any(st.name == name for st in run.plan.stages):
                totals.weights[name] = state
    if run.rank == 0:
        save_torch({"plan": plan_to_dict(run.plan), "weights": totals.weights, "config_hash": run.chash},
                   out_dir / "model.pt")
        log_csv = write_log(totals.rows, out_dir / "train_log.csv")
    else:
        log_csv = out_dir / "train_log.csv"
    finals = {r["stage"]: {k: v for k, v in r.items() if k != "stage"} for r in totals.rows}
    result = TrainResult(out_dir, out_dir / "model.pt", out_dir / "plan.json", log_csv,
                         round(totals.seconds, 2), totals.epochs, finals, totals.stopped, totals.resumed)
    if run.rank == 0:
        write_text(out_dir / "train_result.json",
                   json.dumps({"config_hash": run.chash, "result": result.to_json(),
                               "call_seconds": round(time.perf_counter() - t_call, 2)}, indent=2) + "\n")
    if run.ddp:
        torch.distributed.barrier()
    return result


def _result_from_json(d: dict[str, Any]) -> TrainResult:
    return TrainResult(Path(d["model_dir"]), Path(d["model_path"]), Path(d["plan_path"]), Path(d["log_csv"]),
                       float(d["seconds"]), dict(d["epochs"]), dict(d["final_metrics"]),
                       dict(d["stopped_by"]), dict(d.get("resumed_from", {})))


def _make_optimizer(net, tr: dict[str, Any], lr0: float):
    if tr.get("optimizer", "sgd") == "sgd":
        return torch.optim.SGD(net.parameters(), lr=lr0, momentum=float(tr.get("momentum", 0.99)),
                               weight_decay=float(tr.get("weight_decay", 3e-5)), nesterov=True)
    return torch.optim.AdamW(net.parameters(), lr=lr0, weight_decay=float(tr.get("weight_decay", 1e-4)))


def _iterate_batches(sampler: PatchSampler, epoch: int, iters: int, rank: int, world: int, num_workers: int, dev):
    if num_workers <= 0:
        for it in range(iters):
            yield sampler.batch(epoch, it, rank, world)
        return
    loader = DataLoader(EpochBatches(sampler, epoch, iters, rank, world), batch_size=None, shuffle=False,
                        num_workers=num_workers, pin_memory=dev.type == "cuda")
    yield from loader


def _validate(net, vsampler: PatchSampler, loss_fn, n_classes: int, n_patches: int, dev, use_amp: bool,
              task: str = "labels", soft: bool = False) -> dict[str, float]:
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
