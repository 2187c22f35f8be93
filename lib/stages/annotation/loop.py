"""The annotation loop: batches ordered by split, pre-annotate -> tiers -> accept -> fine-tune.

Batches of N cases ordered by split (trainset first, then the test splits, which are annotated --
their masks are the benchmark truth -- but never trained on): predict -> tiers -> accept into
``gt/`` -> fine-tune from the previous model on every accepted trainset case -> next batch.
Resumable: every random draw is seeded by (seed, case, round).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.cases import Case
from lib.core.paths import SPLITS
from lib.core.seeding import stable_seed
from lib.imaging.label_shift import variant_of
from lib.io import Volume, load_volume, save_like
from lib.io.integrity import verify_case
from lib.metrics.overlap import mean_vertebra_dice
from lib.stages.annotation.ledger import Ledger, now
from lib.stages.annotation.tiers import TIERS, SimulatedTiers

Predictor = Callable[[Path, Path, Path], None]       # (model_path, image_path, out_path)


Finetuner = Callable[[list[Case], Path, Path, int], Path]  # (cases, init_model, out_dir, round) -> model


TruthProvider = Callable[[Case, Volume], np.ndarray]  # truth on the image's canonical grid


@dataclass
class LoopConfig:
    """Parameters of :func:`run_rounds` (the notebook fills them from its params)."""

    batch_size: int
    seed: int = 0
    retrain: bool = True
    max_rounds: int | None = None


def plan_batches(cases: Sequence[Case], batch_size: int, seed: int) -> list[list[Case]]:
    """Batches ordered by split (trainset, test_public, test_private), seeded order within a
    split; a batch never mixes splits."""
    batches: list[list[Case]] = []
    for split in SPLITS + tuple(sorted({c.split for c in cases} - set(SPLITS))):
        group = sorted((c for c in cases if c.split == split), key=lambda c: c.case_id)
        if not group:
            continue
        order = np.random.default_rng(seed).permutation(len(group))
        group = [group[i] for i in order]
        batches.extend(group[i:i + batch_size] for i in range(0, len(group), batch_size))
    return batches


def run_rounds(ledger: Ledger, cases: Sequence[Case], cfg: LoopConfig, model_path: Path,
               predict: Predictor, finetune: Finetuner, truth_for: TruthProvider,
               annotators: SimulatedTiers, work_dir: Path, log=print,
               on_failure: Callable[[Case, Exception], None] | None = None) -> pd.DataFrame:
    """Run (or resume) every annotation round; returns the per-round table.

    Per round: pre-annotate the batch with the current model, run the tiers, accept the final
    masks into ``gt/``, then (for trainset batches, when ``cfg.retrain``) fine-tune from the
    current model on every accepted trainset case. Test batches are annotated, never trained on.

    Resuming: accepted cases are skipped; a finished round's model is reused; an interrupted
    fine-tune is re-entered (the trainer resumes from its checkpoint). Results equal an
    uninterrupted run's because every random draw is seeded by (seed, case, round).

    A case that raises (unreadable image, non-finite CT, a pre-annotation off the image's grid)
    goes to ``on_failure(case, error)`` and stays un-accepted (a re-run tries it again), while the
    round goes on with the others; without ``on_failure`` the error propagates.
    """
    work_dir = Path(work_dir)
    batches = plan_batches(cases, cfg.batch_size, cfg.seed)
    if cfg.max_rounds:
        batches = batches[: cfg.max_rounds]
    ledger.enqueue([c.case_id for c in cases], [c.split for c in cases])
    version, current = 0, Path(model_path)
    for r, batch in enumerate(batches, 1):
        row = ledger.round_row(r)
        if row and row["status"] == "done":
            version, current = row["next_model_version"], Path(row["next_model_path"])
            continue
        split = batch[0].split
        ledger.start_round(r, split, len(batch), version, str(current))
        todo = [c for c in batch if ledger.case_status(c.case_id) != "accepted"]
        log(f"round {r} ({split}, model v{version}): {len(batch) - len(todo)} already accepted, {len(todo)} to annotate")
        for case in todo:
            try:
                _annotate_case(ledger, case, r, version, current, predict, truth_for, annotators, work_dir)
            except Exception as exc:  # handed to on_failure (listed per case) when given
                if on_failure is None:
                    raise
                on_failure(case, exc)
        if split == "trainset" and cfg.retrain:
            train_cases = [c for c in cases if c.split == "trainset" and ledger.case_status(c.case_id) == "accepted"]
            new_path = finetune(train_cases, current, work_dir / "models" / f"round_{r:02d}", r)
            version, current = version + 1, Path(new_path)
        ledger.finish_round(r, version, str(current))
    return rounds_table(ledger)


def _annotate_case(ledger, case: Case, r, version, model_path, predict, truth_for, annotators, work_dir) -> None:
    pre_path = work_dir / "preannotations" / f"round_{r:02d}" / f"{case.case_id}_seg.nii.gz"
    verify_case(case.image)
    if not pre_path.exists():
        predict(model_path, case.image, pre_path)
    img = load_volume(case.image)
    pre = load_volume(pre_path).array.astype(np.uint8)
    if pre.shape != img.shape:
        raise ValueError(f"{pre_path}: pre-annotation shape {pre.shape} differs from image {img.shape} ({case.image})")
    truth = truth_for(case, img)
    voxel_ml = float(np.prod(img.spacing)) / 1000.0
    results = annotators.annotate(case.case_id, r, pre, truth, voxel_ml)
    final = results[-1].mask
    target = case.mask
    save_like(final, img, target, dtype=np.uint8)
    rows, prev, variant = [], pre, variant_of(final)
    for i, res in enumerate(results):
        t = now()
        rows.append(dict(case_id=case.case_id, round=r, tier=res.tier, actor=f"{res.tier}#{1 + (stable_seed(case.case_id) + i) % 3}",
                         started_at=t, finished_at=t, minutes=res.minutes, voxels_changed=res.voxels_changed,
                         ml_changed=res.ml_changed, vertebrae_relabelled=res.relabelled,
                         dice_before=mean_vertebra_dice(truth, prev), dice_after=mean_vertebra_dice(truth, res.mask),
                         hard_case=int(res.hard_case), variant=variant, sent_to_expert=int(res.sent_to_expert),
                         model_version=version, note=res.note))
        prev = res.mask
    ledger.record_case(case.case_id, r, rows, str(target), mean_vertebra_dice(final, pre))


def rounds_table(ledger: Ledger) -> pd.DataFrame:
    """One row per round: cases, model version, mean pre-annotation Dice (vs the accepted mask),
    voxels corrected, vertebrae relabelled, estimated minutes per tier and per case."""
    e, c, rd = ledger.entries(), ledger.cases(), ledger.rounds()
    if e.empty:
        return pd.DataFrame()
    per_case = e.groupby(["round", "case_id"]).agg(minutes=("minutes", "sum"), voxels=("voxels_changed", "sum"),
                                                   relabelled=("vertebrae_relabelled", "sum")).reset_index()
    tiers = e.pivot_table(index="round", columns="tier", values="minutes", aggfunc="sum", fill_value=0.0)
    rows = []
    for _, r in rd.iterrows():
        pc = per_case[per_case["round"] == r["round"]]
        cc = c[c["round"] == r["round"]]
        row = {"round": int(r["round"]), "split": r["split"], "cases": int(len(pc)), "model_version": int(r["model_version"]),
               "pre_dice_mean": float(cc["pre_dice"].mean()) if len(cc) else np.nan,
               "voxels_corrected_mean": float(pc["voxels"].mean()) if len(pc) else np.nan,
               "vertebrae_relabelled": int(pc["relabelled"].sum()),
               "minutes_per_case": float(pc["minutes"].mean()) if len(pc) else np.nan,
               "sent_to_expert": int(e[(e["round"] == r["round"]) & (e["tier"] == "expert")]["case_id"].nunique())}
        for t in TIERS:
            row[f"minutes_{t}"] = float(tiers.loc[r["round"], t]) if t in tiers.columns and r["round"] in tiers.index else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def special_cases(ledger: Ledger) -> dict[str, list[str]]:
    """Case ids per variant from the accepted masks (for the release readme)."""
    e = ledger.entries()
    out: dict[str, list[str]] = {"L6": [], "missing_L5": [], "T13": []}
    if e.empty:
        return out
    for cid, v in e.groupby("case_id")["variant"].last().items():
        if v in out:
            out[v].append(cid)
    return {k: sorted(v) for k, v in out.items()}
