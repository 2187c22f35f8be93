"""nnU-Net v2 as a backend: integrity check, planning and preprocessing, training and prediction by
nnU-Net itself; the workspace brings the data and evaluates (thin adapter over nnU-Net's commands).

* :func:`verify_dataset` — nnU-Net's ``verify_dataset_integrity`` on an exported raw dataset;
  what it prints as ``Error`` / ``Warning`` is returned (and raised on failure) as text.
* :func:`plan_and_preprocess` — fingerprint, plan (``default``: nnU-Net's planner as the paper
  ran it; ``reduced``: the same planner at a coarser isotropic target spacing and a smaller GPU
  memory target, i.e. a smaller patch and network of nnU-Net's own kind, for a CPU), preprocess.
* :func:`train` — what ``nnUNetv2_train DATASET CONFIGURATION all -tr nnUNetTrainerSpine1k`` does,
  through nnU-Net's Python API: nnU-Net's trainer with epochs, iterations per epoch and a
  wall-clock budget from the params; resumes a killed run from ``checkpoint_latest.pth`` (``--c``)
  when its settings are unchanged.
* :func:`predict` — nnU-Net's predictor on the test cases, outputs in the input's geometry.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lib.io.atomic import write_text
from lib.ml.nnunet import tools
from lib.ml.nnunet.tools import NnunetError, NnunetFolders

REDUCED_PLANS = "nnUNetPlans_spine1k_reduced"


class NnunetIntegrityError(RuntimeError):
    """nnU-Net's integrity check refused a dataset; ``errors`` holds its messages."""

    def __init__(self, dataset: Path, errors: list[str], warnings: list[str]):
        self.dataset, self.errors, self.warnings = dataset, errors, warnings
        super().__init__(f"{dataset}: nnU-Net v2's integrity check failed:\n" + "\n".join(errors))


@dataclass
class IntegrityReport:
    """What nnU-Net's check said of a dataset: passed, its error and warning messages."""

    dataset: str
    passed: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _messages(output: str) -> tuple[list[str], list[str]]:
    """nnU-Net's ``Error...`` and ``Warning...`` paragraphs (to the next blank line), and the
    assertion / exception line that ended a failed check."""
    errors, warnings, cur, kind = [], [], [], None
    for line in output.splitlines() + [""]:
        head = line.lstrip()
        starts = re.match(r"(Error|ERROR|Warning|WARNING)\b", head)
        if kind and (not head or starts):
            (errors if kind == "error" else warnings).append("\n".join(cur).strip())
            cur, kind = [], None
        if starts:
            kind = "error" if starts.group(1).lower() == "error" else "warning"
        if kind:
            cur.append(line)
        elif re.match(r"(AssertionError|RuntimeError|FileNotFoundError|ValueError|KeyError): ", head):
            errors.append(head)
    return errors, warnings


def verify_dataset(dataset: Path, folders: NnunetFolders, num_processes: int = 1, log: Path | None = None,
                   echo=print) -> IntegrityReport:
    """nnU-Net v2's ``verify_dataset_integrity`` on ``dataset`` (a ``DatasetNNN_Name`` folder).

    Raises:
        NnunetIntegrityError: the check failed; its messages (e.g. "Unexpected labels found in
            file ...", "Spacing mismatch between segmentation and corresponding images") in ``errors``.
    """
    tools.require()
    env = folders.make().environment()
    cmd = [sys.executable, "-m", "lib.ml.nnunet.jobs", "verify", str(dataset), str(int(num_processes))]
    try:
        out = tools.run(cmd, env, log=log, echo=echo)
    except NnunetError as e:
        full = log.read_text() if log and log.exists() else e.tail
        errors, warnings = _messages(full.split(f"$ {' '.join(cmd)}")[-1])
        raise NnunetIntegrityError(dataset, errors or [e.tail], warnings) from e
    errors, warnings = _messages(out)
    return IntegrityReport(str(dataset), True, errors, warnings)


