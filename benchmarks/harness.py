"""Timing and memory measurement shared by the benchmark suites.

Time ("median_ms", "iqr_ms"): bcos_kernels.timing.measure, i.e.
torch.utils.benchmark.Timer.blocked_autorange on the CPU and triton.testing.do_bench
(CUDA events) on the GPU: the median and interquartile range of the per-call times.
Modes: "fwd" one forward; "fwd+bwd" a forward and its backward; "bwd" the backward
of ONE forward, replayed with retain_graph=True (neither timer has an untimed
per-call setup, and our autograd functions keep what they need in save_for_backward).
Memory ("peak_mem_mb"):
  - GPU: torch.cuda.max_memory_allocated() during one forward+backward, minus
    what was allocated before it (inputs and parameters excluded);
  - CPU: there is no allocator high-water mark, so we report the memory a
    training step keeps alive between forward and backward: the bytes of the
    distinct storages saved for backward (torch.autograd.graph.saved_tensors_hooks)
    plus the output, excluding the inputs and parameters themselves. That is the
    quantity that limits the batch size; it is the same for every mode.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch
import torch._functorch.config as functorch_config

import bcos_kernels
from bcos_kernels.timing import Timing, measure

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from originals import bcos_installed, torchvision_installed  # noqa: E402

SMOKE = os.environ.get("BCOS_BENCH_SMOKE") == "1"
# BCOS_BENCH_THREADS=n pins torch's intra-op threads (on small shared VMs, 2-thread parallel regions showed
# 8-16 ms scheduling jitter that swamps the kernels; the committed CPU results say which count they used).
if os.environ.get("BCOS_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BCOS_BENCH_THREADS"]))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODES = ("fwd", "bwd", "fwd+bwd")
# bf16 only on a GPU: the CPU backends' bf16 is for checkpoints and correctness, not what the CPU run compares.
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# The "bwd" mode runs the backward of one forward graph again and again (retain_graph=True); a compiled graph
# that donates its saved buffers to the backward refuses that, so the compiled providers run without donation.
functorch_config.donated_buffer = False
# torch.compile of the baseline: skipped in smoke runs (compiling takes far longer than a smoke run may).
COMPILE = not SMOKE
# How long measure() samples each case: a smoke run only proves the code runs.
MIN_RUN_TIME_S = 0.01 if SMOKE else 0.2

# What each op's baseline is. The bcos package's modules are the original code ("original"); the other papers'
# code is not installable, so their baseline is our exact reference of it, labelled "reference".
_ORIGINAL_OPS = ("bcos_conv2d", "bcos_linear", "model:bcos")
_REFERENCE_OF = {
    "dau_conv2d": "bcos_kernels.ops.dau_conv2d.reference.dau_conv2d_original: exact re-implementation of "
    "moboehle/CoDA-Nets CoDAConv2d(DAUWeights) (materialises the per-pixel weights like the original)",
    "lwta": "bcos_kernels.ops.lwta.reference.lwta: exact re-implementation of konpanousis/DISCOVER's LWTA activation",
    "class_specific_gate": "bcos_kernels.ops.class_specific_gate.reference.class_specific_gate: exact "
    "re-implementation of hyliang96/CSGCNN's LearnableMaskLayer",
    "model:coda": "CoDA-Net CIFAR-10 9L (make_coda_net) whose layers run the DAU reference above",
}


def baseline_providers(op: str) -> List[str]:
    """The baseline of ``op`` and its torch.compile: "original"/"original_compiled" where the original code is
    importable here, else "reference"/"reference_compiled" (our exact reference, never called "original")."""
    name = "original" if op in _ORIGINAL_OPS and bcos_installed() else "reference"
    return [name] + ([f"{name}_compiled"] if COMPILE else [])


def our_providers(op: str) -> List[str]:
    """Every backend of ours that can run ``op`` on DEVICE in this process ("reference" is a baseline, not ours)."""
    return [b for b in bcos_kernels.available_backends(DEVICE, op) if b != "reference"]


def reference_backend(op: str) -> str:
    """The backend of our modules that runs the exact reference of ``op`` (the "reference" provider): "reference"
    where the registry has it, else the older name "torch"."""
    return "reference" if "reference" in bcos_kernels.available_backends(DEVICE, op) else "torch"


def baseline_description() -> dict:
    """For the results JSON: what "original" and "reference" were in this run."""
    if bcos_installed():
        bcos = f"bcos {importlib.metadata.version('bcos')} (PyPI) modules and models"
        if not torchvision_installed():
            bcos += (
                "; bcos.models.resnet imported with a stand-in torchvision.ops.StochasticDepth (torchvision is "
                "missing; the published ResNets never build it)"
            )
    else:
        bcos = "bcos not installed: bcos ops ran against our reference, labelled reference"
    return {
        "original": bcos,
        **{f"reference ({op})": text for op, text in _REFERENCE_OF.items()},
        "plain": "a plain op of the same shape (conv2d / linear / relu / per-channel multiply): the limit",
        "plain_channels_last": "the plain conv2d with module and input channels_last; the ratio to plain takes the "
        "faster of the two layouts",
        "original_channels_last, cpu_channels_last": "the original module and ours (backend cpu) with module and input "
        "channels_last; base and ours take the faster layout of each",
        "memory": "GPU: torch.cuda.max_memory_allocated over a forward+backward minus what was allocated before; "
        "CPU: bytes saved for backward plus the output (inputs and parameters excluded)",
    }


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Workload:
    """A forward closure over fixed inputs; ``leaves`` are the tensors that receive gradients."""

    forward: Callable[[], torch.Tensor]
    leaves: Sequence[torch.Tensor]

    def backward(self, out: torch.Tensor, grad: torch.Tensor, retain_graph: bool = False):
        torch.autograd.grad(out, list(self.leaves), grad, retain_graph=retain_graph)


def run_mode(work: Workload, mode: str, min_run_time_s: float = MIN_RUN_TIME_S) -> Timing:
    """Time one mode (see the module docstring) after one warm-up forward+backward."""
    out = work.forward()
    grad = torch.randn_like(out)
    work.backward(out, grad, retain_graph=mode == "bwd")
    if mode == "fwd":
        fn = work.forward
    elif mode == "bwd":

        def fn():
            work.backward(out, grad, retain_graph=True)
    elif mode == "fwd+bwd":

        def fn():
            work.backward(work.forward(), grad)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return measure(fn, device=DEVICE, min_run_time_s=min_run_time_s)


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.device)


def peak_memory_mb(work: Workload, exclude: Sequence[torch.Tensor]) -> float:
    """See the module docstring."""
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = work.forward()
        work.backward(out, torch.ones_like(out))
        del out
        sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    excluded = {_storage_key(t) for t in exclude}
    saved: dict = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and not t.is_meta:
            key = _storage_key(t)
            if key not in excluded:
                saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = work.forward()
    total = sum(saved.values())
    if _storage_key(out) not in saved:
        total += out.untyped_storage().nbytes()
    return total / 2**20


@dataclass
class Record:
    op: str
    case: str
    dtype: str
    mode: str
    provider: str
    median_ms: float
    iqr_ms: float
    peak_mem_mb: float
    shape: str


RECORDS: List[Record] = []


class Fn(torch.nn.Module):
    """A function as a module (for ops whose original is a function)."""

    def __init__(self, fn, *params: torch.nn.Parameter):
        super().__init__()
        self.fn = fn
        self.params = torch.nn.ParameterList(params)

    def forward(self, *args):
        return self.fn(*args)


_modules: dict = {}  # (op, case, dtype, provider) -> module: the modes of a case share one (compiled) module


def bench(
    op: str,
    case: str,
    dtype: torch.dtype,
    mode: str,
    provider: str,
    build,
    inputs,
    shape: str,
    grad_inputs=None,
    min_run_time_s: float = MIN_RUN_TIME_S,
):
    """Time ``build(provider)(*inputs)`` in ``mode`` and record it with its memory.

    ``build`` makes the module once per (op, case, dtype, provider); "*_compiled" providers get the module
    ``build`` returns for the provider without the suffix, compiled with torch.compile.
    ``grad_inputs``: the inputs that receive gradients (default: the floating point ones).
    """
    key = (op, case, dtype, provider)
    if key not in _modules:
        module = build(provider.removesuffix("_compiled")).to(DEVICE)
        if dtype.is_floating_point:
            module = module.to(dtype)
        if provider.endswith("_compiled"):
            torch._dynamo.reset()
            module = torch.compile(module)
        _modules[key] = module
    module = _modules[key]
    if grad_inputs is None:
        grad_inputs = [t for t in inputs if t.is_floating_point()]
    for t in grad_inputs:
        t.requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]
    work = Workload(lambda: module(*inputs), [*grad_inputs, *params])
    timing = run_mode(work, mode, min_run_time_s)
    mem = peak_memory_mb(work, [*inputs, *params])
    RECORDS.append(Record(op, case, str(dtype)[6:], mode, provider, timing.median_ms, timing.iqr_ms, mem, shape))
