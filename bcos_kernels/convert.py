"""``convert(model)``: put our layers into an existing model, in place.

A model built with the original code (the `bcos` package, B-cosification, moboehle/B-cos, CoDA-Nets, DISCOVER,
CSGCNN) keeps everything except its interpretable layers, which are swapped for the drop-in modules of
``bcos_kernels.nn``. A layer is recognised

- by class where the original is importable: its class is the class of a loaded original module
  (``sys.modules``; nothing is imported here: a model that holds a `bcos` layer has imported `bcos` already);
- by structure otherwise (the original code copied into a project): same class name and the attributes the
  original defines.

Nothing is copied: the new layer adopts the original's parameter-holding submodule (``linear`` of the B-cos
layers, ``weight_mod.weighting_f`` of CoDA) or parameter (``b`` when learned, CSG's ``mask``), so the state_dict
keys, the parameters an optimiser already holds, their device and dtype stay what they were. The train/eval
flag, the explanation mode (``detach``) and the forward hooks carry over.

A subclass we do not know (it may override ``forward``) and an option our modules do not support (e.g.
``padding_mode="reflect"``) are left as they are with one warning under ``backend=None`` / "auto", and raise
``ValueError`` when a backend was asked for explicitly.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from bcos_kernels import backends
from bcos_kernels import nn as ours

__all__ = ["convert"]

# Our modules are never converted again (convert is idempotent).
_OUR_TYPES = (
    ours.BcosConv2d,
    ours.BcosConv2dV1,
    ours.BcosLinear,
    ours.DAUConv2d,
    ours.LWTA,
    ours.ClassSpecificGate,
    ours.BatchNormUncentered2d,
    ours.DetachableLayerNorm,
    ours.DetachableGroupNorm2d,
    ours.Attention,
)

# Ours that hold layers of the original model (adopted as they are): their children are converted in turn.
_CONTAINERS = (ours.Attention,)


class Unsupported(ValueError):
    """A recognised layer that uses an option our modules do not implement."""


@dataclass(frozen=True)
class _Rule:
    """One original layer class and how to build ours from an instance of it."""

    name: str  # the original class name
    modules: Tuple[str, ...]  # where it lives when its package is importable
    has_structure: Callable[[nn.Module], bool]  # the attributes its __init__ defines (match by structure)
    build: Callable[[nn.Module, Optional[str]], nn.Module]

    def original_classes(self) -> List[type]:
        found = []
        for module_name in self.modules:
            cls = getattr(sys.modules.get(module_name), self.name, None)
            if isinstance(cls, type):
                found.append(cls)
        return found

    def matches(self, module: nn.Module) -> bool:
        cls = type(module)
        if cls in self.original_classes():
            return True
        return cls.__name__ == self.name and self.has_structure(module)

    def is_base_of(self, module: nn.Module) -> bool:
        """``module`` subclasses this original (a subclass we do not know)."""
        bases = type(module).__mro__[1:]
        return any(base in self.original_classes() or base.__name__ == self.name for base in bases)


def _has(*names: str) -> Callable[[nn.Module], bool]:
    return lambda module: all(hasattr(module, name) for name in names)


def _adopt_b(new: nn.Module, original: nn.Module) -> None:
    # A learned b (an nn.Parameter, B-cosification) is registered under the same name: same state_dict key,
    # same parameter object. A number stays a number.
    new.b = original.b


# ------------------------------------------------------------------------------------------------ builders
# Each builds ours on the meta device (nothing is allocated) and then adopts the original's parameters.
def _bcos_conv(original: nn.Module, backend: Optional[str]) -> nn.Module:
    """bcos.modules.BcosConv2d / BcosConv2dWithScale (v2) and B-cosification's BcosifyConv2d."""
    args = (
        original.in_channels,
        original.out_channels,
        original.kernel_size,
        original.stride,
        original.padding,
        original.dilation,
        original.groups,
        original.padding_mode,
    )
    with torch.device("meta"):
        try:
            if type(original).__name__ == "BcosifyConv2d":
                new = ours.BcosifyConv2d(
                    *args, max_out=original.max_out, clamping=original.clamping, b_loss=original.b_loss, backend=backend
                )
            elif type(original).__name__ == "BcosConv2dWithScale":
                new = ours.BcosConv2dWithScale(*args, max_out=original.max_out, scale=original.scale, backend=backend)
            else:
                new = ours.BcosConv2d(*args, max_out=original.max_out, backend=backend)
        except ValueError as error:
            raise Unsupported(str(error)) from None
    new.linear = original.linear
    _adopt_b(new, original)
    return new


def _bcos_conv_v1(original: nn.Module, backend: Optional[str]) -> nn.Module:
    """moboehle/B-cos modules.bcosconv2d.BcosConv2d (v1: MaxOut and a scale divisor)."""
    with torch.device("meta"):
        new = ours.BcosConv2dV1(
            original.inc,
            original.outc // original.max_out,
            original.kernel_size,
            original.stride,
            original.padding,
            max_out=original.max_out,
            scale=original.scale,
            backend=backend,
        )
    new.linear = original.linear
    _adopt_b(new, original)
    return new


