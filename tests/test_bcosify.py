"""bcos_kernels.bcosify: B-cosification of a standard CNN, against the original conversion (shrebox/B-cosification,
executed from its mirror on top of its own B-cos modules), the properties the conversion is meant to have, and its
handling of parameters, devices, modes and bad arguments."""

import copy
import functools
import sys
import types
import warnings

import pytest
import torch
from helpers import one_intra_op_thread  # noqa: F401  (autouse: tiny tensors, one intra-op thread)
from originals import BCOSIFICATION_LAYERS, load_bcosification, torchvision_stand_ins
from torch import nn

import bcos_kernels
from bcos_kernels import nn as bnn
from bcos_kernels.bcosify import add_inverse, bcosify

DT = torch.float64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------
# A small standard CNN and the original conversion
# ---------------------------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """conv-bn-relu-pool blocks with odd channel counts, a stride-2 conv, a grouped conv, a 1x1 conv, a Linear
    head. ``head_before_pool``: the forward of the original's ResNetBcos / DenseNetBcos, which applies the
    classifier (a 1x1 conv once B-cosified with last_layer_name) before global average pooling."""

    def __init__(self, head_before_pool: bool = False):
        super().__init__()
        self.head_before_pool = head_before_pool
        self.stem = nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1, bias=True), nn.BatchNorm2d(5), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        self.block = nn.Sequential(
            nn.Conv2d(5, 9, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(9),
            nn.ReLU(),
            nn.Conv2d(9, 9, 3, padding=1, groups=3, bias=True),
            nn.BatchNorm2d(9),
            nn.ReLU(),
        )
        self.proj = nn.Conv2d(9, 7, 1, bias=True)
        self.bn = nn.BatchNorm2d(7)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(7, 4)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = self.relu(self.bn(self.proj(x)))
        if self.head_before_pool:
            return self.pool(self.fc(x)).flatten(1)
        return self.fc(self.pool(x).flatten(1))


def randomise_batch_norms(model: nn.Module) -> nn.Module:
    """Pretrained-looking norms: running statistics and affine parameters away from their defaults."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def standard_model(head_before_pool=False) -> SmallCNN:
    torch.manual_seed(0)
    return randomise_batch_norms(SmallCNN(head_before_pool)).to(DT)


def set_explanation_mode(model: nn.Module, on: bool) -> None:
    # what the `bcos` package's explanation_mode() context does: every module that has the switch
    for m in model.modules():
        if hasattr(m, "set_explanation_mode"):
            m.set_explanation_mode(on)


@functools.lru_cache(maxsize=None)
def _original_bcosify_module():
    """The original bcosify.py (BcosifyNetwork: add_channels + bcosify), executed on the original's own
    bcos/modules files from the mirror, with stand-ins for what a CNN conversion never uses (torchvision's
    Normalize where torchvision is missing, CLIP's AttentionPool2d, BcosAttentionPool2d)."""
    clip = types.ModuleType("CLIP.clip.model")
    clip.AttentionPool2d = type("AttentionPool2d", (nn.Module,), {})
    stand_ins = {
        **torchvision_stand_ins(),
        "CLIP": types.ModuleType("CLIP"),
        "CLIP.clip": types.ModuleType("CLIP.clip"),
        "CLIP.clip.model": clip,
    }

    def on_load(name, module, packages):
        if name == "bcos.modules.logitlayer":
            pkg = packages["bcos.modules"]
            pkg.BcosSequential = sys.modules["bcos.modules.common"].BcosSequential
            pkg.LogitLayer = module.LogitLayer
            pkg.BcosAttentionPool2d = type("BcosAttentionPool2d", (nn.Module,), {})

    paths = BCOSIFICATION_LAYERS + [
        ("bcos.modules.norms.uncentered_norms", "bcos/modules/norms/uncentered_norms/batchnorm_uncentered.py"),
        ("bcosify", "bcosify.py"),
    ]
    return load_bcosification(paths, stand_ins, on_load)["bcosify"]


