"""bcos_kernels.convert: real models of the original code, converted in place, against their unconverted copy.

Forward outputs and the gradients of the input and of every parameter must match (fp64, train and eval mode,
explanation mode on and off); the parameters must be the original objects (state_dict keys, optimisers,
device and dtype unchanged).
"""

import ast
import copy
import functools
import warnings

import pytest
import torch
from helpers import one_intra_op_thread  # noqa: F401  (autouse fixture)
from originals import bcos_module, bcos_resnet18_imagenet_config, load_source, mirror_source

import bcos_kernels
from bcos_kernels import nn as bnn

F64 = torch.float64


def _warm_norms(model, shape):
    """A few training steps of the norms' statistics so that eval mode is not the identity."""
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(torch.rand(shape, dtype=F64, generator=torch.Generator().manual_seed(seed)))


def assert_model_parity(original, converted, x, extra_inputs=(), rtol=1e-10):
    """Outputs and gradients (input and every parameter, in named_parameters order) of the two models."""
    results = []
    for model in (original, converted):
        xi = x.clone().requires_grad_(True)
        out = model(xi, *extra_inputs)
        outs = out if isinstance(out, tuple) else (out,)
        gen = torch.Generator().manual_seed(1)
        grad_outs = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
        params = [p for _, p in model.named_parameters()]
        grads = torch.autograd.grad(outs, [xi] + params, grad_outs, allow_unused=True)
        results.append(([o.detach() for o in outs], grads, [n for n, _ in model.named_parameters()]))
    (outs_a, grads_a, names_a), (outs_b, grads_b, names_b) = results
    assert names_a == names_b
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * a.abs().max().item())
    for name, a, b in zip(["input"] + names_a, grads_a, grads_b):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(
                b, a, rtol=rtol, atol=rtol * max(a.abs().max().item(), 1e-300), msg=lambda m: f"gradient of {name}: {m}"
            )


def assert_parity_in_train_and_eval(original, converted, x, extra_inputs=(), rtol=1e-10):
    for training in (True, False):
        original.train(training)
        converted.train(training)
        assert_model_parity(original, converted, x, extra_inputs, rtol)


def _converted_copy(model, backend=None):
    original = copy.deepcopy(model)
    converted = bcos_kernels.convert(model, backend=backend)
    return original, converted


def _layer_types(model):
    return {type(m) for m in model.modules()}


# ---------------------------------------------------------------------------------------------- bcos models
def _bcos_models():
    resnet = lambda: bcos_module("models.resnet")  # noqa: E731
    densenet = lambda: bcos_module("models.densenet")  # noqa: E731
    modules = lambda: bcos_module("modules")  # noqa: E731

    def resnext_with_scale():
        # grouped convs (ResNeXt), BcosConv2dWithScale everywhere, MaxOut 2
        mods = modules()
        return resnet().cifar10_resnext29_32x4d(
            conv_layer=functools.partial(mods.BcosConv2dWithScale, b=2.5, max_out=2)
        )

    return {
        "cifar10_resnet20": lambda: resnet().cifar10_resnet20(),
        "imagenet_resnet18": bcos_resnet18_imagenet_config,
        "resnext29_with_scale_maxout": resnext_with_scale,
        "cifar10_densenet52": lambda: densenet().cifar10_densenet52(),
    }


BCOS_MODELS = _bcos_models()


@pytest.mark.parametrize("name", sorted(BCOS_MODELS))
def test_bcos_package_models_match_after_convert(name):
    torch.manual_seed(0)
    model = BCOS_MODELS[name]().to(F64)
    _warm_norms(model, (4, 6, 32, 32))
    mods = bcos_module("modules")
    original_layers = [m for m in model.modules() if isinstance(m, (mods.BcosConv2d, mods.BcosLinear))]
    params_before = dict(model.named_parameters())
    original, converted = _converted_copy(model)
    assert converted is model  # in place
    assert not any(isinstance(m, (mods.BcosConv2d, mods.BcosLinear)) for m in converted.modules())
    ours = [m for m in converted.modules() if isinstance(m, (bnn.BcosConv2d, bnn.BcosLinear))]
    assert len(ours) == len(original_layers) > 10
    # the very same parameter objects, under the same names
    assert dict(converted.named_parameters()).keys() == params_before.keys()
    assert all(p is params_before[k] for k, p in converted.named_parameters())
    assert converted.state_dict().keys() == original.state_dict().keys()
    x = torch.rand(2, 6, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(5))
    assert_parity_in_train_and_eval(original, converted, x)
    with original.explanation_mode(), converted.explanation_mode():
        assert all(m.detach for m in ours)
        assert_model_parity(original, converted, x)
    assert not any(m.detach for m in ours)


