"""nnU-Net v2 as a backend (the optional ``nnunet`` extra).

Without the extra: what is missing is said with the install command, and the parser of nnU-Net's
messages is checked on nnU-Net's own wording. With it (``make setup EXTRAS=nnunet``): nnU-Net's
integrity check passes our export and catches planted faults, with its message shown.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from lib.datasets.nnunet import dataset_folder, export_cases
from lib.ml import nnunet
from lib.ml.nnunet import backend, tools
from tests.helpers.verse_tree import AFFINE, FULL, spine_volumes

needs_nnunet = pytest.mark.skipif(nnunet.missing_reason() is not None,
                                  reason=f"{nnunet.missing_reason()} (runs in make test-all after that)")


def test_missing_nnunet_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setattr(tools.importlib.util, "find_spec", lambda name: None)
    reason = nnunet.missing_reason()
    assert "nnU-Net v2 is not installed" in reason
    assert "make setup EXTRAS=nnunet" in reason
    with pytest.raises(nnunet.NnunetMissingError, match="EXTRAS=nnunet"):
        nnunet.require()


def test_nnunet_messages_are_split_into_errors_and_warnings():
    out = """Dataset501_CTSpine1K
Error: Unexpected labels found in file /x/labelsTr/a.nii.gz.
Expected: [0, 1, 2]
Found: [ 0  1 30]

Warning: Origin mismatch between segmentation and corresponding images.
Origin images: (0.0, 0.0, 0.0).

Traceback (most recent call last):
  File "verify_dataset_integrity.py", line 199, in verify_dataset_integrity
RuntimeError: Some segmentation images contained unexpected labels. Please check text output above to see which one(s).
"""
    errors, warnings = backend._messages(out)
    assert errors[0].startswith("Error: Unexpected labels found in file /x/labelsTr/a.nii.gz.")
    assert "Found: [ 0  1 30]" in errors[0]
    assert errors[1].startswith("RuntimeError: Some segmentation images contained unexpected labels")
    assert len(errors) == 2
    assert warnings == ["Warning: Origin mismatch between segmentation and corresponding images.\n"
                        "Origin images: (0.0, 0.0, 0.0)."]


def test_folders_stay_under_the_given_root_and_compile_is_off_on_a_cpu(tmp_path):
    env = nnunet.NnunetFolders(tmp_path / "nn").make().environment(device="cpu", da_workers=0)
    assert env["nnUNet_raw"] == str(tmp_path / "nn" / "nnUNet_raw")
    assert env["nnUNet_results"] == str(tmp_path / "nn" / "nnUNet_results")
    assert (env["nnUNet_compile"], env["nnUNet_n_proc_DA"]) == ("false", "0")
    assert "nnUNet_n_proc_DA" not in nnunet.NnunetFolders(tmp_path).environment()  # the planner must not see 0


def _export(tmp_path, n=3):
    cases = []
    for i in range(n):
        ct, m = spine_volumes(FULL[i:i + 20])
        img, msk = tmp_path / "src" / f"c{i}.nii.gz", tmp_path / "src" / f"c{i}_seg.nii.gz"
        img.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(ct, AFFINE), str(img))
        nib.save(nib.Nifti1Image(m.astype(np.float64), AFFINE), str(msk))  # float64 masks, as VerSe's
        cases.append((f"c{i}", img, msk))
    folders = nnunet.NnunetFolders(tmp_path / "nn").make()
    return folders, export_cases(cases, [], dataset_folder(folders.raw), test_splits=())


@needs_nnunet
def test_nnunet_accepts_our_export_and_names_each_planted_fault(tmp_path):
    folders, ds = _export(tmp_path)
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 3
    report = nnunet.verify_dataset(ds, folders, log=tmp_path / "verify.log")
    assert report.passed
    assert report.errors == []

    bad = ds / "labelsTr" / "c1.nii.gz"  # a label outside dataset.json (30), written past our own check
    m = np.asarray(nib.load(str(bad)).dataobj).astype(np.uint8)
    m[0, 0, 0] = 30
    bad.unlink()
    nib.save(nib.Nifti1Image(m, AFFINE), str(bad))
    with pytest.raises(nnunet.NnunetIntegrityError) as err:
        nnunet.verify_dataset(ds, folders)
    text = str(err.value)
    assert f"Unexpected labels found in file {bad}" in text
    assert "30" in text
    print(text)  # nnU-Net's own message, as a user sees it

    nib.save(nib.Nifti1Image(m.clip(0, 25), AFFINE), str(bad))  # label fixed
    geo = ds / "labelsTr" / "c2.nii.gz"  # geometry: the mask on a 3 mm grid, the CT on 2 mm
    g = np.asarray(nib.load(str(geo)).dataobj).astype(np.uint8)
    geo.unlink()
    nib.save(nib.Nifti1Image(g, np.diag([3.0, 3.0, 3.0, 1.0])), str(geo))
    with pytest.raises(nnunet.NnunetIntegrityError) as err:
        nnunet.verify_dataset(ds, folders)
    assert "Spacing mismatch between segmentation and corresponding images" in str(err.value)
    assert str(geo) in str(err.value)


def _budgeted(monkeypatch, epochs: int, budget_s: float):
    from types import SimpleNamespace

    from lib.ml.nnunet import trainer as tr
    t = tr.nnUNetTrainerSpine1k.__new__(tr.nnUNetTrainerSpine1k)  # no plans needed for the schedule logic
    monkeypatch.setattr(tr.nnUNetTrainer, "on_epoch_end", lambda self: setattr(self, "current_epoch", self.current_epoch + 1))
    t.num_epochs = t._requested_epochs = epochs
    t.budget_s, t._epochs_here, t.current_epoch, t._loop_start = budget_s, 0, 0, 0.0
    t.lr_scheduler, t.print_to_log_file = SimpleNamespace(max_steps=epochs), lambda *a, **k: None
    return tr, t


@needs_nnunet
def test_a_budget_compresses_nnunets_schedule_and_ends_training_when_spent(monkeypatch):
    tr, t = _budgeted(monkeypatch, epochs=100, budget_s=100.0)
    monkeypatch.setattr(tr.time, "monotonic", lambda: 10.0 * t._epochs_here)  # 10 s per epoch
    t.on_epoch_end()
    assert (t.num_epochs, t.lr_scheduler.max_steps) == (10, 10)  # the poly schedule stretched over 10 epochs
    for _ in range(8):
        t.on_epoch_end()
    with pytest.raises(tr.BudgetSpent):
        t.on_epoch_end()
    assert t.current_epoch == 10


@needs_nnunet
def test_a_schedule_that_fits_its_budget_is_left_to_nnunet(monkeypatch):
    tr, t = _budgeted(monkeypatch, epochs=3, budget_s=1000.0)
    monkeypatch.setattr(tr.time, "monotonic", lambda: 10.0 * t._epochs_here)
    for _ in range(3):
        t.on_epoch_end()  # never raises: nnU-Net's own loop ends after epoch 3
    assert (t.num_epochs, t.current_epoch) == (3, 3)
