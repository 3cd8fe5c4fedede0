"""LWTA's backend modules as this module's attributes (``_by_name.triton``), a lookup torch.compile can follow.

The front door calls its backend's ``draw_noise`` in code that torch.compile traces, and dynamo cannot trace the
import in :func:`bcos_kernels.backends.kernels`; reading an attribute a module lacks, it runs the module's
``__getattr__`` for real, so this module has no attributes but that one.
"""

from bcos_kernels import backends


def __getattr__(name: str):
    if name not in backends.OPS["lwta"]:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return backends.kernels("lwta", name)
