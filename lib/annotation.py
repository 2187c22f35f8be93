"""Model-assisted annotation rounds: the CTSpine1K human-machine loop, executable and resumable.

The paper annotated its 1,005 volumes in rounds: the model pre-annotates a batch, junior
annotators refine it, two senior annotators check, a spine surgeon resolves what the seniors
cannot (lumbosacral variants above all), coordinators double-check a random sample, the
corrected cases join the training data and the model is retrained every 100 cases.

This module holds that loop:

* :class:`Ledger` — an SQLite ledger with one row per case x round x tier (actor, timestamps,
  voxels changed, vertebrae relabelled, Dice before/after, flags). A case's rows, its status
  and its accepted mask are committed together, so a run killed mid-round resumes without
  losing or duplicating entries.
* Annotators are pluggable. :class:`SimulatedTiers` plays the four tiers against a truth mask
  (the oracle of the synthetic profile, or a released mask in "replay" mode) with stated error
  and time models; :func:`export_for_itksnap` / :func:`import_edited` hand a round to real
  people using ITK-SNAP and validate what comes back.
* :func:`run_rounds` — batches of N cases ordered by split (trainset first, then the test
  splits, which are annotated — their masks are the benchmark truth — but never trained on),
  predict -> tiers -> accept into ``gt/`` -> fine-tune from the previous model -> next batch.

Error model of the simulated tiers (what they leave behind is documented and measured):

* A *label shift* is a run of vertebrae whose predicted label is off by the same number of
  levels (the paper's "dislocation"); it is a per-case event.
* junior: redraws every vertebra on the truth geometry but keeps the labels it was given
  (a run shifted by one level stays shifted unless caught, with probability
  ``junior.shift_catch_rate``; a label off by more levels is always fixed);
  leaves a seeded fraction ``junior.boundary_residual`` of the pre-annotation's
  foreground/background errors untouched.
* seniors (two, in turn): each catches a remaining shift with ``senior.shift_catch_rate``;
  on a variant case (L6, missing L5, T13) a caught shift is sent to the expert instead of fixed.
* expert: resolves the cases sent to it with ``expert.shift_catch_rate`` (normally 1).
* double-check: samples ``double_check.sample_fraction`` of the cases and fixes a remaining
  shift with its catch rate.
So an accepted mask differs from the truth by (a) the junior's boundary residual and (b) a
shift that every tier missed. Each tier's time: ``base_minutes + minutes_per_ml * mL changed +
minutes_per_relabel * vertebrae relabelled``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import shutil
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core import labels as L
from lib.core.seeding import stable_rng, stable_seed
from lib.datasets.label_tables import write_itksnap_labels
from lib.imaging.label_shift import level_offsets, relabel, variant_of
from lib.io import Volume, check_pair, load_volume, save_like, write_text
from lib.metrics.overlap import mean_vertebra_dice

TIERS = ("junior", "senior_1", "senior_2", "expert", "double_check")
MAX_MISSABLE_SHIFT = 1.0
"""Largest label offset (levels) a tier can overlook; larger ones are always corrected."""
SPLIT_ORDER = ("trainset", "test_public", "test_private")

# ----------------------------------------------------------------------------- ledger

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    case_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    tier TEXT NOT NULL,
    actor TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    minutes REAL,  -- estimated by the time model; NULL for human work (not timed)
    voxels_changed INTEGER NOT NULL,
    ml_changed REAL NOT NULL,
    vertebrae_relabelled INTEGER NOT NULL,
    dice_before REAL,
    dice_after REAL,
    hard_case INTEGER NOT NULL DEFAULT 0,
    variant TEXT NOT NULL DEFAULT '',
    sent_to_expert INTEGER NOT NULL DEFAULT 0,
    model_version INTEGER NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (case_id, round, tier)
);
CREATE TABLE IF NOT EXISTS cases (
    case_id TEXT PRIMARY KEY,
    split TEXT NOT NULL,
    round INTEGER,
    status TEXT NOT NULL,
    mask_path TEXT,
    pre_dice REAL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    split TEXT NOT NULL,
    n_cases INTEGER NOT NULL,
    model_version INTEGER NOT NULL,
    model_path TEXT,
    next_model_version INTEGER,
    next_model_path TEXT,
    status TEXT NOT NULL,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    case_id TEXT,
    round INTEGER,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
"""

