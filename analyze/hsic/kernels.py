"""Kernel matrices for HSIC in O(m^2) memory, float64: pairwise distances, the median heuristic,
Gaussian/linear/delta kernels, and centring (see analyze.hsic for the statistics).

Median heuristic (`median_sigma`), two conventions, both numpy-style medians (the mean of the two
middle values when the count is even):
    pairs="offdiag" (the estimator's default): sigma = median of the pairwise distances |a_i - a_j|
        over i != j (the diagonal zeros excluded);
    pairs="all": sigma = sqrt(median of all m^2 squared distances, the m diagonal zeros included),
        the convention of Kornblith et al.'s CKA code; with scale=0.5 (sigma^2 = 0.5^2 * median) it
        gives the reference 'Gaussian CKA 0.65483' of algorithms.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MEDIAN_PAIRS = ("offdiag", "all")


def as_float64(a: Tensor) -> Tensor:
    """a as a float64 tensor (no copy when it already is one)."""
    a = torch.as_tensor(a)
    return a.to(torch.float64) if a.dtype != torch.float64 else a


def _as_rows(a: Tensor) -> Tensor:
    """(m, ...) -> (m, d) float64; a 1-D tensor is m samples of dimension 1."""
    a = as_float64(a)
    return a.reshape(a.shape[0], -1) if a.ndim != 2 else a


# --------------------------------------------------------------------------------------------- kernels
def pairwise_sq_dists(a: Tensor) -> Tensor:
    """(m, m) squared Euclidean distances between the rows of `a` (flattened to (m, d)), float64.

    Gram identity on column-centred rows (distances are translation invariant; centring reduces the
    cancellation in |a|^2 + |b|^2 - 2 a.b), clamped at 0, with an exact zero diagonal."""
    a = _as_rows(a)
    a = a - a.mean(dim=0, keepdim=True)
    gram = a @ a.T
    norms = torch.diagonal(gram).clone()
    d2 = gram.mul_(-2.0).add_(norms[:, None]).add_(norms[None, :]).clamp_(min=0.0)
    d2.fill_diagonal_(0.0)
    return d2


def _np_median(values: Tensor) -> float:
    """numpy.median of a 1-D tensor (mean of the two middle values for an even count), by selection."""
    n = values.numel()
    if n == 0:
        return math.nan
    if n % 2:
        return float(torch.kthvalue(values, n // 2 + 1).values)
    lo = float(torch.kthvalue(values, n // 2).values)
    hi = float(torch.kthvalue(values, n // 2 + 1).values)
    return 0.5 * (lo + hi)


def median_sigma(d2: Tensor, pairs: str = "offdiag", scale: float = 1.0) -> float:
    """Median-heuristic bandwidth from an (m, m) squared-distance matrix (see the module docstring).

    offdiag: scale * median{|a_i - a_j| : i != j}   (each unordered pair counted twice; the median of
             the doubled list equals the median over i < j)
    all:     scale * sqrt(median{|a_i - a_j|^2 : all i, j})   (m diagonal zeros included)
    """
    m = d2.shape[0]
    if pairs == "offdiag":
        if m < 2:
            return math.nan
        off = d2.reshape(-1)[1:].reshape(m - 1, m + 1)[:, :-1].reshape(-1)  # the m(m-1) off-diagonal entries
        n = off.numel()  # even; sqrt is monotone, so select on squared distances and average the roots
        lo = float(torch.kthvalue(off, n // 2).values)
        hi = float(torch.kthvalue(off, n // 2 + 1).values)
        return scale * 0.5 * (math.sqrt(lo) + math.sqrt(hi))
    if pairs == "all":
        return scale * math.sqrt(_np_median(d2.reshape(-1)))
    raise ValueError(f"median pairs must be one of {MEDIAN_PAIRS}, not {pairs!r}")


def gaussian_from_sq_dists(d2: Tensor, sigma: float) -> Tensor:
    """exp(-d2 / (2 sigma^2)); sigma = 0 gives the limit 1[d2 == 0] (e.g. a constant representation)."""
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number >= 0, not {sigma!r}")
    if sigma == 0:
        return (d2 == 0).to(torch.float64)
    return torch.exp(d2 * (-0.5 / sigma ** 2))


def gaussian_kernel(a: Tensor, sigma: float | str = "median", *, median_pairs: str = "offdiag",
                    median_scale: float = 1.0) -> tuple[Tensor, float]:
    """Gaussian kernel matrix of the rows of `a` and the sigma used.

    sigma: an absolute bandwidth, or "median" for `median_sigma(d2, median_pairs, median_scale)`."""
    d2 = pairwise_sq_dists(a)
    if isinstance(sigma, str):
        if sigma != "median":
            raise ValueError(f"sigma must be a number or 'median', not {sigma!r}")
        sigma = median_sigma(d2, median_pairs, median_scale)
    sigma = float(sigma)
    return gaussian_from_sq_dists(d2, sigma), sigma


def linear_kernel(a: Tensor) -> Tensor:
    a = _as_rows(a)
    return a @ a.T


def delta_kernel(labels: Tensor) -> Tensor:
    """1[y_i = y_j] for integer labels (shape (m,)) or rows of any tensor (equal rows)."""
    y = torch.as_tensor(labels)
    if y.ndim != 1:  # rows -> integer ids of the distinct rows
        y = torch.unique(y.reshape(y.shape[0], -1), dim=0, return_inverse=True)[1]
    return (y[:, None] == y[None, :]).to(torch.float64)


# ------------------------------------------------------------------------------------------ centring
def center(K: Tensor) -> Tensor:
    """H K H (double centring) without forming H."""
    K = as_float64(K)
    return K - K.mean(dim=0, keepdim=True) - K.mean(dim=1, keepdim=True) + K.mean()


def center_unbiased(K: Tensor) -> Tensor:
    """U(K) with <U(K), U(L)> = m (m - 3) HSIC_u(K, L) (the U-centring of Kornblith et al.'s code).

    Zero the diagonal, subtract from row i and column j the means r_i = (sum_j K~_ij) / (m - 2) minus
    sum(r) / (2 (m - 1)), and zero the diagonal again."""
    m = K.shape[0]
    if m < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples, got {m}")
    U = as_float64(K).clone()
    U.fill_diagonal_(0.0)
    means = U.sum(dim=0) / (m - 2)
    means -= means.sum() / (2 * (m - 1))
    U -= means[:, None]
    U -= means[None, :]
    U.fill_diagonal_(0.0)
    return U
