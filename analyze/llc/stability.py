"""Is an SGLD step stable at this checkpoint? The stiffest direction decides.

On a quadratic, the Euler step of SGLD multiplies the direction of the Hessian's top eigenvalue lambda_max
by 1 - eps nbeta lambda_max / 2 per step: at eps nbeta lambda_max = 4 it no longer contracts, and well
before that its stationary variance is inflated by 1 / (1 - eps nbeta lambda_max / 4), which inflates the
LLC. `step_curvature` = eps x nbeta x lambda_max must stay below STABLE_STEP (variance inflated < 2x in
that direction). A saturating loss (cross-entropy) hides the instability from the loss trace, not its bias,
so the check is made on the Hessian, not on the chains.

lambda_max is the top eigenvalue of the mean loss's Hessian at the checkpoint on the Hessian estimator's
seeded samples (1,280 by default; Lanczos, a few seconds on a 269k-parameter MLP).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from analyze.estimators.base import Context

STABLE_STEP = 2.0


def top_hessian_eigenvalue(ctx: "Context", samples: int | None = None, seed: int = 0) -> float:
    """lambda_max of the mean loss's Hessian at the checkpoint, on the Hessian estimator's seeded samples (by
    default as many as the hessian estimator's default)."""
    from analyze.curvature.spectrum import top_eigenvalues

    return _hessian_eigenvalue(ctx, top_eigenvalues, samples, seed)


def bottom_hessian_eigenvalue(ctx: "Context", samples: int | None = None, seed: int = 0) -> float:
    """lambda_min of the same Hessian. Negative where the loss on these samples curves down at the checkpoint (not
    at a minimum, or a subsample's dip at one: -0.1 to -0.24 on the truth suite's deep linear nets at their
    minimum); then the localized potential nbeta L + gamma |w - w*|^2 / 2 curves down at w* unless
    gamma > -nbeta lambda_min (localization_margin), and where the full loss does too the chains descend. Slower
    than lambda_max: the bottom of a trained net's spectrum is a dense cluster near 0 (about a minute on the
    study's 269k-parameter MLP)."""
    from analyze.curvature.spectrum import bottom_eigenvalues

    return _hessian_eigenvalue(ctx, bottom_eigenvalues, samples, seed)


def localization_margin(localization: float, nbeta: float, lambda_min: float) -> float:
    """gamma + nbeta lambda_min: the smallest curvature of the localized tempered potential at w*. Negative: the
    localizer does not hold the chains against the loss's downward curvature."""
    return localization + nbeta * lambda_min


def relaxation_steps(lr, localization, nbeta, lambda_min):
    """1 / (eps (gamma + nbeta max(lambda_min, 0))): SGLD steps in which the spread of the chains along the
    flattest direction of the localized potential relaxes by a factor e. Near w* the update is an Ornstein-Uhlenbeck
    step, drift (eps/2)(nbeta H + gamma) (w - w*) and noise sqrt(eps), whose variance along an eigenvector of H with
    eigenvalue h relaxes as exp(-eps (gamma + nbeta h) t): a regular model's loss holds every direction (a few steps),
    while along a flat direction only the localizer does (1 / (eps gamma)). A negative lambda_min counts as 0: at a
    minimum it is a subsample's dip, and a checkpoint that is not at one is flagged by `not_at_minimum`. Scalars or
    arrays; infinite where nothing holds the flattest direction (gamma 0 on a singular model). A NaN lambda_min (not
    measured) counts as 0."""
    with np.errstate(divide="ignore"):
        return 1.0 / (np.asarray(lr) * (np.asarray(localization) + np.asarray(nbeta) * np.fmax(lambda_min, 0.0)))


def _hessian_eigenvalue(ctx: "Context", eigenvalues, samples: int | None, seed: int) -> float:
    from analyze.curvature.operators import CurvlinopsOperator
    from analyze.curvature.samples import SAMPLES, batches_of, eval_mode, training_subset

    samples = SAMPLES if samples is None else samples
    x, y = training_subset(ctx, samples, seed)
    op = CurvlinopsOperator(ctx.model, ctx.loss_fn, batches_of(x, y, samples), len(y), engine="hvp")
    try:
        with eval_mode(ctx.model):
            return eigenvalues(op, 1, seed)[0]
    finally:
        op.close()

