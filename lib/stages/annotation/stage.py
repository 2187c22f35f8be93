"""Stage 03_annotation: the model-assisted annotation rounds, wired to the workspace.

Notebook ``notebooks/03_annotation.ipynb``; parameters ``params/<profile>/03_annotation.yaml``.
Modes: ``simulated`` (the synthetic oracle plays the truth), ``replay`` (a real release's masks
play it), ``human`` (the ITK-SNAP round trip). The loop is :mod:`lib.stages.annotation.loop`;
the tiers :mod:`lib.stages.annotation.tiers`; the ledger :mod:`lib.stages.annotation.ledger`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core import labels as L
from lib.core.cases import Case
from lib.core.parallel import CaseFailure
from lib.core.paths import find_model_dir
from lib.datasets.ctspine1k.release import find_special_cases, release_cases, write_readme
from lib.imaging.label_shift import level_offsets, variant_of
from lib.io import Volume, load_volume
from lib.io.integrity import label_counts
from lib.metrics.overlap import mean_vertebra_dice
from lib.ml import inference, trainer
from lib.stages.annotation.itksnap import ImportOutcome, export_for_itksnap, import_edited
from lib.stages.annotation.ledger import Ledger
from lib.stages.annotation.loop import (
    Finetuner,
    LoopConfig,
    Predictor,
    TruthProvider,
    plan_batches,
    rounds_table,
    run_rounds,
)
from lib.stages.annotation.tiers import TIERS, SimulatedTiers, tiers_from_params
from lib.stages.context import StageContext
from lib.synthetic import oracle
from lib.viz.browser import save_view
from lib.viz.charts import plot_effort_by_round, plot_preannotation_dice

STAGE = "03_annotation"


def start(namespace: dict) -> StageContext:
    """Validate the notebook's parameters, create the stage folders, seed with ``P.seed``."""
    return StageContext.start(STAGE, namespace, seed=True)


def setup(ctx: StageContext) -> tuple[list[Case], Path, LoopConfig, dict]:
    """The release cases to annotate, the pretrained model of 02, the loop's configuration and
    the tier models (defaults with the params' overrides)."""
    P = ctx.P
    cases = release_cases(ctx.paths)
    model0 = find_model_dir(ctx.paths.models("02_pretraining"))
    cfg = LoopConfig(batch_size=P.batch_size, seed=P.seed, retrain=P.retrain, max_rounds=P.max_rounds or None)
    return cases, model0, cfg, tiers_from_params(P.tiers)