def original_bcosified(
    std: nn.Module, *, b=2.0, keep_bias=False, learn_b=False, clamping=False, b_loss=False, gap=False
):
    """`std` B-cosified by the original: BcosifyNetwork (its forward normalises the 6-channel input), then what
    model.py's get_model does (stem max pool -> AvgPool2d(3, 2, 1), every bias set to None) and, for a
    learnable b, what trainer.py does (every module with a `b` gets a 0-dim parameter)."""
    orig = _original_bcosify_module()
    config = dict(
        weights="pretrained",
        last_layer_name="fc" if gap else "NoLastLayerName",
        bcos_args=dict(b=b, max_out=1),
        bcosify_args=dict(
            norm_layer="BnUncV2", gap=gap, act_layer=True, clamping=clamping, learn_b=b_loss, fix_b=not learn_b
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = orig.BcosifyNetwork(copy.deepcopy(std), config, add_channels=True, logit_layer=False)
    net.model.stem[3] = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
    if not keep_bias:
        for mod in net.modules():
            if hasattr(mod, "bias") and mod.bias is not None:
                mod.bias = None
    if learn_b:
        start = (b - 2 if b_loss else b) + 1e-6
        for mod in net.modules():
            if hasattr(mod, "b"):
                mod.b = nn.Parameter(torch.tensor(start, dtype=DT))
    return net.to(DT)


def standard_layers_left(model):
    """Names of the standard conv / linear / batch norm / max pool layers not inside a B-cos layer."""
    inner = {id(m.linear) for m in model.modules() if isinstance(m, (bnn.BcosifyConv2d, bnn.BcosifyLinear))}
    return [
        n
        for n, m in model.named_modules()
        if type(m) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.MaxPool2d) and id(m) not in inner
    ]


def forward_and_grads(fn, model, x, seed=1):
    """fn(x) and the gradients of a random projection of it: input, and every parameter by name."""
    x = x.clone().requires_grad_(True)
    out = fn(x)
    torch.manual_seed(seed)
    out.backward(torch.randn_like(out))
    return out, x.grad, {n: p.grad for n, p in model.named_parameters()}


CONFIGS = {
    # the original's ImageNet CNN config: B = 2 fixed, biases removed, classifier after the pooling
    "b2": dict(),
    # ... with its GAP reorder: the classifier a 1x1 conv before the pooling (last_layer_name="fc")
    "b2-gap": dict(gap=True),
    "b1.5-bias": dict(b=1.5, keep_bias=True),
    # trainer.py, fix_b=False: a parameter b per layer; learn_b (our b_loss) / clamping variants
    "learn-b": dict(learn_b=True, b=1.5),
    "learn-b-loss": dict(learn_b=True, b_loss=True, b=1.0),
    "learn-b-clamp-gap": dict(learn_b=True, clamping=True, b=1.0, gap=True),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("detach", [False, True])
def test_matches_original(config, train, detach):
    cfg = dict(CONFIGS[config])
    gap = cfg.pop("gap", False)
    std = standard_model(head_before_pool=gap)
    orig = original_bcosified(std, gap=gap, **cfg)
    ours = bcosify(copy.deepcopy(std), last_layer_name="fc" if gap else None, backend="reference", **cfg)

    # the same distinct b per layer in both (clamping: some below the clamp, where neither gets a gradient)
    orig_b = {n[len("model.") :]: p for n, p in orig.named_parameters() if n.endswith(".b")}
    ours_b = {n: p for n, p in ours.named_parameters() if n.endswith(".b")}
    assert sorted(orig_b) == sorted(ours_b) and (len(ours_b) == 5) == bool(cfg.get("learn_b"))
    for i, name in enumerate(sorted(ours_b)):
        value = ours_b[name].item() + (0.15 * i - 0.3 if cfg.get("clamping") else 0.1 * i)
        with torch.no_grad():
            ours_b[name].fill_(value)
            orig_b[name].fill_(value)

    for model in (orig, ours):
        model.train(train)
        set_explanation_mode(model, detach)
    x = torch.rand(3, 3, 13, 11, dtype=DT)
    # the original's input: AddInverse in its data transform, the normalisation inside its wrapper
    out_o, gx_o, g_o = forward_and_grads(lambda t: orig(torch.cat([t, 1 - t], 1)), orig, x)
    out, gx, g = forward_and_grads(lambda t: ours(add_inverse(t, mean=IMAGENET_MEAN, std=IMAGENET_STD)), ours, x)

    tol = dict(atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(out, out_o, **tol)
    torch.testing.assert_close(gx, gx_o, **tol)
    g_o = {n[len("model.") :]: v for n, v in g_o.items()}
    assert sorted(g) == sorted(g_o)  # same parameters, same state-dict names (`<layer>.linear.weight`, `.b`, ...)
    for name in g:
        torch.testing.assert_close(g[name], g_o[name], **tol, msg=lambda m: f"{name}: {m}")
    buffers_o = {n[len("model.") :]: v for n, v in orig.named_buffers()}
    for name, buf in ours.named_buffers():
        if not name.endswith("num_batches_tracked"):  # the original restarts this count at 0
            torch.testing.assert_close(buf, buffers_o[name], **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", [None, "cpu"])
@pytest.mark.parametrize("learn_b", [False, True])
def test_backends_match_reference(backend, learn_b):
    # the modules get `backend`; the fused CPU path (None: auto) against the reference ("reference"), training mode
    if backend is not None and backend not in bcos_kernels.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available here")
    std = standard_model(head_before_pool=True)
    kwargs = dict(learn_b=learn_b, b=1.5 if learn_b else 2.0, last_layer_name="fc")
    ref = bcosify(copy.deepcopy(std), backend="reference", **kwargs)
    ours = bcosify(copy.deepcopy(std), backend=backend, **kwargs)
    assert all(m.backend == backend for m in ours.modules() if isinstance(m, (bnn.BcosifyConv2d, bnn.BcosifyLinear)))
    x = torch.rand(3, 3, 13, 11, dtype=DT)
    out_r, gx_r, g_r = forward_and_grads(lambda t: ref(add_inverse(t)), ref, x)
    out, gx, g = forward_and_grads(lambda t: ours(add_inverse(t)), ours, x)
    tol = dict(atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(out, out_r, **tol)
    torch.testing.assert_close(gx, gx_r, **tol)
    for name in g_r:
        torch.testing.assert_close(g[name], g_r[name], **tol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# What the conversion preserves (the B-cosification paper: at B = 1 with biases the B-cosified network is the
# standard one; without biases it is dynamic linear)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_before_pool", [False, True])
def test_b1_with_biases_is_the_standard_model(head_before_pool):
    # Eval mode: the uncentered norm with the running mean folded into its bias is the standard norm, B = 1 layers
    # are the plain conv / linear, and the widened first conv on the normalised [x, 1 - x] equals the standard
    # first conv on the normalised x. The max pool is kept (the average pool of the original changes the function).
    std = standard_model().eval()
    ours = copy.deepcopy(std)
    ours.head_before_pool = head_before_pool  # a 1x1 conv before the mean pool = the Linear after it, at B = 1
    bcosify(
        ours,
        b=1.0,
        keep_bias=True,
        maxpool_to_avgpool=False,
        last_layer_name="fc" if head_before_pool else None,
        backend="reference",
    )
    x = torch.rand(4, 3, 13, 11, dtype=DT)
    mean = torch.tensor(IMAGENET_MEAN, dtype=DT)[:, None, None]
    stdev = torch.tensor(IMAGENET_STD, dtype=DT)[:, None, None]
    with torch.no_grad():
        expected = std((x - mean) / stdev)
        torch.testing.assert_close(
            ours(add_inverse(x, mean=IMAGENET_MEAN, std=IMAGENET_STD)), expected, atol=1e-12, rtol=1e-12
        )
        # without normalisation, [x, 1 - x] and the halved weights see the image centred at 1/2
        torch.testing.assert_close(ours(add_inverse(x)), std(x - 0.5), atol=1e-12, rtol=1e-12)


def test_widened_first_conv_on_normalised_encoding_is_the_standard_conv():
    # the identity behind the first-layer widening, at any B: its input [z, -z] has the same patch norms up to
    # sqrt(2), and the same linear part as the standard conv on z
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False).to(DT)
    model = bcosify(nn.Sequential(copy.deepcopy(conv)), b=1.0, backend="reference")
    z = torch.randn(2, 3, 9, 8, dtype=DT)
    torch.testing.assert_close(model(torch.cat([z, -z], 1)), conv(z), atol=1e-13, rtol=1e-12)
    assert torch.equal(model[0].linear.weight, torch.cat([conv.weight, -conv.weight], 1) / 2)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("learn_b", [False, True])
def test_without_biases_is_dynamic_linear(train, learn_b):
    # In explanation mode the output is exactly W(x) x with W(x) the input gradient: contributions sum to the logit.
    # Train mode too (the batch statistics are detached, so a sample's gradient comes from its own output).
    ours = bcosify(
        standard_model(head_before_pool=True),
        learn_b=learn_b,
        b=1.7 if learn_b else 2.0,
        last_layer_name="fc",
        backend="reference",
    ).train(train)
    set_explanation_mode(ours, True)
    x6 = add_inverse(torch.rand(3, 3, 13, 11, dtype=DT)).requires_grad_(True)
    out = ours(x6)
    for c in range(out.shape[1]):
        (grad,) = torch.autograd.grad(out[:, c].sum(), x6, retain_graph=True)
        torch.testing.assert_close((grad * x6).sum((1, 2, 3)), out[:, c], atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Parameters, modes, devices, dtypes
# ---------------------------------------------------------------------------------------------------------------
def test_layers_weights_and_modes():
    std = standard_model().eval()
    std.block.train()
    std.block[3].weight.requires_grad_(False)
    ref = copy.deepcopy(std)
    params = dict(std.named_parameters())
    buffers = dict(std.named_buffers())
    ours = bcosify(std, last_layer_name=None)
    assert ours is std

    kinds = {n: type(m) for n, m in ours.named_children()}
    assert kinds["proj"] is bnn.BcosifyConv2d and kinds["bn"] is bnn.BatchNormUncentered2d
    assert kinds["fc"] is bnn.BcosifyLinear and kinds["relu"] is nn.ReLU and kinds["pool"] is nn.AdaptiveAvgPool2d
    assert isinstance(ours.stem[3], nn.AvgPool2d) and ours.stem[3].kernel_size == 3 and ours.stem[3].stride == 2
    assert ours.stem[3].padding == 1 and ours.stem[3].count_include_pad
    assert not standard_layers_left(ours)

    # the pretrained parameters themselves (shared), except the widened first conv (a new tensor)
    for name in ("block.0.weight", "block.3.weight", "proj.weight", "fc.weight"):
        layer = ours.get_submodule(name[: -len(".weight")])
        assert layer.linear.weight is params[name], name
        assert layer.linear.bias is None and layer.b == 2.0 and layer.backend is None
    first = ours.stem[0].linear
    assert first.in_channels == 6 and ours.stem[0].in_channels == 6
    assert torch.equal(first.weight, torch.cat([ref.stem[0].weight, -ref.stem[0].weight], 1) / 2)
    assert not ours.block[3].linear.weight.requires_grad and first.weight.requires_grad
    # norms share weight and buffers, lose the bias
    for name in ("stem.1", "block.1", "block.4", "bn"):
        norm = ours.get_submodule(name)
        assert norm.weight is params[f"{name}.weight"] and norm.bias is None
        assert norm.running_var is buffers[f"{name}.running_var"]
        assert norm.running_mean is buffers[f"{name}.running_mean"]
    # training / eval mode of each replaced module
    assert not ours.stem[0].training and not ours.stem[0].linear.training and not ours.fc.training
    assert ours.block[0].training and ours.block[0].linear.training and ours.block[1].training
    assert not ours.bn.training
    # dtype
    assert all(p.dtype == DT for p in ours.parameters())
    assert set(dict(ours.state_dict())) >= {"stem.0.linear.weight", "fc.linear.weight", "bn.running_var"}


def test_keep_bias_shares_conv_biases_and_folds_norm_means():
    std = standard_model()
    ref = copy.deepcopy(std)
    bias = std.stem[0].bias
    bn_bias = std.bn.bias
    ours = bcosify(std, keep_bias=True)
    assert ours.stem[0].linear.bias is bias and ours.fc.linear.bias is not None
    folded = ref.bn.bias - ref.bn.running_mean / (ref.bn.running_var + ref.bn.eps).sqrt() * ref.bn.weight
    torch.testing.assert_close(ours.bn.bias.detach(), folded.detach())
    assert ours.bn.bias is not bn_bias and torch.equal(bn_bias, ref.bn.bias)  # the old norm's bias is untouched


def test_last_layer_as_1x1_conv_shares_storage():
    std = standard_model(head_before_pool=True)
    w = std.fc.weight
    ours = bcosify(std, last_layer_name="fc", keep_bias=True)
    fc = ours.fc
    assert isinstance(fc, bnn.BcosifyConv2d) and fc.linear.kernel_size == (1, 1)
    assert fc.linear.weight.shape == (4, 7, 1, 1) and fc.linear.weight.data_ptr() == w.data_ptr()
    assert fc.linear.bias is not None


def test_meta_device_and_dtype():
    # device and dtype come from each layer's parameters, not from the defaults (meta: no GPU needed to see it)
    std = standard_model().to(device="meta", dtype=torch.float32)
    ours = bcosify(std, learn_b=True, keep_bias=True)
    for name, t in list(ours.named_parameters()) + list(ours.named_buffers()):
        assert t.device.type == "meta", name
        if t.is_floating_point():
            assert t.dtype == torch.float32, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_model_stays_on_its_device():
    ours = bcosify(standard_model().cuda().float(), learn_b=True)
    assert all(t.is_cuda for t in list(ours.parameters()) + list(ours.buffers()))
    out = ours(add_inverse(torch.rand(2, 3, 13, 11, device="cuda")))
    out.sum().backward()
    assert all(p.grad is not None for n, p in ours.named_parameters() if n.endswith(".b"))


@pytest.mark.parametrize(
    "b,b_loss,clamping",
    [(1.0, False, False), (2.0, False, False), (1.0, True, False), (1.0, False, True), (1.5, True, True)],
)
def test_learnable_b(b, b_loss, clamping):
    ours = bcosify(standard_model(), b=b, learn_b=True, b_loss=b_loss, clamping=clamping, backend="reference")
    bs = {n: p for n, p in ours.named_parameters() if n.endswith(".b")}
    layers = [m for m in ours.modules() if isinstance(m, (bnn.BcosifyConv2d, bnn.BcosifyLinear))]
    assert len(bs) == len(layers) == 5 and all(m.clamping == clamping and m.b_loss == b_loss for m in layers)
    start = (b - 2 if b_loss else b) + 1e-6  # b_loss: the parameter holds B - 2
    for name, p in bs.items():
        assert p.dim() == 0 and p.dtype == DT and p.item() == pytest.approx(start, abs=1e-15), name
    # the layers' B is b (+ 1e-6)
    assert float(layers[0].effective_b().detach()) == pytest.approx(b + 1e-6, abs=1e-12)
    out = ours(add_inverse(torch.rand(2, 3, 13, 11, dtype=DT)))
    out.square().sum().backward()
    for name, p in bs.items():
        # also with clamping from b = 1: the 1e-6 puts b on the side of the clamp that passes gradients
        assert p.grad is not None and torch.isfinite(p.grad) and p.grad != 0, name
    opt = torch.optim.SGD([p for n, p in ours.named_parameters() if n.endswith(".b")], lr=0.1)
    before = {n: p.item() for n, p in bs.items()}
    opt.step()
    assert all(bs[n].item() != before[n] for n in bs)


def test_relu_removal_and_shared_modules():
    act = nn.ReLU()
    conv = nn.Conv2d(6, 6, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), act, conv, act, conv).to(DT)
    bcosify(model, keep_relu=False)
    assert isinstance(model[1], nn.Identity) and model[1] is model[3]
    assert isinstance(model[2], bnn.BcosifyConv2d) and model[2] is model[4]  # one module at two places stays one


def test_padding_strings():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding="same"),
        nn.Conv2d(4, 4, (3, 5), padding="same", dilation=2),
        nn.Conv2d(4, 2, 3, padding="valid"),
    ).to(DT)
    ref = copy.deepcopy(model)
    bcosify(model, b=1.0, keep_bias=True, backend="reference")
    assert model[1].linear.padding == (2, 4) and model[2].linear.padding == (0, 0)
    x = torch.rand(2, 3, 9, 10, dtype=DT)
    torch.testing.assert_close(model(add_inverse(x)), ref(x - 0.5))


def test_existing_bcos_modules_are_left_alone():
    model = bcosify(standard_model(), backend="reference")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    with pytest.warns(UserWarning, match="no nn.Conv2d with 3 input channels"):
        bcosify(model, b=1.5)
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.proj.b == 2.0


def test_first_conv_warnings_and_choice():
    def two_inputs():
        return nn.Sequential(nn.Conv2d(3, 3, 3), nn.Conv2d(3, 4, 1))

    with pytest.warns(UserWarning, match="several nn.Conv2d with 3 input channels"):
        model = bcosify(two_inputs())
    assert model[0].in_channels == 6 and model[1].in_channels == 6  # as the original: all of them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = bcosify(two_inputs(), add_channels="0")
        assert model[0].in_channels == 6 and model[1].in_channels == 3
        model = bcosify(two_inputs(), add_channels=False)
        assert model[0].in_channels == 3
    with pytest.warns(UserWarning, match="no nn.Conv2d with 3 input channels"):
        bcosify(nn.Sequential(nn.Conv2d(4, 4, 1)))
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    model.add_module("ln", nn.LayerNorm(4))
    with pytest.warns(UserWarning, match=r"left unchanged.*ln \(LayerNorm\)"):
        bcosify(model)
    assert isinstance(model.ln, nn.LayerNorm)


# ---------------------------------------------------------------------------------------------------------------
# Bad arguments and unsupported layers: clear errors, model untouched
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(b=0.5), ValueError, "b must be a finite number >= 1"),
        (dict(b=True), ValueError, "b must"),
        (dict(b="2"), ValueError, "b must"),
        (dict(b=float("nan")), ValueError, "b must"),
        (dict(learn_b=1), TypeError, "learn_b must be True or False"),
        (dict(keep_bias="yes"), TypeError, "keep_bias"),
        (dict(maxpool_to_avgpool=None), TypeError, "maxpool_to_avgpool"),
        (dict(clamping=True), ValueError, "clamping=True .* learn_b=True"),
        (dict(b_loss=True), ValueError, "b_loss=True .* learn_b=True"),
        (dict(add_channels=3), TypeError, "add_channels"),
        (dict(add_channels="nope"), ValueError, "add_channels='nope'"),
        (dict(add_channels="stem.1"), ValueError, "add_channels='stem.1' names a BatchNorm2d"),
        (dict(last_layer_name="nope"), ValueError, "last_layer_name='nope'"),
        (dict(last_layer_name="proj"), ValueError, "last_layer_name='proj' names a Conv2d"),
        (dict(last_layer_name=1), TypeError, "last_layer_name"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    model = standard_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=match):
        bcosify(model, **kwargs)
    assert model.state_dict().keys() == before.keys() and isinstance(model.stem[0], nn.Conv2d)


def _with(layer, name="extra"):
    model = standard_model()
    model.add_module(name, layer)
    return model


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: _with(nn.Conv1d(3, 3, 1)), "layer 'extra' \\(Conv1d\\) cannot be B-cosified"),
        (lambda: _with(nn.ConvTranspose2d(3, 3, 1)), "'extra' \\(ConvTranspose2d\\)"),
        (
            lambda: _with(nn.Sequential(nn.MultiheadAttention(4, 2, add_bias_kv=True))),
            "'extra.0': an nn.MultiheadAttention with bias_k",
        ),
        (lambda: _with(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")), "'extra': padding_mode='reflect'"),
        (lambda: _with(nn.Conv2d(4, 4, (3, 4), padding="same")), "'extra': padding='same' with an even kernel"),
        (lambda: _with(nn.MaxPool2d(2, dilation=2)), "'extra': a MaxPool2d with return_indices or dilation"),
        (lambda: _with(nn.LazyConv2d(4, 1)), "'extra' has uninitialised"),
        (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, groups=3)), "'0': a grouped first conv"),
        (lambda: _with(nn.utils.parametrizations.weight_norm(nn.Linear(3, 3))), "'extra': its weight or bias is not"),
        (lambda: nn.Conv2d(3, 4, 1), "model is itself a Conv2d"),
    ],
)
def test_unsupported_layers(make, match):
    model = make()
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        bcosify(model)
    assert [type(m) for m in model.modules()] == kinds


