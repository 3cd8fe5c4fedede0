"""Whole-model training steps (op "model"): the B-cos ResNet-50 and ViT-Ti/16 of the `bcos` package and the
CIFAR-10 CoDA-Net, each with the original layers (and, on a GPU, torch.compile of them), with each backend of ours
swapped in, and with plain convolutions / linears (the limit; the ViT's with SDPA attention). A training step: the
model in train() mode (batch norm on batch statistics), gradients for the parameters only (the input needs none).

Every provider of ours is first checked against the original on a small float32 batch (benchmarks/models.py
check_parity): a model that disagrees with the original is not timed. On a GPU, the largest batch whose training
step fits in memory is searched and recorded as the case "<case> largest batch".
"""

import contextlib
import copy
import functools

import models
import pytest
import torch
from harness import (
    DEVICE,
    DTYPES,
    MIN_RUN_TIME_S,
    MODES,
    RECORDS,
    SMOKE,
    Record,
    Workload,
    baseline_providers,
    bcos_installed,
    bench,
    our_providers,
    sync,
)
from shapes import (
    CODA_CIFAR10_IMAGE,
    CODA_CIFAR10_MODEL_BATCH,
    RESNET50_MODEL_BATCH,
    RESNET50_MODEL_IMAGE,
    VIT_MODEL_BATCH,
    VIT_S_MODEL_BATCH,
)

import bcos_kernels
from bcos_kernels.timing import measure

RESNET = "B-cos ResNet-50 train step"
CODA = "CoDA-Net CIFAR-10 9L train step"
VIT = "B-cos ViT-Ti/16 train step"
VIT_S = "B-cos ViT-S/16 train step"

GPU = DEVICE.type == "cuda"
# The smoke run only proves the file runs: one mode (the three share the harness's code path, which the per-layer
# smoke runs exercise), so that it takes seconds rather than half a minute on a 2-core machine.
BENCH_MODES = ("fwd+bwd",) if SMOKE else MODES


def _baselines(op):
    # torch.compile of a whole model runs on the GPU only: on a 2-core CPU inductor takes ~5 min for the ResNet-50
    # and ~1.5 min for the CoDA-Net, longer than everything else in this file (and in one such run the eager models
    # timed after the ResNet-50 compile, in the same process, were up to 5x slower). The compiled per-layer
    # baselines still run on CPU.
    return [p for p in baseline_providers(op) if GPU or not p.endswith("_compiled")]


RESNET_OURS = our_providers("bcos_conv2d")
CODA_OURS = our_providers("dau_conv2d")
# "model:bcos": the bcos package's model is the original; "model:coda": the CoDA-Net runs our exact DAU reference
RESNET_PROVIDERS = _baselines("model:bcos") + RESNET_OURS + ["plain"]
CODA_PROVIDERS = _baselines("model:coda") + CODA_OURS + ["plain"]
VIT_PROVIDERS = _baselines("model:bcos") + our_providers("bcos_linear") + ["plain"]
BASELINE = {RESNET: "original", CODA: "reference", VIT: "original", VIT_S: "original"}
SHORT = {RESNET: "resnet50", CODA: "coda", VIT: "vit_ti", VIT_S: "vit_s"}

# Parity: max |ours - original| <= PARITY_RTOL * max |original|, for the logits and the input gradient, in float32.
PARITY_BATCH = 2
PARITY_RTOL = 1e-3
# Train-mode batch norm on 2 images is ill-conditioned where the feature maps are 1x1 (the variance of two numbers
# amplifies float32 rounding differences by orders of magnitude: relative errors ~1 at 32x32 inputs, ~1e-4 at
# 64x64). The smoke image (32) is too small for a meaningful check, so parity runs at 64x64 or more.
PARITY_IMAGE = max(RESNET50_MODEL_IMAGE, 64)

skip_without_bcos = pytest.mark.skipif(
    not bcos_installed(),
    reason="the original `bcos` package is not installed (pip install --no-deps bcos==0.1.3): "
    "no B-cos ResNet-50 or ViT to time (the CoDA-Net case still runs)",
)