def test_bcos_vit_with_conv_stem():
    """A small B-cos SimpleViT as the ImageNet ViT experiments configure it (BcosLinear everywhere but to_qkv,
    uncentered layer norms, no activation) with a B-cos conv stem."""
    pytest.importorskip("einops", reason="bcos.models.vit needs einops (scripts/install.sh installs it)")
    vit, mods = bcos_module("models.vit"), bcos_module("modules")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns when not built through bcos.models.pretrained
        model = vit.SimpleViT(
            image_size=16,
            patch_size=4,
            num_classes=10,
            dim=24,
            depth=2,
            heads=2,
            mlp_dim=40,
            linear_layer=functools.partial(mods.BcosLinear, b=2, max_out=1),
            conv2d_layer=functools.partial(mods.BcosConv2d, b=2, max_out=1),
            norm_layer=mods.norms.NoBias(mods.norms.DetachableLayerNorm),
            act_layer=torch.nn.Identity,
            norm2d_layer=mods.norms.NoBias(mods.DetachableGNLayerNorm2d),
            conv_stem=[8, 12],
        ).to(F64)
    n_bcos = sum(isinstance(m, (mods.BcosConv2d, mods.BcosLinear)) for m in model.modules())
    original, converted = _converted_copy(model)
    assert sum(isinstance(m, (bnn.BcosConv2d, bnn.BcosLinear)) for m in converted.modules()) == n_bcos > 6
    x = torch.rand(2, 6, 16, 16, dtype=F64, generator=torch.Generator().manual_seed(5))
    assert_parity_in_train_and_eval(original, converted, x)


def test_bcos_convnext():
    pytest.importorskip("torchvision", reason="bcos.models.convnext builds torchvision.ops.StochasticDepth")
    convnext = bcos_module("models.convnext")
    torch.manual_seed(0)
    model = convnext.convnext_atto(num_classes=10, stochastic_depth_prob=0.0).to(F64)
    original, converted = _converted_copy(model)
    assert any(isinstance(m, bnn.BcosConv2d) and m.groups > 1 for m in converted.modules())  # depthwise convs
    x = torch.rand(2, 6, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(5))
    assert_parity_in_train_and_eval(original, converted, x)


