"""Class-specific gate: the reference against CSGCNN's original layer, the op against the reference."""

import ast
import importlib.util

import pytest
import torch
from helpers import assert_csg_compile_matches_eager
from originals import mirror_source

from bcos_kernels.nn.csg import ClassSpecificGate
from bcos_kernels.ops.class_specific_gate import class_specific_gate, density, density_loss
from bcos_kernels.ops.class_specific_gate import reference as ref

ORIGINAL_FILE = "VOCPart/train/resnet_std.py"
ORIGINAL_CLASS = "LearnableMaskLayer"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The original LearnableMaskLayer class, cut out of the git mirror at test time (never stored in this repo)."""
    text = mirror_source("hyliang96+CSGCNN", ORIGINAL_FILE)
    node = next(n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == ORIGINAL_CLASS)
    source = "import torch\nimport torch.nn as nn\n\n" + ast.get_source_segment(text, node) + "\n"
    path = tmp_path_factory.mktemp("original") / "csg_learnable_mask.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("csg_learnable_mask", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, ORIGINAL_CLASS)


def _inputs(shape, K, dtype=torch.float32, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    mask = torch.rand(shape[1], K, generator=g, dtype=dtype)
    labels = torch.randint(0, K, (shape[0],), generator=g)
    gout = torch.randn(shape, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(), mask.requires_grad_(), labels, gout


def _fwd_bwd(fn, x, mask, gout):
    out = fn(x, mask)
    gx, gm = torch.autograd.grad(out, (x, mask), gout)
    return out.detach(), gx, gm


SHAPES = [((4, 8, 3, 5), 3), ((1, 16, 2, 2), 6), ((5, 7, 1, 3), 2), ((6, 10), 4), ((1, 3), 1)]


# ---------------------------------------------------------------- against the original layer


@pytest.mark.parametrize("shape,K", [((4, 8, 3, 5), 3), ((7, 16, 2, 2), 6)])
def test_module_matches_original(original, shape, K):
    x, _, labels, gout = _inputs(shape, K)
    orig = original(feature_dim=shape[1], num_classes=K)
    ours = ClassSpecificGate(feature_dim=shape[1], num_classes=K)
    assert ours.state_dict().keys() == orig.state_dict().keys() == {"mask"}
    assert torch.equal(ours.mask, orig.mask)
    with torch.no_grad():
        orig.mask.uniform_(-0.2, 1.0)
    ours.load_state_dict(orig.state_dict())
    results = []
    for layer in (orig, ours):
        out, reg = layer(x, labels)
        gx, gm = torch.autograd.grad(out, (x, layer.mask), gout)
        (greg,) = torch.autograd.grad(reg, layer.mask)
        results.append((out.detach(), reg.detach(), gx, gm, greg, layer.get_density().detach()))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert torch.equal(results[0][0], results[1][0])
    # eval: the identity, x itself, and the same regulariser
    orig.eval(), ours.eval()
    (out_o, reg_o), (out_n, reg_n) = orig(x, labels), ours(x, labels)
    assert out_o is x and out_n is x
    assert torch.equal(reg_n, reg_o)
    assert ours(x, None)[0] is x


def test_regulariser_below_budget_and_clip_match_original(original):
    orig, ours = original(8, 4), ClassSpecificGate(8, 4)
    with torch.no_grad():
        orig.mask.fill_(0.1)  # density 0.1 < 0.2: no penalty
    ours.load_state_dict(orig.state_dict())
    assert torch.equal(ours.loss_function(), orig.loss_function()) and float(orig.loss_function().detach()) == 0.0
    with torch.no_grad():
        orig.mask.copy_(torch.randn(8, 4) + 0.5)
        orig.mask[3] = torch.tensor([-1.0, 0.5, 2.0, 0.0])
    ours.load_state_dict(orig.state_dict())
    storage = ours.mask.data_ptr()
    orig.clip_lmask()
    ours.clip_lmask()
    assert torch.equal(ours.mask, orig.mask)
    assert ours.mask.data_ptr() == storage  # in place: optimiser state stays attached
    assert torch.equal(ref.csg_density_loss(ours.mask), orig.loss_function())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_regulariser_at_imagenet_size_against_fp64(dtype):
    """The layer's L1 regulariser and density (density_loss / density, not torch.norm(p=1)) on a 2048 x 1000 mask
    with negative entries and zeros: within the numerics contract of the fp64 value (the original's fp32
    torch.norm misses it by about 6e-4 at this size), gradient sign(mask) and 0 at 0."""
    g = torch.Generator().manual_seed(3)
    mask64 = torch.rand(2048, 1000, generator=g, dtype=torch.float64) * 1.2 - 0.2
    mask64[::7, ::5] = 0
    mask = mask64.to(dtype).requires_grad_()
    layer = ClassSpecificGate(2048, 1000)
    with torch.no_grad():
        layer.mask = torch.nn.Parameter(mask.detach().clone())
    exact = mask.detach().double().abs().sum()
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    reg = layer.loss_function()
    assert reg.dtype == dtype
    torch.testing.assert_close(reg.double(), torch.relu(exact - 0.2 * mask.numel()), rtol=tol, atol=0)
    torch.testing.assert_close(layer.get_density().double(), exact / mask.numel(), rtol=tol, atol=0)
    (grad,) = torch.autograd.grad(reg * 3.0, layer.mask)
    assert torch.equal(grad, 3.0 * torch.sgn(mask.detach()))
    assert int((grad == 0).sum()) == int((mask == 0).sum()) > 0


def test_regulariser_gradient_zero_below_budget_and_gradcheck():
    mask = torch.full((8, 4), 0.1, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(density_loss(mask), mask)
    assert torch.equal(grad, torch.zeros_like(mask))  # density 0.1 < 0.2: relu inactive
    mask = (torch.rand(5, 3, dtype=torch.float64) - 0.3).requires_grad_()
    torch.autograd.gradcheck(density_loss, (mask,))
    torch.autograd.gradcheck(density, (mask,))


# ---------------------------------------------------------------- op vs reference


@pytest.mark.parametrize("shape,K", SHAPES)
def test_op_matches_reference(shape, K):
    x, mask, labels, gout = _inputs(shape, K)
    r = _fwd_bwd(lambda a, m: ref.class_specific_gate(a, m, labels), x, mask, gout)
    o = _fwd_bwd(lambda a, m: class_specific_gate(a, m, labels), x, mask, gout)
    assert torch.equal(o[0], r[0])
    assert torch.equal(o[1], r[1])
    torch.testing.assert_close(o[2], r[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,K", SHAPES[:1] + SHAPES[3:4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backend_reference_is_the_reference_bit_for_bit(shape, K, channels_last):
    """backend="reference" runs reference.class_specific_gate itself: output and both gradients equal."""
    x, mask, labels, gout = _inputs(shape, K, channels_last=channels_last and len(shape) == 4)
    r = _fwd_bwd(lambda a, m: ref.class_specific_gate(a, m, labels), x, mask, gout)
    o = _fwd_bwd(lambda a, m: class_specific_gate(a, m, labels, backend="reference"), x, mask, gout)
    for got, want in zip(o, r):
        assert torch.equal(got, want)


def test_dmask_is_per_class_sum_of_g_times_x():
    x, mask, labels, gout = _inputs((6, 5, 3, 2), 4)
    _, _, gm = _fwd_bwd(lambda a, m: class_specific_gate(a, m, labels), x, mask, gout)
    expected = torch.zeros(5, 4)
    for n in range(6):
        expected[:, labels[n]] += (gout[n] * x[n].detach()).sum((1, 2))
    torch.testing.assert_close(gm, expected)


def test_channels_last():
    x, mask, labels, gout = _inputs((3, 8, 4, 5), 3, channels_last=True)
    r = _fwd_bwd(lambda a, m: ref.class_specific_gate(a, m, labels), x, mask, gout)
    o = _fwd_bwd(lambda a, m: class_specific_gate(a, m, labels), x, mask, gout)
    assert o[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(o[0], r[0])
    torch.testing.assert_close(o[1], r[1])
    torch.testing.assert_close(o[2], r[2], rtol=1e-5, atol=1e-5)


def test_eval_is_identity_without_copy():
    x, mask, labels, _ = _inputs((2, 4, 3, 3), 2)
    assert class_specific_gate(x, mask, labels, training=False) is x
    assert class_specific_gate(x, mask, None, training=False) is x
    assert ref.class_specific_gate(x, mask, labels, training=False) is x


def test_saves_no_full_size_gate():
    x, mask, labels, _ = _inputs((8, 32, 4, 4), 6)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        class_specific_gate(x, mask, labels)
    assert sum(saved.values()) == x.numel() * 4 + mask.numel() * 4 + labels.numel() * 8
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ref.class_specific_gate(x, mask, labels)
    assert sum(saved.values()) >= 2 * x.numel() * 4


def test_gradcheck_fp64():
    for shape, K in (((3, 4, 2, 3), 3), ((4, 5), 2)):
        x, mask, labels, _ = _inputs(shape, K, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda a, m: class_specific_gate(a, m, labels), (x, mask))


@pytest.mark.parametrize("case", ["conv", "channels_last", "linear"])
def test_opcheck(case):
    shape = (4, 6) if case == "linear" else (3, 6, 2, 3)
    x, mask, labels, _ = _inputs(shape, 3, channels_last=case == "channels_last")
    torch.library.opcheck(torch.ops.bcos_kernels.class_specific_gate.default, (x, mask, labels), dict(backend="torch"))
    gout = torch.randn(shape)
    for need_x, need_mask in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.bcos_kernels.class_specific_gate_backward.default,
            (gout, x.detach(), mask.detach(), labels),
            dict(num_classes=3, nhwc=case == "channels_last", need_x=need_x, need_mask=need_mask, backend="torch"),
        )


def test_compile_fullgraph_matches_eager():
    x, _, labels, gout = _inputs((4, 8, 3, 3), 3)
    layer = ClassSpecificGate(8, 3)
    with torch.no_grad():
        layer.mask.uniform_()
    assert_csg_compile_matches_eager(layer, x, labels, gout)


def test_module_half_input_casts_the_mask():
    x, _, labels, _ = _inputs((2, 4, 2, 2), 3)
    layer = ClassSpecificGate(4, 3)
    out, _ = layer(x.detach().to(torch.bfloat16).requires_grad_(), labels.tolist())
    assert out.dtype == torch.bfloat16
    out.sum().backward()
    assert layer.mask.grad.dtype == torch.float32


# ---------------------------------------------------------------- bad input


def _ok():
    return torch.zeros(2, 4, 3, 3), torch.zeros(4, 3), torch.tensor([0, 2])


@pytest.mark.parametrize(
    "change,exc,name",
    [
        (lambda x, m, lab: (x[0], m, lab), ValueError, "x"),
        (lambda x, m, lab: (x.long(), m, lab), TypeError, "x"),
        (lambda x, m, lab: (x, m[:3], lab), ValueError, "mask"),
        (lambda x, m, lab: (x, m[:, :, None], lab), ValueError, "mask"),
        (lambda x, m, lab: (x, m.double(), lab), TypeError, "mask"),
        (lambda x, m, lab: (x, m.to("meta"), lab), ValueError, "mask"),
        (lambda x, m, lab: (x, m, lab.float()), TypeError, "labels"),
        (lambda x, m, lab: (x, m, lab.bool()), TypeError, "labels"),
        (lambda x, m, lab: (x, m, [0, 1]), TypeError, "labels"),
        (lambda x, m, lab: (x, m, lab[:1]), ValueError, "labels"),
        (lambda x, m, lab: (x, m, lab[None]), ValueError, "labels"),
        (lambda x, m, lab: (x, m, torch.tensor([0, 3])), ValueError, "labels"),
        (lambda x, m, lab: (x, m, torch.tensor([-1, 0])), ValueError, "labels"),
        (lambda x, m, lab: (x, m, lab.to("meta")), ValueError, "labels"),
        (lambda x, m, lab: (x, m, None), ValueError, "labels"),
    ],
)
def test_bad_input(change, exc, name):
    with pytest.raises(exc, match=name):
        class_specific_gate(*change(*_ok()))


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        class_specific_gate(*_ok(), backend="cuda")
