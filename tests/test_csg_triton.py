"""Class-specific gate, backend "triton", against the reference: forward, grad x, grad mask (deterministic).

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1): tiny shapes,
fp32. With a GPU they run on it, and the fp16/bf16 tests run too.
"""

import functools
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="backend 'triton' needs the triton package")

from helpers import (  # noqa: E402
    CSG_OPCHECK_CASES,
    assert_csg_compile_matches_eager,
    csg_inputs,
    on_gpu,
    opcheck_class_specific_gate,
    triton_module_marks,
)

from bcos_kernels import backends  # noqa: E402
from bcos_kernels.nn.csg import ClassSpecificGate  # noqa: E402
from bcos_kernels.ops.class_specific_gate import class_specific_gate  # noqa: E402
from bcos_kernels.ops.class_specific_gate import reference as ref  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = triton_module_marks(DEVICE)
_inputs = functools.partial(csg_inputs, DEVICE)


def _fwd_bwd(fn, x, mask, gout):
    out = fn(x, mask)
    wrt = [t for t in (x, mask) if t.requires_grad]
    grads = torch.autograd.grad(out, wrt, gout)
    return (out.detach(),) + grads


def _triton(labels):
    return lambda a, m: class_specific_gate(a, m, labels, backend="triton")


def _reference(labels):
    return lambda a, m: ref.class_specific_gate(a, m, labels)


# (shape, K, layout, labels): batch 1, one class, repeated and missing classes, every layout
CASES = [
    ((4, 8, 3, 5), 3, "nchw", None),
    ((4, 8, 3, 5), 3, "nhwc", None),
    ((1, 16, 2, 2), 6, "nchw", [4]),
    ((5, 7, 1, 3), 2, "nchw", None),
    ((6, 10), 4, "rows", [3, 3, 0, 3, 0, 3]),  # classes 1 and 2 missing
    ((1, 3), 1, "rows", [0]),
    ((7, 6, 3, 3), 5, "nhwc", [2, 2, 2, 2, 2, 2, 2]),  # one class for the whole batch
    ((3, 33, 2, 9), 4, "nchw", [1, 0, 1]),  # channels and pixels not a power of two
]


@pytest.mark.parametrize("shape,K,layout,labels", CASES)
def test_matches_reference(shape, K, layout, labels):
    x, mask, labels, gout = _inputs(shape, K, layout=layout, labels=labels)
    out_r, gx_r, gm_r = _fwd_bwd(_reference(labels), x, mask, gout)
    out, gx, gm = _fwd_bwd(_triton(labels), x, mask, gout)
    assert out.stride() == x.stride()
    assert torch.equal(out, out_r)  # one rounding of the same product
    assert torch.equal(gx, gx_r)
    torch.testing.assert_close(gm, gm_r, rtol=1e-5, atol=1e-5)
    present = torch.zeros(K, dtype=torch.bool, device=DEVICE)
    present[labels] = True
    assert torch.equal(gm[:, ~present], torch.zeros_like(gm[:, ~present]))  # classes without samples: exactly 0


def test_mask_gradient_against_fp64_sum():
    x, mask, labels, gout = _inputs((9, 12, 4, 4), 4, labels=[0, 1, 0, 3, 3, 0, 1, 0, 0])
    _, _, gm = _fwd_bwd(_triton(labels), x, mask, gout)
    expected = torch.zeros(12, 4, dtype=torch.float64, device=DEVICE)
    for n in range(9):
        expected[:, labels[n]] += (gout[n].double() * x[n].detach().double()).sum((1, 2))
    torch.testing.assert_close(gm.double(), expected, rtol=1e-6, atol=1e-6)


