"""Fault corpus, training and inference: a bad training pair is refused before any step, a
non-finite batch or loss stops training naming the cases and the step (the last checkpoint kept),
a bad test image is a failed case naming its file while the others are predicted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lib.io import IntegrityError
from lib.ml import inference, losses, sampling, trainer
from tests.helpers.plans import tiny_plan
from tests.helpers.toy_cases import toy_cases
from tests.ml import test_trainer
from tests.reliability import data
from tests.reliability.corpus import Fault, faults, scenario

_KW = dict(max_epochs=2, iterations_per_epoch=2, progress=False, device="cpu", num_threads=1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A model of any quality (two steps): inference faults only need it to run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny_model")
    cases = toy_cases(root / "d", 2)
    return trainer.train(cases, root / "m", tiny_plan(cases), **_KW).model_dir


def _refused(mutate, on, kind):
    def check(run):
        cases = toy_cases(run.tmp / "d", 3)
        target = Path(cases[1][1] if on == "image" else cases[1][2])
        mutate(target)
        plan = tiny_plan(toy_cases(run.tmp / "ok", 2))  # planned on good data; the fault enters later
        with pytest.raises(IntegrityError) as err:
            trainer.train(cases, run.tmp / "m", plan, **_KW)
        assert target.name in str(err.value)
        assert kind in err.value.kinds
        assert not (run.tmp / "m" / "model.pt").exists()
        assert not list((run.tmp / "m").rglob("checkpoint.pt"))  # refused before any step
        run.told(f"IntegrityError [{kind}] naming {target.name} before any training step")
    return check


def _nan_after_cache(run):
    cases = toy_cases(run.tmp / "d", 3)
    real = sampling.PatchSampler.sample

    def poisoned(self, epoch, iteration, item, augment=True):
        img, seg = real(self, epoch, iteration, item, augment)
        if self.case_of(epoch, iteration, item) == "t1" and epoch == 1:
            img = img.copy()
            img[..., 0] = np.nan
        return img, seg

    run.monkeypatch.setattr(sampling.PatchSampler, "sample", poisoned)
    with pytest.raises(trainer.NonFiniteError, match=r"non-finite input voxels .*epoch 2, step \d .*t1") as err:
        trainer.train(cases, run.tmp / "m", tiny_plan(cases), max_epochs=6, iterations_per_epoch=3,
                      progress=False, device="cpu", num_threads=1)
    assert "t1" in err.value.case_ids
    run.told(f"NonFiniteError: stage {err.value.stage}, epoch 2, step {err.value.step}, cases named")


def _nan_loss(run):
    cases = toy_cases(run.tmp / "d", 2)
    real, calls = losses.deep_loss, {"n": 0}

    def nan_at_5(loss_fn, out, y, ds):
        calls["n"] += 1
        value = real(loss_fn, out, y, ds)
        return value * float("nan") if calls["n"] == 5 else value

    run.monkeypatch.setattr(trainer, "deep_loss", nan_at_5)
    with pytest.raises(trainer.NonFiniteError, match=r"loss nan in stage 'coarse', epoch \d+, step \d+") as err:
        trainer.train(cases, run.tmp / "m", tiny_plan(cases), max_epochs=8, iterations_per_epoch=2,
                      progress=False, device="cpu", num_threads=1)
    ckpt = next((run.tmp / "m").rglob("checkpoint.pt"))
    state = torch.load(ckpt, weights_only=False)
    assert err.value.epoch >= 1  # after at least one checkpointed epoch
    assert state["epoch"] == err.value.epoch  # the last good epoch; nothing written from the NaN step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if torch.is_tensor(v))
    run.told(f"NonFiniteError at epoch {err.value.epoch + 1} step {err.value.step} (cases "
             f"{', '.join(err.value.case_ids)}); the checkpoint of epoch {state['epoch']} kept")


def _bad_test_image(mutate, kind):
    def check(run):
        model = run.fixture("tiny_model")
        cases = toy_cases(run.tmp / "d", 3)
        mutate(Path(cases[1][1]))
        items = [(c[0], c[1], str(run.tmp / "p" / f"{c[0]}.nii.gz")) for c in cases]
        res = inference.predict_cases(model, items, workers=0, progress=False)
        assert sorted(res.values) == ["t0", "t2"]  # the others were predicted
        assert res.failed_ids == ["t1"]
        assert "t1.nii.gz" in res.failures[0].message
        assert kind in res.failures[0].message
        assert not (run.tmp / "p" / "t1.nii.gz").exists()  # no empty mask written "successfully"
        run.told(f"failed case naming t1.nii.gz ({kind}); t0, t2 predicted")
    return check


FAULTS = faults(
    Fault("ml-01", "train", "a NaN slab in a trainset CT", _refused(data.nan_slab, "image", "non_finite")),
    Fault("ml-02", "train", "a trainset mask shifted 1 mm in its affine", _refused(data.shifted_affine, "mask", "affine")),
    Fault("ml-03", "train", "a trainset mask with a float label 3.5",
          _refused(lambda p: data.set_label(p, 22, 3.5), "mask", "not_integer")),
    Fault("ml-04", "train", "a trainset mask with a label the plan does not have",
          _refused(lambda p: data.set_label(p, 22, 99), "mask", "unknown_label")),
    Fault("ml-05", "train", "NaN reaching a batch after caching", _nan_after_cache),
    Fault("ml-06", "train", "a non-finite loss", _nan_loss),
    Fault("ml-07", "train", "kill -9 during an epoch", scenario(
        test_trainer.test_kill_during_epoch_and_resume_equals_uninterrupted,
        "resumes from the last checkpoint; weights and losses equal an uninterrupted run")),
    Fault("ml-08", "predict", "a NaN slab in a test CT", _bad_test_image(data.nan_slab, "NaN")),
    Fault("ml-09", "predict", "a truncated test CT", _bad_test_image(data.truncate, "truncated")),
)


@pytest.mark.parametrize("fault", FAULTS, ids=repr)
def test_fault(fault, run):
    fault.check(run)
