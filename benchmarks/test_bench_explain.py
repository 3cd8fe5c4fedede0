"""Explanations of a batch of 16 images (op "explain") with the B-cos ResNet-50 and ViT-Ti/16 of the `bcos` package.

Providers (medians by bcos_kernels.timing.measure of whole explanations: forward, backward, contribution maps and
the RGBA images):
- "original": the `bcos` package's ``model.explain`` looped over the 16 images (it takes one image at a time);
- "original_batched": ``bcos_kernels.explain`` on the unconverted model (what batching alone gives);
- each backend of ours: ``bcos_kernels.explain`` on the model after ``bcos_kernels.convert`` and
  ``bcos_kernels.fold_batchnorm`` (the eval-mode norms folded into the conv epilogues);
- "plain": the yardstick of issue 19 ("an explanation of a batch costs at most 2.2x one forward+backward of the
  model"): one forward of that converted model on the batch and the backward of its summed logits to the images
  and every parameter, so ours/plain is that ratio.
Every provider of ours is checked against the per-image original before it is timed.

Memory: on a GPU the peak allocated during one explanation minus what was allocated before; on a CPU the bytes
the forward saves for the backward plus the logits (the harness's CPU measure), of the batch (the loop: of one
image, which is all it holds at a time).
"""

import copy
import functools

import models
import pytest
import torch
from harness import (
    DEVICE,
    MIN_RUN_TIME_S,
    RECORDS,
    SMOKE,
    Record,
    Workload,
    bcos_installed,
    our_providers,
    peak_memory_mb,
    sync,
)
from shapes import RESNET50_MODEL_IMAGE

import bcos_kernels
from bcos_kernels.timing import measure

RESNET = "B-cos ResNet-50 explain"
VIT = "B-cos ViT-Ti/16 explain"
GPU = DEVICE.type == "cuda"
BATCH = 2 if SMOKE else 16
# 224x224 on a GPU; on a 2-core CPU the ResNet at 112x112 keeps its four providers to about a minute (the ViT-Ti,
# 2.3x fewer multiply-adds per image, stays at 224).
IMAGE = {RESNET: RESNET50_MODEL_IMAGE if GPU or SMOKE else 112, VIT: RESNET50_MODEL_IMAGE}
OURS = {RESNET: our_providers("bcos_conv2d"), VIT: our_providers("bcos_linear")}
CALLS = [(case, p) for case in (RESNET, VIT) for p in ["original", "original_batched"] + OURS[case] + ["plain"]]
PARITY_RTOL = 1e-3

pytestmark = pytest.mark.skipif(
    not bcos_installed(),
    reason="the original `bcos` package is not installed: no B-cos ResNet-50 and no original explain() to compare",
)


def _images(case: str) -> torch.Tensor:
    rgb = torch.rand(BATCH, 3, IMAGE[case], IMAGE[case], generator=torch.Generator().manual_seed(0))
    return torch.cat([rgb, 1 - rgb], dim=1).to(DEVICE)


@functools.lru_cache(maxsize=None)
def _original(case: str) -> torch.nn.Module:
    """The model with fixed parameters, in eval mode (the ResNet-50 with running statistics from two train-mode
    batches)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if case == VIT:
            return models.bcos_vit_ti().to(DEVICE).eval()
        model = models.bcos_resnet50().to(DEVICE)
        with torch.no_grad():
            for _ in range(2):
                model(torch.rand(4, 6, IMAGE[case], IMAGE[case], device=DEVICE))
    return model.eval()


def _loop(model, x):
    # the original API: one image at a time, the gradient left on the image tensor
    for i in range(x.shape[0]):
        model.explain(x[i : i + 1].clone().requires_grad_(True))


@functools.lru_cache(maxsize=None)
def _build(case: str, provider: str):
    """(callable explaining x, model) for a provider."""
    original = _original(case)
    if provider == "original":
        return functools.partial(_loop, original), original
    if provider == "original_batched":
        return functools.partial(bcos_kernels.explain, original), original
    if provider == "plain":
        _, model = _build(case, OURS[case][0])
        return functools.partial(_forward_backward, model), model
    model = bcos_kernels.convert(copy.deepcopy(original), backend=provider)
    if case == RESNET:
        bcos_kernels.fold_batchnorm(model, _images(case)[:1])
    return functools.partial(bcos_kernels.explain, model), model


def _forward_backward(model, x):
    leaf = x.clone().requires_grad_(True)
    torch.autograd.grad(model(leaf).sum(), [leaf, *model.parameters()])


def _check_parity(case: str, provider: str, x: torch.Tensor) -> None:
    explain, _ = _build(case, provider)
    ours = explain(x[:2])
    for i in range(2):
        expected = _original(case).explain(x[i : i + 1].clone().requires_grad_(True))
        weights = expected["dynamic_linear_weights"][0]
        err = (ours["dynamic_linear_weights"][i] - weights).abs().max().item()
        if ours["prediction"][i].item() != expected["prediction"] or err > PARITY_RTOL * weights.abs().max().item():
            pytest.fail(
                f"{case}, {provider}: not timed: image {i} differs from the original explain() "
                f"(prediction {ours['prediction'][i].item()} vs {expected['prediction']}, max |diff| of the "
                f"dynamic linear weights {err:.3g})"
            )


def _memory_mb(case: str, provider: str, x: torch.Tensor) -> float:
    explain, model = _build(case, provider)
    if GPU:
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        explain(x)
        sync()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    xs = x[:1] if provider == "original" else x
    leaf = xs.clone().requires_grad_(True)
    if provider == "plain":
        return peak_memory_mb(Workload(lambda: model(leaf), [leaf, *model.parameters()]), [leaf, *model.parameters()])
    with bcos_kernels.explanation_mode(model):
        return peak_memory_mb(Workload(lambda: model(leaf), [leaf]), [leaf, *model.parameters()])


@pytest.mark.parametrize("case,provider", CALLS, ids=[f"{'vit' if c == VIT else 'resnet'}-{p}" for c, p in CALLS])
def test_explain_batch(case, provider):
    x = _images(case)
    if provider not in ("original", "plain"):
        _check_parity(case, provider, x)
    explain, _ = _build(case, provider)
    timing = measure(lambda: explain(x), device=DEVICE, min_run_time_s=MIN_RUN_TIME_S)
    RECORDS.append(
        Record(
            "explain",
            case,
            "float32",
            "fwd+bwd",
            provider,
            timing.median_ms,
            timing.iqr_ms,
            _memory_mb(case, provider, x),
            f"x=[{BATCH}, 6, {IMAGE[case]}, {IMAGE[case]}]",
        )
    )
