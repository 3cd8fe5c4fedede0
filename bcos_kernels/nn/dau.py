"""Drop-in replacement of the CoDA-Net layer ``CoDAConv2d(DAUWeights(...))``.

Original: github moboehle/CoDA-Nets, ``modules/coda_conv.py`` and ``modules/DAUs.py``. The state_dict keys
are the original's (``weight_mod.weighting_f.0.weight``, ``weight_mod.weighting_f.1.weight`` and
``weight_mod.weighting_f.1.bias``), so checkpoints load unchanged, and the parameters are initialised
the same way (they are ``nn.Conv2d`` parameters, as in the original).

What this module covers: the whole ``CoDAConv2d`` forward (dynamic weights, their squash / L2 norm, the
weighted patch sum) and ``explanation_mode(detach=True)``. What it does not: ``CoDAConv2d.save_matrix`` /
``reverse`` (the matrix regulariser needs the per-pixel weights this implementation never builds) and
``reuse`` (unused in the original). The non-parametric parts of a CoDA-Net live outside the layer and are left
to the model: the ``AddInverse`` input (x, 1 - x), ``AdaptiveSumPool2d`` after the last layer and
``FinalLayer`` (logits / logit_temperature + logit_bias).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from bcos_kernels.ops.dau_conv2d import dau_conv2d
from bcos_kernels.ops.dau_conv2d.reference import NORMS, default_padding

__all__ = ["DAUConv2d", "DAUWeights"]


class DAUWeights(nn.Module):
    """Holds the parameters of the dynamic weights under the original ``DAUWeights`` names
    (``weighting_f`` = Sequential(rank conv k x k without bias, 1x1 expansion conv to O*C*k*k channels)).
    It only stores them: ``DAUConv2d`` runs the low-rank op instead of these convs."""

    def __init__(
        self,
        in_channels: int,
        num_daus: int,
        rank: int,
        kernel_size: int = 3,
        stride=1,
        padding=None,
        bias: bool = True,
    ):
        super().__init__()
        if padding is None:
            padding = default_padding(kernel_size)
        self.out_channels = num_daus
        self.kernel_size = kernel_size
        self.padding = padding
        self.stride = stride
        self.groups = 1
        self.weighting_f = nn.Sequential(
            nn.Conv2d(in_channels, rank, kernel_size=kernel_size, stride=stride, padding=padding, bias=False),
            nn.Conv2d(rank, num_daus * in_channels * kernel_size**2, kernel_size=1, bias=bias),
        )

    def forward(self, *args, **kwargs):
        raise RuntimeError("DAUWeights only holds the parameters; call the DAUConv2d that owns it")


class DAUConv2d(nn.Module):
    """CoDA convolution with O = ``out_channels`` dynamic alignment units of rank ``rank``.

    ``norm``: "squash" (the original ``Squashing``) or "l2" (``L2Norm(return_norm=True)``).
    ``padding=None`` is (kernel_size - 1) // 2 as in the original. ``backend``: see ``bcos_kernels.backends``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        kernel_size: int = 3,
        stride: Union[int, Tuple[int, int]] = 1,
        padding: Optional[Union[int, Tuple[int, int]]] = None,
        norm: str = "squash",
        bias: bool = True,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rank = rank
        self.kernel_size = kernel_size
        self.stride = stride
        self.norm = norm
        self.backend = backend
        self.weight_mod = DAUWeights(in_channels, out_channels, rank, kernel_size, stride, padding, bias)
        self.padding = self.weight_mod.padding
        # Explanation mode, as CoDAConv2d.detach: the dynamic weights are constants for the gradient.
        self.detach = False

    def explanation_mode(self, detach: bool = True) -> None:
        self.detach = detach

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank_conv, expand_conv = self.weight_mod.weighting_f
        return dau_conv2d(
            x,
            rank_conv.weight,
            expand_conv.weight,
            expand_conv.bias,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            norm=self.norm,
            detach=bool(self.detach),
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, rank={self.rank}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, norm={self.norm!r}, "
            f"bias={self.weight_mod.weighting_f[1].bias is not None}"
        )

    @classmethod
    def from_original(cls, module: nn.Module, backend: Optional[str] = None) -> "DAUConv2d":
        """Build from an original ``CoDAConv2d(DAUWeights(...))``: the same configuration and explanation mode,
        and the original's parameter-holding ``weighting_f`` itself (shared, not copied: same parameters, device,
        dtype and state_dict keys). Used by ``bcos_kernels.convert``."""
        wm = module.weight_mod
        rank_conv, expand_conv = wm.weighting_f
        if getattr(wm, "groups", 1) != 1 or expand_conv.groups != 1:
            raise ValueError("only groups=1 DAUWeights are supported")
        norm_class = type(wm.norm_func).__name__
        if norm_class == "Squashing":
            norm = "squash"
        elif getattr(wm.norm_func, "p", None) == 2 and getattr(wm.norm_func, "return_norm", False):
            norm = "l2"
        else:
            raise ValueError(f"unsupported norm_func {wm.norm_func!r} (Squashing or L2Norm(return_norm=True))")
        with torch.device("meta"):  # the parameters are the original's: allocate nothing
            new = cls(
                rank_conv.in_channels,
                wm.out_channels,
                rank_conv.out_channels,
                wm.kernel_size,
                wm.stride,
                wm.padding,
                norm,
                expand_conv.bias is not None,
                backend,
            )
        new.weight_mod.weighting_f = wm.weighting_f
        new.detach = bool(getattr(module, "detach", False))
        return new.train(module.training)
