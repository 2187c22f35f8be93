"""lib.train: resampling, cache, patch sampling/augmentation, determinism, kill/resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from lib.datasets import verse
from lib.ml import cache
from lib.ml import checkpoint
from lib.ml import ddp
from lib.ml import losses
from lib.ml import networks
from lib.ml import planning
from lib.ml import plans
from lib.ml import preprocessing
from lib.ml import sampling
from lib.ml import trainer
from lib.core.cases import split_cases
from lib.core.paths import REPO_ROOT
from lib.imaging import resampling, thick_slices
from lib.io import load_volume
from tests.test_model import make_toy_case, toy_cases

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_plan(cases, **kw):
    """A two-stage synthetic plan with very small networks (fast on one CPU thread)."""
    return planning.plan_experiment(cases, "synthetic", base_filters=4, max_filters=16, coarse_spacing_mm=4.0,
                                 roi_margin_mm=8.0, deep_supervision=1, **kw)


def _weights(out_dir):
    return torch.load(out_dir / "model.pt", weights_only=False)["weights"]


def _equal(a, b):
    return all(torch.equal(a[s][k], b[s][k]) for s in a for k in a[s]) and a.keys() == b.keys()


# ----------------------------------------------------------------------------- resampling


def test_resample_image_keeps_extent_and_constants():
    a = np.full((10, 12, 14), 3.5, np.float32)
    assert np.allclose(resampling.resample_image(a, (5, 6, 7)), 3.5)
    ramp = np.broadcast_to(np.arange(20, dtype=np.float32), (4, 4, 20)).copy()
    down = resampling.resample_image(ramp, (4, 4, 10))
    # voxel edges aligned: new voxel j covers old voxels 2j, 2j+1 -> centre 2j + 0.5
    assert np.allclose(down[0, 0], np.arange(10) * 2 + 0.5)


def test_resample_labels_per_class_keeps_blocks_and_values():
    seg = np.zeros((20, 20, 40), np.uint8)
    seg[4:16, 4:16, 2:18] = 7
    seg[4:16, 4:16, 22:38] = 28
    down = resampling.resample_labels(seg, (10, 10, 20))
    assert set(np.unique(down)) == {0, 7, 28}
    assert (down[:, :, 1:9] == 7).sum() == 6 * 6 * 8
    back = resampling.resample_labels(down, seg.shape)
    assert (back == seg).mean() > 0.97


def test_mask_to_classes_names_file_and_values(tmp_path):
    cases = toy_cases(tmp_path, 2)
    plan = tiny_plan(cases)
    m = np.array([0, 20, 23, 99], np.uint8)
    assert preprocessing.mask_to_classes(m[:3], plan, "labels").tolist() == [0, 1, 4]
    assert preprocessing.mask_to_classes(m[:3], plan, "foreground").tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match=r"weird_seg.*\[99\]"):
        preprocessing.mask_to_classes(m, plan, "labels", "weird_seg.nii.gz")


# ----------------------------------------------------------------------------- cache


def test_cache_is_reused_and_redone_when_source_changes(tmp_path):
    cases = toy_cases(tmp_path / "d", 2)
    plan = tiny_plan(cases)
    folder, metas = cache.build_cache(cases, plan, "coarse", tmp_path / "cache", progress=False)
    img = np.load(folder / metas[0]["image"], mmap_mode="r")
    assert img.dtype == np.float16 and list(img.shape) == metas[0]["shape"]
    assert not str(folder / metas[0]["image"]).endswith(".gz")
    assert plan.stage("coarse").task == "levels"
    seg = np.load(folder / metas[0]["seg"])
    assert preprocessing.decode_levels(seg).max() == len(plan.labels) and seg.dtype == np.uint8
    near = seg % preprocessing.LEVEL_FG
    assert (near[seg >= preprocessing.LEVEL_FG] > 0).all() and (near > 0).sum() > (seg >= preprocessing.LEVEL_FG).sum()
    stamp = (folder / metas[0]["image"]).stat().st_mtime_ns
    cache.build_cache(cases, plan, "coarse", tmp_path / "cache", progress=False)
    assert (folder / metas[0]["image"]).stat().st_mtime_ns == stamp  # reused
    time.sleep(0.01)
    make_toy_case(cases[0][1], cases[0][2], seed=99)
    cache.build_cache(cases, plan, "coarse", tmp_path / "cache", progress=False)
    assert (folder / metas[0]["image"]).stat().st_mtime_ns != stamp  # redone
    # the normalisation is the plan's: clipped to the foreground percentiles, z-scored
    fine_folder, fine_metas = cache.build_cache(cases, plan, "fine", tmp_path / "cache", progress=False)
    fimg = np.load(fine_folder / fine_metas[1]["image"]).astype(np.float32)
    assert fimg.min() == pytest.approx(preprocessing.pad_value(plan.normalization), abs=1e-2)
    assert set(np.unique(np.load(fine_folder / fine_metas[1]["seg"]))) == {0, 1}


def test_levels_targets_and_loss_prefer_the_right_count():
    cls = np.zeros((1, 1, 12), np.uint8)
    cls[0, 0, 1:3], cls[0, 0, 6:9] = 1, 2
    enc = preprocessing.encode_levels(cls)
    assert preprocessing.decode_levels(enc).tolist() == cls.tolist()
    # background voxels carry the nearest vertebra's level: 1 above the gap's middle, 2 below
    assert (enc[0, 0] % preprocessing.LEVEL_FG).tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2] or \
        (enc[0, 0] % preprocessing.LEVEL_FG).tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]
    target = torch.as_tensor(enc[None, None].astype(np.int64))  # (1, 1, 1, 1, 12)
    loss = losses.LevelsLoss()
    good = torch.full((1, 1, 1, 1, 12), -8.0)  # the one threshold: "level > 1"
    good[0, 0, ..., 5:] = 8.0
    bad = -good
    assert float(loss(good, target)) < 0.01 < 1.0 < float(loss(bad, target))
    pred = losses.predicted_classes(good.numpy(), "levels", enc[None])
    assert pred[0, 0, 0].tolist() == cls[0, 0].tolist()
    # P(level > 1..4): the level is 1 + the expected number of thresholds passed
    probs = np.array([[0.95, 0.9, 0.1, 0.05], [0.01] * 4, [0.99] * 4]).T
    assert losses.level_from_ordinal(probs).tolist() == [3, 1, 5]


# ----------------------------------------------------------------------------- patches + augmentation


def _sampler(tmp_path, augment=None, stage="fine"):
    cases = toy_cases(tmp_path / "d", 3)
    plan = tiny_plan(cases)
    folder, metas = cache.build_cache(cases, plan, stage, tmp_path / "cache", progress=False)
    aug = plan.augmentation if augment is None else augment
    return sampling.PatchSampler(cache.open_cache(folder, metas), plan.stage(stage), plan, aug, seed=3, stage_index=1), plan


def test_patches_are_a_pure_function_of_seed_epoch_iteration_item(tmp_path):
    s, plan = _sampler(tmp_path, augment={**planning.default_augmentation("synthetic"), "p_rotate": 1.0,
                                          "p_scale": 1.0, "thick_slice_prob": 0.5})
    a = s.sample(2, 5, 1)
    b = s.sample(2, 5, 1)
    c = s.sample(2, 6, 1)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (1, *plan.stage("fine").patch_size) and a[1].dtype == np.uint8
    # DDP: the two ranks' items together are the single-process batch
    full = s.batch(1, 0)
    r0, r1 = s.batch(1, 0, 0, 2), s.batch(1, 0, 1, 2)
    assert np.array_equal(full[0][0::2], r0[0]) and np.array_equal(full[0][1::2], r1[0])


def test_augmentation_mirrors_left_right_never_craniocaudal(tmp_path):
    shape = (16, 16, 32)
    img = np.broadcast_to(np.arange(32, dtype=np.float32), shape).copy()
    seg = np.zeros(shape, np.uint8)
    seg[:4, :, :16] = 1  # right-low corner only
    seg[:, :, 16:] = 2
    out_i, out_s = sampling.extract_patch(img, seg, (7.5, 7.5, 15.5), shape, (1, 1, 1), 0.0, None, flip_lr=True)
    assert np.array_equal(out_i, img)  # z order kept
    assert (out_s[-4:, :, :16] == 1).all() and (out_s[:4, :, :16] == 0).all()  # x mirrored
    # rotation/scale: labels stay labels (nearest neighbour), no new values
    m = sampling._rotation([0.3, 0.2, 0.1]) / 1.1
    ri, rs = sampling.extract_patch(img, seg, (7.5, 7.5, 15.5), shape, (1, 1, 1), -1.0, m)
    assert set(np.unique(rs)) <= {0, 1, 2} and ri.shape == shape


def test_fov_crop_keeps_a_random_part_of_the_region_along_z_only(tmp_path):
    region = (np.array([3, 4, 10]), np.array([30, 31, 110]))
    lengths, starts = [], []
    for i in range(200):
        lo, hi = sampling.crop_region_z(region, np.random.default_rng(i), (0.3, 0.7))
        assert list(lo[:2]) == [3, 4] and list(hi[:2]) == [30, 31]  # x, y untouched
        assert 10 <= lo[2] < hi[2] <= 110
        lengths.append(hi[2] - lo[2])
        starts.append(lo[2])
    assert 30 <= min(lengths) and max(lengths) <= 70
    assert min(starts) < 20 and max(starts) > 60  # the kept part wanders over the whole region
    # in the sampler: the whole-spine stage's patch is fill (and background) outside the kept
    # part, as if the scan ended there; without the augmentation the labels reach further
    none = {"p_fov_crop": 0.0}
    s0, plan = _sampler(tmp_path / "a", augment=none, stage="coarse")
    s1, _ = _sampler(tmp_path / "b", augment={"p_fov_crop": 1.0, "fov_crop_fraction": [0.3, 0.5]}, stage="coarse")
    fill = preprocessing.pad_value(plan.normalization)
    for item in range(4):
        (i0, g0), (i1, g1) = s0.sample(0, 0, item), s1.sample(0, 0, item)
        z0 = np.nonzero((g0 > 0).any(axis=(0, 1)))[0]
        z1 = np.nonzero((g1 > 0).any(axis=(0, 1)))[0]
        assert z1.size and z1.size < z0.size and set(z1) <= set(z0)
        seen0 = ~np.isclose(i0[0], fill).all(axis=(0, 1))
        seen1 = ~np.isclose(i1[0], fill).all(axis=(0, 1))
        assert seen1.sum() < seen0.sum() and seen1[z1].all()  # less image, labels only where there is image


def test_thick_slice_simulation_blurs_z_only():
    rng = np.random.default_rng(0)
    img = rng.normal(0, 1, (12, 12, 48)).astype(np.float32)
    out = thick_slices.thick_slice_augment(img, 1.0, 5.0, 0.0)
    dz = np.abs(np.diff(out, axis=2)).mean()
    dx = np.abs(np.diff(out, axis=0)).mean()
    assert dz < 0.5 * np.abs(np.diff(img, axis=2)).mean()
    assert dx > 2 * dz  # in-plane detail kept
    assert np.array_equal(thick_slices.thick_slice_augment(img, 2.0, 2.5, 0.0), img)  # thinner than 1.5 voxels


# ----------------------------------------------------------------------------- training


def test_training_learns_is_deterministic_and_writes_outputs(tmp_path):
    cases = toy_cases(tmp_path / "d", 4)
    plan = tiny_plan(cases)
    kw = dict(val_cases=cases[3:], max_epochs=10, iterations_per_epoch=4, seed=1, progress=False, device="cpu")
    r1 = trainer.train(cases[:3], tmp_path / "a", plan, **kw)
    r2 = trainer.train(cases[:3], tmp_path / "b", plan, **kw)
    assert _equal(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    log = pd.read_csv(r1.log_csv)
    assert list(log["stage"].unique()) == ["locate", "coarse", "fine"]
    assert r1.epochs == {s.name: max(1, round(10 * s.budget_share)) for s in plan.stages}
    fine = log[log.stage == "fine"]
    assert fine["train_loss"].iloc[-1] < fine["train_loss"].iloc[0]
    coarse = log[log.stage == "coarse"]
    assert coarse["lr"].iloc[1] < coarse["lr"].iloc[0]  # poly decay
    assert r1.log_csv.stat().st_size > 100 and (tmp_path / "a" / "plan.json").exists()
    assert plans.load_plan(tmp_path / "a") == plan
    # another seed gives other weights; a finished run is returned without training
    r3 = trainer.train(cases[:3], tmp_path / "c", plan, **{**kw, "seed": 2})
    assert not _equal(_weights(tmp_path / "a"), _weights(tmp_path / "c"))
    t0 = time.perf_counter()
    again = trainer.train(cases[:3], tmp_path / "a", plan, **kw)
    assert time.perf_counter() - t0 < 1.0 and again.model_path == r1.model_path
    assert r3.seconds > 0 and r2.final_metrics["fine"]["epoch"] == r1.epochs["fine"]


def test_fine_tune_starts_from_previous_weights(tmp_path):
    cases = toy_cases(tmp_path / "d", 3)
    plan = tiny_plan(cases)
    base = trainer.train(cases, tmp_path / "base", plan, max_epochs=4, iterations_per_epoch=3, seed=0, progress=False)
    # zero learning rate: fine-tuned weights must equal the initial ones exactly
    ft = trainer.train(cases[:2], tmp_path / "ft", None, init_from=base.model_dir, max_epochs=2,
                     iterations_per_epoch=2, lr=1e-12, seed=5, progress=False, augment=False)
    assert plans.load_plan(ft.model_dir) == plan
    a, b = _weights(tmp_path / "base"), _weights(tmp_path / "ft")
    diff = max(float((a[s][k].float() - b[s][k].float()).abs().max()) for s in a for k in a[s])
    assert diff < 1e-6
    # fine-tune one stage only: the others keep their weights and the model stays complete
    one = trainer.train(cases[:2], tmp_path / "one", None, init_from=base.model_dir, max_epochs=1,
                      iterations_per_epoch=2, seed=5, progress=False, stages=["coarse"])
    w1 = _weights(one.model_dir)
    assert set(w1) == {"locate", "coarse", "fine"}
    assert all(torch.equal(w1["fine"][k], a["fine"][k]) for k in a["fine"])
    assert not all(torch.equal(w1["coarse"][k], a["coarse"][k]) for k in a["coarse"])
    # a plan with another label set: shared layers initialised, the output head starts fresh
    plan2 = tiny_plan(cases, labels=[20, 21])
    net = networks.build_network(plan2, "coarse")
    skipped = checkpoint.init_state(net, a["coarse"], "base")
    assert skipped and all(("output_block" in k) or ("deep_supervision" in k) or ("super_head" in k) for k in skipped)


def test_time_budget_stops_training(tmp_path):
    cases = toy_cases(tmp_path / "d", 2)
    plan = tiny_plan(cases)
    res = trainer.train(cases, tmp_path / "t", plan, max_epochs=1000, iterations_per_epoch=2, time_budget_s=3.0,
                      progress=False)
    assert set(res.stopped_by.values()) == {"time"}
    assert res.seconds < 6.0 and sum(res.epochs.values()) < 1000


_KILL_SCRIPT = """
import os, signal, sys, torch
from lib.ml import ddp, sampling
torch.set_num_threads(1)
k = int(sys.argv[2])
batch = sampling.PatchSampler.batch
def batch_then_die(self, epoch, iteration, *a, **kw):
    # SIGKILL in the middle of epoch k (0-based epoch k - 1) of the coarse stage: its checkpoint
    # of epoch k - 1 is on disk, one batch of epoch k has been trained, and nothing else is flushed
    if self.stage.name == "coarse" and epoch == k - 1 and iteration == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return batch(self, epoch, iteration, *a, **kw)