def _bcos_linear(original: nn.Module, backend: Optional[str]) -> nn.Module:
    """bcos.modules.BcosLinear (v2) and B-cosification's BcosifyLinear."""
    with torch.device("meta"):
        if type(original).__name__ == "BcosifyLinear":
            new = ours.BcosifyLinear(
                original.in_features,
                original.out_features,
                max_out=original.max_out,
                clamping=original.clamping,
                b_loss=original.b_loss,
                backend=backend,
            )
        else:
            new = ours.BcosLinear(
                original.in_features, original.out_features, max_out=original.max_out, backend=backend
            )
    new.linear = original.linear
    _adopt_b(new, original)
    return new


def _coda_conv(original: nn.Module, backend: Optional[str]) -> nn.Module:
    """CoDA-Nets CoDAConv2d(DAUWeights(...))."""
    for flag in ("save_matrix", "explain", "reuse"):
        if getattr(original, flag, False):
            raise Unsupported(
                f"CoDAConv2d.{flag}=True needs the per-pixel dynamic weights, which DAUConv2d never builds"
            )
    if type(original.weight_mod).__name__ != "DAUWeights":
        raise Unsupported(f"CoDAConv2d with a {type(original.weight_mod).__name__} weighting module (only DAUWeights)")
    try:
        return ours.DAUConv2d.from_original(original, backend)
    except ValueError as error:
        raise Unsupported(str(error)) from None


def _lwta(original: nn.Module, backend: Optional[str]) -> nn.Module:
    """DISCOVER's LWTA activation (no parameters)."""
    new = ours.LWTA(
        inplace=original.inplace,
        deterministic=original.deterministic,
        U=original.U,
        kl=original.kl_flag,
        temp=original.temp,
        backend=backend,
    )
    new.temp_test = original.temp_test
    return new


def _uncentered_norm(original: nn.Module, backend: Optional[str]) -> nn.Module:
    """The `bcos` package's BatchNormUncentered2d (its parameters and buffers shared). Not an interpretable layer
    but most of a B-cos CNN's non-conv time in training (the original's ``var``): it takes ``backend`` when its op
    has it ("reference", "torch"), else "auto"."""
    return ours.BatchNormUncentered2d.from_module(
        original, backend if backend in backends.OPS["batch_norm_uncentered"] else None
    )


def _layer_norm(original: nn.Module, backend: Optional[str]) -> nn.Module:
    """The `bcos` package's DetachableLayerNorm (the ViTs' norm; parameters shared)."""
    return ours.DetachableLayerNorm.from_module(
        original, backend if backend in backends.OPS["detachable_norm"] else None
    )


def _group_norm(original: nn.Module, backend: Optional[str]) -> nn.Module:
    """The `bcos` package's DetachableGroupNorm2d and its one-group / per-channel forms (the ViT-C stem's norm)."""
    return ours.DetachableGroupNorm2d.from_module(
        original, backend if backend in backends.OPS["detachable_norm"] else None
    )


def _attention(original: nn.Module, backend: Optional[str]) -> nn.Module:
    """The B-cos ViTs' Attention (`bcos.models.vit`): its submodules are adopted and converted in turn."""
    return ours.Attention.from_original(original)


def _csg_gate(original: nn.Module, backend: Optional[str]) -> nn.Module:
    """CSGCNN's LearnableMaskLayer."""
    with torch.device("meta"):
        new = ours.ClassSpecificGate(original.mask.shape[0], original.mask.shape[1], backend=backend)
    new.mask = original.mask
    if hasattr(original, "last_layer_mask"):
        new.last_layer_mask = original.last_layer_mask
    return new


_V2_CONV = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
    "b",
    "max_out",
    "linear",
)
_V2_LINEAR = ("in_features", "out_features", "b", "max_out", "linear")

