"""lib.ml.sliding_window: equal to a direct pass, memory bounded, mirror TTA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.ml import sliding_window

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Pointwise(torch.nn.Module):
    """Logits that depend only on each voxel's value: any window layout gives the same answer."""

    def __init__(self, n_classes=3):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, n_classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(-1, 1, n_classes).view(n_classes, 1, 1, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)


def test_sliding_window_equals_direct_and_is_memory_bounded():
    rng = np.random.default_rng(0)
    img = rng.normal(0, 2, (10, 12, 100)).astype(np.float32)
    net = _Pointwise().eval()
    with torch.no_grad():
        direct = torch.softmax(net(torch.from_numpy(img)[None, None]), 1)[0].numpy()
    got = np.zeros_like(direct)
    seen = []

    def consume(z0, z1, probs):
        seen.append((z0, z1))
        got[..., z0:z1] = probs

    info = sliding_window.sliding_window(net, img, (8, 8, 16), 3, consume, overlap=0.5)
    assert np.allclose(got, direct, atol=1e-5)
    # every slice emitted once, in order; never more than ~2 patch heights of all classes held
    assert seen[0][0] == 0
    assert seen[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(seen, seen[1:], strict=False))
    assert info["max_buffer_z"] <= 2 * 16
    assert info["windows"] > 10
    # an image smaller than the patch is padded around (centred), not cut
    small = img[:5, :6, :7]
    out = np.zeros((3, 5, 6, 7), np.float32)
    sliding_window.sliding_window(net, small, (8, 8, 16), 3, lambda a, b, p: out.__setitem__((Ellipsis, slice(a, b)), p))
    assert np.allclose(out, direct[:, :5, :6, :7], atol=1e-5)


def test_mirror_tta_is_exact_for_a_symmetric_net_and_changes_an_asymmetric_one():
    img = np.random.default_rng(1).normal(0, 1, (8, 8, 16)).astype(np.float32)
    runs = {}
    for name, net in (("point", _Pointwise()), ("conv", torch.nn.Conv3d(1, 3, 3, padding=1))):
        for tta in ((), (0,)):
            out = np.zeros((3, 8, 8, 16), np.float32)
            sliding_window.sliding_window(net.eval(), img, (8, 8, 16), 3,
                                 lambda a, b, p, o=out: o.__setitem__((Ellipsis, slice(a, b)), p), tta_axes=tta)
            runs[name, tta] = out
    assert np.allclose(runs["point", ()], runs["point", (0,)], atol=1e-6)
    assert not np.allclose(runs["conv", ()], runs["conv", (0,)], atol=1e-4)


def test_gaussian_importance_peaks_in_the_centre():
    w = sliding_window.gaussian_importance((9, 11, 16))
    assert w.max() == pytest.approx(1.0)
    assert w.min() > 0
    assert np.unravel_index(np.argmax(w), w.shape)[:2] == (4, 5)
    assert np.allclose(w, w[::-1, ::-1, ::-1])


def test_probabilities_are_handed_on_a_few_slices_at_a_time_with_the_same_values(monkeypatch):
    rng = np.random.default_rng(3)
    img = rng.normal(0, 2, (12, 10, 70)).astype(np.float32)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 4, 1)).eval()

    def run():
        got, seen = np.zeros((4, *img.shape), np.float32), []

        def consume(z0, z1, probs):
            seen.append(z1 - z0)
            got[..., z0:z1] = probs

        info = sliding_window.sliding_window(net, img, (8, 8, 16), 4, consume, overlap=0.5)
        return got, seen, info

    whole, seen_whole, _ = run()
    monkeypatch.setattr(sliding_window, "EMIT_VOXELS", 4 * 12 * 10 * 3)  # three slices of all classes
    parts, seen_parts, info = run()
    assert np.array_equal(parts, whole)
    assert max(seen_parts) <= 3 < max(seen_whole)
    assert sum(seen_parts) == 70
    assert info["max_buffer_z"] == 16  # one patch height, shifted in place
    # the float16 buffer (what paper-scale volumes use) stays within float16 rounding of float32
    monkeypatch.setattr(sliding_window, "FLOAT16_ABOVE_BYTES", 0)
    half, _, info16 = run()
    assert info16["buffer_dtype"] == "float16"
    assert np.abs(half - whole).max() < 2e-3
    assert (half.argmax(0) == whole.argmax(0)).mean() > 0.999


def test_shift_moves_the_unfinished_slices_to_the_front_and_zeroes_the_rest():
    buf = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 10)
    ref = torch.cat([buf[:, 3:], torch.zeros(2, 3)], dim=1)
    sliding_window._shift(buf, 3, dim=1)  # overlapping move (7 slices by 3)
    assert torch.equal(buf, ref)
    full = torch.ones(3, 4)
    sliding_window._shift(full, 4, dim=1)
    assert not full.any()