# ---------------------------------------------------------------------------------------------------------------
# Models: one set of parameters per case, every provider built from it
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _resnet_original() -> torch.nn.Module:
    """The B-cos ResNet-50 with fixed parameters; never run itself, only copied (bench moves and casts the module
    it gets in place)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return models.bcos_resnet50().train()


def build_resnet(provider: str) -> torch.nn.Module:
    # bench passes the provider without its "_compiled" suffix (and compiles the result itself)
    if provider == "original":
        return copy.deepcopy(_resnet_original())
    if provider == "plain":
        return models.with_plain_layers(_resnet_original())
    return bcos_kernels.convert(copy.deepcopy(_resnet_original()), backend=provider)


@functools.lru_cache(maxsize=None)
def _vit_original(case: str) -> torch.nn.Module:
    """The B-cos ViT-Ti/16 or ViT-S/16 with fixed parameters (only copied, as the ResNet)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return (models.bcos_vit_ti() if case == VIT else models.bcos_vit_s()).train()


def build_vit(provider: str, case: str = VIT) -> torch.nn.Module:
    if provider == "original":
        return copy.deepcopy(_vit_original(case))
    if provider == "plain":
        return models.plain_vit(_vit_original(case))
    return bcos_kernels.convert(copy.deepcopy(_vit_original(case)), backend=provider)


def build_coda(provider: str) -> torch.nn.Module:
    # coda_net_cifar10 seeds its own parameters: every provider gets the same ones
    return models.coda_net_cifar10(provider).train()


BUILD = {RESNET: build_resnet, CODA: build_coda, VIT: build_vit, VIT_S: functools.partial(build_vit, case=VIT_S)}
IMAGE = {RESNET: RESNET50_MODEL_IMAGE, CODA: CODA_CIFAR10_IMAGE, VIT: RESNET50_MODEL_IMAGE, VIT_S: RESNET50_MODEL_IMAGE}
BATCH = {RESNET: RESNET50_MODEL_BATCH, CODA: CODA_CIFAR10_MODEL_BATCH, VIT: VIT_MODEL_BATCH, VIT_S: VIT_S_MODEL_BATCH}