def test_mask_gradient_is_deterministic():
    """Bit-identical over repeated runs (no atomics), in both layouts."""
    x, mask, labels, gout = _inputs((16, 8, 3, 3), 3)
    runs = [_fwd_bwd(_triton(labels), x, mask, gout)[2] for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    runs_cl = [_fwd_bwd(_triton(labels), x_cl, mask, gout)[2] for _ in range(2)]
    assert torch.equal(runs_cl[0], runs_cl[1])


@pytest.mark.parametrize("which", ["x", "mask"])
def test_only_one_gradient(which):
    x, mask, labels, gout = _inputs((4, 8, 2, 3), 3)
    (x if which == "mask" else mask).requires_grad_(False)
    _, g = _fwd_bwd(_triton(labels), x, mask, gout)
    _, g_r = _fwd_bwd(_reference(labels), x, mask, gout)
    torch.testing.assert_close(g, g_r, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    x, mask, labels, gout = _inputs((3, 6, 4, 5), 4)
    odd = x.detach().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3).requires_grad_()  # memory N,H,C,W
    sliced = torch.randn(3, 12, 4, 5, device=DEVICE)[:, ::2].requires_grad_()
    mask_t = mask.detach().t().contiguous().t().requires_grad_()  # (C, K) stored column-major
    g_cl = gout.contiguous(memory_format=torch.channels_last)
    for xi, mi, gi in ((odd, mask, gout), (sliced, mask, gout), (x, mask_t, gout), (x, mask, g_cl)):
        out_r, gx_r, gm_r = _fwd_bwd(_reference(labels), xi, mi, gi)
        out, gx, gm = _fwd_bwd(_triton(labels), xi, mi, gi)
        assert out.stride() == torch.empty_like(xi).stride()
        assert torch.equal(out, out_r)
        assert torch.equal(gx, gx_r)
        torch.testing.assert_close(gm, gm_r, rtol=1e-5, atol=1e-5)


def test_eval_is_identity_without_copy_and_empty_batch():
    x, mask, labels, _ = _inputs((2, 4, 3, 3), 2)
    assert class_specific_gate(x, mask, labels, training=False, backend="triton") is x
    assert class_specific_gate(x, mask, None, training=False, backend="triton") is x
    empty = torch.randn(0, 4, 3, 3, device=DEVICE, requires_grad=True)
    out = class_specific_gate(empty, mask, torch.zeros(0, dtype=torch.long, device=DEVICE), backend="triton")
    (gm,) = torch.autograd.grad(out.sum(), mask)
    assert out.shape == empty.shape and torch.equal(gm, torch.zeros_like(gm))


def test_module_backend_triton_matches_torch():
    x, _, labels, gout = _inputs((4, 8, 3, 3), 3)
    layers = [ClassSpecificGate(8, 3, backend=b).to(DEVICE) for b in ("torch", "triton")]
    layers[1].load_state_dict(layers[0].state_dict())
    results = []
    for layer in layers:
        out, reg = layer(x, labels.tolist())
        results.append((out.detach(),) + torch.autograd.grad((out * gout).sum() + reg, (x, layer.mask)))
    assert torch.equal(results[1][0], results[0][0])
    assert torch.equal(results[1][1], results[0][1])
    torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CSG_OPCHECK_CASES)
def test_opcheck(case):
    opcheck_class_specific_gate(DEVICE, case, "triton")


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x, _, labels, gout = _inputs((4, 8, 3, 3), 3)
    layer = ClassSpecificGate(8, 3, backend="triton").to(DEVICE)
    with torch.no_grad():
        layer.mask.uniform_()
    assert_csg_compile_matches_eager(layer, x, labels, gout)


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "rows"])
def test_half_precision(dtype, layout):
    """out and grad x: one rounding of the exact product, as the torch backend; grad mask (fp32 accumulation)
    at most 2x the torch backend's error against fp64 (plus the rounding of the result itself)."""
    shape = (32, 512) if layout == "rows" else (32, 256, 7, 7)
    x, mask, labels, gout = _inputs(shape, 20, dtype=dtype, layout=layout)
    out, gx, gm = _fwd_bwd(_triton(labels), x, mask, gout)
    out_t, gx_t, gm_t = _fwd_bwd(lambda a, m: class_specific_gate(a, m, labels, backend="torch"), x, mask, gout)
    assert torch.equal(out, out_t) and torch.equal(gx, gx_t)
    x64, m64 = x.detach().double().requires_grad_(), mask.detach().double().requires_grad_()
    _, _, gm_64 = _fwd_bwd(_reference(labels), x64, m64, gout.double())
    err = (gm.double() - gm_64).abs().max()
    err_t = (gm_t.double() - gm_64).abs().max()
    assert err <= 2 * err_t + 1e-6, (err, err_t)


# ---------------------------------------------------------------- errors


def test_explicit_triton_raises_with_the_reason():
    x, mask, labels, _ = _inputs((2, 4, 3, 3), 3)
    with pytest.raises(ValueError, match="backend 'triton'.*float64"):
        class_specific_gate(x.double(), mask.double(), labels, backend="triton")
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="interpreter.*float32"):
            class_specific_gate(x.half(), mask.half(), labels, backend="triton")
    with pytest.raises(ValueError, match="labels"):
        class_specific_gate(x, mask, torch.tensor([0, 3], device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run here"):
        torch.ops.bcos_kernels.class_specific_gate.default(x.cpu(), mask.cpu(), labels.cpu(), backend="cuda")


def test_auto_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setitem(backends.AUTO_ORDER, DEVICE.type, ("triton",))
    monkeypatch.setattr(backends, "_warned", set())
    x, mask, labels, _ = _inputs((2, 4, 3, 3), 3)
    xd, md = x.detach().double(), mask.detach().double()
    with pytest.warns(RuntimeWarning, match="float64"):
        out = class_specific_gate(xd, md, labels, backend="auto")
    assert torch.equal(out, ref.class_specific_gate(xd, md, labels))
    with warnings.catch_warnings():
        # our fallback warning is a RuntimeWarning; other categories (e.g. numpy deprecations raised inside
        # older Triton interpreters) are not ours to fail on
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.equal(
            class_specific_gate(x, mask, labels, backend="auto"), ref.class_specific_gate(x, mask, labels)
        )
