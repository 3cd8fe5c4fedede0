"""Drop-in B-cos modules. Same constructor arguments, attributes, state_dict keys
(``linear.weight``, ``linear.bias``, ``b`` when it is a parameter) and
explanation-mode switches as the originals:

- BcosConv2d, BcosConv2dWithScale, BcosLinear: the `bcos` package (B-cos v2)
- BcosConv2dV1: moboehle/B-cos (v1: ``scale`` divisor, MaxOut 2 by default)
- BcosifyConv2d, BcosifyLinear: B-cosification (bias, unnormalised weights,
  ``b`` may be replaced by an ``nn.Parameter``, ``clamping`` and ``b_loss``)

Each forward is one call of the fused op; ``backend`` picks the implementation
(None: ``BCOS_KERNELS_BACKEND`` or auto).
"""

import math
from typing import Optional, Tuple, Union

import torch.nn as nn
from torch import Tensor

from bcos_kernels.ops._checks import is_finite_number, positive_int
from bcos_kernels.ops.bcos_conv2d import bcos_conv2d
from bcos_kernels.ops.bcos_conv2d.reference import normalized_weight
from bcos_kernels.ops.bcos_linear import bcos_linear

IntOrPair = Union[int, Tuple[int, int]]


class NormedConv2d(nn.Conv2d):
    """nn.Conv2d whose filters are divided by their L2 norm (what ``BcosConv2d.linear`` computes)."""

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, normalized_weight(self.weight), self.bias)


class NormedLinear(nn.Linear):
    """nn.Linear whose rows are divided by their L2 norm."""

    def forward(self, input: Tensor) -> Tensor:
        return nn.functional.linear(input, normalized_weight(self.weight), self.bias)


class DetachableModule(nn.Module):
    """Explanation mode switch of the `bcos` package (``detach`` attribute)."""

    def __init__(self):
        super().__init__()
        self.detach = False

    def set_explanation_mode(self, activate: bool = True) -> None:
        self.detach = activate

    @property
    def is_in_explanation_mode(self) -> bool:
        return self.detach


def _check_padding_mode(padding_mode: str) -> None:
    # The original pads the convolution with padding_mode but its patch norm with zeros; none of the B-cos
    # models uses another mode, so we refuse it rather than reproduce that mismatch.
    if padding_mode != "zeros":
        raise ValueError(f"padding_mode={padding_mode!r} is not supported (only 'zeros')")


