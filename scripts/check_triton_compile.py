"""Compile every Triton kernel of bcos_kernels for real GPUs (sm_80, sm_90), without a GPU.

The interpreter (TRITON_INTERPRET=1) proves the kernels compute the right thing, but it runs tl.dot and friends
in numpy and accepts code that the GPU compiler rejects (dot tiles under 16, type mismatches, layouts). This
script runs the real launchers on *meta* tensors (shapes and strides, no data), intercepts each kernel launch,
and hands the kernel with its actual argument types and compile-time constants to triton.compile for each
target: the whole GPU pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with ptxas) runs on the CPU. It also
checks that the shared memory each compiled kernel asks for fits the target.

    python scripts/check_triton_compile.py          # CI set (sm_90); exit status 1 if anything fails
    python scripts/check_triton_compile.py --full   # sm_80 and sm_90, fp16 too, more layers and modes
"""

from __future__ import annotations

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions, not interpreted ones

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# (name, target, max shared memory per block in bytes)
TARGETS = [("sm_80", GPUTarget("cuda", 80, 32), 166912), ("sm_90", GPUTarget("cuda", 90, 32), 232448)]
TYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.uint8: "u8",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "i1",
}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


class CompileOnly:
    """Replaces JITFunction.run: compiles for every target instead of launching."""

    def __init__(self):
        self.seen = {}
        self.failures = []

    def run(self, fn: JITFunction, args, kwargs):
        options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        names = fn.arg_names
        values = dict(zip(names, args))
        values.update(kwargs)
        missing = [n for n in names if n not in values]
        if missing:
            raise TypeError(f"{fn.__name__}: missing arguments {missing}")
        constexpr_idx = {p.num for p in fn.params if p.is_constexpr}
        signature, constexprs = {}, {}
        for i, name in enumerate(names):
            if i in constexpr_idx:
                signature[name] = "constexpr"
                constexprs[(i,)] = values[name]
            else:
                signature[name] = _arg_type(values[name])
        key = (
            fn.__name__,
            tuple(sorted(signature.items())),
            tuple(sorted(constexprs.items())),
            tuple(sorted(options.items())),
        )
        if key in self.seen:
            return
        for target_name, target, max_shared in TARGETS:
            label = f"{fn.__name__} [{target_name}] " + ", ".join(f"{names[i[0]]}={v}" for i, v in constexprs.items())
            start = time.time()
            try:
                compiled = triton.compile(
                    ASTSource(fn, signature, constexprs=constexprs), target=target, options=dict(options)
                )
            except Exception as error:  # noqa: BLE001 (report every failure, then fail)
                self.failures.append(f"{label}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
                print("FAIL", label, flush=True)
                continue
            shared = compiled.metadata.shared
            if shared > max_shared:
                self.failures.append(f"{label}: needs {shared} bytes of shared memory, {target_name} has {max_shared}")
            self.seen[key] = (label, shared, time.time() - start)
            print(f"ok   {label}  (shared {shared} B, {time.time() - start:.1f}s)", flush=True)


def _bcos_cases(full: bool):
    """Launch the B-cos kernels (forward and backward) on meta tensors for representative layers: both K-loop
    forms of each GEMM kernel, MaxOut (2 and 3), every scale mode, fp32 and bf16 (and fp16 with --full), and the
    conv forward with a per-output-channel factor (channel_scale, in the layer's dtype)."""
    from bcos_kernels.ops.bcos_conv2d import triton as kernels

    meta = dict(device="meta")
    # (C, O, k, stride, padding, groups, max_out, N, H, channels_last)
    convs = [
        (64, 64, 3, 1, 1, 1, 1, 8, 56, True),  # ResNet 3x3, tap-by-tap loops
        (3, 64, 7, 2, 3, 1, 1, 2, 224, False),  # first layer: flat K
        (96, 96, 7, 1, 3, 96, 3, 2, 28, True),
    ]  # depthwise with MaxOut 3: flat K and flat J everywhere
    modes = [(2.0, False, False), (float("nan"), True, True)]  # (b, learnable b, detach)
    if full:
        convs += [
            (256, 64, 1, 1, 0, 1, 1, 8, 56, False),
            (128, 128, 3, 2, 1, 1, 2, 8, 28, True),
            (64, 64, 3, 1, 1, 1, 3, 2, 14, False),
        ]
        modes += [(1.0, False, False), (2.5, False, True)]
    dtypes = (torch.float32, torch.bfloat16) + ((torch.float16,) if full else ())
    for dtype in dtypes:
        for ci, (c, o, k, s, p, g, m, n, h, channels_last) in enumerate(convs):
            x = torch.empty(n, c, h, h, dtype=dtype, **meta)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            w = torch.empty(o * m, c // g, k, k, dtype=dtype, **meta)
            bias = torch.empty(o * m, dtype=dtype, **meta)
            geo = kernels.conv_geometry(x, w, (s, s), (p, p), (1, 1), g, m)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            for i, (b, learnable, detach) in enumerate(modes):
                b_tensor = torch.empty(1, **meta) if learnable else None
                out, lin, norm, winner = kernels.fused_forward(
                    x, w, bias, b_tensor, b, geo, True, 1.0, kernels.NORM_CONV, fmt
                )
                kernels.fused_backward(
                    torch.empty_like(out),
                    x,
                    w,
                    b_tensor,
                    lin,
                    norm,
                    winner,
                    b,
                    geo,
                    True,
                    1.0,
                    detach,
                    [True, True, True, learnable],
                    kernels.NORM_CONV,
                )
                # The epilogue's extra load and multiply (the backward does not change): without MaxOut and with
                # MaxOut 3 in CI (the first layer adds ~30 s of compiling and nothing new to the epilogue).
                if full or (i == 0 and ci != 1):
                    kernels.fused_forward(
                        x,
                        w,
                        bias,
                        b_tensor,
                        b,
                        geo,
                        True,
                        1.0,
                        kernels.NORM_CONV,
                        fmt,
                        channel_scale=torch.empty(o, dtype=dtype, **meta),
                    )
        # ViT-B/16 linears (the second with MaxOut 2)
        for d, f, m in ((768, 2304, 1), (3072, 768, 2)):
            x = torch.empty(64 * 197, d, dtype=dtype, **meta)
            w = torch.empty(f * m, d, dtype=dtype, **meta)
            geo = kernels.linear_geometry(x.shape[0], d, f * m, m)
            out, lin, norm, winner = kernels.fused_forward(
                x, w, None, None, 2.0, geo, True, 1.0, kernels.NORM_LINEAR, torch.contiguous_format
            )
            kernels.fused_backward(
                torch.empty_like(out),
                x,
                w,
                None,
                lin,
                norm,
                winner,
                2.0,
                geo,
                True,
                1.0,
                False,
                [True, True, False, False],
                kernels.NORM_LINEAR,
            )


def _lwta_csg_cases(full: bool):
    """LWTA (seeded, explicit noise, deterministic; NCHW, channels_last, [..., D]) and the class-specific gate."""
    from bcos_kernels.ops.class_specific_gate import GateBackwardOptions
    from bcos_kernels.ops.class_specific_gate import triton as gate
    from bcos_kernels.ops.lwta import LwtaOptions
    from bcos_kernels.ops.lwta import triton as lwta

    meta = dict(device="meta")
    dtypes = (torch.float32, torch.bfloat16) + ((torch.float16,) if full else ())
    for dtype in dtypes:
        for shape, nhwc in (((8, 64, 56, 56), False), ((8, 64, 56, 56), True), ((8, 197, 1536), False)):
            x = torch.empty(shape, dtype=dtype, **meta)
            if nhwc:
                x = x.contiguous(memory_format=torch.channels_last)
            for competitors in (2, 4, 3) if full else (2, 3):
                seed = torch.empty(1, dtype=torch.int64, **meta)
                noise = torch.empty(shape, dtype=torch.float32, **meta)
                for noise_arg, seed_arg in ((None, seed), (noise, None), (None, None)):
                    opts = LwtaOptions(competitors=competitors, temperature=1.0, backend="triton")
                    out, winner = lwta.forward(x, noise_arg, seed_arg, opts)
                    lwta.backward(torch.empty_like(out), x, noise_arg, seed_arg, winner, opts, nhwc=nhwc)
        for shape, nhwc in (((32, 2048, 4, 4), True), ((64, 512, 7, 7), False), ((16, 512), False)):
            x = torch.empty(shape, dtype=dtype, **meta)
            if nhwc:
                x = x.contiguous(memory_format=torch.channels_last)
            mask = torch.empty(shape[1], 1000, dtype=dtype, **meta)
            labels = torch.empty(shape[0], dtype=torch.int64, **meta)
            out = gate.forward(x, mask, labels)
            gate.backward(
                torch.empty_like(out),
                x,
                mask,
                labels,
                GateBackwardOptions(num_classes=1000, nhwc=nhwc, need_x=True, need_mask=True, backend="triton"),
            )


def _dau_cases(full: bool):
    """DAU forward and backward (training and explanation mode) on CoDA-Net CIFAR-10 / ImageNet-like layers."""
    from bcos_kernels.ops.dau_conv2d import DauOptions
    from bcos_kernels.ops.dau_conv2d import triton as dau

    meta = dict(device="meta")
    # (C, O, rank, k, stride, N, H, bias)
    layers = [(16, 32, 32, 3, 2, 64, 32, True), (64, 10, 448, 1, 1, 64, 8, False)]
    if full:
        layers += [(3, 64, 64, 7, 2, 8, 112, True)]
    dtypes = (torch.float32, torch.bfloat16) + ((torch.float16,) if full else ())
    for dtype in dtypes:
        for c, o, rank, k, stride, n, h, has_bias in layers:
            x = torch.empty(n, c, h, h, dtype=dtype, **meta)
            a = torch.empty(rank, c, k, k, dtype=dtype, **meta)
            e = torch.empty(c * k * k * o, rank, 1, 1, dtype=dtype, **meta)
            bias = torch.empty(c * k * k * o, dtype=dtype, **meta) if has_bias else None
            for norm in ("squash", "l2"):
                opts = DauOptions(
                    kernel_size=k,
                    stride=[stride, stride],
                    padding=[(k - 1) // 2] * 2,
                    norm=norm,
                    detach=False,
                    backend="triton",
                )
                out, z, s, w = dau.forward(x, a, e, bias, opts)
                for detach in (False, True):
                    needs = [True, not detach, not detach, not detach and has_bias]
                    dau.backward(
                        torch.empty_like(out), x, a, e, bias, z, s, out, w, opts._replace(detach=detach), needs
                    )


CASES = [_bcos_cases, _lwta_csg_cases, _dau_cases]


def main() -> int:
    full = "--full" in sys.argv[1:]
    if not full:
        del TARGETS[0]  # CI: sm_90 only; --full adds sm_80, fp16 and more layers and modes
    compiler = CompileOnly()
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: compiler.run(self, args, kwargs)
    start = time.time()
    for case in CASES:
        case(full)
    print(
        f"\n{len(compiler.seen)} kernel variants compiled for {', '.join(t[0] for t in TARGETS)} "
        f"in {time.time() - start:.0f}s"
    )
    if compiler.failures:
        print(f"{len(compiler.failures)} FAILURES:")
        for failure in compiler.failures:
            print("  " + failure)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
