"""Front door of the CoDA dynamic alignment unit (DAU) convolution.

Math and parameter layout: reference.py; the low-rank form every other backend computes: lowrank.py (DESIGN.md
section 3). backend "reference" runs ``reference.dau_conv2d_original`` (plain autograd). The others ("torch",
"triton", "cuda": one file each here, chosen by bcos_kernels.backends) run the custom op
``bcos_kernels::dau_conv2d`` with a hand-written backward, which for backends with opaque kernels is the custom
op ``bcos_kernels::dau_conv2d_backward``; tensors are positional, options keyword-only.
"""

# The backend module "torch" (./torch.py) is imported before the library: importing a submodule binds its name in
# this package's namespace, and the `import torch` after it binds the name to the library again for good.
import bcos_kernels.ops.dau_conv2d.torch  # noqa: I001, F401
import torch
from typing import List, NamedTuple

from bcos_kernels import backends
from bcos_kernels.ops import _autocast, _eager
from bcos_kernels.ops._checks import check_like, check_tensor, int_pair, positive_int
from bcos_kernels.ops._layout import conv_output_size
from bcos_kernels.ops._options import custom_op
from bcos_kernels.ops.dau_conv2d import cost_model
from bcos_kernels.ops.dau_conv2d.lowrank import compute_dtype
from bcos_kernels.ops.dau_conv2d.reference import NORMS, dau_conv2d_original, default_padding

__all__ = ["dau_conv2d"]


def dau_conv2d(
    x,
    rank_weight,
    expand_weight,
    expand_bias=None,
    *,
    kernel_size,
    stride=1,
    padding=None,
    norm="squash",
    detach=False,
    backend=None,
):
    """CoDA DAU convolution. x: (N, C, H, W); rank_weight: (r, C, k, k); expand_weight: (C*k*k*O, r, 1, 1);
    expand_bias: (C*k*k*O,) or None. Returns (N, O, Ho, Wo).

    ``padding=None`` is the original's default (k - 1) // 2. ``norm`` is "squash" or "l2".
    ``detach=True`` is explanation mode: the dynamic weights (and their norms) are constants for the
    gradient, which then flows to x only through x_patch in w . x_patch.
    Under autocast x and the weights are cast to its dtype, as a conv2d's inputs.
    """
    x, rank_weight, expand_weight, expand_bias = _autocast.lower_precision(x, rank_weight, expand_weight, expand_bias)
    check_tensor("x", x, 4)
    check_tensor("rank_weight", rank_weight, 4)
    check_tensor("expand_weight", expand_weight, 4)
    check_like("rank_weight", rank_weight, "x", x)
    check_like("expand_weight", expand_weight, "x", x)
    if expand_bias is not None:
        check_tensor("expand_bias", expand_bias, 1)
        check_like("expand_bias", expand_bias, "x", x)
    kernel_size = positive_int("kernel_size", kernel_size)
    stride = int_pair("stride", stride)
    padding = int_pair("padding", default_padding(kernel_size) if padding is None else padding, minimum=0)
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not isinstance(detach, bool):
        raise TypeError(f"detach must be a bool, got {type(detach).__name__}")

    channels = x.shape[1]
    rank = rank_weight.shape[0]
    d = channels * kernel_size * kernel_size
    if rank_weight.shape[1] != channels:
        raise ValueError(f"rank_weight expects {rank_weight.shape[1]} input channels but x has {channels}")
    if tuple(rank_weight.shape[2:]) != (kernel_size, kernel_size):
        raise ValueError(f"rank_weight has kernel {tuple(rank_weight.shape[2:])} but kernel_size={kernel_size}")
    if rank < 1:
        raise ValueError(f"rank_weight must have at least one filter (rank >= 1), got shape {tuple(rank_weight.shape)}")
    rows = expand_weight.shape[0]
    if tuple(expand_weight.shape[1:]) != (rank, 1, 1):
        raise ValueError(
            f"expand_weight must have shape (C*k*k*O, r, 1, 1) = (*, {rank}, 1, 1), got {tuple(expand_weight.shape)}"
        )
    if rows == 0 or rows % d:
        raise ValueError(
            f"expand_weight.shape[0] = {rows} must be a positive multiple of "
            f"C*k*k = {channels}*{kernel_size}*{kernel_size} = {d} (one row per patch entry and DAU)"
        )
    if expand_bias is not None and expand_bias.shape[0] != rows:
        raise ValueError(f"expand_bias has {expand_bias.shape[0]} elements but expand_weight has {rows} rows")
    for i, name in enumerate(("height", "width")):
        if x.shape[2 + i] + 2 * padding[i] < kernel_size:
            raise ValueError(
                f"x {name} {x.shape[2 + i]} plus padding {padding[i]} is smaller than kernel_size {kernel_size}"
            )

    ho, wo = conv_output_size(x.shape[2:], (kernel_size, kernel_size), stride, padding)
    name = backends.resolve(
        "dau_conv2d", backend, x, rank=rank, pixels=max(x.shape[0] * ho * wo, x.shape[0] * x.shape[2] * x.shape[3])
    )
    if name == "reference" and x.numel() == 0:  # the original's reshape fails on an empty x; the result is empty
        name = "torch"
    if name == "reference":  # plain autograd through the exact reference, no custom op
        with _autocast.off(x):
            return dau_conv2d_original(
                x,
                rank_weight,
                expand_weight,
                expand_bias,
                kernel_size=kernel_size,
                stride=stride,
                padding=padding,
                norm=norm,
                detach=detach,
            )
    plan = _plan(name, x, rank_weight, expand_weight, expand_bias, kernel_size, ho, wo, detach)
    out, _, _, _ = _eager.call(
        dau_conv2d_op,
        x,
        rank_weight,
        expand_weight,
        expand_bias,
        kernel_size=kernel_size,
        stride=list(stride),
        padding=list(padding),
        norm=norm,
        detach=detach,
        backend=name,
        forward_form=plan.forward,
        backward_form=plan.backward,
    )
    return out