def queue_tables(cases: Sequence[Case], cfg: LoopConfig, tier_models: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The planned rounds (split, cases, first case) and the tier models as tables."""
    batches = plan_batches(cases, cfg.batch_size, cfg.seed)
    queue = pd.DataFrame([{"round": r, "split": b[0].split, "cases": len(b), "first": b[0].case_id}
                          for r, b in enumerate(batches, 1)])
    tiers = pd.DataFrame([{"tier": t, **vars(m)} for t, m in tier_models.items()])
    return queue, tiers


def truth_provider(ctx: StageContext) -> TruthProvider:
    """The truth the simulated annotators play against: the oracle (``simulated``) or a real
    release's masks (``replay``)."""
    return oracle_truth(ctx.paths) if ctx.P.mode == "simulated" else replay_truth(replay_truth_root(ctx))


def replay_truth_root(ctx: StageContext) -> Path:
    """The folder of the released masks for ``replay``: ``replay_truth_dir`` as given when
    absolute, else under the profile's data folder (``data/<profile>/``, i.e. ``$SPINE1K_DATA/<profile>``).

    Raises:
        ValueError: ``replay_truth_dir`` is empty.
        FileNotFoundError: the folder does not exist (naming it and the parameter).
    """
    value = str(ctx.P.replay_truth_dir or "").strip()
    if not value:
        raise ValueError(f"replay_truth_dir is empty in params/{ctx.P.profile}/03_annotation.yaml: set it to the "
                         f"downloaded release (<split>/gt/<ID>_seg.nii.gz), relative to {ctx.paths.data} or absolute")
    root = Path(value) if Path(value).is_absolute() else ctx.paths.data / value
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: replay_truth_dir (params/{ctx.P.profile}/03_annotation.yaml) not found")
    return root


def run(ctx: StageContext, ledger: Ledger, cases: Sequence[Case], cfg: LoopConfig, model0: Path, tier_models: dict,
        truth_for: TruthProvider | None) -> ImportOutcome | None:
    """Run (or resume) every round; in ``human`` mode one step of the ITK-SNAP round trip
    (export the next round, import what came back)."""
    P = ctx.P
    predict = model_predictor(device=P.device)
    if P.mode == "human":
        r, outcome = human_round(ledger, cases, cfg, model0, predict, ctx.dir / "itksnap")
        print(f"round {r}: accepted {outcome.accepted}; waiting for {len(outcome.waiting)} cases; refused:")
        for cid, why in outcome.refused.items():
            print(f"  {cid}: {why}")
        ctx.add_failures("import", [CaseFailure(cid, str(why)) for cid, why in outcome.refused.items()])
        return outcome
    finetune = model_finetuner(P.finetune_epochs, P.finetune_lr or None, P.seed, device=P.device,
                               num_threads=P.num_threads, cache_dir=ctx.dir / "cache")
    def failed(case: Case, exc: Exception) -> None:
        ctx.add_failures("annotate", [CaseFailure(f"{case.split}/{case.case_id}", f"{type(exc).__name__}: {exc}")])

    run_rounds(ledger, cases, cfg, model0, predict, finetune, truth_for, SimulatedTiers(tier_models, seed=P.seed),
               ctx.dir, on_failure=failed)
    return None


def write_round_tables(ctx: StageContext, ledger: Ledger) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    """``tables/rounds.csv``, ``tables/ledger_entries.csv`` and the two figures of the rounds."""
    rounds = rounds_table(ledger)
    entries, case_rows = ledger.entries(), ledger.cases()
    ctx.save_table(rounds, "rounds.csv")
    ctx.save_table(entries, "ledger_entries.csv")
    figs = []
    if len(rounds):
        figs = [ctx.save_figure(plot_effort_by_round(rounds, TIERS), "effort_per_case_by_round.png"),
                ctx.save_figure(plot_preannotation_dice(rounds, case_rows), "preannotation_dice_by_round.png")]
    return rounds, entries, figs


def write_residual(ctx: StageContext, ledger: Ledger, cases: Sequence[Case], truth_for: TruthProvider) -> pd.DataFrame:
    """Accepted mask vs truth per case (``tables/accepted_vs_truth.csv``)."""
    residual = residual_table(ledger, cases, truth_for)
    ctx.save_table(residual, "accepted_vs_truth.csv")
    return residual


def write_release_readme(ctx: StageContext) -> tuple[dict, Path]:
    """The release readme with the special cases found in the accepted masks."""
    special = find_special_cases(ctx.paths.release)
    return special, write_readme(ctx.paths.release, special=special)


def save_case_view(ctx: StageContext, ledger: Ledger, cases: Sequence[Case], limit: int = 8) -> tuple[list[Case], Path | None]:
    """Accepted cases for the browser (lowest pre-annotation Dice first) and a saved view of the first."""
    view = browser_cases(ledger, cases, ctx.dir, limit=limit)
    png = save_view(view[0], ctx.figures / f"case_view_{view[0].case_id}.png") if view else None
    return view, png


def record(ctx: StageContext, ledger: Ledger, rounds: pd.DataFrame, outcome, special: dict) -> Path:
    """The run record: mode, rounds, accepted / queued cases, refused imports, special cases."""
    extra = {"mode": ctx.P.mode, "rounds": rounds.to_dict(orient="records") if len(rounds) else [],
             "accepted": len(ledger.accepted()), "queued": ledger.queued(),
             "refused": outcome.refused if outcome else {}, "special_cases": {k: v for k, v in special.items() if k != "masks"}}
    return ctx.write_record(extra)


def oracle_truth(paths) -> TruthProvider:
    """Truth for simulated annotators: the curation provenance (release id -> source series)
    joined with the oracle (synthetic profile only; the oracle is never a pipeline input)."""
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
            raise ValueError(f"{path}: grid differs from {case.image}")
        return np.asarray(m.array, dtype=np.uint8)

    return truth_for


def model_predictor(device: str = "auto", tta: bool = False) -> Predictor:
    """Pre-annotation with :func:`lib.ml.inference.predict_case`, the model loaded once per version."""
    cache: dict[str, object] = {}

    def predict(model_dir: Path, image: Path, out: Path) -> None:
        key = str(model_dir)
        if key not in cache:
            cache.clear()
            cache[key] = inference.load_model(model_dir, device=device)
        inference.predict_case(cache[key], image, out, tta=tta, device=device)

    return predict


def model_finetuner(max_epochs: int, lr: float | None, seed: int, device: str = "auto",
                    num_threads: int | None = None, cache_dir: Path | None = None) -> Finetuner:
    """Fine-tune from the previous round's model on every accepted trainset case
    (:func:`lib.ml.trainer.train` with ``init_from``; resumable from its checkpoints)."""
    def finetune(cases: list[Case], init: Path, out_dir: Path, round_: int) -> Path:
        triples = [c.triple() for c in cases]
        res = trainer.train(triples, out_dir, init_from=init, max_epochs=max_epochs, lr=lr, seed=seed + round_,
                          device=device, num_threads=num_threads, cache_dir=cache_dir, progress=False)
        return res.model_dir

    return finetune


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
                predict(model_dir, c.image, pre)
            work.append((c.case_id, c.image, pre))
        # a model pretrained on VerSe (02 keeps T13 as its own class) may pre-annotate a T13: the
        # annotators may keep it, so those cases offer and accept 28 (DESIGN 4)
        t13 = {cid for cid, _, pre in work if L.T13 in label_counts(np.asarray(load_volume(pre).array))}
        export_for_itksnap(out, work, t13_cases=t13)
        outcome = import_edited(ledger, r, out, {c.case_id: c.mask.parent for c in todo}, model_version,
                                t13_cases=t13)
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
        img = load_volume(c.image)
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
    """Accepted cases for the case browser (accepted mask as truth, the round's
    pre-annotation as prediction), the lowest pre-annotation Dice first."""
    st = ledger.cases()
    st = st[st["status"] == "accepted"].sort_values("pre_dice")
    by_id = {c.case_id: c for c in cases}
    out = []
    for _, r in st.head(limit).iterrows():
        c = by_id.get(r["case_id"])
        if c is None:
            continue
        pre = Path(work_dir) / "preannotations" / f"round_{int(r['round']):02d}" / f"{c.case_id}_seg.nii.gz"
        out.append(Case(c.case_id, c.image, Path(r["mask_path"]), c.split, pre if pre.exists() else None))
    return out
