"""The B-cos models' norms: the CNNs' uncentered batch norm (`bcos.modules.norms.BatchNormUncentered2d`) and the
ViTs' detachable layer and group norms (`bcos.modules.norms.centered_norms`, at the end).

B-cos networks must stay dynamic-linear, so their batch norm divides by the standard deviation without
subtracting the mean: ``out = input / sqrt(var + eps) * weight (+ bias)``. The bias is usually removed
(the `bcos` package's ``NoBias`` wrapper; here ``bias=False``). Same buffers and state_dict keys as
``nn.BatchNorm2d`` (``running_mean`` is kept, unused, so checkpoints load both ways).

Eval-mode folding (``bcos_kernels.fold_batchnorm``): in eval mode the norm is a fixed per-channel scale
``weight / sqrt(running_var + eps)``. When a B-cos conv's output goes only into this norm, the conv applies that
scale in its fused epilogue (``channel_scale`` of ``bcos_conv2d``) and the norm, marked ``folded``, only adds its
bias. In training mode both run unfolded: the batch statistics and the running_var update are unchanged.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from bcos_kernels.nn.bcos import DetachableModule
from bcos_kernels.ops.batch_norm_uncentered import batch_norm_uncentered
from bcos_kernels.ops.detachable_norm import detachable_group_norm, detachable_layer_norm


class BatchNormUncentered2d(nn.BatchNorm2d, DetachableModule):
    """`bcos.modules.norms.BatchNormUncentered2d`; ``bias=False`` is the original's ``NoBias(...)``.

    ``detach`` (explanation mode, ``set_explanation_mode`` of DetachableModule) detaches the batch statistics in
    training mode, as the original. ``folded`` is set by ``bcos_kernels.fold_batchnorm``: see the module docstring.
    ``backend``: as :func:`bcos_kernels.batch_norm_uncentered` (None: "auto", the fast path; "reference": the
    original's operations).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        bias: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if not bias:
            if not affine:
                raise ValueError("bias=False needs affine=True (there is no bias without affine parameters)")
            self.bias = None
        self.folded = False
        self.backend = backend

    @classmethod
    def from_module(cls, norm: nn.BatchNorm2d, backend: Optional[str] = None) -> "BatchNormUncentered2d":
        """The same norm (its parameters and buffers shared, not copied) as an instance of this class."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            setattr(new, name, getattr(norm, name))
        for name, param in norm._parameters.items():
            new._parameters[name] = param
        for name, buf in norm._buffers.items():
            new._buffers[name] = buf
        new.detach = bool(getattr(norm, "detach", False))
        new.folded = False
        new.backend = getattr(norm, "backend", backend) if backend is None else backend
        return new

    def _momentum_and_count(self) -> float:
        # the running-average factor, as nn.BatchNorm2d / the original compute it
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return factor

    def uses_batch_statistics(self) -> bool:
        return self.training or self.running_var is None

    def channel_scale(self) -> Tensor:
        """The eval-mode per-channel factor ``weight / sqrt(running_var + eps)`` (differentiable in weight)."""
        if self.running_var is None:
            raise ValueError("this norm tracks no running_var: it has no fixed eval-mode scale")
        inv_std = 1.0 / (self.running_var + self.eps).sqrt()
        return inv_std if self.weight is None else self.weight * inv_std

    def forward(self, input: Tensor) -> Tensor:
        if self.folded and not self.uses_batch_statistics():
            # the conv before this norm has applied channel_scale() in its epilogue
            return input if self.bias is None else input + self.bias[None, :, None, None]
        factor = self._momentum_and_count()
        training = self.uses_batch_statistics()
        running_var = self.running_var if not self.training or self.track_running_stats else None
        return batch_norm_uncentered(
            input,
            running_var,
            self.weight,
            self.bias,
            training=training,
            momentum=factor,
            eps=self.eps,
            detach=self.detach,
            backend=getattr(self, "backend", None),
        )

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + (", bias=False" if self.affine and self.bias is None else "")
            + (", folded" if self.folded else "")
        )


def _share_state(new: nn.Module, norm: nn.Module, names) -> None:
    """``new`` (built with ``__new__``) gets ``norm``'s attributes ``names``, parameters and buffers, shared."""
    nn.Module.__init__(new)
    for name in names:
        setattr(new, name, getattr(norm, name))
    new.training = norm.training
    for name, param in norm._parameters.items():
        new._parameters[name] = param
    for name, buf in norm._buffers.items():
        new._buffers[name] = buf
    new.detach = bool(getattr(norm, "detach", False))


class DetachableLayerNorm(nn.LayerNorm, DetachableModule):
    """`bcos.modules.norms.DetachableLayerNorm`, the B-cos ViTs' norm (``NoBias(...)``: ``bias=False``). In
    explanation mode (``detach``) the variance is a constant for autograd; that backward is hand-written
    (``bcos_kernels.ops.detachable_layer_norm``)."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.detach = False
        self.backend = backend

    @classmethod
    def from_module(cls, norm: nn.LayerNorm, backend: Optional[str] = None) -> "DetachableLayerNorm":
        """The same norm (parameters shared, not copied) as an instance of this class."""
        new = cls.__new__(cls)
        _share_state(new, norm, ("normalized_shape", "eps", "elementwise_affine"))
        new.backend = backend
        return new

    def forward(self, input: Tensor) -> Tensor:
        return detachable_layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, detach=self.detach, backend=self.backend
        )


class DetachableGroupNorm2d(nn.GroupNorm, DetachableModule):
    """`bcos.modules.norms.DetachableGroupNorm2d` (the ViT-C conv stem's norm is its one-group form,
    DetachableGNLayerNorm2d). In explanation mode (``detach``) the variance is a constant for autograd."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.detach = False
        self.backend = backend

    @classmethod
    def from_module(cls, norm: nn.GroupNorm, backend: Optional[str] = None) -> "DetachableGroupNorm2d":
        """The same norm (parameters shared, not copied) as an instance of this class."""
        new = cls.__new__(cls)
        _share_state(new, norm, ("num_groups", "num_channels", "eps", "affine"))
        new.backend = backend
        return new

    def forward(self, input: Tensor) -> Tensor:
        return detachable_group_norm(
            input, self.num_groups, self.weight, self.bias, self.eps, detach=self.detach, backend=self.backend
        )


class DetachableGNLayerNorm2d(DetachableGroupNorm2d):
    """`bcos.modules.norms.DetachableGNLayerNorm2d`: one group, a layer norm over (C, H, W)."""

    def __init__(self, num_channels: int, *args, **kwargs):
        super().__init__(1, num_channels, *args, **kwargs)


class DetachableGNInstanceNorm2d(DetachableGroupNorm2d):
    """`bcos.modules.norms.DetachableGNInstanceNorm2d`: a group per channel."""

    def __init__(self, num_channels: int, *args, **kwargs):
        super().__init__(num_channels, num_channels, *args, **kwargs)
