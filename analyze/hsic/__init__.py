"""HSIC and CKA in O(m^2) memory (algorithms.md section 4): `kernels` (kernel matrices, median heuristic,
centring) and `statistics` (the HSIC statistics, the information plane).

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
"""

from analyze.hsic.kernels import (MEDIAN_PAIRS, as_float64, center, center_unbiased, delta_kernel,
                                  gaussian_from_sq_dists, gaussian_kernel, linear_kernel, median_sigma,
                                  pairwise_sq_dists)
from analyze.hsic.statistics import (STATISTICS, Prepared, hsic, hsic_biased, hsic_normalized, hsic_pyglow,
                                     hsic_unbiased, information_plane, prepare, statistic)

__all__ = ["MEDIAN_PAIRS", "STATISTICS", "Prepared", "as_float64", "center", "center_unbiased", "delta_kernel",
           "gaussian_from_sq_dists", "gaussian_kernel", "hsic", "hsic_biased", "hsic_normalized", "hsic_pyglow",
           "hsic_unbiased", "information_plane", "linear_kernel", "median_sigma", "pairwise_sq_dists", "prepare",
           "statistic"]
