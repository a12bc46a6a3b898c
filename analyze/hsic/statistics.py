"""HSIC statistics of prepared kernels, and the information plane of a network's layers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from analyze.hsic.kernels import as_float64, center, center_unbiased, gaussian_kernel, linear_kernel

STATISTICS = ("biased", "unbiased", "normalized", "debiased", "pyglow")


def hsic_biased(K: Tensor, L: Tensor) -> float:
    """tr(K H L H) / (m - 1)^2 = <HKH, L> / (m - 1)^2."""
    m = K.shape[0]
    return float((center(K) * as_float64(L)).sum()) / (m - 1) ** 2


def hsic_pyglow(K: Tensor, L: Tensor) -> float:
    """PyGlow's statistic tr(K H L H) / (m - 1) = (m - 1) HSIC_b."""
    m = K.shape[0]
    return float((center(K) * as_float64(L)).sum()) / (m - 1)


def hsic_unbiased(K: Tensor, L: Tensor) -> float:
    """Song et al. (2012), literally: with K~, L~ the kernels with zeroed diagonals,
    [tr(K~L~) + 1'K~1 1'L~1 / ((m-1)(m-2)) - 2/(m-2) 1'K~L~1] / (m (m - 3)); O(m^2)."""
    m = K.shape[0]
    if m < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples, got {m}")
    Kt, Lt = as_float64(K).clone(), as_float64(L).clone()
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