class BcosConv2d(DetachableModule):
    """B-cos v2 convolution (`bcos.modules.BcosConv2d`)."""

    _normalize_weight = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair = 1,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        b: Union[int, float] = 2,
        max_out: int = 1,
        *,
        backend: Optional[str] = None,
        **kwargs,
    ):
        positive_int("max_out", max_out)
        _check_padding_mode(padding_mode)
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        self.device = device
        self.dtype = dtype
        self.bias = False
        self.b = b
        self.max_out = max_out
        self.backend = backend
        self.linear = self._make_linear(bias=False)
        self.patch_size = math.prod(self.linear.kernel_size)

    def _make_linear(self, bias: bool) -> nn.Conv2d:
        cls = NormedConv2d if self._normalize_weight else nn.Conv2d
        return cls(
            self.in_channels,
            self.out_channels * self.max_out,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=bias,
            padding_mode=self.padding_mode,
            device=self.device,
            dtype=self.dtype,
        )

    def effective_b(self):
        return self.b

    @property
    def scale_divisor(self) -> float:
        return 1.0

    def fold_norm(self, norm) -> None:
        """Apply ``norm`` (a ``BatchNormUncentered2d`` that this conv's output goes into) in the fused epilogue
        whenever it is in eval mode; marks it ``folded`` so that it then only adds its bias. The norm stays
        registered where it is (a plain reference here: the state_dict is unchanged). See
        ``bcos_kernels.fold_batchnorm``."""
        self.__dict__["folded_norm"] = norm
        norm.folded = True

    def _channel_scale(self, x: Tensor) -> Optional[Tensor]:
        norm = self.__dict__.get("folded_norm")
        if norm is None or norm.uses_batch_statistics():
            return None
        return norm.channel_scale().to(x.dtype)

    def forward(self, in_tensor: Tensor) -> Tensor:
        lin = self.linear
        return bcos_conv2d(
            in_tensor,
            lin.weight,
            lin.bias,
            b=self.effective_b(),
            stride=lin.stride,
            padding=lin.padding,
            dilation=lin.dilation,
            groups=lin.groups,
            max_out=self.max_out,
            normalize_weight=self._normalize_weight,
            scale=self.scale_divisor,
            detach=self.detach,
            channel_scale=self._channel_scale(in_tensor),
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        b = self.b.item() if isinstance(self.b, Tensor) else self.b
        return f"B={b}" + (f", max_out={self.max_out}" if self.max_out > 1 else "") + ","


class BcosConv2dWithScale(BcosConv2d):
    """`bcos.modules.BcosConv2dWithScale`: the output divided by a fixed ``scale``.

    Arguments: BcosConv2d's, then ``scale`` (None: ``sqrt(kernel area * in_channels) / scale_factor``) and
    ``scale_factor``, by keyword or, as in the original, by position (the 13th and 14th).
    """

    _POSITIONAL = 12  # BcosConv2d's positional parameters, in_channels ... max_out

    def __init__(self, *args, scale: Optional[float] = None, scale_factor: Union[int, float] = 100.0, **kwargs):
        if len(args) > self._POSITIONAL + 2:
            raise TypeError(
                f"BcosConv2dWithScale takes at most {self._POSITIONAL + 2} positional arguments, got {len(args)}"
            )
        if len(args) > self._POSITIONAL:
            scale, scale_factor = (*args[self._POSITIONAL :], scale_factor)[:2]
        super().__init__(*args[: self._POSITIONAL], **kwargs)
        kernel_size, in_channels = self.kernel_size, self.in_channels
        if scale is None:
            ks = kernel_size if not isinstance(kernel_size, tuple) else math.sqrt(math.prod(kernel_size))
            self.scale = ks * math.sqrt(in_channels) / scale_factor
        else:
            if scale == 1.0:
                raise ValueError("scale=1.0: use BcosConv2d instead of BcosConv2dWithScale")
            self.scale = scale

    @property
    def scale_divisor(self) -> float:
        return self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale:.3f}, " + super().extra_repr()


class BcosConv2dV1(nn.Module):
    """B-cos v1 convolution (moboehle/B-cos ``modules.bcosconv2d.BcosConv2d``): MaxOut 2 and a ``scale``."""

    def __init__(
        self,
        inc: int,
        outc: int,
        kernel_size: IntOrPair = 1,
        stride: int = 1,
        padding: int = 0,
        max_out: int = 2,
        b: Union[int, float] = 2,
        scale: Optional[float] = None,
        scale_fact: float = 100,
        *,
        backend: Optional[str] = None,
        **kwargs,
    ):
        super().__init__()
        self.stride = stride
        self.linear = NormedConv2d(inc, outc * max_out, kernel_size, stride, padding, 1, 1, bias=False)
        self.outc = outc * max_out
        self.b = b
        self.max_out = max_out
        self.inc = inc
        self.kernel_size = kernel_size
        self.kssq = math.prod(kernel_size) if isinstance(kernel_size, tuple) else kernel_size**2
        self.padding = padding
        self.detach = False
        self.backend = backend
        if scale is None:
            ks = kernel_size if not isinstance(kernel_size, tuple) else math.sqrt(math.prod(kernel_size))
            self.scale = ks * math.sqrt(inc) / scale_fact
        else:
            self.scale = scale

    def explanation_mode(self, detach: bool = True) -> None:
        self.detach = detach

    def forward(self, in_tensor: Tensor) -> Tensor:
        lin = self.linear
        return bcos_conv2d(
            in_tensor,
            lin.weight,
            None,
            b=self.b,
            stride=lin.stride,
            padding=lin.padding,
            max_out=self.max_out,
            scale=self.scale,
            detach=self.detach,
            backend=self.backend,
        )


