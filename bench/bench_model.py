"""Benchmark the segmentation model: training step time and inference throughput.

    python bench/bench_model.py [--quick] [--threads N] [--device auto|cpu|cuda]

Measured in one run, on the CPU (and on the GPU when one is available):

* training step time (forward + DiceCE/levels loss + backward + optimiser, batch of the plan)
  of every stage of the synthetic cascade and of the paper-size 3d_fullres network
  (nnU-Net's 128^3 class patch, filters 32..320; ``--quick`` uses a 64^3 patch on the CPU);
* inference throughput in voxels per second of ``lib.ml.sliding_window.sliding_window`` (Gaussian weighting,
  slab-wise argmax, bounded memory) against MONAI's ``sliding_window_inference`` (the named
  competitor: same network, same windows, full-volume output buffer), and the resulting
  seconds per 512 x 512 x 500 volume (extrapolated on the CPU, measured on a GPU);
* the whole synthetic cascade (``lib.ml.inference.predict_volume``) on a synthetic whole-spine scan
  (120 x 120 x 390 voxels at 2 mm, like the synthetic VerSe), seconds per case; with random
  weights the spine search covers the whole field of view (the worst case), so pass
  ``--model runs/synthetic/02_pretraining/models --image <a VerSe CT>`` for a trained model.

Networks have random weights unless ``--model`` is given: the speed of a step or a window does
not depend on them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lib.ml import (
    inference,
    losses,
    networks,
    planning,
    plans,
    preprocessing,
    sliding_window,
    trainer,
)


def _fingerprint(shape, spacing, labels):
    rng = np.random.default_rng(0)
    per = [{"case_id": f"c{i}", "shape": list(shape), "spacing_mm": list(spacing), "labels": list(labels),
            "fg_extent_mm": [110.0, 120.0, 0.85 * shape[2] * spacing[2]],
            "fg_samples": rng.normal(400, 200, 500).tolist()} for i in range(4)]
    return planning.summarise_fingerprint(per)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_train_step(plan, stage, dev, repeats: int = 3, patch=None) -> float:
    """Median seconds of one optimiser step of ``stage`` (random data of the stage's shape)."""
    st = plan.stage(stage) if isinstance(stage, str) else stage
    if patch is not None:
        st = plans.StagePlan(**{**st.__dict__, "patch_size": list(patch)})
    net = networks.build_network(plan, st).to(dev).train()
    opt = trainer._make_optimizer(net, plan.training, plan.training["lr"])
    loss_fn = losses.make_loss(st.task)
    n_cls = 1 + len(plan.labels) if st.task == "levels" else st.n_classes(plan)
    x = torch.randn(st.batch_size, st.in_channels, *st.patch_size, device=dev)
    y = torch.randint(0, n_cls, (st.batch_size, 1, *st.patch_size), device=dev)
    if st.task == "levels":
        y = y + preprocessing.LEVEL_FG * (y > 0)
    use_amp = dev.type == "cuda"
    times = []
    for _ in range(repeats + 1):
        _sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
            out = net(x)
            loss = losses.deep_loss(loss_fn, out, y, st.deep_supervision)
        loss.backward()
        opt.step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def time_sliding_window(plan, stage, shape, dev) -> tuple[float, float]:
    """(our seconds, MONAI sliding_window_inference seconds) over a volume of ``shape`` voxels."""
    from monai.inferers import sliding_window_inference

    st = plan.stage(stage) if isinstance(stage, str) else stage
    net = networks.build_network(plan, st).to(dev).eval()
    n_cls = st.n_classes(plan)
    img = np.random.default_rng(0).normal(0, 1, shape).astype(np.float32)
    overlap = plan.inference["overlap"]
    out = np.zeros(shape, np.uint8)

    def consume(z0, z1, probs):
        out[..., z0:z1] = probs.argmax(0)

    _sync(dev)
    t0 = time.perf_counter()
    sliding_window.sliding_window(net, img, st.patch_size, n_cls, consume, overlap=overlap, device=dev)
    _sync(dev)
    ours = time.perf_counter() - t0
    x = torch.from_numpy(img)[None, None].to(dev)
    _sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
        y = sliding_window_inference(x, st.patch_size, 1, net, overlap=overlap, mode="gaussian", sigma_scale=0.125)
        y.argmax(1)
    _sync(dev)
    return ours, time.perf_counter() - t0


def bench_trained(model_dir: str, image: str, dev) -> None:
    """Seconds per case of a trained model on one image (load excluded, best of two)."""
    from lib.io import load_volume

    lm = inference.load_model(model_dir, str(dev))
    vol = load_volume(image)
    times = []
    for _ in range(2):
        _sync(dev)
        t0 = time.perf_counter()
        inference.predict_volume(lm, vol.array, vol.spacing)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    print(f"\ntrained model {model_dir} on {image} {vol.shape}: {min(times):.2f} s per case "
          f"({np.prod(vol.shape) / min(times) / 1e6:.2f} Mvox/s of input)")


def bench_device(dev, quick: bool) -> None:
    print(f"\n=== device {dev} (torch threads {torch.get_num_threads()}) ===")
    syn = planning.plan_experiment(_fingerprint((120, 120, 390), (2.0, 2.0, 2.0), range(1, 26)), "synthetic",
                                target_spacing_mm=[3.0, 3.0, 3.0], coarse_spacing_mm=6.0, roi_margin_mm=25.0,
                                deep_supervision=0)
    paper = planning.plan_experiment(_fingerprint((512, 512, 600), (0.8, 0.8, 1.0), range(1, 26)), "paper")
    print(planning.describe_plan(syn))
    print(planning.describe_plan(paper))
    print("\ntraining step (s):")
    for st in syn.stages:
        t = time_train_step(syn, st, dev)
        print(f"  synthetic {st.name:8s} patch {st.patch_size} x{st.batch_size}: {t:.3f} s/step")
    p_patch = [64, 64, 64] if (quick and dev.type == "cpu") else None
    t = time_train_step(paper, "3d_fullres", dev, repeats=1 if dev.type == "cpu" else 5, patch=p_patch)
    shown = p_patch or paper.stages[0].patch_size
    print(f"  paper     3d_fullres patch {shown} x2: {t:.3f} s/step"
          + (f" (x{np.prod(paper.stages[0].patch_size) / np.prod(p_patch):.1f} voxels at full patch)" if p_patch else ""))
    print("\nsliding-window inference (voxels/s), lib.ml.inference vs MONAI sliding_window_inference:")
    vol_syn = (40, 48, 160)
    ours, theirs = time_sliding_window(syn, "fine", vol_syn, dev)
    n = np.prod(vol_syn)
    print(f"  synthetic fine {vol_syn}: ours {n / ours / 1e6:.2f} Mvox/s, MONAI {n / theirs / 1e6:.2f} Mvox/s "
          f"(ratio {theirs / ours:.2f})")
    vol_p = (512, 512, 500) if dev.type == "cuda" else (96, 128, 160) if quick else (192, 256, 240)
    ours, theirs = time_sliding_window(paper, "3d_fullres", vol_p, dev)
    n = np.prod(vol_p)
    per_vol = (512 * 512 * 500) / (n / ours)
    print(f"  paper 3d_fullres {vol_p}: ours {n / ours / 1e6:.3f} Mvox/s, MONAI {n / theirs / 1e6:.3f} Mvox/s "
          f"(ratio {theirs / ours:.2f}); 512x512x500 at the network grid: "
          f"{per_vol:.1f} s {'(measured)' if vol_p == (512, 512, 500) else '(extrapolated)'}")
    print("\nwhole synthetic cascade on a 120x120x390 whole-spine scan at 2 mm (random weights):")
    weights = {st.name: networks.build_network(syn, st).state_dict() for st in syn.stages}
    nets = {}
    for st in syn.stages:
        net = networks.build_network(syn, st)
        net.load_state_dict(weights[st.name])
        nets[st.name] = net.to(dev).eval()
    lm = inference.LoadedModel(syn, nets, dev)
    rng = np.random.default_rng(1)
    ct = rng.normal(0, 30, (120, 120, 390)).astype(np.float32)
    ct[50:70, 50:75, 20:370] += 500  # a bright column so every stage finds a region to work on
    times = []
    for _ in range(2):
        _sync(dev)
        t0 = time.perf_counter()
        inference.predict_volume(lm, ct, (2.0, 2.0, 2.0))
        _sync(dev)
        times.append(time.perf_counter() - t0)
    print(f"  {min(times):.2f} s per case")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller paper-size patch and volume on the CPU")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--device", default="auto", help="auto: CPU, then the GPU when available")
    ap.add_argument("--model", default=None, help="a trained model folder (model.pt + plan.json)")
    ap.add_argument("--image", default=None, help="a CT for --model")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append(torch.device("cuda"))
    if args.device == "cpu":
        devices = [torch.device("cpu")]
    for dev in devices:
        bench_device(dev, args.quick)
        if args.model and args.image:
            bench_trained(args.model, args.image, dev)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
