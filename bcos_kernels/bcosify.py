"""B-cosification of a standard CNN or ViT: ``bcosify(model)``, and the ``add_inverse`` input encoding.

B-cosification (Arya, Rao, Boehle, Schiele, NeurIPS 2024; github shrebox/B-cosification) turns a pretrained
standard network into a B-cos network that is then fine-tuned: every conv and linear becomes a B-cos layer that
keeps the pretrained (unnormalised) weights, batch norms stop centering, biases are dropped, and the first conv
reads the B-cos input encoding ``[x, 1 - x]``. ``bcosify`` does this conversion in place on any ``nn.Module``
built from standard layers (torchvision ResNets, DenseNets, VGGs, home-made CNNs; the `bcos` package's standard
SimpleViT / ViT-C and ViTs on ``nn.MultiheadAttention``, CLIP's and torchvision's layout), using this package's
fused modules. What it does to each layer, and where it follows or departs from the original, is in its docstring.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from bcos_kernels import backends
from bcos_kernels.nn.bcos import BcosConv2d, BcosConv2dV1, BcosifyConv2d, BcosifyLinear, BcosLinear, LogitLayer
from bcos_kernels.nn.norms import BatchNormUncentered2d, DetachableGroupNorm2d, DetachableLayerNorm
from bcos_kernels.nn.vit import Attention, DetachableGELU, DetachableQuickGELU, MultiheadAttention

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "add_inverse", "bcosify"]

# The normalisations of the original's BcosifyNetwork, per RGB channel (``add_inverse(x, mean=..., std=...)``
# extends them to the 6 channels as it does); CLIP's "mean zero" variant is ``add_inverse(x, std=CLIP_STD)``.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Modules that are already B-cos: left as they are and never entered (a BcosConv2d holds an nn.Conv2d, which
# must not be converted a second time).
_BCOS_MODULES = (
    BcosConv2d,
    BcosLinear,
    BcosConv2dV1,
    BatchNormUncentered2d,
    DetachableLayerNorm,
    DetachableGroupNorm2d,
    DetachableGELU,
    DetachableQuickGELU,
)

# Weighted layers the original does not convert and that we cannot convert faithfully: refused, so that a model
# is never silently left half-converted.
_UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# In a ViT (see ``_is_vit``): the qkv projection of the `bcos` package's ViT attention, which the original keeps a
# plain linear (its q and k only form the attention matrix, detached in explanation mode), and the linear patch
# embedding of its SimpleViT, which reads the [x, 1 - x] encoding pixel by pixel.
_QKV_NAME = "to_qkv"
_PATCH_LINEAR = "to_patch_embedding.linear"


def _is_vit(model: nn.Module) -> bool:
    """A transformer: an ``nn.MultiheadAttention`` or an attention with a ``to_qkv`` projection (the `bcos`
    package's ViTs)."""
    return any(
        isinstance(m, (nn.MultiheadAttention, Attention, MultiheadAttention))
        or isinstance(getattr(m, _QKV_NAME, None), nn.Linear)
        for m in model.modules()
    )


def _is_quick_gelu(module: nn.Module) -> bool:
    # CLIP's QuickGELU (clip/model.py): x * sigmoid(1.702 x); recognised by name, CLIP is not a dependency
    return type(module).__name__ == "QuickGELU" and not list(module.parameters())


# Centered norms that the original leaves in place for CNNs; they keep the network from being dynamic linear,
# so we say so once.
_CENTERED_NORMS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.BatchNorm1d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def add_inverse(
    x: Tensor, dim: int = 1, *, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None
) -> Tensor:
    """The B-cos input encoding ``cat([x, 1 - x], dim)`` (the `bcos` package's ``AddInverse``), for images
    ``x`` in [0, 1].

    ``mean`` / ``std`` (one value per channel of ``x``): also normalise the encoding as the original
    B-cosification wrapper (``BcosifyNetwork``) does before its first conv, with mean ``(mean, 1 - mean)`` and
    std ``(std, std)``. The normalised encoding is then exactly ``[z, -z]`` with ``z = (x - mean) / std`` the
    input the standard model was trained on, which is what makes ``bcosify``'s widened first conv reproduce the
    standard model's (see ``bcosify``). ``mean=None`` subtracts nothing from any of the 2C channels (the
    original's "mean zero" variant); ``std=None`` divides by nothing. Note that subtracting a mean makes the
    network affine, not linear, in the encoded image: B-cos explanations of such a model (gradient times the
    encoded input) do not sum to its output exactly.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(
            f"x must be a floating point tensor, got {type(x).__name__}"
            + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else "")
        )
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for x with {x.dim()} dimensions")
    dim = dim % x.dim()
    out = torch.cat([x, 1 - x], dim)
    if mean is None and std is None:
        return out
    channels = x.shape[dim]
    # shape that broadcasts a per-channel vector along `dim`
    view = [1] * x.dim()
    view[dim] = 2 * channels

    def per_channel(name: str, values) -> Tensor:
        t = torch.as_tensor(values, dtype=x.dtype, device=x.device).flatten()
        if t.numel() != channels:
            raise ValueError(
                f"{name} must have one value per channel of x along dim {dim} ({channels}), got {t.numel()}"
            )
        return t

    if mean is not None:
        m = per_channel("mean", mean)
        # the inverse channels 1 - x have mean 1 - mean
        out = out - torch.cat([m, 1 - m]).view(view)
    if std is not None:
        s = per_channel("std", std)
        if not bool((s != 0).all()):
            raise ValueError("std must be non-zero in every channel")
        out = out / torch.cat([s, s]).view(view)
    return out


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _conv_padding(conv: nn.Conv2d, name: str) -> Tuple[int, int]:
    """nn.Conv2d's padding as two ints: the B-cos patch norm pads symmetrically, so the string forms are only
    accepted where they mean symmetric padding."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation):
        total = d * (k - 1)
        if total % 2:
            raise ValueError(
                f"layer {name!r}: padding='same' with an even kernel span pads asymmetrically, which "
                "the B-cos patch norm does not support"
            )
        pads.append(total // 2)
    return tuple(pads)


def _named_modules_outside_bcos(model: nn.Module):
    """(qualified name, module) for every module, not entering modules that are already B-cos."""
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        yield prefix, module
        if isinstance(module, _BCOS_MODULES):
            continue
        # _modules, not named_children(), which hides the second name of a module registered twice
        children = [(f"{prefix}.{n}" if prefix else n, c) for n, c in module._modules.items() if c is not None]
        stack.extend(reversed(children))


class _Plan:
    """Everything ``bcosify`` will do, worked out (and every error raised) before the model is touched."""

    def __init__(self, model, add_channels, last_layer_name, keep_bias, maxpool_to_avgpool, keep_relu, vit):
        self.vit = vit
        replaced = (
            (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
            + ((nn.MaxPool2d,) if maxpool_to_avgpool else ())
            + (() if keep_relu else (nn.ReLU,))
        )
        if isinstance(model, replaced) and not isinstance(model, _BCOS_MODULES):
            # a module cannot change its class in place
            raise ValueError(
                f"model is itself a {type(model).__name__}: bcosify converts the layers inside a "
                "model; wrap it, e.g. in nn.Sequential"
            )
        self.widen: set = set()  # ids of the convs that get the [x, 1 - x] input
        self.last_layer: Optional[int] = None
        self.left_alone: List[str] = []
        first_convs: List[str] = []
        found_last = False
        seen: set = set()
        for name, module in _named_modules_outside_bcos(model):
            where = name or "<model>"
            if isinstance(add_channels, str) and name == add_channels:
                if vit and type(module) is nn.Linear:
                    self._check_widenable_linear(module, where)
                elif not isinstance(module, nn.Conv2d) or isinstance(module, _BCOS_MODULES):
                    raise ValueError(
                        f"add_channels={add_channels!r} names a {type(module).__name__}, not an nn.Conv2d"
                        + (" or the linear patch embedding" if vit else "")
                    )
                else:
                    self._check_widenable(module, where)
                self.widen.add(id(module))
                first_convs.append(name)
            if last_layer_name is not None and name == last_layer_name:
                if not isinstance(module, nn.Linear):
                    raise ValueError(
                        f"last_layer_name={last_layer_name!r} names a {type(module).__name__}, not an nn.Linear"
                    )
                self.last_layer = id(module)
                found_last = True
            if id(module) in seen:  # registered at several places: checked once
                continue
            seen.add(id(module))
            if isinstance(module, _UNSUPPORTED):
                raise ValueError(
                    f"layer {where!r} ({type(module).__name__}) cannot be B-cosified: the original "
                    "B-cosification converts only 2-D convs, linears, norms and (ViTs) GELUs"
                )
            if type(module).__name__ == "AttentionPool2d" and hasattr(module, "c_proj"):
                # CLIP ResNets' attention pool calls F.multi_head_attention_forward with its projections' weights:
                # swapping those linears for B-cos ones would be bypassed silently
                raise ValueError(
                    f"layer {where!r} is CLIP's AttentionPool2d, which reads its projections' weights directly: "
                    "its B-cos form (the original's BcosAttentionPool2d) is not implemented here"
                )
            if isinstance(module, nn.MultiheadAttention):
                if not vit:
                    raise ValueError(
                        f"layer {where!r} is an nn.MultiheadAttention: B-cosify a transformer with vit=True"
                    )
                reason = MultiheadAttention.unsupported(module)
                if reason is not None:
                    raise ValueError(f"layer {where!r}: an nn.MultiheadAttention with {reason} has no B-cos form here")
                for p_name in ("in_proj_weight", "in_proj_bias"):
                    if not isinstance(getattr(module, p_name), (nn.Parameter, type(None))):
                        raise ValueError(f"layer {where!r}: its {p_name} is not a plain nn.Parameter")
            if (
                vit
                and add_channels is True
                and not first_convs  # a conv stem before it reads the image (the ViT-C models)
                and type(module) is nn.Linear
                and (name == _PATCH_LINEAR or name.endswith("." + _PATCH_LINEAR))
            ):
                self._check_widenable_linear(module, where)
                self.widen.add(id(module))
                first_convs.append(name)
            if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
                raise ValueError(
                    f"layer {where!r} has uninitialised (lazy) parameters: run one forward pass before bcosify"
                )
            if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) and not isinstance(module, _BCOS_MODULES):
                if any(not isinstance(getattr(module, p), (nn.Parameter, type(None))) for p in ("weight", "bias")):
                    # weight norm, spectral norm, parametrizations: the weight is recomputed from other
                    # parameters, which a B-cos layer would not do
                    raise ValueError(
                        f"layer {where!r}: its weight or bias is not a plain nn.Parameter (weight norm "
                        "or a parametrization?); remove that before bcosify"
                    )
            if isinstance(module, nn.Conv2d) and not isinstance(module, _BCOS_MODULES):
                if module.padding_mode != "zeros":
                    raise ValueError(
                        f"layer {where!r}: padding_mode={module.padding_mode!r} is not supported "
                        "(the B-cos patch norm pads with zeros)"
                    )
                _conv_padding(module, where)
                if add_channels is True and module.in_channels == 3:
                    first_convs.append(name)
                    self._check_widenable(module, where)
                    self.widen.add(id(module))
            if isinstance(module, nn.BatchNorm2d) and not isinstance(module, BatchNormUncentered2d) and keep_bias:
                if module.running_mean is None or not module.affine:
                    raise ValueError(
                        f"layer {where!r}: keep_bias=True folds the running mean of a BatchNorm2d "
                        "into its bias, which needs affine=True and track_running_stats=True"
                    )
            if isinstance(module, nn.MaxPool2d) and maxpool_to_avgpool:
                if module.return_indices or _pair(module.dilation) != (1, 1):
                    raise ValueError(
                        f"layer {where!r}: a MaxPool2d with return_indices or dilation has no "
                        "AvgPool2d equivalent (pass maxpool_to_avgpool=False to keep it)"
                    )
            if isinstance(module, _CENTERED_NORMS) and not (vit and isinstance(module, (nn.LayerNorm, nn.GroupNorm))):
                self.left_alone.append(f"{where} ({type(module).__name__})")
        if isinstance(add_channels, str) and not first_convs:
            raise ValueError(f"add_channels={add_channels!r}: the model has no module of that name")
        if last_layer_name is not None and not found_last:
            raise ValueError(f"last_layer_name={last_layer_name!r}: the model has no module of that name")
        if add_channels is True and len(first_convs) != 1:
            # the original warns in both cases and goes on
            what = (
                f"no nn.Conv2d with 3 input channels{' (nor a ' + _PATCH_LINEAR + ')' if vit else ''}: the input "
                "encoding [x, 1 - x] is not added"
                if not first_convs
                else f"several nn.Conv2d with 3 input channels ({', '.join(first_convs)}): all of them get the "
                "[x, 1 - x] input; pass add_channels='<name of the first conv>' to widen only that one"
            )
            warnings.warn(f"bcosify: {what}", UserWarning, stacklevel=3)

    @staticmethod
    def _check_widenable(conv: nn.Conv2d, where: str) -> None:
        if conv.groups != 1:
            # the widened input is [x, 1 - x]: a channel's two halves are C channels apart, never in one group
            raise ValueError(
                f"layer {where!r}: a grouped first conv (groups={conv.groups}) cannot take the [x, 1 - x] input"
            )

    @staticmethod
    def _check_widenable_linear(lin: nn.Linear, where: str) -> None:
        if lin.in_features % 3:
            # the SimpleViT's patches are (p1 p2 c): each pixel's 3 colour features are consecutive
            raise ValueError(
                f"layer {where!r}: a linear patch embedding must read 3 colour features a pixel, got "
                f"{lin.in_features} input features"
            )


def _pair(v) -> Tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _Converter:
    def __init__(
        self,
        plan: _Plan,
        b_kwargs: dict,
        b_param_init: Optional[float],
        keep_bias: bool,
        maxpool_to_avgpool: bool,
        keep_relu: bool,
        detachable_gelu: bool,
        backend: Optional[str],
    ):
        self.plan = plan
        self.detachable_gelu = detachable_gelu
        self.b_kwargs = b_kwargs
        self.b_param_init = b_param_init
        self.keep_bias = keep_bias
        self.maxpool_to_avgpool = maxpool_to_avgpool
        self.keep_relu = keep_relu
        self.backend = backend
        # A module registered at several places maps to one new module, so the sharing survives.
        self.done: Dict[int, nn.Module] = {}

    def _bias(self, bias: Optional[nn.Parameter]) -> Optional[nn.Parameter]:
        return bias if self.keep_bias else None

    def _finish(self, new: nn.Module, old: nn.Module, weight: Tensor) -> nn.Module:
        if self.b_param_init is not None:
            # one learnable b per layer, a 0-dim parameter (the original's shape), in the layer's dtype/device
            new.b = nn.Parameter(torch.tensor(self.b_param_init, dtype=weight.dtype, device=weight.device))
        return new.train(old.training)

    def conv(self, conv: nn.Conv2d, name: str) -> BcosifyConv2d:
        weight = conv.weight
        in_channels = conv.in_channels
        if id(conv) in self.plan.widen:
            # Input [x, 1 - x] and weights [w, -w] / 2: w.x / 2 - w.(1 - x) / 2. After the original's
            # normalisation the input is [z, -z] (see add_inverse) and this is exactly w.z, the standard conv;
            # zero padding stays zero padding. A new parameter: its shape changes.
            with torch.no_grad():
                wide = torch.cat([weight, -weight], dim=1) / 2
            weight = nn.Parameter(wide, requires_grad=conv.weight.requires_grad)
            in_channels *= 2
        kernel_size, stride, dilation = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)
        geometry = (kernel_size, stride, _conv_padding(conv, name), dilation, conv.groups)
        return self._new_conv(conv, weight, self._bias(conv.bias), in_channels, conv.out_channels, *geometry)

    def _new_conv(self, original: nn.Module, weight, bias, in_channels, out_channels, *geometry) -> BcosifyConv2d:
        """A BcosifyConv2d (geometry: kernel_size, stride, padding, dilation, groups, or a prefix) holding
        ``weight`` and ``bias`` themselves, not copies: their values, dtype, device, requires_grad and hooks carry
        over, and an optimizer built on them before still points at them."""
        new = BcosifyConv2d(
            in_channels,
            out_channels,
            *geometry,
            device=weight.device,
            dtype=weight.dtype,
            bias=bias is not None,
            backend=self.backend,
            **self.b_kwargs,
        )
        new.linear.weight = weight
        new.linear.bias = bias
        return self._finish(new, original, weight)

    def linear(self, lin: nn.Linear) -> BcosifyLinear:
        bias = self._bias(lin.bias)
        new = BcosifyLinear(
            lin.in_features,
            lin.out_features,
            bias=bias is not None,
            device=lin.weight.device,
            dtype=lin.weight.dtype,
            max_out=1,
            backend=self.backend,
            **self.b_kwargs,
        )
        new.linear.weight = lin.weight
        new.linear.bias = bias
        return self._finish(new, lin, lin.weight)

    def linear_as_conv1x1(self, lin: nn.Linear) -> BcosifyConv2d:
        # The original's "GAP reorder" for its ResNet/DenseNet: the classifier becomes a 1x1 B-cos conv applied
        # to the feature map before global average pooling. The weight is a (O, C, 1, 1) view of the Linear's,
        # so the storage is shared (the Parameter object cannot be: its shape differs).
        weight = nn.Parameter(
            lin.weight.detach().view(lin.out_features, lin.in_features, 1, 1), requires_grad=lin.weight.requires_grad
        )
        return self._new_conv(lin, weight, self._bias(lin.bias), lin.in_features, lin.out_features, 1)

    def batch_norm(self, bn: nn.BatchNorm2d) -> BatchNormUncentered2d:
        # shares weight, running_var, running_mean and num_batches_tracked with bn
        new = BatchNormUncentered2d.from_module(bn)
        if not self.keep_bias or bn.bias is None:
            new.bias = None
        else:
            # The original's "BnUncV2": fold the running mean into the bias, so that in eval mode the uncentered
            # norm computes exactly what the standard one did: y / s * w + (bias - mean / s * w). A new parameter,
            # so that bn's own bias is not changed.
            with torch.no_grad():
                std = (bn.running_var + bn.eps).sqrt()
                folded = bn.bias - (bn.running_mean / std) * bn.weight
            new.bias = nn.Parameter(folded, requires_grad=bn.bias.requires_grad)
        return new

    def _convert_vit_layer(self, module: nn.Module, name: str) -> Optional[nn.Module]:
        """The replacement of a layer that a ViT's B-cosification treats on its own (None: not such a layer)."""
        if isinstance(module, nn.MultiheadAttention):
            new = MultiheadAttention.from_module(module, self.linear(module.out_proj))
            if not self.keep_bias:
                new.in_proj_bias = None
            return new
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] == _QKV_NAME:
            # stays a plain linear (the original's choice); its bias goes with the others
            if not self.keep_bias:
                module.bias = None
            return module
        if isinstance(module, nn.Linear) and id(module) in self.plan.widen:
            return self.patch_linear(module)
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            norm_type = DetachableLayerNorm if isinstance(module, nn.LayerNorm) else DetachableGroupNorm2d
            new = norm_type.from_module(
                module, self.backend if self.backend in backends.OPS["detachable_norm"] else None
            )
            if not self.keep_bias:
                new.bias = None
            return new
        if isinstance(module, nn.GELU) or _is_quick_gelu(module):
            if not self.detachable_gelu:
                return nn.Identity()
            return (DetachableGELU() if isinstance(module, nn.GELU) else DetachableQuickGELU()).train(module.training)
        return None

    def patch_linear(self, lin: nn.Linear) -> BcosifyLinear:
        # The SimpleViT's patch features are (p1 p2 c), so with 6 channels each pixel reads (x, 1 - x) as 6
        # consecutive features: each pixel's 3 weights w become (w, -w) / 2, the linear counterpart of the first
        # conv's cat([w, -w]) / 2 (the original's add_channels). A new parameter: its shape changes.
        with torch.no_grad():
            half = lin.weight.view(lin.out_features, -1, 3) / 2
            wide = torch.cat([half, -half], dim=2).view(lin.out_features, 2 * lin.in_features)
        new = self.linear(lin)
        new.in_features = new.linear.in_features = 2 * lin.in_features
        new.linear.weight = nn.Parameter(wide, requires_grad=lin.weight.requires_grad)
        return new

    def convert(self, module: nn.Module, name: str) -> nn.Module:
        """The replacement of `module` (itself when it stays), its children converted first."""
        if id(module) in self.done:
            return self.done[id(module)]
        new = self._convert(module, name)
        self.done[id(module)] = new
        return new

    def _convert(self, module: nn.Module, name: str) -> nn.Module:
        if isinstance(module, _BCOS_MODULES):
            return module
        if isinstance(module, nn.Conv2d):
            return self.conv(module, name)
        if self.plan.vit:
            new = self._convert_vit_layer(module, name)
            if new is not None:
                return new
        if isinstance(module, nn.Linear):
            if id(module) == self.plan.last_layer:
                return self.linear_as_conv1x1(module)
            return self.linear(module)
        if isinstance(module, nn.BatchNorm2d):
            return self.batch_norm(module)
        if isinstance(module, nn.MaxPool2d) and self.maxpool_to_avgpool:
            # the original's ResNets/DenseNets swap their (only) max pool, the stem's, for an average pool with
            # the same window (count_include_pad=True, nn.AvgPool2d's default, as there)
            return nn.AvgPool2d(module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode)
        if isinstance(module, nn.ReLU) and not self.keep_relu:
            return nn.Identity()
        # every name of a module registered twice (named_children() would skip the second one)
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            new_child = self.convert(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module


def bcosify(
    model: nn.Module,
    b: float = 2.0,
    *,
    learn_b: bool = False,
    clamping: bool = False,
    b_loss: bool = False,
    keep_bias: bool = False,
    add_channels: Union[bool, str] = True,
    last_layer_name: Optional[str] = None,
    maxpool_to_avgpool: bool = True,
    keep_relu: bool = True,
    vit: Optional[bool] = None,
    detachable_gelu: bool = True,
    logit_bias: Optional[float] = None,
    logit_temperature: Optional[float] = None,
    backend: Optional[str] = None,
) -> nn.Module:
    """B-cosify a standard CNN or ViT in place, as B-cosification (shrebox/B-cosification) does, and return it.

    Feed the result ``add_inverse(x, mean=..., std=...)`` with the mean and std the standard model was trained
    with (the original's wrapper normalises the 6-channel input inside the network; this function cannot add a
    layer in front of ``model``, so the normalisation moves into the input helper), or ``add_inverse(x)`` for
    a network that is dynamic linear in its input. Then fine-tune it.

    Layer by layer (modules of the `bcos_kernels.nn` B-cos classes, e.g. from an earlier call, are left as they
    are and not entered):

    - ``nn.Conv2d`` -> ``bcos_kernels.nn.BcosifyConv2d`` (unnormalised weights, B-cos scale ``|cos|^(b-1)``),
      same geometry. Its ``weight`` Parameter is the old one itself (shared, not copied; the original shares
      the storage too): values, dtype, device, ``requires_grad`` and parameter hooks carry over and an
      optimizer made earlier still updates it. State-dict keys become ``<name>.linear.weight`` as in the
      original. ``padding='same'/'valid'`` become numbers.
    - The first conv (``add_channels=True``: every ``nn.Conv2d`` with 3 input channels, with a warning when
      there are none or several, as the original; a string: the conv of that qualified name; False: none)
      reads ``[x, 1 - x]``: its in_channels double and its weight becomes ``cat([w, -w], dim=1) / 2`` (a new
      Parameter). On the original's normalised encoding ``[z, -z]`` this is exactly ``w.z``: the standard
      conv. Grouped first convs raise.
    - ``nn.Linear`` -> ``bcos_kernels.nn.BcosifyLinear`` (weight shared), or, for ``last_layer_name`` (the
      qualified name of the classifier), a 1x1 ``BcosifyConv2d`` whose weight is a view of the Linear's: the
      original's "GAP reorder" (``gap=True``), for models whose forward applies the classifier to the feature
      map *before* global average pooling (the original's ``ResNetBcos`` / ``DenseNetBcos``). This function
      cannot rewrite ``forward``: for an unchanged torchvision model keep ``last_layer_name=None`` (the
      original's ``gap=False``: the classifier stays after the pooling, as a B-cos linear).
    - ``nn.BatchNorm2d`` -> ``bcos_kernels.nn.BatchNormUncentered2d`` (divides by the batch / running std,
      subtracts no mean), sharing the weight and all buffers (``running_mean`` is kept but unused).
    - Biases (convs, linears, batch norms): removed, as the original's CNN experiments do (``get_model`` sets
      every bias to None); a network without biases is dynamic linear, ``out = W(x) x``. ``keep_bias=True``
      keeps conv/linear biases (shared) and, like the original's ``BnUncV2`` norm, folds each batch norm's
      running mean into its bias, ``bias - running_mean / sqrt(running_var + eps) * weight``, so that in eval
      mode the norm computes what the standard one did.
    - ``nn.MaxPool2d`` -> ``nn.AvgPool2d`` with the same kernel, stride, padding and ceil_mode
      (``maxpool_to_avgpool=True``). The original swaps the stem max pool of its ResNets/DenseNets (their only
      one); we swap every ``MaxPool2d``. ``AdaptiveMaxPool2d`` and average pools stay.
    - ``nn.ReLU`` stays (the original's default); ``keep_relu=False`` replaces it with ``nn.Identity`` (the
      original's ``act_layer=False`` ablation). Functional ReLUs in ``forward`` are untouched either way.
    - Left alone in a CNN, as the original does: other activations, pools, dropout, flatten, and centered norms
      (``LayerNorm``, ``GroupNorm``, ``BatchNorm1d/3d``, ``SyncBatchNorm``, instance norms; a warning lists them,
      since they keep the network from being dynamic linear).
    - Refused (``ValueError`` naming the layer, before anything is changed): ``Conv1d/3d``, transposed convs,
      ``nn.MultiheadAttention`` with ``vit=False``, convs with a ``padding_mode`` other than zeros or an asymmetric
      ``padding='same'``, layers whose weight is recomputed (weight norm, parametrizations), max pools with
      dilation or ``return_indices``, uninitialised lazy modules.

    Transformers (``vit=True``; None: when the model holds an ``nn.MultiheadAttention`` or an attention with a
    ``to_qkv`` linear), as the original's ``bcosify_vit.py`` does for the `bcos` package's standard ViTs, plus:

    - ``nn.LayerNorm`` -> ``bcos_kernels.nn.DetachableLayerNorm`` and ``nn.GroupNorm`` (the ViT-C conv stem's
      norm) -> ``DetachableGroupNorm2d``, parameters shared, their biases removed with the others: in explanation
      mode their variance is a constant.
    - ``nn.GELU`` -> ``bcos_kernels.nn.DetachableGELU`` (the erf form; its gate a constant in explanation mode),
      or ``nn.Identity`` with ``detachable_gelu=False`` (the original's ``act_layer=False``). Departure: CLIP's
      ``QuickGELU`` (recognised by its class name) -> ``DetachableQuickGELU``; the original has no rule for it.
    - A linear named ``to_qkv`` stays a plain linear (the original's choice: q and k only form the attention
      matrix, detached in explanation mode); its bias, if any, is removed with the others.
    - The first layer reading the image gets the ``[x, 1 - x]`` input: a conv with 3 input channels (the conv
      stem's first conv, torchvision's ``conv_proj``, CLIP's ``conv1``: ``cat([w, -w], dim=1) / 2`` as above),
      else the SimpleViT's linear patch embedding ``to_patch_embedding.linear``, whose features are (p1 p2 c):
      each pixel's 3 weights ``w`` become ``(w, -w) / 2`` (the original's interleaving by groups of 3).
    - The `bcos` package's ViT ``Attention`` -> ``bcos_kernels.nn.Attention`` (``convert``'s rule: SDPA).
    - Departure (the original converts no ``nn.MultiheadAttention``; its CLIP models are ResNets):
      ``nn.MultiheadAttention`` -> ``bcos_kernels.nn.MultiheadAttention``: the packed q/k/v projection stays
      plain, as ``to_qkv``; ``out_proj`` becomes a B-cosify linear; the attention runs on SDPA; explanation mode
      detaches q and k. Its ``in_proj_bias`` is removed with the other biases (the v part of it would be an
      additive term of the output). Refused: ``kdim``/``vdim`` other than ``embed_dim``, ``bias_k``/``bias_v``,
      ``add_zero_attn``.
    - Kept as they are: class tokens and learned positional embeddings (additive parameters, which keep such a
      model affine rather than linear in its input), the SimpleViT's sin-cos embedding, CLIP's ``proj`` matrix.
      The original's ``gap_reorder`` (head before the token mean) is a change of its ViT's ``forward``, not of
      the conversion.

    Every new module takes the training/eval mode of the one it replaces; a module registered at several places
    becomes one new module. Forward hooks on replaced modules are not carried over.

    B: ``b`` (a finite number >= 1; default 2, the original's ``bcos_args.b``) is the exponent of every new
    B-cos layer. ``learn_b=True`` gives each layer its own 0-dim ``nn.Parameter`` ``b`` (named ``<layer>.b``,
    in the layer's dtype and on its device), as the original's trainer does, starting at ``b + 1e-6`` as there
    (with ``clamping`` from b = 1, the 1e-6 puts b on the clamp's bound, where its gradient still passes).
    With ``clamping=True`` the layers use ``max(b, 1 + 1e-6)``. With ``b_loss=True`` (the original's
    ``learn_b``) the parameter holds ``B - 2`` (it starts at ``b - 2 + 1e-6``) and the layers use
    ``parameter + 2``, so that weight decay on the parameter pulls B towards 2. ``clamping`` and ``b_loss``
    need ``learn_b=True``.

    ``backend`` is passed to every B-cos module (None: ``BCOS_KERNELS_BACKEND`` or "auto").

    ``logit_bias`` / ``logit_temperature`` (the original's ``logit_layer=True``, whose default bias is
    ``-log(1000 - 1)``): the result is ``nn.Sequential(model, bcos_kernels.nn.LogitLayer(logit_temperature,
    logit_bias))``, the model itself converted in place; without them ``model`` itself is returned.

    Not reproduced from the original: the rest of its wrapper module (``BcosifyNetwork``: the 6-channel
    normalisation, see ``add_inverse``), ``BcosSequential`` (a class swap that only adds the `bcos` package's
    explanation helpers), the ``linear_b`` schedule of B (a gradient hook of its trainer), and the attention pool
    of its ResNet-50 CLIP (CLIP's ``AttentionPool2d`` is refused: it reads its projections' weights directly).
    Its 6-channel normalisations are ``add_inverse(x, mean=IMAGENET_MEAN,
    std=IMAGENET_STD)``, ``add_inverse(x, mean=CLIP_MEAN, std=CLIP_STD)`` and (CLIP "mean zero")
    ``add_inverse(x, std=CLIP_STD)``. Its new norms restart ``num_batches_tracked`` at 0 and its new layers start
    in training mode; ours share the count and keep each replaced module's mode (the count only matters for
    ``momentum=None``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 1:
        raise ValueError(f"b must be a finite number >= 1, got {b!r}")
    for flag, value in (
        ("learn_b", learn_b),
        ("clamping", clamping),
        ("b_loss", b_loss),
        ("keep_bias", keep_bias),
        ("maxpool_to_avgpool", maxpool_to_avgpool),
        ("keep_relu", keep_relu),
        ("detachable_gelu", detachable_gelu),
    ):
        _check_flag(flag, value)
    # checked before anything changes
    logit_layer = (
        None if logit_bias is None and logit_temperature is None else LogitLayer(logit_temperature, logit_bias)
    )
    if vit is None:
        vit = _is_vit(model)
    _check_flag("vit", vit)
    if clamping and not learn_b:
        raise ValueError("clamping=True clamps a learnable b: it needs learn_b=True")
    if b_loss and not learn_b:
        raise ValueError("b_loss=True parameterises a learnable b as B - 2: it needs learn_b=True")
    if not isinstance(add_channels, (bool, str)):
        raise TypeError(f"add_channels must be True, False or the name of a conv, got {add_channels!r}")
    if last_layer_name is not None and not isinstance(last_layer_name, str):
        raise TypeError(f"last_layer_name must be None or the name of an nn.Linear, got {last_layer_name!r}")
    backends.check_name(backend)

    plan = _Plan(model, add_channels, last_layer_name, keep_bias, maxpool_to_avgpool, keep_relu, vit)
    if plan.left_alone:
        warnings.warn(
            "bcosify: left unchanged (centered norms: the network is not dynamic linear): "
            + ", ".join(plan.left_alone),
            UserWarning,
            stacklevel=2,
        )

    b_param_init = None
    if learn_b:
        b_param_init = (b - 2 if b_loss else b) + 1e-6
    b_kwargs = dict(b=float(b), clamping=clamping, b_loss=b_loss)
    converter = _Converter(
        plan, b_kwargs, b_param_init, keep_bias, maxpool_to_avgpool, keep_relu, detachable_gelu, backend
    )
    converter.convert(model, "")
    if vit:
        # the `bcos` package's ViT attention (its projections and norm B-cosified above) -> ours, on SDPA
        from bcos_kernels.convert import convert

        convert(model, backend)
    return model if logit_layer is None else nn.Sequential(model, logit_layer)
