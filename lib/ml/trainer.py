"""Training: preprocessing cache, patch sampling with augmentation, the loop, checkpoints, DDP.

Typical use (a notebook or a later stage)::

    from lib.ml import planning, trainer
    plan = planning.plan_experiment(cases, "synthetic")           # or model.load_plan(prev_dir)
    res = trainer.train(cases, out_dir, plan, max_epochs=40, time_budget_s=200, seed=0)
    res.model_dir            # model.pt + plan.json, read by lib.infer
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
depends on the clock). Multi-GPU: launch ``torchrun --nproc_per_node N -m lib.train --job
job.json``; each process takes every N-th item of every batch (so the global batch is the
same for any N), gradients are averaged by DDP (gloo on CPU, NCCL on GPUs), rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
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
from lib.ml.plans import Plan, plan_to_dict, save_plan
from lib.ml.sampling import EpochBatches, PatchSampler


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        model_dir: folder with ``model.pt`` and ``plan.json`` (pass it to lib.infer / init_from).
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

    t_call = time.perf_counter()
    rank, world, local_rank = dist_info()
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
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    config = {"cases": cases, "val": val_cases, "plan": plan_to_dict(plan), "epochs": max_epochs, "iters": iters,
              "lr": lr0, "seed": seed, "aug": aug, "init": str(init_from) if init_from else None,
              "budget": time_budget_s, "stages": stage_names, "world": world}
    chash = config_hash(config)
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
                blob = load_torch(final_path)
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
                init_state(net, init_weights[sname], str(init_from))
            net.to(dev)
            model = net
            if ddp:
                model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
            opt = _make_optimizer(net, tr, lr0)
            use_amp = bool(tr.get("amp", True)) and dev.type == "cuda"
            scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
            start_epoch, rows, elapsed = 0, [], 0.0
            if resume and ckpt_path.exists():
                ck = load_torch(ckpt_path)
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
            loss_fn = make_loss("soft" if st.soft_targets else st.task)
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
                        loss = deep_loss(loss_fn, out, y, st.deep_supervision)
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
                    save_torch({"config_hash": chash, "stage": sname, "epoch": epoch, "model": net.state_dict(),
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
                save_torch({"config_hash": chash, "model": state, "rows": rows, "epoch": epoch,
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
            save_torch({"plan": plan_to_dict(plan), "weights": weights, "config_hash": chash}, out_dir / "model.pt")
            log_csv = write_log(all_rows, out_dir / "train_log.csv")
        else:
            log_csv = out_dir / "train_log.csv"
        finals = {}
        for r in all_rows:
            finals[r["stage"]] = {k: v for k, v in r.items() if k != "stage"}
        result = TrainResult(model_dir, out_dir / "model.pt", out_dir / "plan.json", log_csv,
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