ENTRY_COLUMNS = ("case_id", "round", "tier", "actor", "started_at", "finished_at", "minutes",
                 "voxels_changed", "ml_changed", "vertebrae_relabelled", "dice_before", "dice_after",
                 "hard_case", "variant", "sent_to_expert", "model_version", "note")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


class Ledger:
    """The annotation ledger: an SQLite file with entries, cases, rounds and events.

    Every change that belongs together (a case's tier rows + its accepted status) is one
    transaction: either all of it is on disk or none of it is.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(_SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- cases
    def enqueue(self, case_ids: Iterable[str], splits: Iterable[str]) -> None:
        """Add cases to the queue (existing cases keep their status)."""
        with self.transaction() as c:
            c.executemany("INSERT OR IGNORE INTO cases(case_id, split, status, updated_at) VALUES (?,?, 'queued', ?)",
                          [(cid, sp, _now()) for cid, sp in zip(case_ids, splits, strict=True)])

    def case_status(self, case_id: str) -> str | None:
        row = self.conn.execute("SELECT status FROM cases WHERE case_id=?", (case_id,)).fetchone()
        return row[0] if row else None

    def accepted(self, split: str | None = None) -> list[str]:
        q = "SELECT case_id FROM cases WHERE status='accepted'" + (" AND split=?" if split else "") + " ORDER BY round, case_id"
        return [r[0] for r in self.conn.execute(q, (split,) if split else ())]

    def queued(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT case_id FROM cases WHERE status!='accepted' ORDER BY case_id")]

    def record_case(self, case_id: str, round_: int, rows: Sequence[dict], mask_path: str, pre_dice: float | None) -> None:
        """Write a case's tier rows and mark it accepted, in one transaction.

        Raises:
            sqlite3.IntegrityError: if rows for this case and round already exist (never
                silently duplicated).
        """
        with self.transaction() as c:
            c.executemany(f"INSERT INTO entries({', '.join(ENTRY_COLUMNS)}) VALUES ({', '.join('?' * len(ENTRY_COLUMNS))})",
                          [tuple(r[k] for k in ENTRY_COLUMNS) for r in rows])
            c.execute("UPDATE cases SET status='accepted', round=?, mask_path=?, pre_dice=?, updated_at=? WHERE case_id=?",
                      (round_, mask_path, pre_dice, _now(), case_id))

    def log_event(self, kind: str, message: str, case_id: str | None = None, round_: int | None = None) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO events(at, case_id, round, kind, message) VALUES (?,?,?,?,?)",
                      (_now(), case_id, round_, kind, message))

    # -- rounds
    def round_row(self, round_: int) -> dict | None:
        cur = self.conn.execute("SELECT * FROM rounds WHERE round=?", (round_,))
        row = cur.fetchone()
        return dict(zip([d[0] for d in cur.description], row, strict=True)) if row else None

    def start_round(self, round_: int, split: str, n_cases: int, model_version: int, model_path: str | None) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO rounds(round, split, n_cases, model_version, model_path, status) "
                      "VALUES (?,?,?,?,?, 'running')", (round_, split, n_cases, model_version, model_path))

    def finish_round(self, round_: int, next_version: int, next_path: str | None) -> None:
        with self.transaction() as c:
            c.execute("UPDATE rounds SET status='done', next_model_version=?, next_model_path=?, finished_at=? WHERE round=?",
                      (next_version, next_path, _now(), round_))

    # -- tables
    def entries(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM entries ORDER BY round, case_id, "
                                 "CASE tier WHEN 'junior' THEN 0 WHEN 'senior_1' THEN 1 WHEN 'senior_2' THEN 2 "
                                 "WHEN 'expert' THEN 3 WHEN 'double_check' THEN 4 ELSE 5 END", self.conn)

    def cases(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM cases ORDER BY case_id", self.conn)

    def rounds(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM rounds ORDER BY round", self.conn)

    def events(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM events ORDER BY id", self.conn)


# ----------------------------------------------------------------------------- mask arithmetic


# ----------------------------------------------------------------------------- simulated tiers


@dataclass(frozen=True)
class TierModel:
    """Error and time model of one tier (rates are probabilities per case)."""

    shift_catch_rate: float
    base_minutes: float
    minutes_per_ml: float
    minutes_per_relabel: float
    boundary_residual: float = 0.0
    sample_fraction: float = 1.0


DEFAULT_TIERS: dict[str, TierModel] = {
    "junior": TierModel(0.3, 4.0, 0.6, 3.0, boundary_residual=0.03),
    "senior": TierModel(0.8, 2.0, 0.2, 2.0),
    "expert": TierModel(1.0, 10.0, 0.2, 5.0),
    "double_check": TierModel(0.9, 1.5, 0.2, 2.0, sample_fraction=0.2),
}


def tiers_from_params(spec: dict | None) -> dict[str, TierModel]:
    """Tier models from a params dict ``{tier: {field: value}}`` over :data:`DEFAULT_TIERS`.

    Raises:
        ValueError: an unknown tier or field, naming it.
    """
    out = dict(DEFAULT_TIERS)
    for tier, fields in (spec or {}).items():
        if tier not in out:
            raise ValueError(f"annotation tiers: unknown tier {tier!r}; expected {list(out)}")
        known = set(TierModel.__dataclass_fields__)
        bad = set(fields) - known
        if bad:
            raise ValueError(f"annotation tiers: {tier}: unknown fields {sorted(bad)}; expected {sorted(known)}")
        out[tier] = TierModel(**{**asdict(out[tier]), **fields})
    return out


def case_rng(seed: int, case_id: str, round_: int) -> np.random.Generator:
    """A generator that depends only on (seed, case, round): re-runs give the same draws."""
    return stable_rng(seed, case_id, round_, sep="|", nbytes=8, byteorder="little")


@dataclass
class TierResult:
    tier: str
    mask: np.ndarray
    minutes: float
    voxels_changed: int
    ml_changed: float
    relabelled: int
    hard_case: bool = False
    sent_to_expert: bool = False
    note: str = ""


@dataclass
class SimulatedTiers:
    """The four tiers played against a truth mask with the models in ``tiers``."""

    tiers: dict[str, TierModel] = field(default_factory=lambda: dict(DEFAULT_TIERS))
    seed: int = 0

    def annotate(self, case_id: str, round_: int, pre: np.ndarray, truth: np.ndarray,
                 voxel_ml: float) -> list[TierResult]:
        """Run junior -> senior_1 -> senior_2 -> (expert) -> (double_check) on one case.

        Args:
            pre: the model's pre-annotation (uint8 labels), canonical array.
            truth: the truth mask on the same grid.
            voxel_ml: volume of one voxel in mL.

        Returns:
            One :class:`TierResult` per tier that touched the case; the last one's mask is
            the accepted mask.
        """
        rng = case_rng(self.seed, case_id, round_)
        variant = variant_of(truth)
        results: list[TierResult] = []
        offsets = level_offsets(truth, pre)
        shifted = any(offsets.values())

        # junior: truth geometry, labels as given unless the shift is caught
        j = self.tiers["junior"]
        caught = shifted and rng.random() < j.shift_catch_rate
        if caught:
            offsets = {v: 0 for v in offsets}
        # a label off by more than one level is obvious to anyone counting: always fixed
        offsets = {v: (o if abs(o) <= MAX_MISSABLE_SHIFT else 0) for v, o in offsets.items()}
        mask = relabel(truth, offsets)
        fg_err = (pre > 0) != (truth > 0)
        n_err = int(fg_err.sum())
        if n_err and j.boundary_residual > 0:
            keep = rng.random(n_err) < j.boundary_residual
            idx = np.flatnonzero(fg_err.ravel())[keep]
            flat = mask.ravel()  # relabel() returned a fresh array
            flat[idx] = pre.ravel()[idx]
        results.append(self._result("junior", pre, mask, j, voxel_ml, note="shift fixed" if caught else ""))

        # two seniors in turn
        sent = False
        s = self.tiers["senior"]
        for name in ("senior_1", "senior_2"):
            before = mask
            still = any(offsets.values())
            hard = bool(variant) and still
            if still and not sent and rng.random() < s.shift_catch_rate:
                if variant:
                    sent = True  # a variant: the senior flags it for the surgeon
                else:
                    offsets = {v: 0 for v in offsets}
                    mask = _fix_labels(mask, truth)
            r = self._result(name, before, mask, s, voxel_ml)
            r.hard_case, r.sent_to_expert = hard, sent
            results.append(r)

        if sent:
            e = self.tiers["expert"]
            before = mask
            if rng.random() < e.shift_catch_rate:
                offsets = {v: 0 for v in offsets}
                mask = _fix_labels(mask, truth)
            r = self._result("expert", before, mask, e, voxel_ml, note=f"resolved {variant}")
            r.hard_case = r.sent_to_expert = True
            results.append(r)

        d = self.tiers["double_check"]
        if rng.random() < d.sample_fraction:
            before = mask
            if any(offsets.values()) and rng.random() < d.shift_catch_rate:
                offsets = {v: 0 for v in offsets}
                mask = _fix_labels(mask, truth)
            results.append(self._result("double_check", before, mask, d, voxel_ml))
        return results

    @staticmethod
    def _result(tier, before, after, model: TierModel, voxel_ml, note="") -> TierResult:
        changed = before != after
        n = int(changed.sum())
        ml = n * voxel_ml
        relab = _relabelled_vertebrae(before, after)
        minutes = model.base_minutes + model.minutes_per_ml * ml + model.minutes_per_relabel * relab
        return TierResult(tier, after, float(minutes), n, float(ml), relab, note=note)


def _fix_labels(mask: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Relabel each foreground component of ``mask`` that overlaps a truth vertebra to that
    vertebra's label (the geometry, including any residual, is kept)."""
    out = mask.copy()
    fg = (mask > 0) & (truth > 0)
    out[fg] = truth[fg]
    return out


