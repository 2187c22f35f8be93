"""nnU-Net v2's Python API in a child process (``python -m lib.ml.nnunet.jobs verify|predict``):
started by :mod:`lib.ml.nnunet.backend` with nnU-Net's folders in the environment.

* ``verify FOLDER NP``: nnU-Net's ``verify_dataset_integrity`` on a raw dataset folder.
* ``train SPEC.json``: :class:`lib.ml.nnunet.trainer.nnUNetTrainerSpine1k` on fold ``all`` of a
  preprocessed dataset, as ``nnUNetv2_train`` builds and runs a trainer (``maybe_load_checkpoint``
  for ``--c``, then ``run_training``, then nnU-Net's final validation unless the schedule skips it).
* ``predict SPEC.json``: ``nnUNetPredictor`` on a list of (case, image, output) items, one case
  at a time (no worker pools). Each input is checked first (:func:`lib.io.integrity.check_image`:
  unreadable, non-3D, non-finite CT); a case that fails is listed, the others still run. Existing
  outputs are kept (re-runs resume). Writes ``SPEC.result.json``: seconds and error per case.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from lib.io.integrity import check_image
from lib.ml.nnunet.trainer import (
    nnUNetTrainerSpine1k,  # imports nnU-Net: this module runs in its child process only
)


def verify(folder: str, num_processes: int) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import (
        verify_dataset_integrity,  # optional extra
    )
    verify_dataset_integrity(folder, num_processes)


def train(spec_file: str) -> None:
    from nnunetv2.run.run_training import maybe_load_checkpoint  # optional extra
    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(int(spec.get("num_threads", 2)))
    pre = Path(spec["preprocessed_dir"])
    plans = json.loads((pre / f"{spec['plans_name']}.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    plans["continue_training"] = bool(spec.get("resume"))  # as nnUNetv2_train passes --c to the trainer
    trainer = nnUNetTrainerSpine1k(plans=plans, configuration=spec["configuration"], fold="all",
                                   dataset_json=dataset_json, device=torch.device(spec.get("device", "cpu")))
    maybe_load_checkpoint(trainer, bool(spec.get("resume")), False)
    trainer.run_training()
    trainer.perform_actual_validation(False)
    write_train_result(Path(trainer.output_folder))


def write_train_result(fold: Path) -> None:
    """``<model>/spine1k_train_result.json``: epochs done and the last logged losses / pseudo Dice,
    from ``checkpoint_final.pth`` (read here, so the parent never loads torch or the checkpoint)."""
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    keys = ("train_losses", "val_losses", "ema_fg_dice", "mean_fg_dice")
    last = {k: (float(v[-1]) if not isinstance(v[-1], list) else [float(x) for x in v[-1]])
            for k, v in ck.get("logging", {}).items() if v and k in keys}
    result = {"epochs": int(ck.get("current_epoch", 0)), "final_metrics": last}  # nnU-Net saves the epochs done
    (fold.parent / "spine1k_train_result.json").write_text(json.dumps(result, indent=1) + "\n")


def _predictor(spec: dict):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # optional extra
    from nnunetv2.utilities.label_handling.label_handling import (
        determine_num_input_channels,  # optional extra
    )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # optional extra
    torch.set_num_threads(int(spec.get("num_threads", 2)))
    device = torch.device(spec.get("device", "cpu"))
    model = Path(spec["model_dir"])
    plans = PlansManager(json.loads((model / "plans.json").read_text()))
    dataset_json = json.loads((model / "dataset.json").read_text())
    ck = torch.load(model / "fold_all" / spec.get("checkpoint", "checkpoint_final.pth"), map_location="cpu",
                    weights_only=False)
    conf = plans.get_configuration(ck["init_args"]["configuration"])
    network = nnUNetTrainerSpine1k.build_network_architecture(
        plans, conf, determine_num_input_channels(plans, conf, dataset_json),
        plans.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    network.load_state_dict(ck["network_weights"])
    predictor = nnUNetPredictor(tile_step_size=float(spec.get("step_size", 0.5)), use_gaussian=True,
                                use_mirroring=bool(spec.get("tta", False)), perform_everything_on_device=device.type != "cpu",
                                device=device, verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans, conf, [ck["network_weights"]], dataset_json, ck["trainer_name"],
                                    ck.get("inference_allowed_mirroring_axes"))
    return predictor


def predict(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    predictor = _predictor(spec)
    results, n = {}, len(spec["items"])
    for k, (case, image, output) in enumerate(spec["items"], 1):
        out = Path(output)
        if out.exists():
            results[case] = {"seconds": 0.0, "error": None, "skipped": True}
            continue
        t0 = time.perf_counter()
        faults = check_image(image)
        if faults:
            results[case] = {"seconds": 0.0, "error": "; ".join(f"{f.path}: [{f.kind}] {f.message}" for f in faults)}
            print(f"[{k}/{n}] {case}: not predicted: {results[case]['error']}", flush=True)
            continue
        try:
            truncated = str(out)[: -len(".nii.gz")]
            tmp = truncated + ".part"  # nnU-Net writes <name>.nii.gz; renamed when complete
            predictor.predict_from_files_sequential([[image]], [tmp], save_probabilities=False, overwrite=True)
            Path(tmp + ".nii.gz").replace(out)
            results[case] = {"seconds": time.perf_counter() - t0, "error": None}
            print(f"[{k}/{n}] {case}: {results[case]['seconds']:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001  (one case fails, the others still run; listed)
            results[case] = {"seconds": time.perf_counter() - t0, "error": f"{image}: {type(e).__name__}: {e}"}
            print(f"[{k}/{n}] {case}: failed: {results[case]['error']}", flush=True)
    Path(spec_file + ".result.json").write_text(json.dumps(results, indent=1))


def main(argv: list[str]) -> None:
    if argv[:1] == ["verify"] and len(argv) == 3:
        verify(argv[1], int(argv[2]))
    elif argv[:1] == ["train"] and len(argv) == 2:
        train(argv[1])
    elif argv[:1] == ["predict"] and len(argv) == 2:
        predict(argv[1])
    else:
        raise SystemExit("usage: python -m lib.ml.nnunet.jobs verify FOLDER NP | train SPEC.json | predict SPEC.json")


if __name__ == "__main__":
    main(sys.argv[1:])
