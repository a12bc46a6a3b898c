"""HSIC and CKA in O(m^2) memory: kernels, centring and the HSIC statistics (algorithms.md section 4).

All functions take and return torch tensors and compute in float64 (inputs are converted). Memory is
O(m^2 + m d) for m samples of dimension d: pairwise squared distances use the Gram identity
|a|^2 + |b|^2 - 2 a.b on column-centred features (never an m x m x d broadcast).

Statistics, for m x m kernel matrices K and L and H = I - 11^T / m:

    biased      HSIC_b = tr(K H L H) / (m - 1)^2                                   (Gretton et al. 2005)
    unbiased    HSIC_u = [tr(K~L~) + 1'K~1 1'L~1 / ((m-1)(m-2)) - 2/(m-2) 1'K~L~1] / (m (m - 3))
                with K~, L~ the kernels with zeroed diagonals                       (Song et al. 2012)
    normalized  HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with the biased statistic  (CKA)
    debiased    the same with the unbiased statistic                                (debiased CKA)
    pyglow      tr(K H L H) / (m - 1) = (m - 1) HSIC_b                              (PyGlow's HSIC)

Batching over layers: `prepare(K, unbiased)` centres a kernel once (H K H, or the U-centring below for
the unbiased statistic), and `statistic(a, b, name)` is then one inner product of two prepared
kernels. The information plane of L layers needs L + 2 kernels and 2 L inner products.

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
from dataclasses import dataclass

import torch
from torch import Tensor

STATISTICS = ("biased", "unbiased", "normalized", "debiased", "pyglow")
MEDIAN_PAIRS = ("offdiag", "all")


def _f64(a: Tensor) -> Tensor:
    a = torch.as_tensor(a)
    return a.to(torch.float64) if a.dtype != torch.float64 else a


def _as_rows(a: Tensor) -> Tensor:
    """(m, ...) -> (m, d) float64; a 1-D tensor is m samples of dimension 1."""
    a = _f64(a)
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
    K = _f64(K)
    return K - K.mean(dim=0, keepdim=True) - K.mean(dim=1, keepdim=True) + K.mean()


def center_unbiased(K: Tensor) -> Tensor:
    """U(K) with <U(K), U(L)> = m (m - 3) HSIC_u(K, L) (the U-centring of Kornblith et al.'s code).

    Zero the diagonal, subtract from row i and column j the means r_i = (sum_j K~_ij) / (m - 2) minus
    sum(r) / (2 (m - 1)), and zero the diagonal again."""
    m = K.shape[0]
    if m < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples, got {m}")
    U = _f64(K).clone()
    U.fill_diagonal_(0.0)
    means = U.sum(dim=0) / (m - 2)
    means -= means.sum() / (2 * (m - 1))
    U -= means[:, None]
    U -= means[None, :]
    U.fill_diagonal_(0.0)
    return U


# ------------------------------------------------------------------------------------------ statistics
def hsic_biased(K: Tensor, L: Tensor) -> float:
    """tr(K H L H) / (m - 1)^2 = <HKH, L> / (m - 1)^2."""
    m = K.shape[0]
    return float((center(K) * _f64(L)).sum()) / (m - 1) ** 2


def hsic_pyglow(K: Tensor, L: Tensor) -> float:
    """PyGlow's statistic tr(K H L H) / (m - 1) = (m - 1) HSIC_b."""
    m = K.shape[0]
    return float((center(K) * _f64(L)).sum()) / (m - 1)


def hsic_unbiased(K: Tensor, L: Tensor) -> float:
    """Song et al. (2012), literally: with K~, L~ the kernels with zeroed diagonals,
    [tr(K~L~) + 1'K~1 1'L~1 / ((m-1)(m-2)) - 2/(m-2) 1'K~L~1] / (m (m - 3)); O(m^2)."""
    m = K.shape[0]
    if m < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples, got {m}")
    Kt, Lt = _f64(K).clone(), _f64(L).clone()
    Kt.fill_diagonal_(0.0)
    Lt.fill_diagonal_(0.0)
    trace = (Kt * Lt.T).sum()  # tr(K~ L~) = sum_ij K~_ij L~_ji
    sums = Kt.sum() * Lt.sum() / ((m - 1) * (m - 2))
    cross = Kt.sum(dim=0) @ Lt.sum(dim=1)  # 1' K~ L~ 1 = (1'K~)(L~1)
    return float(trace + sums - 2.0 / (m - 2) * cross) / (m * (m - 3))


def hsic_normalized(K: Tensor, L: Tensor, unbiased: bool = False) -> float:
    """CKA: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with the biased statistic (default) or, with
    unbiased=True, the unbiased one (debiased CKA). NaN when the denominator is not positive
    (e.g. a constant representation)."""
    a, b = prepare(K, unbiased), prepare(L, unbiased)
    return statistic(a, b, "debiased" if unbiased else "normalized")


def hsic(K: Tensor, L: Tensor, name: str = "biased") -> float:
    """One of STATISTICS for two kernel matrices."""
    if name not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, not {name!r}")
    unbiased = name in ("unbiased", "debiased")
    return statistic(prepare(K, unbiased), prepare(L, unbiased), name)


@dataclass
class Prepared:
    """A centred kernel, ready for inner products: H K H, or U(K) for the unbiased statistics."""

    mat: Tensor
    unbiased: bool
    self_dot: float  # <mat, mat>

    @property
    def m(self) -> int:
        return self.mat.shape[0]


def prepare(K: Tensor, unbiased: bool = False) -> Prepared:
    mat = center_unbiased(K) if unbiased else center(K)
    return Prepared(mat, unbiased, float((mat * mat).sum()))


def statistic(a: Prepared, b: Prepared, name: str) -> float:
    """The named statistic from two prepared kernels (both prepared with the matching centring)."""
    if a.m != b.m:
        raise ValueError(f"kernels of different sizes {a.m} and {b.m}")
    unbiased = name in ("unbiased", "debiased")
    if a.unbiased != unbiased or b.unbiased != unbiased:
        raise ValueError(f"statistic {name!r} needs kernels prepared with unbiased={unbiased}")
    m = a.m
    dot = float((a.mat * b.mat).sum())
    if name == "biased":
        return dot / (m - 1) ** 2
    if name == "pyglow":
        return dot / (m - 1)
    if name == "unbiased":
        return dot / (m * (m - 3))
    if name in ("normalized", "debiased"):
        denom = a.self_dot * b.self_dot
        return dot / math.sqrt(denom) if denom > 0 else math.nan
    raise ValueError(f"statistic must be one of {STATISTICS}, not {name!r}")


def information_plane(x: Tensor, y_kernel: Tensor, layers: list[Tensor], *, kernel: str = "gaussian",
                      sigma: float | str = "median", name: str = "normalized",
                      median_pairs: str = "offdiag") -> list[tuple[float, float]]:
    """(HSIC(X, T_l), HSIC(Y, T_l)) for every layer output T_l, given a kernel matrix for Y.

    The kernels of X and Y are centred once; each layer's kernel is computed and centred once and
    used for both coordinates. Memory: a few m x m matrices plus one layer's activations."""
    unbiased = name in ("unbiased", "debiased")

    def kern(a: Tensor) -> Tensor:
        if kernel == "linear":
            return linear_kernel(a)
        return gaussian_kernel(a, sigma, median_pairs=median_pairs)[0]

    px, py = prepare(kern(x), unbiased), prepare(y_kernel, unbiased)
    out = []
    for t in layers:
        pt = prepare(kern(t), unbiased)
        out.append((statistic(pt, px, name), statistic(pt, py, name)))
    return out
