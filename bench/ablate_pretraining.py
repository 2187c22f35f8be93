"""Ablation of the synthetic pretraining model (issue 6: "say what helped, with figures").

Trains one configuration of the synthetic CPU cascade on the complete synthetic VerSe scans of
``data/<profile>/sources/VerSe`` (made by ``00_sources``), holds out the same scans as
``02_pretraining`` (``--n-holdout``, ``--seed``), and prints / stores the held-out binary spine
Dice, mean vertebra Dice and training time. ``--plot`` draws every stored result as one figure.

    python bench/ablate_pretraining.py --config final            # ~6 min on 2 cores
    python bench/ablate_pretraining.py --config fine3mm --n-train 8
    python bench/ablate_pretraining.py --plot runs/ablation/pretraining.png

Configurations (each changes one thing against ``final``, the 02_pretraining default):

* ``final``: level-counting stage on an 8 mm grid, fine stage on the scans' 2 mm grid, budget
  shares locate/coarse/fine 0.05/0.5/0.45 of 130 epochs (6/65/58), label boundaries moved to
  the mask's necks, T13 off the ordinal ladder.
* ``coarse6``: the counting stage on a 6 mm grid (2.4x the voxels per step): 29 epochs in the
  time 8 mm gets 65 (shares 0.06/0.29/0.65 of 100).
* ``fine3mm``: the fine stage on a 3 mm grid (partial volume blurs the surface).
* ``short_fine``: 19 fine epochs instead of 58 (locate and coarse as long).
* ``no_necks``: no :func:`lib.imaging.instances.split_at_necks`.
* ``fov_crop``: ``p_fov_crop`` 0.3 (random craniocaudal crops of the whole-spine stage).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.core import labels as L  # noqa: E402
from lib.core.cases import split_cases  # noqa: E402
from lib.core.paths import REPO_ROOT  # noqa: E402
from lib.datasets import verse  # noqa: E402
from lib.io import load_volume  # noqa: E402
from lib.ml import (
    inference,  # noqa: E402
    planning,  # noqa: E402
    trainer,  # noqa: E402
)

CONFIGS = {
    "final": {},
    "coarse6": {"coarse_mm": 6.0, "max_epochs": 100, "shares": {"locate": 0.06, "coarse": 0.29, "fine": 0.65}},
    "fine3mm": {"fine_mm": 3.0},
    "short_fine": {"max_epochs": 90, "shares": {"locate": 0.07, "coarse": 0.72, "fine": 0.21}},
    "no_necks": {"inference": {"split_necks": 0}},
    "fov_crop": {"augmentation": {"p_fov_crop": 0.3}},
}
SHARES = {"locate": 0.05, "coarse": 0.5, "fine": 0.45}


def scores(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Binary spine Dice and the mean Dice over the vertebrae present in ``truth``."""
    a, b = pred > 0, truth > 0
    spine = 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)
    per = [2 * ((pred == v) & (truth == v)).sum() / ((pred == v).sum() + (truth == v).sum())
           for v in np.unique(truth) if v]
    return float(spine), float(np.mean(per))