@dataclass
class Plan:
    """The nnU-Net plan a backend run used: plans name, configuration and what nnU-Net chose."""

    dataset_id: int
    plans_name: str
    configuration: str
    kind: str
    spacing: list[float]
    patch_size: list[int]
    batch_size: int
    network: str
    n_stages: int

    def describe(self) -> str:
        return (f"nnU-Net v2 {self.configuration} ({self.kind} plan {self.plans_name}): spacing "
                f"{' x '.join(f'{s:g}' for s in self.spacing)} mm, patch {' x '.join(map(str, self.patch_size))}, "
                f"batch {self.batch_size}, {self.network} with {self.n_stages} stages (axes in nnU-Net's order)")


def read_plan(folders: NnunetFolders, dataset_name: str, dataset_id: int, plans_name: str, configuration: str,
              kind: str) -> Plan:
    """The configuration nnU-Net planned, from its plans file."""
    plans = json.loads((folders.preprocessed / dataset_name / f"{plans_name}.json").read_text())
    c = plans["configurations"][configuration]
    arch = c.get("architecture", {})
    return Plan(dataset_id, plans_name, configuration, kind, [float(s) for s in c["spacing"]],
                [int(p) for p in c["patch_size"]], int(c["batch_size"]),
                arch.get("network_class_name", "?").rsplit(".", 1)[-1], int(arch.get("arch_kwargs", {}).get("n_stages", 0)))


def plan_and_preprocess(dataset: Path, folders: NnunetFolders, kind: str = "default", configuration: str = "3d_fullres",
                        target_spacing_mm: float = 4.0, gpu_memory_gb: float = 2.0, num_processes: int = 2,
                        log: Path | None = None, echo=print) -> Plan:
    """Fingerprint, plan and preprocess ``dataset`` (already in ``folders.raw``) with nnU-Net's
    own commands; ``kind`` ``reduced`` plans at ``target_spacing_mm`` (isotropic) with a
    ``gpu_memory_gb`` target under the plans name :data:`REDUCED_PLANS`."""
    tools.require()
    ds_id = int(re.match(r"Dataset(\d+)_", dataset.name).group(1))
    env = folders.make().environment()
    npr = str(max(1, int(num_processes)))
    tools.run([tools.script("nnUNetv2_extract_fingerprint"), "-d", str(ds_id), "-np", npr, "--clean"], env, log, echo)
    plan_cmd = [tools.script("nnUNetv2_plan_experiment"), "-d", str(ds_id)]
    plans_name = "nnUNetPlans"
    if kind == "reduced":
        plans_name = REDUCED_PLANS
        plan_cmd += ["-overwrite_target_spacing", *[f"{target_spacing_mm:g}"] * 3, "-gpu_memory_target",
                     f"{gpu_memory_gb:g}", "-overwrite_plans_name", plans_name]
    elif kind != "default":
        raise ValueError(f"nnU-Net plan kind {kind!r}: expected 'default' or 'reduced'")
    tools.run(plan_cmd, env, log, echo)
    tools.run([tools.script("nnUNetv2_preprocess"), "-d", str(ds_id), "-plans_name", plans_name, "-c", configuration,
               "-np", npr], env, log, echo)
    return read_plan(folders, dataset.name, ds_id, plans_name, configuration, kind)


@dataclass
class NnunetTrainResult:
    """A finished nnU-Net training: its model folder (``nnUNet_results/.../<trainer>__<plans>__<conf>``),
    epochs run, wall-clock seconds, the last logged losses / pseudo Dice, and the plan."""

    model_dir: Path
    epochs: int
    seconds: float
    final_metrics: dict
    plan: Plan
    schedule: dict
    budget_spent: bool
    log_file: Path

    @property
    def progress_png(self) -> Path:
        return self.model_dir / "fold_all" / "progress.png"

    def to_json(self) -> dict:
        return {"backend": "nnunetv2", "model_dir": str(self.model_dir), "epochs": self.epochs,
                "seconds": round(self.seconds, 1), "final_metrics": self.final_metrics, "plan": asdict(self.plan),
                "schedule": self.schedule, "budget_spent": self.budget_spent, "log": str(self.log_file)}


TRAIN_RESULT = "spine1k_train_result.json"
"""Written by the training job beside the model: epochs done and the last logged values."""


