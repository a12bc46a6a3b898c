"""What a checkpoint that is not a stationary point does to the LLC estimate, in the quadratic model.

The LLC estimator samples the localized tempered posterior exp(-nbeta L(w) - gamma |w - w*|^2 / 2) around the
checkpoint w* and reports nbeta (E[L] - L(w*)). With L's gradient g and Hessian H at w* (the mean training loss),
and A = nbeta H + gamma I positive definite, that posterior is Gaussian with mean -A^-1 nbeta g and covariance
A^-1, and the estimate is

    (nbeta / 2) tr(H A^-1)                        the curvature's share (d / 2 at most, the regular answer)
  - (nbeta^2 / 2) (g'x + gamma |x|^2),  x = A^-1 g    the gradient's share: the chains slide downhill.

`gradient_offset` is that second term's size: how far below its curvature share the estimate is pulled at a
checkpoint where training has not stopped. Where A is not positive definite (gamma < -nbeta lambda_min) the
quadratic model has no stationary distribution at all: the chains keep descending; conjugate gradients then meet a
direction of curvature below -gamma / nbeta, which is reported instead (evidence that lambda_min lies below it,
on these samples). The Hessian products are exact (curvlinops, on the given samples); only the solve is iterative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from analyze.estimators.base import Context

BATCH = 4096  # samples per Hessian-product batch (memory), not a statistical choice


@dataclass(frozen=True)
class GradientOffset:
    """The quadratic model's downward shift of the LLC estimate (NaN where A is not positive definite), the
    gradient's norm, and where CG met negative curvature of A, the Rayleigh quotient p'Hp / |p|^2 of that
    direction (below -gamma / nbeta), else NaN."""
    offset: float
    grad_norm: float
    negative_curvature: float
    iterations: int
    relative_residual: float


def gradient_offset(ctx: "Context", nbeta: float, localization: float, samples: int | None = None,
                    seed: int = 0, rtol: float = 1e-3, max_iterations: int = 200) -> GradientOffset:
    """(nbeta^2 / 2) (g'x + gamma |x|^2), x = (nbeta H + gamma I)^-1 g, on `samples` seeded training samples (all
    of them by default: the shift is that of the full loss), by conjugate gradients to a relative residual
    `rtol`."""
    from analyze.curvature.operators import CurvlinopsOperator
    from analyze.curvature.samples import batches_of, eval_mode, training_subset

    x, y = training_subset(ctx, len(ctx.splits.train) if samples is None else samples, seed)
    op = CurvlinopsOperator(ctx.model, ctx.loss_fn, batches_of(x, y, BATCH), len(y), engine="hvp")
    try:
        with eval_mode(ctx.model):
            grads, _ = op.op.gradient_and_loss()
            g = torch.cat([t.reshape(-1) for t in grads]).to(torch.float64)
            return _offset(lambda v: op.matmat(v.to(op.dtype).unsqueeze(1)).squeeze(1).to(torch.float64), g, nbeta,
                           localization, rtol, max_iterations)
    finally:
        op.close()


def _offset(hvp, g: torch.Tensor, nbeta: float, gamma: float, rtol: float, max_iterations: int) -> GradientOffset:
    """CG on A x = g, A v = nbeta H v + gamma v, stopping at negative curvature of A (see the module)."""
    norm = float(g.norm())
    if norm == 0.0:
        return GradientOffset(0.0, 0.0, math.nan, 0, 0.0)
    x, r = torch.zeros_like(g), g.clone()
    p, rr = r.clone(), float(r @ r)
    for iteration in range(1, max_iterations + 1):
        Hp = hvp(p)
        pAp = nbeta * float(p @ Hp) + gamma * float(p @ p)
        if pAp <= 0.0:
            return GradientOffset(math.nan, norm, float(p @ Hp) / float(p @ p), iteration, math.sqrt(rr) / norm)
        step = rr / pAp
        x += step * p
        r -= step * (nbeta * Hp + gamma * p)
        rr_next = float(r @ r)
        if math.sqrt(rr_next) <= rtol * norm:
            rr = rr_next
            break
        p = r + (rr_next / rr) * p
        rr = rr_next
    offset = 0.5 * nbeta ** 2 * (float(g @ x) + gamma * float(x @ x))
    return GradientOffset(offset, norm, math.nan, iteration, math.sqrt(rr) / norm)