def test_convert_preserves_modes_hooks_and_sharing():
    mods = bcos_module("modules")
    conv = mods.BcosConv2d(6, 8, 3, padding=1)
    shared = mods.BcosLinear(8, 8)
    conv.set_explanation_mode(True)
    conv.eval()
    seen = []
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model = torch.nn.Sequential(conv, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), shared, shared)
    model[3].linear.weight.data = torch.randn(8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        bcos_kernels.convert(model)
    new_conv = model[0]
    assert isinstance(new_conv, bnn.BcosConv2d) and new_conv.detach and not new_conv.training
    assert model[1].training  # the rest is untouched
    assert model[3] is model[4] and isinstance(model[3], bnn.BcosLinear)  # a shared layer stays shared
    model(torch.rand(1, 6, 5, 5))
    assert seen == [torch.Size([1, 8, 5, 5])]  # the hook moved with the layer
    handle.remove()
    model(torch.rand(1, 6, 5, 5))
    assert len(seen) == 1
    assert bcos_kernels.convert(model) is model and model[0] is new_conv  # idempotent


def test_convert_keeps_dtype_device_and_optimizer():
    mods = bcos_module("modules")
    model = torch.nn.Sequential(mods.BcosConv2d(3, 4, 3), mods.BcosConv2d(4, 4, 1)).to(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    original = copy.deepcopy(model)
    bcos_kernels.convert(model)
    x = torch.rand(2, 3, 6, 6, dtype=F64)
    assert model(x).dtype == F64
    # the optimiser built before the conversion updates the converted model's parameters
    model(x).square().sum().backward()
    opt.step()
    original(x).square().sum().backward()
    torch.optim.SGD(original.parameters(), lr=0.1).step()
    torch.testing.assert_close(model(x), original(x), rtol=1e-10, atol=1e-12)


def test_root_module_and_backend_argument():
    mods = bcos_module("modules")
    layer = mods.BcosLinear(5, 3)
    new = bcos_kernels.convert(layer, backend="reference")
    assert isinstance(new, bnn.BcosLinear) and new.backend == "reference" and new.linear is layer.linear
    with pytest.raises(ValueError, match="backend must be one of"):
        bcos_kernels.convert(mods.BcosLinear(5, 3), backend="tpu")


def test_unknown_subclass_and_unsupported_option_are_left_with_a_warning():
    mods = bcos_module("modules")

    class MyConv(mods.BcosConv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(
        MyConv(3, 4, 3), mods.BcosConv2d(4, 4, 3, padding=1, padding_mode="reflect"), mods.BcosConv2d(4, 4, 1)
    )
    with pytest.warns(UserWarning, match=r"(?s)0: MyConv subclasses BcosConv2d.*1: padding_mode='reflect'"):
        bcos_kernels.convert(model)
    assert type(model[0]) is MyConv and type(model[1]) is mods.BcosConv2d and type(model[2]) is bnn.BcosConv2d
    # asked for a backend explicitly: an error instead
    model = torch.nn.Sequential(MyConv(3, 4, 3))
    with pytest.raises(ValueError, match="cannot convert 0: MyConv subclasses BcosConv2d"):
        bcos_kernels.convert(model, backend="reference")


def test_structural_match_of_a_copied_class():
    """The original code copied into a project (another module, so another class object) is recognised by its
    class name and attributes."""
    root = bcos_module("modules").bcosconv2d.__file__
    source = open(root).read().replace("from .", "from bcos.modules.")  # the copy imports the package absolutely
    copied = load_source("my_project_layers", source)
    layer = copied.BcosConv2d(4, 6, 3, stride=2, padding=1, b=1.5, max_out=2).to(F64)
    assert type(layer) is not bcos_module("modules").BcosConv2d
    model = torch.nn.Sequential(layer)
    original = copy.deepcopy(model)
    bcos_kernels.convert(model)
    assert isinstance(model[0], bnn.BcosConv2d)
    assert_model_parity(original, model, torch.rand(2, 4, 9, 7, dtype=F64))


# ---------------------------------------------------------------------------- the other original repos
def _bcosify_layers():
    from test_bcos_reference import _bcosify_original

    return _bcosify_original()


def test_bcosify_layers_with_learned_b():
    conv_cls, lin_cls = _bcosify_layers()
    conv = conv_cls(4, 6, 3, 1, 1, b=2, clamping=True).to(F64)
    conv.linear.bias = torch.nn.Parameter(torch.randn(6, dtype=F64))
    conv.b = torch.nn.Parameter(torch.tensor(1.4, dtype=F64))
    lin = lin_cls(6, 3, b=2, b_loss=True).to(F64)
    lin.b = torch.nn.Parameter(torch.tensor(0.3, dtype=F64))
    model = torch.nn.Sequential(conv, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), lin)
    original = copy.deepcopy(model)
    bcos_kernels.convert(model)
    assert isinstance(model[0], bnn.BcosifyConv2d) and isinstance(model[3], bnn.BcosifyLinear)
    assert model[0].b is conv.b and model[3].b is lin.b and model[0].clamping and model[3].b_loss
    assert model.state_dict().keys() == original.state_dict().keys()
    assert_model_parity(original, model, torch.rand(2, 4, 7, 5, dtype=F64))


def test_bcos_v1_layer():
    v1 = load_source("bcos_v1_convert", mirror_source("moboehle+B-cos", "modules/bcosconv2d.py"))
    model = torch.nn.Sequential(
        v1.BcosConv2d(6, 8, 3, stride=2, padding=1, max_out=2, b=2), v1.BcosConv2d(8, 5, 1, max_out=2, b=1.5)
    ).to(F64)
    model[0].explanation_mode(True)
    original = copy.deepcopy(model)
    bcos_kernels.convert(model)
    assert all(isinstance(m, bnn.BcosConv2dV1) for m in model) and model[0].detach and not model[1].detach
    assert_model_parity(original, model, torch.rand(2, 6, 9, 8, dtype=F64))


def test_coda_net(coda_original):
    daus, coda, norms = coda_original["DAUs"], coda_original["coda_conv"], coda_original["norms"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        coda.CoDAConv2d(daus.DAUWeights(6, 8, 5, norms.Squashing(), kernel_size=3, stride=1, padding=1)),
        coda.CoDAConv2d(daus.DAUWeights(8, 7, 3, norms.L2Norm(return_norm=True), kernel_size=3, stride=2, padding=0)),
        coda.CoDAConv2d(daus.DAUWeights(7, 4, 2, norms.Squashing(), kernel_size=1, stride=1, padding=0, bias=False)),
    ).to(F64)
    model[1].explanation_mode(True)
    original = copy.deepcopy(model)
    bcos_kernels.convert(model)
    assert all(isinstance(m, bnn.DAUConv2d) for m in model)
    assert [m.norm for m in model] == ["squash", "l2", "squash"] and [m.detach for m in model] == [False, True, False]
    assert model.state_dict().keys() == original.state_dict().keys()
    assert_model_parity(original, model, torch.rand(2, 6, 9, 8, dtype=F64))
    # save_matrix needs the per-pixel weights: left as it is
    layer = coda.CoDAConv2d(daus.DAUWeights(6, 8, 5, norms.Squashing()))
    layer.save_matrix = True
    with pytest.warns(UserWarning, match="save_matrix"):
        assert bcos_kernels.convert(layer) is layer


@pytest.fixture(scope="module")
def discover_activations():
    return load_source("discover_activations", mirror_source("konpanousis+DISCOVER", "models/ResNet/activations.py"))


def test_discover_lwta(discover_activations):
    lwta = discover_activations.LWTA
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        lwta(U=4, deterministic=True),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 6),
        lwta(U=2, deterministic=True),
        lwta(U=1),
    ).to(F64)
    model[4].temp_test = 0.5
    original = copy.deepcopy(model)
    bcos_kernels.convert(model)
    assert [type(m) for m in model][1::3] == [bnn.LWTA, bnn.LWTA]
    assert model[1].U == 4 and model[4].temp_test == 0.5 and model[5].U == 1 and model[1].deterministic
    assert_parity_in_train_and_eval(original, model, torch.rand(2, 3, 6, 6, dtype=F64))
    # stochastic: the configuration carries over (the noise streams differ, see test_lwta for the op)
    stochastic = bcos_kernels.convert(torch.nn.Sequential(lwta(U=3, temp=0.7)))
    assert isinstance(stochastic[0], bnn.LWTA) and not stochastic[0].deterministic and stochastic[0].temp == 0.7


def test_csg_learnable_mask_layer():
    text = mirror_source("hyliang96+CSGCNN", "VOCPart/train/resnet_std.py")
    node = next(n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == "LearnableMaskLayer")
    module = load_source("csg_convert", "import torch\nimport torch.nn as nn\n\n" + ast.get_source_segment(text, node))
    layer = module.LearnableMaskLayer(8, 5)  # fp32: the original builds its gate in the default dtype
    with torch.no_grad():
        layer.mask.uniform_(0, 1)
    original = copy.deepcopy(layer)
    converted = bcos_kernels.convert(layer)
    assert isinstance(converted, bnn.ClassSpecificGate) and converted.mask is layer.mask
    labels = torch.tensor([4, 0, 2])
    x = torch.rand(3, 8, 3, 4)
    assert_parity_in_train_and_eval(original, converted, x, (labels,), rtol=1e-6)
