"""Backend "cuda" of the LWTA op: backend "cpu"'s code (cpu.py: noise, seeds, layouts) on the extension's CUDA
kernels ``bcos_kernels::lwta_block_forward`` / ``lwta_block_backward`` (csrc/cuda/lwta_cuda.cu), one thread per
block each way; the same Philox stream as on the CPU, so a seed draws the same uniforms on both.

The seed stays a CPU tensor (the front door draws it on the CPU generator; ``torch.cuda.manual_seed`` alone does
not seed it): the kernels take it as a host integer, and a CUDA seed tensor would cost a device-to-host
synchronisation per call, forward and backward (a seed tensor on the GPU passed to the op directly still works,
at that cost). A CPU tensor in a compiled graph keeps CUDA graphs (mode="reduce-overhead") from capturing it:
inductor then runs that graph without them.
"""

from bcos_kernels.ops.lwta.cpu import KEEPS_X_WHEN_DETERMINISTIC, backward, draw_noise, forward, uniforms  # noqa: F401
