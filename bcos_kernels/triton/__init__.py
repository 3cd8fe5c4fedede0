"""Backend "triton": fully fused kernels, one file per op family.

Imported lazily by the op front doors (only when backend "triton" runs), so that
importing bcos_kernels never imports triton, and so that TRITON_INTERPRET=1 (CPU
testing) can be set by the caller before any @triton.jit kernel is defined.
"""
