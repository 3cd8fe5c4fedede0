"""dau_conv2d (CoDA) on every backend against the reference (the original's per-pixel weights)."""

import pytest
from cases import DAU_CONV2D

import bcos_kernels
from bcos_kernels.ops.dau_conv2d import cost_model, reference
from ops._util import DTYPES, check_backend, op_tests

globals().update(
    op_tests(
        "dau_conv2d",
        bcos_kernels.dau_conv2d,
        reference.dau_conv2d_original,
        DAU_CONV2D,
        autocast_lowers=("x", "rank_weight", "expand_weight", "expand_bias"),
    )
)


PLANS = cost_model.PLANS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in DAU_CONV2D])
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.forward}-{p.backward}")
def test_torch_backend_every_plan(plan, case, dtype, monkeypatch):
    """Backend "torch" in each of its four plans (forward and backward form each low-rank or materialised),
    whichever the cost model would pick for the case, against the reference."""
    monkeypatch.setattr(cost_model, "choose", lambda shape, needs_backward=True: plan)
    check_backend("dau_conv2d", "torch", bcos_kernels.dau_conv2d, reference.dau_conv2d_original, case, dtype)