def test_keep_bias_needs_foldable_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="'1': keep_bias=True folds the running mean"):
        bcosify(model, keep_bias=True)
    bcosify(model)  # without biases there is nothing to fold
    assert isinstance(model[1], bnn.BatchNormUncentered2d) and model[1].bias is None


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        bcosify(lambda x: x)


# ---------------------------------------------------------------------------------------------------------------
# add_inverse
# ---------------------------------------------------------------------------------------------------------------
def test_add_inverse():
    x = torch.rand(2, 3, 4, 5, dtype=DT)
    assert torch.equal(add_inverse(x), torch.cat([x, 1 - x], 1))
    assert torch.equal(add_inverse(x[0], dim=0), torch.cat([x[0], 1 - x[0]], 0))
    assert torch.equal(add_inverse(x[0], dim=-3), torch.cat([x[0], 1 - x[0]], 0))
    z = (x - torch.tensor(IMAGENET_MEAN, dtype=DT)[:, None, None]) / torch.tensor(IMAGENET_STD, dtype=DT)[:, None, None]
    torch.testing.assert_close(add_inverse(x, mean=IMAGENET_MEAN, std=IMAGENET_STD), torch.cat([z, -z], 1))
    torch.testing.assert_close(
        add_inverse(x, std=IMAGENET_STD),
        torch.cat([x, 1 - x], 1) / torch.tensor(IMAGENET_STD * 2, dtype=DT)[:, None, None],
    )
    assert bcos_kernels.add_inverse is add_inverse and bcos_kernels.bcosify is bcosify
    with pytest.raises(ValueError, match="mean must have one value per channel"):
        add_inverse(x, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std must be non-zero"):
        add_inverse(x, std=(1.0, 0.0, 1.0))
    with pytest.raises(TypeError, match="floating point"):
        add_inverse(torch.ones(1, 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="dim=4 is out of range"):
        add_inverse(x, dim=4)


# ---------------------------------------------------------------------------------------------------------------
# torchvision (not installed on CPU-only CI; runs where it is, e.g. the GPU machine)
# ---------------------------------------------------------------------------------------------------------------
def test_torchvision_resnet18():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    std = randomise_batch_norms(models.resnet18(weights=None, num_classes=10)).to(DT).eval()
    x = torch.rand(2, 3, 64, 64, dtype=DT)
    mean = torch.tensor(IMAGENET_MEAN, dtype=DT)[:, None, None]
    stdev = torch.tensor(IMAGENET_STD, dtype=DT)[:, None, None]

    # B = 1 with biases and the max pool kept: the standard network
    same = bcosify(copy.deepcopy(std), b=1.0, keep_bias=True, maxpool_to_avgpool=False, backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(
            same(add_inverse(x, mean=IMAGENET_MEAN, std=IMAGENET_STD)), std((x - mean) / stdev), atol=1e-10, rtol=1e-10
        )

    # the default conversion: nothing standard left, dynamic linear
    ours = bcosify(copy.deepcopy(std), backend="reference")
    assert not standard_layers_left(ours)
    assert ours.conv1.in_channels == 6 and isinstance(ours.maxpool, nn.AvgPool2d)
    set_explanation_mode(ours, True)
    x6 = add_inverse(x).requires_grad_(True)
    out = ours(x6)
    (grad,) = torch.autograd.grad(out[:, 3].sum(), x6)
    torch.testing.assert_close((grad * x6).sum((1, 2, 3)), out[:, 3], atol=1e-10, rtol=1e-8)

    if torch.cuda.is_available():
        # the fused GPU path (backend auto) against the reference, fp32
        ref = bcosify(copy.deepcopy(std), backend="reference").float().cuda()
        fused = bcosify(copy.deepcopy(std)).float().cuda()
        xc = add_inverse(x.float().cuda())
        expected = ref(xc)
        torch.testing.assert_close(fused(xc), expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)


def test_torchvision_resnet18_gap_reorder_matches_original():
    models = pytest.importorskip("torchvision.models")

    class ResNetBcos(models.ResNet):
        # the original's forward (bcos/models/standard_models.py): classifier, then the global average pooling
        def _forward_impl(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.avgpool(self.fc(x)).flatten(1)

    torch.manual_seed(0)
    std = randomise_batch_norms(ResNetBcos(models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=10)).to(DT)
    orig = _original_bcosify_module()
    config = dict(
        weights="pretrained",
        last_layer_name="fc",
        bcos_args=dict(b=2, max_out=1),
        bcosify_args=dict(norm_layer="BnUncV2", gap=True, act_layer=True),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = orig.BcosifyNetwork(copy.deepcopy(std), config, add_channels=True, logit_layer=False)
    net.model.maxpool = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
    for mod in net.modules():
        if hasattr(mod, "bias") and mod.bias is not None:
            mod.bias = None
    net = net.to(DT).eval()
    ours = bcosify(copy.deepcopy(std), last_layer_name="fc", backend="reference").eval()
    x = torch.rand(2, 3, 64, 64, dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(add_inverse(x, mean=IMAGENET_MEAN, std=IMAGENET_STD)),
            net(torch.cat([x, 1 - x], 1)),
            atol=1e-10,
            rtol=1e-9,
        )