def run(config: str, profile: str, n_holdout: int, n_train: int, seed: int, threads: int, out_root: Path) -> dict:
    import torch

    torch.set_num_threads(threads)
    cfg = CONFIGS[config]
    usable, _ = verse.select_pretraining_cases(REPO_ROOT / "data" / profile / "sources" / "VerSe", progress=False)
    tr, te = split_cases(usable, n_holdout, seed=seed)
    tr = tr[:n_train] if n_train else tr
    labs = L.ordered(list(L.CTSPINE1K_LABELS) + [L.T13])
    plan = planning.plan_experiment(tr, "synthetic", labels=labs, coarse_spacing_mm=cfg.get("coarse_mm", 8.0), deep_supervision=0,
                                 target_spacing_mm=[cfg.get("fine_mm", 2.0)] * 3,
                                 augmentation=cfg.get("augmentation"), inference=cfg.get("inference"))
    shares = cfg.get("shares", SHARES)
    plan = dataclasses.replace(plan, stages=[dataclasses.replace(s, budget_share=shares[s.name]) for s in plan.stages])
    out = out_root / f"{config}_n{len(tr)}"
    t0 = time.perf_counter()
    res = trainer.train(tr, out / "model", plan, val_cases=te[:1], seed=seed, max_epochs=cfg.get("max_epochs", 130),
                      iterations_per_epoch=20, cache_dir=out_root / "cache", progress=False)
    train_s = time.perf_counter() - t0
    m = inference.load_model(out / "model", "cpu")
    rows = []
    for cid, img, msk in te:
        v = load_volume(img)
        t = time.perf_counter()
        p = inference.predict_volume(m, v.array, v.spacing)
        spine, vert = scores(p, load_volume(msk).array)
        rows.append({"case_id": cid, "spine_dice": spine, "vertebra_dice": vert, "seconds": time.perf_counter() - t})
        print(f"  {cid}: spine {rows[-1]['spine_dice']:.3f}  vertebra {rows[-1]['vertebra_dice']:.3f}", flush=True)
    result = {"config": config, "n_train": len(tr), "train_s": round(train_s, 1), "epochs": res.epochs,
              "spine_dice": float(np.mean([r["spine_dice"] for r in rows])),
              "vertebra_dice": float(np.mean([r["vertebra_dice"] for r in rows])), "cases": rows}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{config} (n_train {len(tr)}): spine {result['spine_dice']:.3f}, vertebra {result['vertebra_dice']:.3f}, "
          f"training {train_s:.0f} s")
    return result


def plot(out_root: Path, png: Path, extra: Path | None = None) -> None:
    """One bar pair per stored result (and per row of ``extra``, a CSV of earlier measurements)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    rows = [json.loads(p.read_text()) for p in sorted(out_root.glob("*/result.json"))]
    df = pd.DataFrame([{k: r[k] for k in ("config", "n_train", "train_s", "spine_dice", "vertebra_dice")} for r in rows])
    if extra is not None:
        df = pd.concat([pd.read_csv(extra, comment="#"), df], ignore_index=True)
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(df) + 1.4))
    y = np.arange(len(df))[::-1]
    ax.barh(y + 0.18, df.spine_dice, 0.36, color="#888", label="binary spine Dice")
    ax.barh(y - 0.18, df.vertebra_dice, 0.36, color="#c44", label="mean vertebra Dice")
    for yy, s, v in zip(y, df.spine_dice, df.vertebra_dice, strict=True):
        ax.text(s + 0.005, yy + 0.18, f"{s:.2f}", va="center", fontsize=7)
        ax.text(v + 0.005, yy - 0.18, f"{v:.2f}", va="center", fontsize=7)
    ax.axvline(0.90, color="#888", ls="--", lw=0.8)
    ax.axvline(0.70, color="#c44", ls="--", lw=0.8)
    ax.set_yticks(y, [f"{c} ({n} train, {t:.0f} s)" for c, n, t in zip(df.config, df.n_train, df.train_s, strict=True)],
                  fontsize=7)
    ax.set_xlim(0, 1)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    ax.set_title("Synthetic pretraining: held-out complete VerSe scans (dashed: issue 6 targets)", fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), action="append", help="configuration(s) to train")
    ap.add_argument("--profile", default="synthetic")
    ap.add_argument("--n-holdout", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=0, help="use only the first N training scans (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "ablation")
    ap.add_argument("--plot", type=Path, default=None, help="draw all stored results into this PNG")
    ap.add_argument("--extra", type=Path, default=None, help="CSV of earlier measurements to draw too")
    args = ap.parse_args(argv)
    for c in args.config or []:
        run(c, args.profile, args.n_holdout, args.n_train, args.seed, args.threads, args.out)
    if args.plot:
        plot(args.out, args.plot, args.extra)
    if not args.config and not args.plot:
        ap.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