def train(plan: Plan, folders: NnunetFolders, dataset_name: str, epochs: int, iterations_per_epoch: int,
          budget_s: float = 0.0, device: str = "cpu", da_workers: int = 0, validation: bool = False,
          num_threads: int = 2, log: Path | None = None, echo=print) -> NnunetTrainResult:
    """Train ``plan``'s configuration on fold ``all`` (every training case, as the paper did)
    with :data:`lib.ml.nnunet.tools.TRAINER`. A run killed mid-way resumes from
    ``checkpoint_latest.pth`` when its schedule and plan are those of this call; a finished one
    with the same settings is reused; otherwise the model folder is started afresh."""
    tools.require()
    schedule = {"epochs": int(epochs), "iterations_per_epoch": int(iterations_per_epoch), "budget_s": float(budget_s),
                "validation": bool(validation), "device": device, "plan": asdict(plan)}
    model_dir = folders.results / dataset_name / f"{tools.TRAINER}__{plan.plans_name}__{plan.configuration}"
    fold = model_dir / "fold_all"
    key_file = model_dir / "spine1k_schedule.json"
    same = key_file.exists() and json.loads(key_file.read_text()) == schedule
    log = log or model_dir / "spine1k_train.log"
    t0 = time.perf_counter()
    if not (same and (fold / "checkpoint_final.pth").exists() and (model_dir / TRAIN_RESULT).exists()):
        resume = same and (fold / "checkpoint_latest.pth").exists()
        if not resume and model_dir.exists():
            shutil.rmtree(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        write_text(key_file, json.dumps(schedule, indent=1) + "\n")
        env = folders.make().environment(device=device, da_workers=da_workers, extra={
            "SPINE1K_NNUNET_EPOCHS": int(epochs), "SPINE1K_NNUNET_ITERATIONS": int(iterations_per_epoch),
            "SPINE1K_NNUNET_BUDGET_S": float(budget_s), "SPINE1K_NNUNET_VALIDATION": int(bool(validation))})
        spec = {"preprocessed_dir": str(folders.preprocessed / dataset_name), "plans_name": plan.plans_name,
                "configuration": plan.configuration, "device": device, "num_threads": int(num_threads),
                "resume": resume}
        spec_file = model_dir / "spine1k_train_spec.json"
        write_text(spec_file, json.dumps(spec, indent=1) + "\n")
        tools.run([sys.executable, "-m", "lib.ml.nnunet.jobs", "train", str(spec_file)], env, log, echo)
    seconds = time.perf_counter() - t0
    done = json.loads((model_dir / TRAIN_RESULT).read_text())  # the job read nnU-Net's checkpoint
    n_epochs, metrics = done["epochs"], done["final_metrics"]
    text = (log.read_text() if log.exists() else "").rsplit("lib.ml.nnunet.jobs train", 1)[-1]  # this run's part
    return NnunetTrainResult(model_dir, n_epochs, seconds, metrics, plan, schedule, "spine1k budget:" in text, log)


def predict(model_dir: Path, items: Sequence[tuple[str, str | Path, str | Path]], folders: NnunetFolders,
            device: str = "cpu", tta: bool = False, num_threads: int = 2, log: Path | None = None,
            echo=print) -> dict[str, dict]:
    """nnU-Net's predictor (fold ``all``, ``checkpoint_final.pth``) on (case, image, output) items,
    one case at a time; outputs are NIfTI in each input's geometry. Returns seconds and error per
    case (``error`` None when it was written; a failed case does not stop the others)."""
    tools.require()
    spec_file = Path(model_dir) / f"predict_{time.strftime('%Y%m%d-%H%M%S')}_{id(items):x}.json"
    spec = {"model_dir": str(model_dir), "device": device, "tta": bool(tta), "num_threads": int(num_threads),
            "items": [[c, str(i), str(o)] for c, i, o in items]}
    for _, _, o in items:
        Path(o).parent.mkdir(parents=True, exist_ok=True)
    write_text(spec_file, json.dumps(spec, indent=1))
    env = folders.make().environment(device=device)
    try:
        tools.run([sys.executable, "-m", "lib.ml.nnunet.jobs", "predict", str(spec_file)], env, log, echo)
        result_file = Path(str(spec_file) + ".result.json")
        return json.loads(result_file.read_text())
    finally:
        spec_file.unlink(missing_ok=True)
        Path(str(spec_file) + ".result.json").unlink(missing_ok=True)
