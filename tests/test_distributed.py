"""Distributed training through our layers: a 2-process DDP run (gloo, CPU) of a converted B-cos ResNet-18 and a
converted B-cos ViT-Ti gives the parameter gradients of one process on the whole batch, and FSDP2
(``fully_shard``) trains the converted ViT for a few SGD steps with the losses of one process.

The ResNet runs in eval mode: its batch norms then use their running statistics, which is what makes one batch
split over two processes the same computation as the whole batch in one (DDP does not synchronise batch
statistics). The ViT has no batch norm and runs in training mode."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from originals import SMALL_MODELS, small_bcos_model

import bcos_kernels

WORLD = 2
BATCH = 4  # the global batch; each process gets BATCH // WORLD


def _model(name: str) -> torch.nn.Module:
    model = small_bcos_model(name)
    model = model.eval() if name == "resnet18" else model.train()
    return bcos_kernels.convert(model).double()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(BATCH, 6, 32, 32, generator=g, dtype=torch.float64)
    weights = torch.randn(BATCH, 10, generator=g, dtype=torch.float64)
    return x, weights


def _loss(model, x, weights):
    # a mean over the samples, as a training loss is: DDP's averaging of the two halves' gradients then gives the
    # gradient of the whole batch's mean
    return (model(x) * weights).sum(1).mean()


def _worker(rank: int, name: str, init_file: str, out_dir: str):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model(name))
        x, weights = _data()
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        _loss(model, x[part], weights[part]).backward()
        grads = {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}
        torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_ddp_two_processes_give_the_whole_batch_gradients(name, tmp_path):
    mp.spawn(_worker, args=(name, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    model = _model(name)
    x, weights = _data()
    _loss(model, x, weights).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    half = _model(name)
    _loss(half, x[: BATCH // WORLD], weights[: BATCH // WORLD]).backward()
    # the comparison means something: one process's own half alone gives other gradients
    assert any(not torch.allclose(p.grad, want[n]) for n, p in half.named_parameters() if p.grad is not None)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"grads{rank}.pt")
        assert got.keys() == want.keys()
        for key, grad in want.items():
            torch.testing.assert_close(got[key], grad, atol=1e-10, rtol=1e-8, msg=lambda m: f"rank {rank} {key}: {m}")


STEPS = 3


def _train(model, x, weights, steps=STEPS):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model, x, weights)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _fsdp_worker(rank: int, name: str, init_file: str, out_dir: str):
    from torch.distributed.fsdp import fully_shard

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model(name)
        for block in model[0].transformer:  # one shard group a block, then the rest
            fully_shard(block)
        fully_shard(model)
        from torch.distributed.tensor import DTensor

        assert all(isinstance(p, DTensor) for p in model.parameters())  # sharded, between the steps too
        x, weights = _data()
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        losses = _train(model, x[part], weights[part])
        dist.all_reduce(losses)  # the mean of the halves' losses: the whole batch's
        torch.save(losses / WORLD, os.path.join(out_dir, f"losses{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_fsdp2_trains_a_converted_vit_as_one_process(tmp_path):
    mp.spawn(_fsdp_worker, args=("vit_ti", str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    x, weights = _data()
    want = _train(_model("vit_ti"), x, weights)
    assert not torch.allclose(want[0], want[-1])  # the steps changed the model
    for rank in range(WORLD):
        torch.testing.assert_close(torch.load(tmp_path / f"losses{rank}.pt"), want, atol=1e-10, rtol=1e-8)
