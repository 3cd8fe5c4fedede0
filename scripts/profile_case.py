"""One benchmark case's forward+backward, for a profiler (ncu) to look at.

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \
        python scripts/profile_case.py bcos_conv2d "resnet50 layer1.0.conv2 3x3 64->64 @56" --provider triton

The case is looked up by its benchmark name (benchmarks/shapes.py; `--list` prints them) and built by the
benchmark suite's own builders, at the benchmark's batch (DAU layers: their GPU batch). The step runs `--warmup`
times first (Triton compiles, cuDNN picks its algorithms), then once more between cudaProfilerStart and
cudaProfilerStop, so `--profile-from-start off` sees that step alone. On a CPU the same step runs without the
profiler range (for checking this script).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import shapes  # noqa: E402
from test_bench_bcos import _conv_module, _linear_module  # noqa: E402
from test_bench_dau import _dau_module  # noqa: E402

OPS = ("bcos_conv2d", "bcos_linear", "dau_conv2d")


def _cases(op):
    # every shape, whatever this machine's default selection is (the DAU cases carry their GPU batch)
    return {
        "bcos_conv2d": shapes.ALL_BCOS_CONVS,
        "bcos_linear": shapes.ALL_BCOS_LINEARS,
        "dau_conv2d": shapes.select_dau_cases(True, False, True),
    }[op]


def build_step(op: str, case_name: str, provider: str, dtype: torch.dtype, device: torch.device, batch=None):
    """(module, input) of the named case, built by the benchmark suite's own builder for ``provider``."""
    by_name = {c.name: c for c in _cases(op)}
    if case_name not in by_name:
        raise SystemExit(f"unknown {op} case {case_name!r}; `--list {op}` prints the cases")
    c = by_name[case_name]
    if op == "bcos_conv2d":
        module = _conv_module(provider, c)
        x = torch.randn(batch or shapes.BCOS_CONV_BATCH, c.cin, c.hw, c.hw)
    elif op == "bcos_linear":
        module = _linear_module(provider, c)
        x = torch.randn(batch or shapes.BCOS_LINEAR_BATCH, c.rows, c.cin)
    else:
        module = _dau_module(provider, c)
        x = torch.randn(batch or c.batch, c.cin, c.hw, c.hw)
    module = module.to(device=device, dtype=dtype)
    return module, x.to(device=device, dtype=dtype).requires_grad_(True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("op", choices=OPS)
    parser.add_argument("case", nargs="?", help="the benchmark case name")
    parser.add_argument(
        "--provider",
        default="triton",
        help="a benchmark provider: a backend of ours (cpu, "
        "triton, cuda; torch for DAU), original, reference or plain (default: triton)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--batch", type=int, help="default: the benchmark's batch on this machine")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--list", action="store_true", help="print the case names of OP")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(c.name for c in _cases(args.op)))
        return
    if args.case is None:
        parser.error("the case name is required (or --list)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module, x = build_step(args.op, args.case, args.provider, getattr(torch, args.dtype), device, args.batch)
    out = module(x)
    grad = torch.randn_like(out)

    def step():
        module(x).backward(grad)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        step()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    else:
        step()
    print(
        f"profiled one fwd+bwd of {args.op} {args.case!r} ({args.provider}, {args.dtype}, x={list(x.shape)}) "
        f"on {device}"
    )


if __name__ == "__main__":
    main()