def _relabelled_vertebrae(before: np.ndarray, after: np.ndarray) -> int:
    """Vertebrae (by their label after) whose majority label changed."""
    both = (before > 0) & (after > 0) & (before != after)
    if not both.any():
        return 0
    changed = np.unique(after[both])
    sizes = np.bincount(after.ravel(), minlength=32)
    moved = np.bincount(after[both], minlength=32)
    return int(sum(1 for v in changed if moved[v] > 0.5 * sizes[v]))


# ----------------------------------------------------------------------------- human round trip


def export_for_itksnap(out_dir: str | Path, cases: Sequence[tuple[str, Path, Path]]) -> Path:
    """Write a round's work for human annotators using ITK-SNAP.

    For each ``(case_id, image_path, preannotation_path)``: ``<out>/<case_id>/`` with the image,
    ``<case_id>_preannotation_seg.nii.gz`` and ``labels.txt`` (ITK-SNAP label description). The
    annotator saves the edited mask as ``<case_id>_seg.nii.gz`` in the same folder.
    """
    out = Path(out_dir)
    for cid, img, pre in cases:
        d = out / cid
        d.mkdir(parents=True, exist_ok=True)
        for src, name in ((img, f"{cid}.nii.gz"), (pre, f"{cid}_preannotation_seg.nii.gz")):
            if not (d / name).exists():
                shutil.copyfile(src, d / name)
        write_itksnap_labels(d / "labels.txt")
    write_text(out / "README.txt",
               "Open <ID>.nii.gz in ITK-SNAP, load <ID>_preannotation_seg.nii.gz as segmentation and\n"
               "labels.txt as label descriptions (Segmentation > Import Label Descriptions).\n"
               "Correct the vertebra labels and boundaries, then save as <ID>_seg.nii.gz in the same folder.\n")
    return out


