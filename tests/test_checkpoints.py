"""Checkpoints through our layers: activation checkpointing (reentrant and not) gives the same gradients; the
state_dict moves between the original and the converted model both ways; a whole converted model survives
torch.save / torch.load, copy.deepcopy and pickle."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from originals import SMALL_MODELS, small_bcos_model
from torch.utils.checkpoint import checkpoint

import bcos_kernels

DT = torch.float64


def _original(name: str) -> torch.nn.Module:
    model = small_bcos_model(name).to(DT)
    return model.eval() if name == "resnet18" else model.train()


def _grads(model, x):
    """Output, input gradient and parameter gradients of a fixed projection (by .backward(): reentrant
    checkpointing refuses torch.autograd.grad)."""
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    out.backward(g)
    return [out.detach(), x.grad, *(p.grad for p in model.parameters())]


class Checkpointed(torch.nn.Module):
    """``module`` recomputed in the backward (torch.utils.checkpoint)."""

    def __init__(self, module, reentrant):
        super().__init__()
        self.module, self.reentrant = module, reentrant

    def forward(self, x):
        return checkpoint(self.module, x, use_reentrant=self.reentrant)


X = torch.rand(2, 6, 32, 32, generator=torch.Generator().manual_seed(2), dtype=DT)
NAMES = SMALL_MODELS


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_activation_checkpointing_gives_the_same_gradients(name, reentrant):
    model = bcos_kernels.convert(_original(name))
    want = _grads(model, X)
    if name == "resnet18":
        model.layer2 = Checkpointed(model.layer2, reentrant)
    else:
        model[0].transformer = Checkpointed(model[0].transformer, reentrant)
    got = _grads(model, X)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_moves_both_ways(name):
    original = _original(name)
    converted = bcos_kernels.convert(copy.deepcopy(original))
    with torch.no_grad():  # a trained converted model: its parameters moved away from the original's
        for p in converted.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fresh = _original(name)
    fresh.load_state_dict(converted.state_dict())  # converted -> original
    back = bcos_kernels.convert(_original(name))
    back.load_state_dict(fresh.state_dict())  # original -> converted
    want = _grads(converted, X)
    for model in (fresh, back):
        for a, b in zip(want, _grads(model, X)):
            torch.testing.assert_close(b, a, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_whole_model_save_load_deepcopy_and_pickle(name):
    model = bcos_kernels.convert(_original(name))
    if name == "resnet18":
        # the original ResNet keeps its norm factory, the `bcos` package's NoBias wrapper (a local function, which
        # pickle refuses); its forward never reads it
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            pickle.dumps(_original(name))
        del model._norm_layer
    want = _grads(model, X)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.load(buffer, weights_only=False)
    copies = [loaded, copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    for other in copies:
        assert type(other) is type(model)
        for a, b in zip(want, _grads(other, X)):
            torch.testing.assert_close(b, a, atol=0, rtol=0)
