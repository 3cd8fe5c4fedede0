"""Front door of DISCOVER's stochastic local winner-takes-all (LWTA).

Semantics: :mod:`bcos_kernels.ops.lwta.reference`; backend "reference" runs it
(plain autograd). The other backends ("torch", "cpu", "triton", "cuda": one file each
here, chosen by bcos_kernels.backends) run the custom op ``bcos_kernels::lwta``
below with the hand-written backward op ``bcos_kernels::lwta_backward``;
tensors are positional, options keyword-only.

Straight-through gradient (stochastic mode), with p = y_soft, v = g * x, g the
incoming gradient, m the forward mask (1 at the winner, 0 elsewhere):

    d L / d x_i = m_i g_i + (1 / T) p_i (v_i - sum_j p_j v_j)     (sum over the block)

Deterministic mode: d L / d x_i = m_i g_i.

Noise: with ``noise=None`` and the stochastic mode (training or not -- the
original samples at test time too), the backend's ``draw_noise`` gives either
the uniforms u ("torch": ``torch.rand``, the original's numbers) or a seed the
kernels draw u from ("cpu" and "cuda": one Philox stream, the same numbers on
both; "triton": others; all the same distribution); each backend's file says
which. An explicit ``noise`` must hold uniforms in [0, 1)
(not checked: that would synchronise), have x's shape and device, and dtype
fp32 or x's dtype; every backend then computes the same thing.

Ties: the winner is the first maximum of y_soft (deterministic: of x), as
the original's ``max``/``argmax``. Non-finite x is not supported (the
original raises OverflowError on the NaN mask it gets; here such a block
gives NaN or 0). ``competitors`` is at most 256 (uint8 winner index).

Precision: the Gumbel transform runs in the noise's dtype, the rest in
promote(x, noise) but at least fp32; the output has x's dtype (the original
returns fp32 for a half x, because its mask is fp32). The fused backends'
dtypes and rounding: their files.

Layouts: out has x's strides (``empty_like``) and the winner tensor is
channels_last when x is read so (:func:`bcos_kernels.ops._layout.is_channels_last`;
every backend); the backward op's grad x is channels_last then, else contiguous.
"""

from __future__ import annotations

# The backend "torch" is this package's submodule ``torch``: importing it sets the package's global ``torch`` to it,
# so it is imported here, before the library that the code below means by ``torch``.
from bcos_kernels.ops.lwta import torch as _torch_backend  # noqa: F401

# isort: split
from typing import NamedTuple, Optional

import torch

from bcos_kernels import backends
from bcos_kernels.ops import _autocast, _eager
from bcos_kernels.ops._checks import check_tensor, positive_int
from bcos_kernels.ops._layout import block_shape, is_channels_last, memory_format, memory_format_of
from bcos_kernels.ops._options import custom_op
from bcos_kernels.ops.lwta import _by_name
from bcos_kernels.ops.lwta import reference as ref
from bcos_kernels.ops.lwta._seed import SEED_HIGH  # noqa: F401  (re-exported: the range of the drawn seeds)