@dataclass(frozen=True)
class ImportOutcome:
    accepted: list[str]
    refused: dict[str, str]  # case id -> reason
    waiting: list[str]       # no edited mask yet


def import_edited(ledger: Ledger, round_: int, export_dir: str | Path, gt_dirs: dict[str, Path],
                  model_version: int, allowed_labels: Iterable[int] = L.CTSPINE1K_LABELS) -> ImportOutcome:
    """Import masks edited by people; validate each before accepting it.

    A mask whose shape or affine differs from the image, or that holds an unknown label, is
    refused with a message naming the file; the refusal is logged and the case stays queued.

    Args:
        gt_dirs: ``{case_id: release gt folder}`` where accepted masks are written.
    """
    export_dir = Path(export_dir)
    accepted, refused, waiting = [], {}, []
    allowed = list(allowed_labels)
    for cid in sorted(gt_dirs):
        d = export_dir / cid
        edited, image = d / f"{cid}_seg.nii.gz", d / f"{cid}.nii.gz"
        if not edited.exists():
            waiting.append(cid)
            continue
        faults = check_pair(image, edited, allowed_labels=allowed)
        if faults:
            msg = "; ".join(str(f) for f in faults)
            refused[cid] = msg
            ledger.log_event("refused", msg, cid, round_)
            continue
        img = load_volume(image)
        new = load_volume(edited).array.astype(np.uint8)
        pre = load_volume(d / f"{cid}_preannotation_seg.nii.gz").array.astype(np.uint8)
        target = Path(gt_dirs[cid]) / f"{cid}_seg.nii.gz"
        save_like(new, img, target, dtype=np.uint8)
        voxel_ml = float(np.prod(img.spacing)) / 1000.0
        n = int((new != pre).sum())
        t = _now()
        row = dict(case_id=cid, round=round_, tier="human", actor="human", started_at=t, finished_at=t,
                   minutes=None, voxels_changed=n, ml_changed=n * voxel_ml,
                   vertebrae_relabelled=_relabelled_vertebrae(pre, new), dice_before=None, dice_after=None,
                   hard_case=0, variant=variant_of(new), sent_to_expert=0, model_version=model_version,
                   note=f"imported from {edited}")
        ledger.record_case(cid, round_, [row], str(target), mean_vertebra_dice(new, pre))
        accepted.append(cid)
    return ImportOutcome(accepted, refused, waiting)


