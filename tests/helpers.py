"""Test helpers that several test files use (tests/conftest.py puts tests/ on sys.path): inputs, runs and checks
that the per-backend test files of one op share, so that every backend is tested on the same cases."""

import pytest
import torch

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """The tensors are tiny: intra-op threads only add synchronisation (badly so on a busy machine). Autouse in
    each test module that imports it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def saved_bytes(fn, x):
    """Bytes of the distinct storages autograd saves for the backward of fn(x)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


# ---------------------------------------------------------------------------------------------------------------
# B-cos
# ---------------------------------------------------------------------------------------------------------------
def assert_zero_output_and_finite_grads(fn, x, w, b):
    """fn(x, w, b) on an all-zero x (leaves x and w) is all zero, with finite gradients for x, w and a tensor b."""
    out = fn(x, w, b)
    out.sum().backward()
    assert torch.all(out == 0)
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    if isinstance(b, torch.Tensor):
        assert torch.isfinite(b.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# LWTA
# ---------------------------------------------------------------------------------------------------------------
def lwta_kwargs(mode, temperature=0.7):
    """The lwta keyword arguments of a mode: "train", "eval" or "deterministic"."""
    return dict(temperature=temperature, deterministic=mode == "deterministic", training=mode != "eval")


def lwta_inputs(device, shape, layout="nchw", dtype=torch.float32, seed=0):
    """(x, uniforms u, grad_out) on device, x a leaf in the layout ("nhwc": channels_last)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    u = torch.rand(shape, generator=g)
    gout = torch.randn(shape, generator=g).to(dtype)
    x, u, gout = x.to(device), u.to(device), gout.to(device)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(), u, gout


def fwd_bwd(fn, x, gout):
    """fn(x) and its gradient with respect to x for grad_out gout."""
    out = fn(x)
    (grad,) = torch.autograd.grad(out, x, gout)
    return out.detach(), grad


def assert_lwta_output_matches(out, expected, U, mode):
    """Same winners; the same values, bit for bit where the straight-through factor (1 - p) + p rounds to exactly
    1 in both (always at U = 2 and in deterministic mode), else within one ulp of it (a device's exp/log may
    differ from torch's in the last bit)."""
    assert torch.equal(out != 0, expected != 0)
    if U == 2 or mode == "deterministic":
        assert torch.equal(out, expected)
    else:
        torch.testing.assert_close(out, expected, rtol=2.4e-7, atol=0)


def assert_lwta_matches_reference_given_noise(lwta_fn, x, u, gout, U, mode):
    """lwta_fn(x, U, noise=u, ...) in the mode against the reference given the same noise: output (in x's layout)
    and grad x."""
    from bcos_kernels.ops.lwta import reference as lwta_ref

    kw = lwta_kwargs(mode)
    out_r, grad_r = fwd_bwd(lambda t: lwta_ref.lwta(t, U, noise=u, **kw), x, gout)
    out, grad = fwd_bwd(lambda t: lwta_fn(t, U, noise=u, **kw), x, gout)
    assert out.stride() == x.stride()
    assert_lwta_output_matches(out, out_r, U, mode)
    torch.testing.assert_close(grad, grad_r, rtol=1e-5, atol=1e-6)


def assert_lwta_noise_grad_and_x_layouts(lwta_fn, x, u, gout):
    """lwta_fn(x, 4, noise=...) (x NCHW, U = 4) against the reference with the noise and grad_out in other layouts
    than x; then an x that is neither contiguous nor channels_last gives the same output (in its own layout) and
    grad. Returns lwta_fn's (output, grad x) for the NCHW x."""
    from bcos_kernels.ops.lwta import reference as lwta_ref

    u_t = u.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    g_cl = gout.contiguous(memory_format=torch.channels_last)
    out_r, grad_r = fwd_bwd(lambda t: lwta_ref.lwta(t, 4, noise=u), x, gout)
    out, grad = fwd_bwd(lambda t: lwta_fn(t, 4, noise=u_t), x, g_cl)
    assert_lwta_output_matches(out, out_r, 4, "train")
    torch.testing.assert_close(grad, grad_r, rtol=1e-5, atol=1e-6)
    odd = x.detach().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3).requires_grad_()  # memory N, H, C, W
    assert not odd.is_contiguous() and not odd.is_contiguous(memory_format=torch.channels_last)
    out_o, grad_o = fwd_bwd(lambda t: lwta_fn(t, 4, noise=u), odd, gout)
    assert out_o.stride() == torch.empty_like(odd).stride()
    assert torch.equal(out_o, out) and torch.equal(grad_o, grad)
    return out, grad


def assert_compiled_matches_eager_after_same_seed(module, compiled, x, gout, seed=11):
    """compiled (module under torch.compile) after torch.manual_seed(seed) gives module's output and grad x after
    the same seed, bit for bit: the noise it draws is the eager one."""
    torch.manual_seed(seed)
    out_e, grad_e = fwd_bwd(module, x, gout)
    torch.manual_seed(seed)
    out_c, grad_c = fwd_bwd(compiled, x, gout)
    assert torch.equal(out_c, out_e)
    torch.testing.assert_close(grad_c, grad_e, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Class-specific gate
# ---------------------------------------------------------------------------------------------------------------
def csg_inputs(device, shape, K, dtype=torch.float32, seed=0, layout="nchw", labels=None):
    """(x, mask (C, K), labels, grad_out) on device, x and mask leaves; x in the layout ("nhwc": channels_last,
    "odd": strides of neither layout)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    mask = torch.rand(shape[1], K, generator=g).to(dtype)
    if labels is None:
        labels = torch.randint(0, K, (shape[0],), generator=g)
    gout = torch.randn(shape, generator=g).to(dtype)
    x, mask, labels, gout = (t.to(device) for t in (x, mask, torch.as_tensor(labels), gout))
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "odd":
        x = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    return x.requires_grad_(), mask.requires_grad_(), labels, gout


CSG_OPCHECK_CASES = ["conv", "channels_last", "rows"]


def opcheck_class_specific_gate(device, case, backend):
    """torch.library.opcheck of the gate's forward and backward custom ops on one of CSG_OPCHECK_CASES."""
    shape = (4, 6) if case == "rows" else (3, 6, 2, 3)
    nhwc = case == "channels_last"
    x, mask, labels, gout = csg_inputs(device, shape, 3, layout="nhwc" if nhwc else "nchw")
    torch.library.opcheck(torch.ops.bcos_kernels.class_specific_gate.default, (x, mask, labels), dict(backend=backend))
    for need_x, need_mask in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.bcos_kernels.class_specific_gate_backward.default,
            (gout, x.detach(), mask.detach(), labels),
            dict(num_classes=3, nhwc=nhwc, need_x=need_x, need_mask=need_mask, backend=backend),
        )


def assert_csg_compile_matches_eager(layer, x, labels, gout):
    """The ClassSpecificGate layer under torch.compile(fullgraph=True) gives eager's output, regulariser and
    gradients (x and mask), bit for bit."""

    def run(fn):
        out, reg = fn(x, labels)
        gx, gm = torch.autograd.grad((out * gout).sum() + reg, (x, layer.mask))
        return out.detach(), reg.detach(), gx, gm

    eager = run(layer)
    compiled = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# DAU
# ---------------------------------------------------------------------------------------------------------------
def make_dau_case(c, o, r, k, n, h, w, bias=True, seed=0, zero_x=False):
    """fp64 (x, rank_weight, expand_weight, expand_bias) initialised like the original's nn.Conv2d layers."""
    g = torch.Generator().manual_seed(seed)
    d = c * k * k
    a = (torch.rand(r, c, k, k, generator=g, dtype=F64) * 2 - 1) / d**0.5
    e = (torch.rand(d * o, r, 1, 1, generator=g, dtype=F64) * 2 - 1) / r**0.5
    b = (torch.rand(d * o, generator=g, dtype=F64) * 2 - 1) / r**0.5 if bias else None
    x = torch.zeros(n, c, h, w, dtype=F64) if zero_x else torch.rand(n, c, h, w, generator=g, dtype=F64)
    return x, a, e, b


# ---------------------------------------------------------------------------------------------------------------
# The test modules of backend "triton"
# ---------------------------------------------------------------------------------------------------------------
def triton_module_marks(device):
    """The pytestmark of a test module of backend "triton": skip all its tests where that backend cannot run on
    device (its reason said), else none."""
    from bcos_kernels import backends

    reason = backends.device_reason("triton", device)
    return [] if reason is None else [pytest.mark.skip(reason=reason)]


# The interpreter (no GPU) has no fp16/bf16 arithmetic: tests of those dtypes need a GPU.
on_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="fp16/bf16 kernels need a GPU (the interpreter runs fp32)"
)


# ---------------------------------------------------------------------------------------------------------------
# The fused B-cos custom ops: tensors positional, options keyword-only. Tests list the options in this order.
# ---------------------------------------------------------------------------------------------------------------
CONV_OPTIONS = (
    "b",
    "stride",
    "padding",
    "dilation",
    "groups",
    "max_out",
    "normalize_weight",
    "scale",
    "detach",
    "backend",
)
LINEAR_OPTIONS = ("b", "max_out", "normalize_weight", "scale", "detach", "backend")


def conv_fused_args(x, w, bias, b_tensor, *options, channel_scale=None):
    """(args, kwargs) of bcos_conv2d_fused from the tensors and the options in CONV_OPTIONS order."""
    return (x, w, bias, b_tensor, channel_scale), dict(zip(CONV_OPTIONS, options))


def linear_fused_args(x, w, bias, b_tensor, *options):
    return (x, w, bias, b_tensor), dict(zip(LINEAR_OPTIONS, options))


def fused_backward_args(tensors, options, needs, names=CONV_OPTIONS):
    """(args, kwargs) of a fused backward op: its 7 tensors, the forward's options and ``needs``."""
    return tuple(tensors), {**dict(zip(names, options)), "needs": needs}