TEST_TEMPERATURE = ref.TEST_TEMPERATURE


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number > 0, got {temperature!r}")
    t = float(temperature)
    if not (t > 0 and t != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def lwta(
    x: torch.Tensor,
    competitors: int,
    *,
    temperature: float = ref.DEFAULT_TEMPERATURE,
    deterministic: bool = False,
    training: bool = True,
    noise: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Local winner-takes-all over blocks of ``competitors`` consecutive channels.

    x: (N, C, H, W) (blocks along C) or (N, D) / (B, T, D) (blocks along the
    last dim). ``training=False`` uses the original's test temperature 1.67
    instead of ``temperature`` (and still samples). ``deterministic`` keeps the
    plain argmax (no noise, no temperature). ``noise``: uniforms u to use
    instead of drawing them (ignored in deterministic mode). ``backend``:
    "reference", "torch", "cpu", "triton", "cuda", "auto" or None (the ``BCOS_KERNELS_BACKEND`` env var, else
    auto; on the CPU auto takes "cpu" for the deterministic mode and for sampling an fp32/fp64 x, where it is
    measured faster).
    """
    check_tensor("x", x, (2, 3, 4))
    positive_int("competitors", competitors)
    dim = ref.competition_dim(x)
    if x.shape[dim] % competitors:
        raise ValueError(
            f"competitors={competitors} must divide the channel dim of x "
            f"(dim {dim}, size {x.shape[dim]}), shape {tuple(x.shape)}"
        )
    if competitors > 256:
        raise ValueError(f"competitors must be at most 256 (the winner index is stored as uint8), got {competitors}")
    temperature = _check_temperature(temperature)
    deterministic = bool(deterministic)
    if noise is not None:
        check_tensor("noise", noise)
        if noise.shape != x.shape:
            raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
        if noise.device != x.device:
            raise ValueError(f"noise is on {noise.device} but x is on {x.device}; they must be on the same device")
        if noise.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"noise must have dtype float32 or x's dtype {x.dtype}, got {noise.dtype}")
    keeps = _by_name.cpu.keeps_probabilities(x, stochastic=not deterministic)  # read by auto's choice on the CPU
    name = backends.resolve("lwta", backend, x, deterministic=deterministic, keeps_probabilities=keeps)
    if name == "reference" and x.numel() == 0:  # the original's reshape fails on an empty x; the result is empty
        name = "torch"
    if name == "reference":
        with _autocast.off(x):
            return ref.lwta(
                x, competitors, temperature=temperature, deterministic=deterministic, training=training, noise=noise
            )
    seed = None
    if deterministic:
        noise = None
    else:
        if noise is None:
            noise, seed = getattr(_by_name, name).draw_noise(x)
        if not training:
            temperature = TEST_TEMPERATURE
    out, _, _ = _eager.call(lwta_op, x, noise, seed, competitors=competitors, temperature=temperature, backend=name)
    return out


# ---------------------------------------------------------------------------
# the custom ops: each backend's forward and backward in its file here (bcos_kernels.backends.kernels)


class LwtaOptions(NamedTuple):
    """The options of the LWTA ops (keyword-only in their schemas; the backends get them as one object)."""

    competitors: int
    temperature: float
    backend: str


def _keeps_probabilities(backend: str, x: torch.Tensor, noise, seed) -> bool:
    """Whether the backend's forward keeps the softmax probabilities for its backward (``keeps_probabilities`` of
    its file; a backend without one never does)."""
    keeps = getattr(backends.kernels("lwta", backend), "keeps_probabilities", None)
    return keeps is not None and keeps(x, stochastic=noise is not None or seed is not None)


@custom_op("bcos_kernels::lwta", "Tensor x, Tensor? noise, Tensor? seed", LwtaOptions, "(Tensor, Tensor, Tensor)")
def lwta_op(x, noise, seed, **options):
    """(out, winner, probs): winner is the uint8 index of the winning unit of each block (channels_last if x is);
    probs the softmax probabilities of a backend that keeps them for its backward (x's shape, dtype and layout;
    winner is then empty: the backward finds it again from them), else empty.

    noise given: the stochastic LWTA with uniforms ``noise``; else seed given (backends "cpu", "triton", "cuda": a
    1-element int64 tensor): uniforms drawn in the kernel from it; neither: deterministic (argmax of x).
    """
    opts = LwtaOptions(**options)
    kernels = backends.checked_kernels("lwta", opts.backend, x.device)
    if _keeps_probabilities(opts.backend, x, noise, seed):
        out, probs = kernels.sample_forward(x, noise, seed, opts)
        return out, x.new_empty(0, dtype=torch.uint8), probs
    out, winner = kernels.forward(x, noise, seed, opts)
    return out, winner, x.new_empty(0)


@lwta_op.register_fake
def _(x, noise, seed, **options):
    opts = LwtaOptions(**options)
    backends.kernels("lwta", opts.backend)  # an unknown backend fails when traced too
    if _keeps_probabilities(opts.backend, x, noise, seed):
        probs = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
        return torch.empty_like(x), x.new_empty(0, dtype=torch.uint8), probs
    winner = torch.empty(
        block_shape(x, opts.competitors), dtype=torch.uint8, device=x.device, memory_format=memory_format_of(x)
    )
    return torch.empty_like(x), winner, x.new_empty(0)


@custom_op(
    "bcos_kernels::lwta_backward",
    "Tensor grad_out, Tensor? x, Tensor? noise, Tensor? seed, Tensor winner, Tensor probs",
    LwtaOptions,
    "Tensor",
    extra="bool nhwc",
)
def lwta_backward_op(grad_out, x, noise, seed, winner, probs, *, nhwc, **options):
    """d L / d x of the forward (channels_last if ``nhwc`` else contiguous). x is None in deterministic mode
    (neither noise nor seed) for a backend whose backward reads the winner alone; probs: the forward's third
    output."""
    opts = LwtaOptions(**options)
    kernels = backends.checked_kernels("lwta", opts.backend, grad_out.device)
    if x is not None and _keeps_probabilities(opts.backend, x, noise, seed):
        return kernels.sample_backward(grad_out, x, probs, opts, nhwc=nhwc)
    return kernels.backward(grad_out, x, noise, seed, winner, opts, nhwc=nhwc)


@lwta_backward_op.register_fake
def _(grad_out, x, noise, seed, winner, probs, *, nhwc, **options):
    return torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device, memory_format=memory_format(nhwc))


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    x, noise, seed = inputs
    _, winner, probs = output
    ctx.mark_non_differentiable(winner, probs)
    stochastic = noise is not None or seed is not None
    # the backward recomputes y_soft from x in the stochastic mode; in the deterministic one only some backends
    # read x
    keeps_x = stochastic or backends.kernels("lwta", keyword_only_inputs["backend"]).KEEPS_X_WHEN_DETERMINISTIC
    ctx.save_for_backward(x if keeps_x else None, noise, seed, winner, probs)
    ctx.options = dict(keyword_only_inputs)
    ctx.nhwc = is_channels_last(x)


def _backward(ctx, grad_out, _grad_winner, _grad_probs):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    return _eager.call(lwta_backward_op, grad_out, *ctx.saved_tensors, **ctx.options, nhwc=ctx.nhwc), None, None


_eager.register_autograd(lwta_op, _backward, _setup_context)
