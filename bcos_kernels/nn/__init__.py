"""Drop-in modules (same arguments and state_dict keys as the original code)."""
from bcos_kernels.nn.bcos import (BcosConv2d, BcosConv2dV1, BcosConv2dWithScale, BcosifyConv2d, BcosifyLinear,
                                  BcosLinear, NormedConv2d, NormedLinear)

__all__ = ["BcosConv2d", "BcosConv2dV1", "BcosConv2dWithScale", "BcosLinear", "BcosifyConv2d", "BcosifyLinear",
           "NormedConv2d", "NormedLinear"]
