"""Whole models for the end-to-end benchmark (benchmarks/test_bench_models.py).

The per-layer benchmarks time one layer at a time; these builders give the two networks the layers come from,
so that a training step of the whole model can be timed with the original layers, with ours and with plain
convolutions (the limit a B-cos / CoDA network cannot beat):

- ``bcos_resnet50()``: the `bcos` package's B-cos ResNet-50, as its ImageNet experiment builds it;
  ``bcos_kernels.convert(copy.deepcopy(model), backend)`` puts our layers in, ``with_plain_layers(model)`` plain
  convolutions.
- ``bcos_vit_ti()`` / ``bcos_vit_s()``: the `bcos` package's B-cos ViT-Ti/16 and ViT-S/16, as its ``vit_final``
  experiment builds them; ``plain_vit(model)`` the same ViT with plain linears, layer norms and attention (the limit).
- ``coda_net_cifar10(provider)``: the 9-layer CoDA-Net of the CIFAR-10 experiment ("9L-S-CoDA-SQ-1000").
- ``largest_batch`` / ``gpu_step_fits``: the largest batch whose training step fits in GPU memory.
- ``check_parity``: the benchmark refuses to time a model that disagrees with the original.
"""

from __future__ import annotations

import copy
import functools
import gc
import math
from typing import Callable, Optional

import torch
from harness import Workload, sync
from originals import bcos_module, bcos_vit  # tests/ is on sys.path: harness puts it there
from shapes import CODA_CIFAR10_ARCH, CODA_CIFAR10_LOGIT_BIAS, CODA_CIFAR10_LOGIT_TEMPERATURE
from torch import nn

from bcos_kernels import nn as bnn


# ---------------------------------------------------------------------------------------------------------------
# B-cos ResNet-50
# ---------------------------------------------------------------------------------------------------------------
def bcos_resnet50() -> nn.Module:
    """The `bcos` package's B-cos ResNet-50 (25.54M parameters), built exactly as its ImageNet experiment config
    (experiments/ImageNet/bcos_final: "resnet_50") does: uncentered batch norm without bias, logit bias
    -log(999) and BcosConv2d with b=2 and no MaxOut."""
    resnet = bcos_module("models.resnet")
    modules = bcos_module("modules")
    return resnet.resnet50(
        num_classes=1000,
        norm_layer=modules.norms.NoBias(modules.norms.BatchNormUncentered2d),
        logit_bias=-math.log(1000 - 1),
        conv_layer=functools.partial(modules.BcosConv2d, b=2, max_out=1),
    )


def _swapped(model: nn.Module, replace: Callable[[nn.Module], Optional[nn.Module]]) -> nn.Module:
    """A deep copy of ``model`` in which every submodule m with ``replace(m)`` not None is replaced by it (the
    replacement's own children are not visited)."""
    model = copy.deepcopy(model)
    root = replace(model)
    if root is not None:
        return root

    def visit(parent: nn.Module):
        for name, child in list(parent.named_children()):
            new = replace(child)
            if new is None:
                visit(child)
            else:
                setattr(parent, name, new)

    visit(model)
    return model


def _bcos_layer_types():
    modules = bcos_module("modules")
    return modules.BcosConv2d, modules.BcosLinear


def with_plain_layers(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every B-cos conv / linear replaced by a plain ``nn.Conv2d`` / ``nn.Linear``
    of the same output shape, without bias; the rest of the network is unchanged. It is the lower bound a B-cos
    network cannot beat: the same convolutions without the norm, the |cos| scale and the weight normalisation."""
    conv_type, linear_type = _bcos_layer_types()

    def replace(m: nn.Module) -> Optional[nn.Module]:
        if not isinstance(m, (conv_type, linear_type)):
            return None
        weight = m.linear.weight
        kw = dict(bias=False, device=weight.device, dtype=weight.dtype)
        if isinstance(m, conv_type):
            new = nn.Conv2d(
                m.in_channels,
                m.out_channels,
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                m.groups,
                padding_mode=m.padding_mode,
                **kw,
            )
        else:
            new = nn.Linear(m.in_features, m.out_features, **kw)
        if m.max_out == 1:  # same parameters where the shapes agree (MaxOut layers have max_out times more filters)
            with torch.no_grad():
                new.weight.copy_(weight)
        return new.train(m.training)

    return _swapped(model, replace)


# ---------------------------------------------------------------------------------------------------------------
# B-cos ViT-Ti/16
# ---------------------------------------------------------------------------------------------------------------
def bcos_vit_ti() -> nn.Module:
    """The `bcos` package's B-cos ViT-Ti/16 (simple_vit_ti_patch16_224, 1000 classes), built as its
    ``vit_final`` experiment config does (tests/originals.py ``bcos_vit``)."""
    return bcos_vit("simple_vit_ti_patch16_224", num_classes=1000)


def bcos_vit_s() -> nn.Module:
    """The same for ViT-S/16 (simple_vit_s_patch16_224)."""
    return bcos_vit("simple_vit_s_patch16_224", num_classes=1000)


def plain_vit(model: nn.Module) -> nn.Module:
    """A deep copy of the B-cos ViT ``model`` as the fastest plain ViT of its shape: plain linears and convs
    (``with_plain_layers``), and the attention on scaled_dot_product_attention with ATen's layer norm (our
    converted Attention and norms, which out of explanation mode are exactly those)."""
    import bcos_kernels

    return bcos_kernels.convert(with_plain_layers(model))


# ---------------------------------------------------------------------------------------------------------------
# CoDA-Net CIFAR-10
# ---------------------------------------------------------------------------------------------------------------
class AdaptiveSumPool2d(nn.AdaptiveAvgPool2d):
    """CoDA-Nets modules/utils.AdaptiveSumPool2d: adaptive average pooling with the averaging undone (times H*W),
    computed the way the original does it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * (x.shape[-2] * x.shape[-1])


