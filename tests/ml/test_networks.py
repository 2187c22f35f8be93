"""lib.ml.networks: output shapes with and without deep supervision."""

from __future__ import annotations

import torch

from lib.ml import networks, planning
from tests.helpers.fingerprints import _fp


def test_build_network_shapes_with_deep_supervision():
    fp = _fp([(2.0, 2.0, 2.0)] * 3, [(32, 32, 64)] * 3, labels=(1, 2, 3))
    plan = planning.plan_experiment(fp, "synthetic", base_filters=4, max_filters=16)
    st = plan.stage("fine")
    net = networks.build_network(plan, st)
    x = torch.zeros(1, 1, *st.patch_size)
    net.train()
    out = net(x)
    assert out.shape == (1, 1 + st.deep_supervision, 2, *st.patch_size)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (1, 2, *st.patch_size)
    cst = plan.stage("coarse")  # the levels stage: CT + z-coordinate in, K - 1 thresholds out
    coarse = networks.build_network(plan, cst).eval()
    with torch.no_grad():
        y = coarse(torch.zeros(1, 2, *cst.patch_size))
    assert cst.in_channels == 2
    assert y.shape[1] == len(plan.labels) - 1