# ----------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Case:
    """A release case to annotate."""

    case_id: str
    split: str
    image_path: Path
    gt_dir: Path


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
    for split in SPLIT_ORDER + tuple(sorted({c.split for c in cases} - set(SPLIT_ORDER))):
        group = sorted((c for c in cases if c.split == split), key=lambda c: c.case_id)
        if not group:
            continue
        order = np.random.default_rng(seed).permutation(len(group))
        group = [group[i] for i in order]
        batches.extend(group[i:i + batch_size] for i in range(0, len(group), batch_size))
    return batches


def run_rounds(ledger: Ledger, cases: Sequence[Case], cfg: LoopConfig, model_path: Path,
               predict: Predictor, finetune: Finetuner, truth_for: TruthProvider,
               annotators: SimulatedTiers, work_dir: Path, log=print) -> pd.DataFrame:
    """Run (or resume) every annotation round; returns the per-round table.

    Per round: pre-annotate the batch with the current model, run the tiers, accept the final
    masks into ``gt/``, then (for trainset batches, when ``cfg.retrain``) fine-tune from the
    current model on every accepted trainset case. Test batches are annotated, never trained on.

    Resuming: accepted cases are skipped; a finished round's model is reused; an interrupted
    fine-tune is re-entered (the trainer resumes from its checkpoint). Results equal an
    uninterrupted run's because every random draw is seeded by (seed, case, round).
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
            _annotate_case(ledger, case, r, version, current, predict, truth_for, annotators, work_dir)
        if split == "trainset" and cfg.retrain:
            train_cases = [c for c in cases if c.split == "trainset" and ledger.case_status(c.case_id) == "accepted"]
            new_path = finetune(train_cases, current, work_dir / "models" / f"round_{r:02d}", r)
            version, current = version + 1, Path(new_path)
        ledger.finish_round(r, version, str(current))
    return rounds_table(ledger)


def _annotate_case(ledger, case: Case, r, version, model_path, predict, truth_for, annotators, work_dir) -> None:
    pre_path = work_dir / "preannotations" / f"round_{r:02d}" / f"{case.case_id}_seg.nii.gz"
    if not pre_path.exists():
        predict(model_path, case.image_path, pre_path)
    img = load_volume(case.image_path)
    pre = load_volume(pre_path).array.astype(np.uint8)
    if pre.shape != img.shape:
        raise ValueError(f"{pre_path}: pre-annotation shape {pre.shape} differs from image {img.shape} ({case.image_path})")
    truth = truth_for(case, img)
    voxel_ml = float(np.prod(img.spacing)) / 1000.0
    results = annotators.annotate(case.case_id, r, pre, truth, voxel_ml)
    final = results[-1].mask
    target = Path(case.gt_dir) / f"{case.case_id}_seg.nii.gz"
    save_like(final, img, target, dtype=np.uint8)
    rows, prev, variant = [], pre, variant_of(final)
    for i, res in enumerate(results):
        t = _now()
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


def dump_json(obj, path: Path) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- wiring for 03_annotation


def release_cases(paths) -> list[Case]:
    """Every image of the curated release as a :class:`Case` (split from its folder)."""
    from lib.core.paths import SPLITS
    from lib.io import strip_nifti_suffix

    cases = []
    for split in SPLITS:
        for img in sorted(paths.split_dir(split, "data").glob("*.nii.gz")):
            cases.append(Case(strip_nifti_suffix(img), split, img, paths.split_dir(split, "gt")))
    if not cases:
        raise FileNotFoundError(f"{paths.release}: no release images; run 01_curation first")
    return cases


def find_model_dir(root: str | Path) -> Path:
    """The newest folder under ``root`` holding a trained model (``model.pt`` + ``plan.json``)."""
    found = sorted((p.parent for p in Path(root).rglob("model.pt") if (p.parent / "plan.json").exists()),
                   key=lambda d: (d / "model.pt").stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{root}: no trained model (model.pt + plan.json); run the stage that trains it")
    return found[-1]


def oracle_truth(paths) -> TruthProvider:
    """Truth for simulated annotators: the curation provenance (release id -> source series)
    joined with the oracle (synthetic profile only; the oracle is never a pipeline input)."""
    from lib.synthetic import oracle

    prov_path = paths.tables("01_curation") / "provenance.csv"
    if not prov_path.exists():
        raise FileNotFoundError(f"{prov_path}: curation provenance missing; run 01_curation first")
    prov = pd.read_csv(prov_path, dtype=str).set_index("release_id")

    def truth_for(case: Case, img: Volume) -> np.ndarray:
        if case.case_id not in prov.index:
            raise KeyError(f"{case.case_id}: not in {prov_path}")
        row = prov.loc[case.case_id]
        return oracle.load_truth(paths, row["source"], row["source_key"], img)

    return truth_for


def replay_truth(truth_dir: str | Path) -> TruthProvider:
    """Truth for "replay" mode on a real release: its released masks play the truth.

    ``truth_dir`` holds ``<split>/gt/<ID>_seg.nii.gz`` (a CTSpine1K download) or flat
    ``<ID>_seg.nii.gz`` files. A mask whose grid differs from the image is an error naming both.
    """
    root = Path(truth_dir)

    def truth_for(case: Case, img: Volume) -> np.ndarray:
        cands = [root / case.split / "gt" / f"{case.case_id}_seg.nii.gz", root / f"{case.case_id}_seg.nii.gz"]
        path = next((p for p in cands if p.exists()), None)
        if path is None:
            raise FileNotFoundError(f"{case.case_id}: no released mask in {root} (looked for {cands[0].name})")
        m = load_volume(path)
        if m.shape != img.shape or not np.allclose(m.affine, img.affine, atol=1e-3):
            raise ValueError(f"{path}: grid differs from {case.image_path}")
        return np.asarray(m.array, dtype=np.uint8)

    return truth_for


def model_predictor(device: str = "auto", tta: bool = False) -> Predictor:
    """Pre-annotation with :func:`lib.infer.predict_case`, the model loaded once per version."""
    from lib import infer

    cache: dict[str, object] = {}

    def predict(model_dir: Path, image: Path, out: Path) -> None:
        key = str(model_dir)
        if key not in cache:
            cache.clear()
            cache[key] = infer.load_model(model_dir, device=device)
        infer.predict_case(cache[key], image, out, tta=tta, device=device)

    return predict


def model_finetuner(max_epochs: int, lr: float | None, seed: int, device: str = "auto",
                    num_threads: int | None = None, cache_dir: Path | None = None) -> Finetuner:
    """Fine-tune from the previous round's model on every accepted trainset case
    (:func:`lib.train.train` with ``init_from``; resumable from its checkpoints)."""
    from lib import train

    def finetune(cases: list[Case], init: Path, out_dir: Path, round_: int) -> Path:
        triples = [(c.case_id, str(c.image_path), str(Path(c.gt_dir) / f"{c.case_id}_seg.nii.gz")) for c in cases]
        res = train.train(triples, out_dir, init_from=init, max_epochs=max_epochs, lr=lr, seed=seed + round_,
                          device=device, num_threads=num_threads, cache_dir=cache_dir, progress=False)
        return res.model_dir

    return finetune


def plot_rounds(rounds: pd.DataFrame, entries: pd.DataFrame, cases: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Figures: estimated minutes per case by round (stacked by tier) and pre-annotation Dice
    (vs the accepted mask) per case by round. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib.viz import save_figure

    out_dir = Path(out_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(len(rounds))
    for t in TIERS:
        col = f"minutes_{t}"
        if col in rounds:
            per_case = rounds[col].to_numpy() / rounds["cases"].clip(lower=1).to_numpy()
            ax.bar(rounds["round"], per_case, bottom=bottom, label=t)
            bottom += per_case
    ax.set_xlabel("round")
    ax.set_ylabel("estimated minutes per case")
    ax.set_title("Annotation effort per case by round")
    ax.legend(fontsize=8)
    for x, sp in zip(rounds["round"], rounds["split"], strict=True):
        ax.text(x, 0, sp.replace("test_", "t_"), rotation=90, va="bottom", ha="center", fontsize=7, color="white")
    fig.tight_layout()
    p = out_dir / "effort_per_case_by_round.png"
    save_figure(fig, p)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(7, 4))
    data = [cases.loc[cases["round"] == r, "pre_dice"].dropna().to_numpy() for r in rounds["round"]]
    ax.boxplot(data, positions=list(rounds["round"]), widths=0.5)
    for r, d in zip(rounds["round"], data, strict=True):
        ax.scatter(np.full(len(d), r) + np.linspace(-0.15, 0.15, max(len(d), 1))[: len(d)], d, s=10, alpha=0.6)
    ax.plot(rounds["round"], rounds["pre_dice_mean"], "k--", lw=1, label="mean")
    ax.set_xlabel("round (model version = rounds of fine-tuning before it)")
    ax.set_ylabel("pre-annotation Dice vs accepted mask")
    ax.set_ylim(0, 1.02)
    ax.set_title("Pre-annotation quality by round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "preannotation_dice_by_round.png"
    save_figure(fig, p)
    paths.append(p)
    return paths


def human_round(ledger: Ledger, cases: Sequence[Case], cfg: LoopConfig, model_dir: Path, predict: Predictor,
                export_dir: Path, model_version: int = 0) -> tuple[int, ImportOutcome]:
    """One step of the human loop: the first round with cases not yet accepted gets its
    pre-annotations exported for ITK-SNAP (once), and whatever edited masks are already back are
    validated and imported. Run it again after annotators saved their work.

    Returns:
        (round number, :class:`ImportOutcome`); round 0 when every case is accepted.
    """
    ledger.enqueue([c.case_id for c in cases], [c.split for c in cases])
    for r, batch in enumerate(plan_batches(cases, cfg.batch_size, cfg.seed), 1):
        todo = [c for c in batch if ledger.case_status(c.case_id) != "accepted"]
        if not todo:
            continue
        out = Path(export_dir) / f"round_{r:02d}"
        work = []
        for c in todo:
            pre = out / c.case_id / f"{c.case_id}_preannotation_seg.nii.gz"
            if not pre.exists():
                predict(model_dir, c.image_path, pre)
            work.append((c.case_id, c.image_path, pre))
        export_for_itksnap(out, work)
        outcome = import_edited(ledger, r, out, {c.case_id: c.gt_dir for c in todo}, model_version)
        return r, outcome
    return 0, ImportOutcome([], {}, [])


def residual_table(ledger: Ledger, cases: Sequence[Case], truth_for: TruthProvider) -> pd.DataFrame:
    """Accepted mask vs truth per accepted case: voxels that differ (count and share of the
    truth's foreground), mean vertebra Dice, whether a label shift survived, the variant."""
    rows = []
    status = ledger.cases().set_index("case_id")
    for c in cases:
        if c.case_id not in status.index or status.loc[c.case_id, "status"] != "accepted":
            continue
        img = load_volume(c.image_path)
        final = load_volume(status.loc[c.case_id, "mask_path"]).array.astype(np.uint8)
        truth = truth_for(c, img)
        wrong = int((final != truth).sum())
        rows.append({"case_id": c.case_id, "split": c.split, "round": int(status.loc[c.case_id, "round"]),
                     "variant": variant_of(truth), "voxels_wrong": wrong,
                     "wrong_share_of_foreground": wrong / max(int((truth > 0).sum()), 1),
                     "mean_vertebra_dice": mean_vertebra_dice(truth, final),
                     "label_shift_left": any(level_offsets(truth, final).values())})
    return pd.DataFrame(rows)


def browser_cases(ledger: Ledger, cases: Sequence[Case], work_dir: Path, limit: int = 8):
    """Accepted cases as :class:`lib.browser.CaseFiles` (accepted mask as truth, the round's
    pre-annotation as prediction), the lowest pre-annotation Dice first."""
    from lib.browser import CaseFiles

    st = ledger.cases()
    st = st[st["status"] == "accepted"].sort_values("pre_dice")
    by_id = {c.case_id: c for c in cases}
    out = []
    for _, r in st.head(limit).iterrows():
        c = by_id.get(r["case_id"])
        if c is None:
            continue
        pre = Path(work_dir) / "preannotations" / f"round_{int(r['round']):02d}" / f"{c.case_id}_seg.nii.gz"
        out.append(CaseFiles(c.case_id, c.image_path, Path(r["mask_path"]), pre if pre.exists() else None))
    return out
