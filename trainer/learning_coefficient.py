"""Learning coefficients (real log canonical thresholds, RLCTs) of models where the answer is known in closed form.

- `regular(d)`: d / 2, the learning coefficient of a regular model with d parameters.
- `deep_linear(widths, rank)`: a bias-free deep linear network x -> W_L ... W_1 x, fitted with Gaussian noise
  to a true linear map of rank r that it can realise (r <= every width). `deep_linear_multiplicity` gives the
  order of the pole (the m in the free energy's (m - 1) log log n term).

Reference: M. Aoyagi, "Consideration on the learning efficiency of multiple-layered neural networks with linear
units", Neural Networks 172 (2024) 106132, Theorem 1 (Theorem 2 of the 2023 preprint, SSRN 4404877, whose
Theorem 1 is the L = 2 case: reduced rank regression, Aoyagi & Watanabe 2005).

Widths H_1 (input), H_2, ..., H_{L+1} (output): L weight matrices. With Delta_s = H_s - r, let Sigma be the
ell + 1 smallest Delta's (ell >= 1) such that

    max Sigma < min(rest),   sum Sigma >= ell * max Sigma,   sum Sigma < ell * min(rest)

(conditions on an empty rest hold vacuously). Sigma is unique. With S = sum Sigma and a = S mod ell,

    lambda = (-r^2 + r (H_1 + H_{L+1})) / 2 + a (ell - a) / (4 ell) - ell (ell - 1) / 4 * (S / ell)^2
             + 1/2 * sum_{sigma < k, both in Sigma} Delta_sigma Delta_k,
    multiplicity = a (ell - a) + 1.

(Aoyagi writes a = S - (M - 1) ell with M = ceil(S / ell); it differs from S mod ell only when ell divides S,
where both give a (ell - a) = 0.) The first term is half the dimension of the rank-r matrices of the product's
shape; the rest is the contribution of the rank-deficient "core" of widths Delta.

Lehalleur & Rimanyi, "Geometry of the fibers of the multiplication map of deep linear neural networks"
(arXiv 2411.19920), Thm 8.6, show lambda = codim(product^-1(B)) / 2, so 2 lambda is an integer and the core part
is invariant under any permutation of the widths.
"""

from __future__ import annotations

import operator
from fractions import Fraction
from typing import Sequence


def regular(d: int) -> float:
    """d / 2: the learning coefficient of a regular model with d parameters."""
    d = _integer(d, "the parameter count d")
    if d < 0:
        raise ValueError(f"the parameter count d must be >= 0, got {d}")
    return d / 2


def deep_linear(widths: Sequence[int], rank: int) -> float:
    """Learning coefficient of a bias-free deep linear network with layer widths [input, hidden..., output]
    on a true map of rank `rank` (Aoyagi 2024, Theorem 1)."""
    return float(_aoyagi(widths, rank)[0])


def deep_linear_multiplicity(widths: Sequence[int], rank: int) -> int:
    """The multiplicity (order) a (ell - a) + 1 that goes with `deep_linear` (Aoyagi 2024, Theorem 1)."""
    return _aoyagi(widths, rank)[1]


def _aoyagi(widths: Sequence[int], rank: int) -> tuple[Fraction, int]:
    widths, r = _check(widths, rank)
    deltas = sorted(h - r for h in widths)
    sigma = _sigma(deltas)
    ell, s = len(sigma) - 1, sum(sigma)
    a = s % ell
    pairs = sum(x * y for i, x in enumerate(sigma) for y in sigma[i + 1:])
    lam = (Fraction(r * (widths[0] + widths[-1] - r), 2) + Fraction(a * (ell - a), 4 * ell)
           - Fraction(ell * (ell - 1), 4) * Fraction(s, ell) ** 2 + Fraction(pairs, 2))
    return lam, a * (ell - a) + 1


def _sigma(deltas: list[int]) -> list[int]:
    """Aoyagi's Sigma: the ell + 1 smallest of the sorted `deltas`, for the one ell that meets all three
    conditions. Growing ell from 1 finds it; a tie across the cut fails `max < min(rest)`, so it is skipped.
    (At sum Sigma = ell * min(rest) the next ell gives the same lambda, so strict or not there is immaterial.)"""
    for ell in range(1, len(deltas)):
        sigma, rest = deltas[:ell + 1], deltas[ell + 1:]
        s = sum(sigma)
        if s >= ell * sigma[-1] and (not rest or (sigma[-1] < rest[0] and s < ell * rest[0])):
            return sigma
    raise AssertionError(f"no Sigma for {deltas}: Aoyagi's theorem says there always is one")


def _check(widths: Sequence[int], rank: int) -> tuple[list[int], int]:
    if isinstance(widths, (str, bytes)) or not hasattr(widths, "__len__"):
        raise ValueError(f"widths must be a list of layer widths [input, hidden..., output], got {widths!r}")
    if len(widths) < 2:
        raise ValueError(f"widths needs at least an input and an output width, got {list(widths)}")
    widths = [_integer(h, "a width") for h in widths]
    if min(widths) < 1:
        raise ValueError(f"every width must be >= 1, got {widths}")
    r = _integer(rank, "the rank")
    if not 0 <= r <= min(widths):
        raise ValueError(f"the rank must be in [0, min(widths)] = [0, {min(widths)}] for the network to "
                         f"realise the true map, got {r}")
    return widths, r


def _integer(x, what: str) -> int:
    if isinstance(x, bool):
        raise ValueError(f"{what} must be an integer, got {x!r}")
    try:
        return operator.index(x)  # ints and numpy integers, not floats
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {x!r}") from None
