"""Networks: MONAI DynUNet built from a plan stage (instance norm, leaky ReLU, deep supervision)."""

from __future__ import annotations

from monai.networks.nets import DynUNet

from lib.ml.plans import Plan, StagePlan


def build_network(plan: Plan, stage: str | StagePlan | None = None):
    """MONAI DynUNet for one stage of a plan.

    Args:
        plan: the plan.
        stage: stage name or object (default: the plan's first stage).

    Returns:
        ``monai.networks.nets.DynUNet`` with instance norm and leaky ReLU. In training mode with
        deep supervision it returns ``(batch, 1 + deep_supervision, classes, x, y, z)``; in eval
        mode ``(batch, classes, x, y, z)`` logits.
    """
    st = plan.stages[0] if stage is None else (plan.stage(stage) if isinstance(stage, str) else stage)
    ds = int(st.deep_supervision)
    return DynUNet(
        spatial_dims=3, in_channels=st.in_channels, out_channels=st.n_classes(plan),
        kernel_size=[list(k) for k in st.kernels], strides=[list(s) for s in st.strides],
        upsample_kernel_size=[list(s) for s in st.strides[1:]], filters=list(st.filters),
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=ds > 0, deep_supr_num=max(ds, 1), res_block=bool(st.res_block),
    )


def count_parameters(net) -> int:
    """Trainable parameters of a module."""
    return int(sum(p.numel() for p in net.parameters() if p.requires_grad))