class BcosLinear(DetachableModule):
    """B-cos v2 linear (`bcos.modules.BcosLinear`)."""

    _normalize_weight = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device=None,
        dtype=None,
        b: Union[int, float] = 2,
        max_out: int = 1,
        *,
        backend: Optional[str] = None,
    ):
        if bias and self._normalize_weight:
            raise ValueError("bias=True: BcosLinear has no bias (BcosifyLinear has)")
        positive_int("max_out", max_out)
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = False
        self.b = b
        self.max_out = max_out
        self.backend = backend
        cls = NormedLinear if self._normalize_weight else nn.Linear
        self.linear = cls(in_features, out_features * max_out, bias=bias, device=device, dtype=dtype)

    def effective_b(self):
        return self.b

    def forward(self, in_tensor: Tensor) -> Tensor:
        return bcos_linear(
            in_tensor,
            self.linear.weight,
            self.linear.bias,
            b=self.effective_b(),
            max_out=self.max_out,
            normalize_weight=self._normalize_weight,
            detach=self.detach,
            backend=self.backend,
        )

    extra_repr = BcosConv2d.extra_repr


def _bcosify_b(module) -> Union[float, Tensor]:
    """B-cosification's b: ``b + 2`` when b is learned with a loss (b_loss), b clamped at 1 + 1e-6 when
    ``clamping``. A tensor b always takes the general formula (and gets a gradient)."""
    b = module.b
    if module.b_loss:
        return b + 2
    if module.clamping:
        return b.clamp(min=1 + 1e-6) if isinstance(b, Tensor) else max(b, 1 + 1e-6)
    return b


class BcosifyConv2d(BcosConv2d):
    """B-cosification's conv: plain (unnormalised) weights, optional bias, b a float or a parameter."""

    _normalize_weight = False

    def __init__(self, *args, clamping: bool = False, b_loss: bool = False, bias: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.clamping = clamping
        self.b_loss = b_loss
        self.linear = self._make_linear(bias=bias)

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    effective_b = _bcosify_b


class BcosifyLinear(BcosLinear):
    """B-cosification's linear: plain (unnormalised) weights, optional bias, b a float or a parameter."""

    _normalize_weight = False

    def __init__(self, *args, clamping: bool = False, b_loss: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.clamping = clamping
        self.b_loss = b_loss

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    effective_b = _bcosify_b


class LogitLayer(nn.Module):
    """`bcos.modules.LogitLayer`: ``logits / logit_temperature + logit_bias`` (None: 1 and 0), no parameters.
    The B-cos models end in it (bias ``-log(K - 1)`` for K classes, so that a binary cross-entropy on one-hot
    targets starts near its optimum for the off classes)."""

    def __init__(self, logit_temperature: Optional[float] = None, logit_bias: Optional[float] = None):
        super().__init__()
        for name, value in (("logit_temperature", logit_temperature), ("logit_bias", logit_bias)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not is_finite_number(value)
            ):
                raise ValueError(f"{name} must be None or a finite number, got {value!r}")
        if logit_temperature is not None and logit_temperature <= 0:
            raise ValueError(f"logit_temperature must be positive, got {logit_temperature!r}")
        self.logit_temperature = logit_temperature
        self.logit_bias = logit_bias

    def forward(self, in_tensor: Tensor) -> Tensor:
        if self.logit_temperature is not None:
            in_tensor = in_tensor / self.logit_temperature
        if self.logit_bias is not None:
            in_tensor = in_tensor + self.logit_bias
        return in_tensor

    def extra_repr(self) -> str:
        return f"logit_temperature={self.logit_temperature}, logit_bias={self.logit_bias}"