def _plan(backend, x, rank_weight, expand_weight, expand_bias, kernel_size, ho, wo, detach) -> cost_model.Plan:
    """The forms to compute: the cost model's choice where the backend has both (cost_model.py), else low-rank.
    Only the forward counts when nothing will need a gradient. Under torch.compile: low-rank (the model's
    comparisons of symbolic sizes would guard on them, i.e. recompile per batch size under dynamic shapes)."""
    if torch.compiler.is_compiling() or "materialised" not in backends.OPS["dau_conv2d"][backend].forms:
        return cost_model.Plan("lowrank", "lowrank")
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in ((x,) if detach else (x, rank_weight, expand_weight, expand_bias))
    )
    d = x.shape[1] * kernel_size * kernel_size
    shape = cost_model.DauShape(
        x.shape[0] * ho * wo, d, expand_weight.shape[0] // d, rank_weight.shape[0], expand_bias is not None
    )
    return cost_model.choose(shape, needs_backward=grads)


# ---------------------------------------------------------------------------------------------------------
# custom ops


class DauOptions(NamedTuple):
    """The options of the DAU ops (keyword-only in their schemas; the backends get them as one object)."""

    kernel_size: int
    stride: List[int]
    padding: List[int]
    norm: str
    detach: bool  # for the backward only
    backend: str
    # the plan of backend "torch" (cost_model.py); "lowrank" for the backends that have only that form
    forward_form: str = "lowrank"
    backward_form: str = "lowrank"


_FORWARD_INPUTS = "Tensor x, Tensor rank_weight, Tensor expand_weight, Tensor? expand_bias"


@custom_op("bcos_kernels::dau_conv2d", _FORWARD_INPUTS, DauOptions, "(Tensor, Tensor, Tensor, Tensor)")
def dau_conv2d_op(x, rank_weight, expand_weight, expand_bias, **options):
    """Returns (out, z, s, w): out (N, O, Ho, Wo) contiguous in x's dtype; z (N*Ho*Wo, r) and s = ||w||
    (N*Ho*Wo, O), pixel-major, in the compute dtype (fp32 for half inputs); w the per-pixel weights
    (N*Ho*Wo, C*k*k*O) when the plan keeps them (both forms materialised), else empty: what the backward needs,
    not differentiable."""
    opts = DauOptions(**options)
    kernels = backends.checked_kernels("dau_conv2d", opts.backend, x.device)
    for field in ("forward_form", "backward_form"):
        form = getattr(opts, field)
        if form not in backends.OPS["dau_conv2d"][opts.backend].forms:
            raise ValueError(f"bcos_kernels.dau_conv2d: backend {opts.backend!r} has no {field}={form!r}")
    out, z, s, w = kernels.forward(x, rank_weight, expand_weight, expand_bias, opts)
    return out, z, s, z.new_empty(0) if w is None else w


