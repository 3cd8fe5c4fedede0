"""Which form of the DAU backend "torch" computes, per shape: low-rank (lowrank.py) or materialised
(materialised.py), for the forward and for the backward separately.

Both forms do the same big GEMMs in number of multiply-adds, P*D*O*r give or take (P pixels, D = C*k*k, O DAUs,
rank r, R = r + 1 with a bias), but of different shapes:

- low-rank: a convolution with O*R filters over D inputs (long reductions: near peak FLOP rate), plus Gram terms
  of O*R^2 a pixel, which dominate at a high rank (r = 256: 6.6M a pixel vs 14.7M for the GEMM);
- materialised: z (P, r) times E^T (r, D*O): a reduction of only r per output, so writing and re-reading the
  (P, D*O) weights costs as much as the arithmetic, but no Gram terms and a cheap gradient of x.

The model: each GEMM takes max(flops / FLOP rate, bytes / bandwidth), each elementwise pass bytes / bandwidth,
summed. Only the ratio of the two rates decides; they are this package's 1-thread fp32 figures on a 2-core AMD
EPYC (a fit to 36 timed forwards and backwards of the 9 benchmark layers of CoDA-Nets, whose choices it
reproduces wherever the two forms differ by more than 10%). The choice is a function of the shape only, so a
shape always runs the same code. The backward of a materialised forward reads the forward's w when it is
materialised too (and then the forward keeps w: as much memory as the original's per-pixel weights, no more).
"""

from __future__ import annotations

from typing import NamedTuple

FLOPS_PER_S = 100e9  # fp32 GEMM rate (2 flops a multiply-add)
BYTES_PER_S = 16e9  # memory traffic of streaming passes
# Streaming passes over the big per-pixel tensor of each form (P*O*R or P*D*O elements) besides the GEMMs, as
# counted in the code and then fitted (allocations of fresh memory cost a pass or more on this machine).
LOWRANK_FORWARD_PASSES = 1.0
LOWRANK_BACKWARD_PASSES = 6.0
MATERIALISED_FORWARD_PASSES = 2.0
MATERIALISED_BACKWARD_PASSES = 12.0
KEPT_WEIGHTS_PASSES = 4.0  # the forward's w written to memory kept for the backward
FORMS = ("lowrank", "materialised")


class DauShape(NamedTuple):
    pixels: int  # N * Ho * Wo
    patch: int  # D = C * k * k
    daus: int  # O
    rank: int  # r
    has_bias: bool


class Plan(NamedTuple):
    forward: str
    backward: str

    @property
    def saves_weights(self) -> bool:
        """Whether the forward keeps w for the backward."""
        return self.forward == "materialised" and self.backward == "materialised"


PLANS = tuple(Plan(f, b) for f in FORMS for b in FORMS)


def _gemm(m: int, k: int, n: int) -> float:
    return max(2.0 * m * k * n / FLOPS_PER_S, 4.0 * (m * k + k * n + m * n) / BYTES_PER_S)


def _passes(elements: int, count: float) -> float:
    return 4.0 * elements * count / BYTES_PER_S


def forward_seconds(form: str, s: DauShape) -> float:
    p, d, o, r = s.pixels, s.patch, s.daus, s.rank
    big_r = r + int(s.has_bias)
    if form == "lowrank":
        # conv with r + O*R filters; G za (P, R) x (R, O*R); the two batched mat-vecs read y and G za
        return _gemm(p, d, r + o * big_r) + _gemm(p, big_r, o * big_r) + _passes(p * o * big_r, LOWRANK_FORWARD_PASSES)
    # z; w = z E^T + b; num (reads w); the norm (reads w, writes and reads its squares)
    return _gemm(p, d, r) + _gemm(p, r, d * o) + _passes(p * d * o, MATERIALISED_FORWARD_PASSES) + _passes(p * d, 2)


def backward_seconds(form: str, s: DauShape, saved_weights: bool) -> float:
    p, d, o, r = s.pixels, s.patch, s.daus, s.rank
    big_r = r + int(s.has_bias)
    z_conv = 2 * _gemm(p, r, d)  # the gradients of x and rank_weight through z
    if form == "lowrank":
        # y again; G za; M = sum dq za za^T; the gradients of x and of the filters through y; dy, dqz built
        return (
            _gemm(p, d, o * big_r)
            + _gemm(p, big_r, o * big_r)
            + _gemm(o * big_r, p, big_r)
            + 2 * _gemm(p, o * big_r, d)
            + _passes(p * o * big_r, LOWRANK_BACKWARD_PASSES)
            + z_conv
        )
    rebuild = 0.0 if saved_weights else _gemm(p, r, d * o)
    # w dnum (reads w); dw built (reads w, writes dw, then read and written once more); db (reads dw);
    # dE = dw^T z; dz = dw E; the patches unfolded and folded
    return (
        rebuild
        + _passes(p * d * o, MATERIALISED_BACKWARD_PASSES + (KEPT_WEIGHTS_PASSES if saved_weights else 0.0))
        + _gemm(d * o, p, r)
        + _gemm(p, d * o, r)
        + _passes(p * d, 4)
        + z_conv
    )


def plan_seconds(plan: Plan, s: DauShape) -> float:
    return forward_seconds(plan.forward, s) + backward_seconds(plan.backward, s, plan.saves_weights)


def choose(s: DauShape, needs_backward: bool = True) -> Plan:
    """The plan with the least modelled time; ties go to the low-rank form (less memory). Without a backward
    (inference) only the forward counts and w is not kept."""
    if not needs_backward:
        fwd = min(FORMS, key=lambda f: (forward_seconds(f, s), f != "lowrank"))
        return Plan(fwd, "lowrank")
    return min(PLANS, key=lambda pl: (plan_seconds(pl, s), pl.forward != "lowrank", pl.backward != "lowrank"))