sampling.PatchSampler.batch = batch_then_die
ddp.run_job(sys.argv[1])
"""


def test_kill_during_epoch_and_resume_equals_uninterrupted(tmp_path):
    cases = toy_cases(tmp_path / "d", 3)
    plan = tiny_plan(cases)
    kw = dict(max_epochs=10, iterations_per_epoch=6, seed=4, progress=False, device="cpu", num_threads=1)
    ref = trainer.train(cases, tmp_path / "ref", plan, **kw)
    job = ddp.write_job(tmp_path / "job.json", cases, tmp_path / "run", plan, **kw)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    k = 3  # killed during epoch 3 of the coarse stage, once the checkpoint of epoch 2 exists
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(job), str(k)], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    ckpt = tmp_path / "run" / "stage_coarse" / "checkpoint.pt"
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    killed_at = torch.load(ckpt, weights_only=False)["epoch"]
    assert killed_at == k - 1, f"killed after epoch {killed_at}, wanted during epoch {k}"
    assert not (tmp_path / "run" / "model.pt").exists()
    res = ddp.run_job(job)
    assert res.resumed_from["coarse"] == k - 1
    assert _equal(_weights(tmp_path / "ref"), _weights(tmp_path / "run"))
    a, b = pd.read_csv(ref.log_csv), pd.read_csv(res.log_csv)
    assert np.allclose(a["train_loss"], b["train_loss"], rtol=0, atol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_gloo_matches_one_process_curve(tmp_path):
    cases = toy_cases(tmp_path / "d", 4)
    plan = tiny_plan(cases)
    st = plan.stages[1]
    plan = plans.Plan(**{**plan.__dict__, "stages": [st], "combine": "single"})  # one stage, foreground only
    plan.stages[0].budget_share = 1.0
    kw = dict(max_epochs=8, iterations_per_epoch=4, seed=0, progress=False, device="cpu", num_threads=1)
    single = trainer.train(cases, tmp_path / "one", plan, **kw)
    job = ddp.write_job(tmp_path / "job.json", cases, tmp_path / "two", plan, **kw)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "lib.ml.ddp", "--job", str(job)]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])
    one = pd.read_csv(single.log_csv)["train_loss"].to_numpy()
    two = pd.read_csv(res["log_csv"])["train_loss"].to_numpy()
    assert len(one) == len(two) == 8
    assert two[-1] < 0.8 * two[0] and one[-1] < 0.8 * one[0]
    assert np.corrcoef(one, two)[0, 1] > 0.9
    assert abs(two[0] - one[0]) / one[0] < 0.15  # same init, same global batch


def test_train_rejects_unknown_labels(tmp_path):
    cases = toy_cases(tmp_path / "d", 2)
    plan = tiny_plan(cases, labels=[20, 21, 22])
    with pytest.raises(Exception, match=r"t0_seg.*\[23\]"):
        trainer.train(cases, tmp_path / "x", plan, max_epochs=1, iterations_per_epoch=1, progress=False)
    # label_map can drop a value instead
    plan2 = tiny_plan(cases, labels=[20, 21, 22], label_map={23: 0})
    res = trainer.train(cases, tmp_path / "y", plan2, max_epochs=2, iterations_per_epoch=1, progress=False)
    assert res.model_path.exists()
    assert load_volume(cases[0][2]).array.max() == 23


# ----------------------------------------------------------------------------- VerSe selection


def _verse_scan(root, stem, labels, shape=(10, 10, 72), mask_zoom=1.0, pad_top=9):
    """A tiny BIDS VerSe scan: one 2-voxel slab per label from the top (superior) down."""
    from lib.io import save_volume

    sub = stem.split("_")[0]
    ct = np.zeros(shape, np.int16)
    m = np.zeros(shape, np.uint8)
    z = shape[2] - pad_top
    for v in labels:
        m[3:7, 3:7, z - 2:z] = v
        ct[3:7, 3:7, z - 2:z] = 500
        z -= 2
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    save_volume(ct, aff, root / "rawdata" / sub / f"{stem}_ct.nii.gz")
    if mask_zoom != 1.0:
        m = np.repeat(m, int(1 / mask_zoom), axis=2)
        aff = np.diag([2.0, 2.0, 2.0 * mask_zoom, 1.0])
    save_volume(m, aff, root / "derivatives" / sub / f"{stem}_seg-vert_msk.nii.gz")


def test_verse_selection_keeps_complete_consistent_scans_and_says_why_not(tmp_path):
    from lib.core import labels as L

    full = list(range(1, 25))  # C1..L5
    _verse_scan(tmp_path, "sub-verse001", full)
    _verse_scan(tmp_path, "sub-verse002_dir-ax", [v for v in full if v != L.T12])  # T11 spine: usable
    _verse_scan(tmp_path, "sub-verse003", full[:19] + [L.T13] + full[19:])  # T13: usable
    _verse_scan(tmp_path, "sub-verse004", full[3:])  # starts at C4
    _verse_scan(tmp_path, "sub-verse005", full[:15])  # ends at T8
    _verse_scan(tmp_path, "sub-verse006", full, mask_zoom=0.5)  # mask on a 1 mm z grid
    _verse_scan(tmp_path, "sub-verse007", full, pad_top=0)  # C1 cut by the superior face
    _verse_scan(tmp_path, "sub-verse008", [v for v in full if v != 12])  # T5 missing inside
    usable, table = verse.select_pretraining_cases(tmp_path, progress=False)
    assert [u[0] for u in usable] == ["sub-verse001", "sub-verse002_dir-ax", "sub-verse003"]
    why = dict(zip(table["case_id"], table["reason"], strict=True))
    assert "C1 not in the field of view" in why["sub-verse004"]
    assert "ends at T8" in why["sub-verse005"]
    assert "mask spacing 2 2 1 mm differs" in why["sub-verse006"]
    assert "border" in why["sub-verse007"] or "above C1" in why["sub-verse007"]
    assert "T5" in why["sub-verse008"]
    assert table["usable"].sum() == 3 and len(table) == 8
    tr, te = split_cases(usable, 1, seed=0)
    assert len(tr) == 2 and len(te) == 1 and set(tr + te) == set(usable)
    assert split_cases(usable, 1, seed=0) == (tr, te)


def test_foreground_targets_are_spine_fractions_on_a_coarser_grid(tmp_path):
    cases = toy_cases(tmp_path / "d", 2)
    plan = tiny_plan(cases, target_spacing_mm=[3.0, 3.0, 3.0], soft_targets=True)
    folder, metas = cache.build_cache(cases, plan, "fine", tmp_path / "cache", progress=False)
    seg = np.load(folder / metas[0]["seg"])
    partial = (seg > 0) & (seg < preprocessing.SOFT_MAX)
    assert partial.any() and (seg == preprocessing.SOFT_MAX).any()  # boundary voxels hold fractions
    # the loss prefers probabilities equal to the fractions over hard 0/1 guesses
    y = torch.as_tensor(seg[None, None].astype(np.int64))
    f = y.float() / preprocessing.SOFT_MAX
    exact = torch.log(torch.cat([1 - f, f], 1).clamp(1e-4, 1))
    hard = torch.log(torch.cat([(f < 0.5).float(), (f >= 0.5).float()], 1).clamp(1e-4, 1))
    loss = losses.SoftForegroundLoss()
    assert float(loss(exact, y)) < float(loss(hard, y))


def test_levels_count_whole_levels_so_a_normal_l1_follows_t12(tmp_path):
    from lib.core import labels as L

    cases = toy_cases(tmp_path / "d", 1)
    plan = tiny_plan(cases, labels=L.ordered(list(range(1, 26)) + [L.T13]))
    ladder = plan.level_ladder()
    assert L.T13 not in ladder and ladder == list(range(1, 26))
    assert plan.stage("coarse").n_classes(plan) == 24  # thresholds between the 25 rungs
    mask = np.array([[[19, L.T13, 20, 0, 25]]], dtype=np.uint8)  # T12, T13, L1, background, L6
    lev = preprocessing.mask_to_classes(mask, plan, "levels")
    assert lev.ravel().tolist() == [19, 0, 20, 0, 25]  # T12 and L1 one rung apart; T13 off the ladder
    assert plan.level_to_label()[[19, 20, 25]].tolist() == [19, 20, 25]
    # the softmax task keeps T13 as its own class
    lab = preprocessing.mask_to_classes(mask, plan, "labels").ravel().tolist()
    assert lab[1] == plan.labels.index(L.T13) + 1 and lab[2] == lab[1] + 1
    # encoded targets: T13's voxel takes a neighbour's level, never a rung of its own
    enc = preprocessing.encode_levels(lev[..., :3]) & (preprocessing.LEVEL_FG - 1)  # the trained level of every voxel
    assert enc.ravel()[0] == 19 and enc.ravel()[2] == 20 and enc.ravel()[1] in (19, 20)