@dau_conv2d_op.register_fake
def _(x, rank_weight, expand_weight, expand_bias, **options):
    opts = DauOptions(**options)
    k = opts.kernel_size
    cdt = compute_dtype(x.dtype)
    ho, wo = conv_output_size(x.shape[2:], (k, k), opts.stride, opts.padding)
    n, c = x.shape[:2]
    o = expand_weight.shape[0] // (c * k * k)
    kept = cost_model.Plan(opts.forward_form, opts.backward_form).saves_weights
    return (
        x.new_empty((n, o, ho, wo)),
        x.new_empty((n * ho * wo, rank_weight.shape[0]), dtype=cdt),
        x.new_empty((n * ho * wo, o), dtype=cdt),
        x.new_empty((n * ho * wo, expand_weight.shape[0]) if kept else (0,), dtype=cdt),
    )


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    out, z, s, w = output
    ctx.mark_non_differentiable(z, s, w)
    # Saved: the inputs (alive anyway), z (r channels), s (O channels), the output (O channels, alive anyway
    # while the next layer uses it) and w when the plan keeps it (then as large as the original's weights). NOT
    # saved: any O*R-channel intermediate; the backward recomputes what it needs of it (see the backends).
    ctx.save_for_backward(*inputs, z, s, out, w)
    ctx.options = dict(keyword_only_inputs)


@torch.autograd.function.once_differentiable  # z, s and out are saved as constants: no double backward
def _backward(ctx, grad_out, _grad_z, _grad_s, _grad_w):
    needs = list(ctx.needs_input_grad[:4])
    if ctx.options["detach"]:  # explanation mode: w and ||w|| are constants, x gets a gradient through x_patch
        needs[1:] = [False] * 3
    if not any(needs):
        return (None,) * 4
    impl = backends.kernels("dau_conv2d", ctx.options["backend"])
    if impl.OPAQUE_BACKWARD:
        grads = _eager.call(dau_conv2d_backward_op, grad_out, *ctx.saved_tensors, **ctx.options, needs=needs)
    else:
        *saved, w = ctx.saved_tensors
        grads = impl.backward(grad_out, *saved, w if w.numel() else None, DauOptions(**ctx.options), needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


_eager.register_autograd(dau_conv2d_op, _backward, _setup_context)


@custom_op(
    "bcos_kernels::dau_conv2d_backward",
    f"Tensor grad_out, {_FORWARD_INPUTS}, Tensor z, Tensor s, Tensor out, Tensor weights",
    DauOptions,
    "(Tensor, Tensor, Tensor, Tensor)",
    extra="bool[] needs",
)
def dau_conv2d_backward_op(
    grad_out, x, rank_weight, expand_weight, expand_bias, z, s, out, weights, *, needs, **options
):
    """Gradients for (x, rank_weight, expand_weight, expand_bias) of the forward op; an empty tensor where
    ``needs`` is False (and for the parameters in explanation mode). A custom op of its own so that compiled
    graphs keep the kernels opaque."""
    opts = DauOptions(**options)
    grads = backends.checked_kernels("dau_conv2d", opts.backend, x.device).backward(
        grad_out,
        x,
        rank_weight,
        expand_weight,
        expand_bias,
        z,
        s,
        out,
        weights if weights.numel() else None,
        opts,
        list(needs),
    )
    return tuple(x.new_empty(0) if t is None else t for t in grads)


@dau_conv2d_backward_op.register_fake
def _(grad_out, x, rank_weight, expand_weight, expand_bias, z, s, out, weights, *, needs, **options):
    detach = options["detach"]
    like = (x, rank_weight, expand_weight, expand_bias)
    return tuple(
        torch.empty_like(t) if need and t is not None and not (detach and i > 0) else x.new_empty(0)
        for i, (t, need) in enumerate(zip(like, needs))
    )