def _input(case: str, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """A random 6-channel (x, 1 - x)-like batch: timing does not depend on the values."""
    return torch.randn(batch, 6, IMAGE[case], IMAGE[case], device=DEVICE, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Parity with the original, once per (case, provider)
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _full_float32():
    """TF32 off on the GPU: the check is about our layers, not about cuDNN's choice of TF32 algorithms."""
    if DEVICE.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


_parity: dict = {}  # (case, provider) -> None (agrees) or the AssertionError message


def require_parity(case: str, provider: str) -> None:
    """Fail (and so do not time) a provider of ours whose model disagrees with the original."""
    name = provider.removesuffix("_compiled")
    if name in (BASELINE[case], "plain"):
        return
    key = (case, name)
    if key not in _parity:
        build = BUILD[case]
        reference, ours = build(BASELINE[case]).to(DEVICE), build(name).to(DEVICE)
        image = PARITY_IMAGE if case == RESNET else IMAGE[case]
        x = torch.randn(PARITY_BATCH, 6, image, image, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        try:
            with _full_float32():
                models.check_parity(reference, ours, x, rtol=PARITY_RTOL)
            _parity[key] = None
        except AssertionError as error:
            _parity[key] = str(error)
        del reference, ours
        models.free_gpu_memory()
    if _parity[key] is not None:
        pytest.fail(f"{case}, {name}: not timed: {_parity[key]}")


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------
def _bench_case(case, dtype, provider, mode):
    require_parity(case, provider)
    x = _input(case, BATCH[case], dtype)
    # grad_inputs=[]: a training step needs the parameter gradients, not the input's
    bench("model", case, dtype, mode, provider, BUILD[case], [x], f"x={list(x.shape)}", grad_inputs=[])


@skip_without_bcos
@pytest.mark.parametrize("mode", BENCH_MODES)
@pytest.mark.parametrize("provider", RESNET_PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_resnet50_train_step(dtype, provider, mode):
    _bench_case(RESNET, dtype, provider, mode)


@skip_without_bcos
@pytest.mark.parametrize("mode", BENCH_MODES)
@pytest.mark.parametrize("provider", VIT_PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", [VIT, VIT_S], ids=[SHORT[VIT], SHORT[VIT_S]])
def test_vit_train_step(case, dtype, provider, mode):
    _bench_case(case, dtype, provider, mode)


@pytest.mark.parametrize("mode", BENCH_MODES)
@pytest.mark.parametrize("provider", CODA_PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_coda_cifar10_train_step(dtype, provider, mode):
    _bench_case(CODA, dtype, provider, mode)


# ---------------------------------------------------------------------------------------------------------------
# Largest batch that fits (GPU)
# ---------------------------------------------------------------------------------------------------------------
# Ours: the fused backends; "torch" runs the original's math through our module, so its autograd graph, and the
# batch that fits, are the original's. The compiled baselines are left out (a new batch size recompiles them).
LARGEST = [(RESNET, p) for p in ["original"] + [b for b in RESNET_OURS if b != "torch"] + ["plain"]] + [
    (CODA, p) for p in ["reference"] + [b for b in CODA_OURS if b != "torch"] + ["plain"]
]
# Search limits: far above what the originals fit in 80 GB; the plain CoDA-Net (nine small convolutions on 32x32
# images) may reach its limit, which the record then says. Larger CoDA batches would approach 2^31-element
# activations, where some kernels fail for reasons other than memory.
BATCH_LIMIT = {RESNET: 4096, CODA: 1 << 14}


def _timed_step(model, case, batch, dtype):
    """(Timing, peak MB) of a training step at ``batch``: the peak of one step after a warm-up step, then the
    harness's timer."""
    params = [p for p in model.parameters() if p.requires_grad]
    x = _input(case, batch, dtype)
    work = Workload(lambda: model(x), params)

    def step():
        out = work.forward()
        work.backward(out, torch.ones_like(out))

    step()
    sync()
    torch.cuda.reset_peak_memory_stats()
    step()
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**20
    return measure(step, device=DEVICE, min_run_time_s=MIN_RUN_TIME_S), peak


@pytest.mark.parametrize("case,provider", LARGEST, ids=[f"{SHORT[c]}-{p}" for c, p in LARGEST])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_largest_batch(case, dtype, provider):
    if SMOKE:
        pytest.skip("the largest-batch search is not part of the smoke run")
    if DEVICE.type != "cuda":
        pytest.skip("largest batch that fits is a GPU-memory measure; runs only with a GPU")
    if case == RESNET and not bcos_installed():
        pytest.skip("the original `bcos` package is not installed: no B-cos ResNet-50")
    model = BUILD[case](provider).to(DEVICE, dtype)
    params = [p for p in model.parameters() if p.requires_grad]

    def make_workload(batch):
        x = _input(case, batch, dtype)
        return Workload(lambda: model(x), params)

    models.free_gpu_memory()
    limit = BATCH_LIMIT[case]
    batch = models.largest_batch(models.gpu_step_fits(make_workload), start=1, limit=limit)
    if batch == 0:
        pytest.fail(f"{case}, {provider}: a batch of 1 does not fit in GPU memory")
    while True:  # the search stepped right at the edge: a measurement that runs out of memory retries a bit lower
        try:
            timing, peak = _timed_step(model, case, batch, dtype)
            break
        except torch.cuda.OutOfMemoryError:
            pass
        models.free_gpu_memory()
        batch -= max(1, batch // 32)
        if batch < 1:
            pytest.fail(f"{case}, {provider}: no batch could be timed")
    models.free_gpu_memory()
    shape = f"batch={batch}" + (" (search limit)" if batch == limit else "")
    RECORDS.append(
        Record(
            op="model",
            case=f"{case} largest batch",
            dtype=str(dtype)[6:],
            mode="fwd+bwd",
            provider=provider,
            median_ms=timing.median_ms,
            iqr_ms=timing.iqr_ms,
            peak_mem_mb=peak,
            shape=shape,
        )
    )
