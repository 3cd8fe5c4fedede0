"""Backend "cuda" of the B-cos linear: backend "cpu"'s code (cpu.py) on cuBLAS and the extension's CUDA scale
kernels (the same torch.ops.bcos_kernels ops, registered for CUDA)."""

from bcos_kernels.ops.bcos_linear.cpu import backward, forward  # noqa: F401