# Order matters only where two originals share a class name (B-cos v1 and v2 "BcosConv2d"): the structure tells.
_RULES = (
    _Rule("BcosConv2d", ("bcos.modules.bcosconv2d",), _has(*_V2_CONV), _bcos_conv),
    _Rule("BcosConv2dWithScale", ("bcos.modules.bcosconv2d",), _has(*_V2_CONV, "scale"), _bcos_conv),
    _Rule("BcosifyConv2d", ("bcos.modules.bcosifyconv2d",), _has(*_V2_CONV, "clamping", "b_loss"), _bcos_conv),
    _Rule("BcosLinear", ("bcos.modules.bcoslinear",), _has(*_V2_LINEAR), _bcos_linear),
    _Rule("BcosifyLinear", ("bcos.modules.bcosifylinear",), _has(*_V2_LINEAR, "clamping", "b_loss"), _bcos_linear),
    _Rule(
        "BcosConv2d",
        ("modules.bcosconv2d",),
        _has("inc", "outc", "kssq", "scale", "max_out", "b", "linear"),
        _bcos_conv_v1,
    ),
    _Rule("CoDAConv2d", ("modules.coda_conv",), _has("weight_mod", "detach"), _coda_conv),
    _Rule(
        "LWTA",
        ("models.ResNet.activations", "activations"),
        _has("U", "temp", "temp_test", "deterministic", "kl_flag", "inplace"),
        _lwta,
    ),
    _Rule(
        "BatchNormUncentered2d",
        ("bcos.modules.norms.uncentered_norms.batchnorm_uncentered",),
        _has("num_features", "eps", "momentum", "running_var", "track_running_stats"),
        _uncentered_norm,
    ),
    *(
        _Rule(
            name,
            ("bcos.modules.norms.centered_norms",),
            _has("num_groups", "num_channels", "eps", "detach"),
            _group_norm,
        )
        for name in ("DetachableGroupNorm2d", "DetachableGNLayerNorm2d", "DetachableGNInstanceNorm2d")
    ),
    _Rule(
        "DetachableLayerNorm",
        ("bcos.modules.norms.centered_norms",),
        _has("normalized_shape", "eps", "elementwise_affine", "detach"),
        _layer_norm,
    ),
    # "Attention" is a common name: the structure test asks for the attributes only the B-cos ViTs' one has
    _Rule(
        "Attention",
        ("bcos.models.vit",),
        _has("heads", "scale", "norm", "attend", "to_qkv", "to_out", "pos_info", "attention_biases", "detach"),
        _attention,
    ),
    _Rule("LearnableMaskLayer", ("resnet_std", "VOCPart.train.resnet_std"), _has("mask", "avg_pool"), _csg_gate),
)


def _rule_for(module: nn.Module) -> Tuple[Optional[_Rule], Optional[str]]:
    """(rule, None) for a layer to convert; (None, why) for one we recognise but must leave; (None, None) else."""
    if isinstance(module, _OUR_TYPES):
        return None, None
    for rule in _RULES:
        if rule.matches(module):
            return rule, None
    for rule in _RULES:
        if rule.is_base_of(module):
            return None, (
                f"{type(module).__name__} subclasses {rule.name} but is not a subclass we know (its forward may differ)"
            )
    return None, None


def _carry_over(original: nn.Module, new: nn.Module) -> nn.Module:
    """Train/eval flag, explanation mode and hooks of ``original`` on ``new``."""
    new.train(original.training)
    if hasattr(original, "detach") and not callable(original.detach):
        new.detach = original.detach
    # The hook dicts themselves (not copies): handles the user holds still remove them.
    for name in (
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_backward_hooks",
        "_backward_pre_hooks",
    ):
        hooks = getattr(original, name, None)
        if hooks:
            setattr(new, name, hooks)
    return new


def convert(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Replace, in place, the interpretable layers of ``model`` by those of ``bcos_kernels.nn`` running on
    ``backend`` (None: the ``BCOS_KERNELS_BACKEND`` environment variable, else "auto"). Returns the model (a new
    object only when ``model`` itself is such a layer).

    Converted: `bcos.modules` BcosConv2d, BcosConv2dWithScale, BcosLinear (B-cos v2); B-cosification's
    BcosifyConv2d / BcosifyLinear (learned b included); moboehle/B-cos v1 BcosConv2d; CoDA-Nets
    ``CoDAConv2d(DAUWeights)``; DISCOVER's LWTA; CSGCNN's LearnableMaskLayer; the `bcos` package's
    BatchNormUncentered2d, DetachableLayerNorm and DetachableGroupNorm2d (GN layer/instance forms included; on
    ``backend`` where their ops have it, else "auto"); and the B-cos ViTs' Attention (`bcos.models.vit`, on
    ``scaled_dot_product_attention``; its projections and norm converted in turn). Everything else is untouched, so
    outputs and gradients are those of the original model (up to floating-point rounding).
    """
    backends.check_name(backend)
    explicit = backend not in (None, "auto")
    done: Dict[int, nn.Module] = {}  # a layer used at several places is converted once
    left: List[str] = []

    def converted(path: str, module: nn.Module) -> Optional[nn.Module]:
        if id(module) in done:
            return done[id(module)]
        rule, why = _rule_for(module)
        if rule is not None:
            try:
                new = _carry_over(module, rule.build(module, backend))
            except Unsupported as error:
                why = str(error)
            else:
                done[id(module)] = new
                return new
        if why is not None:
            if explicit:
                raise ValueError(f"convert(backend={backend!r}): cannot convert {path or 'the model'}: {why}")
            left.append(f"{path or '(root)'}: {why}")
        return None

    def visit(parent: nn.Module, prefix: str, seen: set) -> None:
        # _modules, not named_children(): that one yields a module used twice only once
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{prefix}{name}"
            new = converted(path, child)
            if new is not None:
                setattr(parent, name, new)
            if (new is None or isinstance(new, _CONTAINERS)) and id(child) not in seen:
                seen.add(id(child))
                visit(new if new is not None else child, path + ".", seen)

    root = converted("", model)
    if root is None or isinstance(root, _CONTAINERS):
        visit(model if root is None else root, "", set())
    if left:
        warnings.warn(
            "bcos_kernels.convert left these layers as they are (they run the original code):\n  " + "\n  ".join(left),
            stacklevel=2,
        )
    return model if root is None else root
