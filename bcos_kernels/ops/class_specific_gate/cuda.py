"""Backend "cuda" of the class-specific gate: backend "cpu"'s code (cpu.py) on the extension's CUDA kernels
``bcos_kernels::csg_gate_forward`` / ``csg_gate_backward`` (csrc/cuda/csg_cuda.cu): one gather-multiply kernel
forward; backward one pass for grad_x and the per-sample sums, then a segmented sum by label, deterministic, no
atomics.
"""

from bcos_kernels.ops.class_specific_gate.cpu import backward, forward  # noqa: F401
