"""When does a difference between two estimates count, if their standard errors come from few replicates?
(Used where a difference is the claim: the branch verdicts. Where agreement is the evidence, as in calibrate's
plateau test, a wider bound would accept more, and that test keeps its normal bound: analyze/llc/calibrate.py.)

An LLC's standard error comes from the spread of C independent chains (C - 1 degrees of freedom), and with 2 or
4 chains that spread is itself very uncertain: on a deep linear net the 4-chain errors of one setting ranged
0.24-0.68 for a true 0.40 (docs/llc.md). "More than Z combined standard errors" is a normal bound, which holds
only when the errors are known. Here the bound is Student's t at the same coverage (Z = 2: 95.45%, two-sided),
with the Welch-Satterthwaite degrees of freedom of the difference: Z itself for errors with many degrees of
freedom (a Hessian trace over 1,280 samples), 2.5 at 4 chains per side, about 4.5-14 at 2 chains per side.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

Z = 2.0  # the bound for standard errors with infinitely many degrees of freedom


def welch_dof(se_a, dof_a, se_b, dof_b):
    """Welch-Satterthwaite degrees of freedom of the difference of two estimates (elementwise); infinite dof
    allowed. Where both errors are zero the difference is exact: infinite."""
    se_a, dof_a, se_b, dof_b = (np.asarray(x, dtype=float) for x in (se_a, dof_a, se_b, dof_b))
    va, vb = se_a ** 2, se_b ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = va ** 2 / dof_a + vb ** 2 / dof_b  # inf dof contributes 0
        dof = np.where(spread > 0, (va + vb) ** 2 / np.where(spread > 0, spread, 1.0), np.inf)
    return dof


def critical(dof, z: float = Z):
    """Student's t quantile with `dof` degrees of freedom at the coverage of `z` normal standard errors."""
    dof = np.asarray(dof, dtype=float)
    coverage = stats.norm.cdf(z)
    with np.errstate(invalid="ignore"):
        return np.where(np.isinf(dof), z, stats.t.ppf(coverage, np.where(np.isinf(dof), 1.0, dof)))


def difference_bound(se_a, dof_a, se_b, dof_b, z: float = Z):
    """(combined standard error, the multiple of it a difference must exceed, elementwise)."""
    se = np.hypot(np.asarray(se_a, dtype=float), np.asarray(se_b, dtype=float))
    return se, critical(welch_dof(se_a, dof_a, se_b, dof_b), z)
