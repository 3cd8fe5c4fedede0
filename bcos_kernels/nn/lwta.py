"""Drop-in replacement of DISCOVER's ``LWTA`` module (``models/ResNet/activations.py``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from bcos_kernels.ops.lwta import lwta
from bcos_kernels.ops.lwta.reference import TEST_TEMPERATURE


class LWTA(nn.Module):
    """Stochastic local winner-takes-all over blocks of ``U`` consecutive channels.

    Same constructor arguments, defaults and attributes as the original
    (``U``, ``temp``, ``temp_test`` = 1.67, ``deterministic``, ``kl_flag``,
    ``inplace``; no parameters or buffers, so state_dicts are unaffected):

    * ``U == 1``: ReLU, as the original module.
    * training: temperature ``temp``; eval: ``temp_test`` (1.67), still
      sampling noise with a hard mask and a straight-through gradient, as the
      original. ``deterministic=True``: plain argmax, train and eval.
    * ``inplace`` and ``kl`` are accepted and ignored: the original never works
      in place, and its KL term is disabled (``kl_`` is set to 0.0 after each
      forward, as the original). ``temp`` may be changed between steps (the
      original's training script anneals it); it must stay > 0.

    ``backend``: as :func:`bcos_kernels.ops.lwta` (None: env var / auto).
    """

    def __init__(
        self,
        inplace: bool = True,
        deterministic: bool = False,
        U: int = 16,
        kl: bool = True,
        temp: float = 1.67,
        *,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.inplace = inplace
        self.temp_test = TEST_TEMPERATURE
        self.temp = temp
        self.kl_flag = kl
        self.deterministic = deterministic
        self.U = U
        self.backend = backend
        self.kl_ = 0.0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.U == 1:
            return torch.relu(input)
        self.kl_ = 0.0
        # The op's training flag only picks its fixed test temperature; pass ours so that a changed
        # temp_test is honoured.
        temperature = self.temp if self.training else self.temp_test
        return lwta(
            input,
            self.U,
            temperature=temperature,
            deterministic=self.deterministic,
            training=True,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"U={self.U}, temp={self.temp}, temp_test={self.temp_test}, "
            f"deterministic={self.deterministic}, kl={self.kl_flag}"
        )
