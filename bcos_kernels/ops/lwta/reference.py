"""Exact pure-PyTorch reference of DISCOVER's local winner-takes-all (the specification).

Source: github konpanousis/DISCOVER, ``models/ResNet/activations.py``
(``LWTA``, ``lwta_activation``, ``concrete_sample``). The steps below follow
that code one by one, so that results agree with it bit for bit given the same
uniform noise:

* The channels form consecutive blocks of ``U`` competitors: a 4-D input
  (N, C, H, W) competes along dim 1 (channel c = block * U + unit); a 2-D or
  3-D input ([..., D]) competes along its last dim.
* deterministic: the unit with the largest input of each block passes, the
  others give 0 (``x * one_hot(argmax)``); no gradient flows through the choice.
* stochastic: u ~ U[0, 1) (``torch.rand`` in the default dtype, or the given
  ``noise``), Gumbel noise ``g = -log(-log(u + 1e-5) + 1e-5)``,
  ``y_soft = softmax((x + g) / T)`` over the block,
  ``mask = (one_hot(argmax y_soft) - y_soft).detach() + y_soft`` (hard value,
  straight-through gradient), ``out = x * mask``.

Test time (``training=False``): the original module still samples -- noise is
drawn, the mask is hard, the straight-through gradient is kept -- and only the
temperature changes to ``LWTA.temp_test``, which the ResNet code fixes at
1.67 (:data:`TEST_TEMPERATURE`) whatever ``temp`` is. The forward value does
not depend on T at all (argmax of (x + g) / T is the argmax of x + g, up to
rounding), only the straight-through gradient does.

Original behaviours this reference leaves out, on purpose:

* ``temperature == 0`` takes a separate argmax branch in the original (which
  scatters along the last dim even for convs); the front door rejects T <= 0.
* the original re-draws the whole noise tensor when the Gumbel noise contains
  NaN/inf, and raises ``OverflowError`` when the mask has a NaN. For u in
  [0, 1) in fp32 or fp64 the noise is always finite (u + 1e-5 <= 1 + 1e-5 - ulp,
  so -log(u + 1e-5) + 1e-5 > 0), so the re-draw never happens; both checks
  would synchronise with the GPU on every call.
* the KL term is disabled in the original (``if False:``): its ``kl`` is 0.
* ``U == 1`` is a plain ReLU in the original *module*; the function itself
  (and this one) gives ``x * 1``. :class:`bcos_kernels.nn.LWTA` does the ReLU.

The DeiT variant vendored in DISCOVER's ``timm`` (eps 1e-8, test temperature
0.01, GELU for U == 1, no conv branch) is not what this reproduces.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

# The original's stabilising epsilon inside the Gumbel transform (ResNet code).
GUMBEL_EPS = 1e-5
# LWTA.temp_test in the ResNet code: the temperature at test time.
TEST_TEMPERATURE = 1.67
# LWTA's default training temperature.
DEFAULT_TEMPERATURE = 1.67


def competition_dim(x: torch.Tensor) -> int:
    """The dim whose channels compete: 1 for a 4-D (conv) input, the last dim otherwise."""
    return 1 if x.dim() == 4 else x.dim() - 1


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from uniforms, with the original's epsilons, in u's dtype."""
    return -torch.log(-torch.log(u + GUMBEL_EPS) + GUMBEL_EPS)


def _blocks(t: torch.Tensor, U: int) -> Tuple[torch.Tensor, int]:
    """The original's reshape into competition blocks, and the block (softmax) axis.

    2-D/3-D: [-1, D // U, U] (axis -1); 4-D: [-1, C // U, U, H, W] (axis 2).
    """
    if t.dim() in (2, 3):
        return t.reshape(-1, t.shape[-1] // U, U), -1
    return t.reshape(-1, t.shape[1] // U, U, t.shape[-2], t.shape[-1]), 2


def lwta(
    x: torch.Tensor,
    competitors: int,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    deterministic: bool = False,
    training: bool = True,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DISCOVER's LWTA on x of shape (N, C, H, W), (N, D) or (B, T, D).

    ``noise``: the uniforms u (same shape as x) to use instead of ``torch.rand``.
    ``training=False`` replaces ``temperature`` by :data:`TEST_TEMPERATURE`.
    """
    if x.dim() not in (2, 3, 4):
        raise ValueError(f"x must have 2, 3 or 4 dimensions, got shape {tuple(x.shape)}")
    U = competitors
    logits, axis = _blocks(x, U)
    if deterministic:
        winner = torch.argmax(logits, axis, keepdim=True)
        mask = torch.zeros_like(logits).scatter_(axis, winner, 1.0)
    else:
        T = temperature if training else TEST_TEMPERATURE
        if noise is None:
            u = torch.rand(logits.shape, device=logits.device)
        else:
            u = _blocks(noise, U)[0]
        y_soft = ((logits + gumbel(u)) / T).softmax(axis)
        winner = y_soft.max(axis, keepdim=True)[1]
        y_hard = torch.zeros_like(y_soft).scatter_(axis, winner, 1.0)
        mask = (y_hard - y_soft).detach() + y_soft
    return x * mask.reshape(x.shape)