class FinalLayer(nn.Module):
    """CoDA-Nets modules/utils.FinalLayer: (N, C, 1, 1) -> logits / temperature + bias, (N, C)."""

    def __init__(self, temperature: float, bias: float):
        super().__init__()
        self.temperature = temperature
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2]) / self.temperature + self.bias

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, bias={self.bias}"


def coda_net_cifar10(provider: str, seed: int = 0) -> nn.Sequential:
    """The CIFAR-10 CoDA-Net "9L-S-CoDA-SQ-1000" (moboehle/CoDA-Nets models/simple_coda.make_coda_net): 9 CoDA
    layers (squash norm) from ``shapes.CODA_CIFAR10_ARCH``, a sum pool over H, W and logits / 1000 + log(.1/.9).
    Its input is the 6-channel (x, 1 - x) 32x32 image.

    provider: "reference" runs each layer through ``dau_conv2d_original``; "plain" uses nn.Conv2d(in, out, k, s,
    p, bias=False) layers (the limit); any other name is a backend of our ``DAUConv2d``. The parameters are
    drawn under ``torch.manual_seed(seed)`` (without touching the global RNG), so the reference and every backend
    of ours get identical parameters and can be compared.
    """
    layers = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for cin, cout, k, s, p, rank in CODA_CIFAR10_ARCH:
            if provider == "plain":
                layers.append(nn.Conv2d(cin, cout, k, s, p, bias=False))
            else:  # backend "reference" runs the exact reference of the original (dau_conv2d_original)
                layers.append(bnn.DAUConv2d(cin, cout, rank, k, s, p, norm="squash", backend=provider))
    return nn.Sequential(
        *layers, AdaptiveSumPool2d((1, 1)), FinalLayer(CODA_CIFAR10_LOGIT_TEMPERATURE, CODA_CIFAR10_LOGIT_BIAS)
    )


# ---------------------------------------------------------------------------------------------------------------
# Largest batch that fits
# ---------------------------------------------------------------------------------------------------------------
def largest_batch(fits: Callable[[int], bool], start: int = 1, limit: int = 4096) -> int:
    """The largest batch b in [start, limit] with ``fits(b)``, assuming fits is monotone (True up to some batch,
    False above): doubling from ``start`` until a batch does not fit (or ``limit`` is reached), then bisection.
    0 if ``fits(start)`` is False."""
    if not 1 <= start <= limit:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    if not fits(start):
        return 0
    good = start  # largest batch known to fit
    while True:
        trial = min(2 * good, limit)
        if trial == good:  # good == limit
            return good
        if not fits(trial):
            bad = trial
            break
        good = trial
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def _is_oom(error: BaseException) -> bool:
    # cuDNN / cuBLAS workspace allocations that fail surface as a RuntimeError saying "out of memory".
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error)
    )


def _train_step(make_workload: Callable[[int], Workload], batch: int) -> None:
    # A function of its own: its locals (the workload, activations) are gone once it returns or raises.
    work = make_workload(batch)
    out = work.forward()
    work.backward(out, torch.ones_like(out))
    sync()


def free_gpu_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_step_fits(make_workload: Callable[[int], Workload]) -> Callable[[int], bool]:
    """``fits(batch)``: builds ``make_workload(batch)``, runs one forward+backward; False if the GPU ran out of
    memory, True otherwise. The memory is freed after each try so that the next one starts from the same state."""

    def fits(batch: int) -> bool:
        try:
            _train_step(make_workload, batch)
            ok = True
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not _is_oom(error):
                raise
            ok = False
        # outside the except block: the traceback (and the tensors its frames hold) is released by now
        free_gpu_memory()
        return ok

    return fits


# ---------------------------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------------------------
def _max_error(name: str, ours: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> Optional[str]:
    """None if max |ours - ref| <= atol + rtol * max |ref| (a criterion relative to the output's scale: whole-model
    outputs and gradients span orders of magnitude, so an elementwise rtol would be dominated by the tiny
    entries), else the message."""
    if ours.shape != ref.shape:
        return f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    ours, ref = ours.double(), ref.double()
    if not torch.isfinite(ours).all():
        return f"{name}: not finite"
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    if err > atol + rtol * scale:
        return f"{name}: max |diff| = {err:.3g}, max |ref| = {scale:.3g}, relative {err / max(scale, 1e-300):.3g}"
    return None


def check_parity(
    reference_model: nn.Module, our_model: nn.Module, x: torch.Tensor, rtol: float, atol: float = 0.0
) -> None:
    """Forward outputs and input gradients of the two models on ``x`` (and one fixed random output gradient) agree
    to ``atol + rtol * max |reference|``; AssertionError with the max error otherwise."""
    results = []
    grad_out = None
    for model in (reference_model, our_model):
        xi = x.detach().clone().requires_grad_(True)
        out = model(xi)
        if grad_out is None:
            gen = torch.Generator(device="cpu").manual_seed(0)
            grad_out = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
        (grad,) = torch.autograd.grad(out, xi, grad_out)
        results.append((out.detach(), grad))
    (ref_out, ref_grad), (out, grad) = results
    errors = [
        e
        for e in (
            _max_error("output", out, ref_out, rtol, atol),
            _max_error("input gradient", grad, ref_grad, rtol, atol),
        )
        if e
    ]
    if errors:
        raise AssertionError("model parity with the original failed: " + "; ".join(errors))
