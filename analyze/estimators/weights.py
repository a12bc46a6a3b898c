"""`weights`: data-free spectra of every weight matrix (in the spirit of weightwatcher).

Per parameter with ndim >= 2 (conv kernels reshaped to (out, -1)): singular values in float64, spectral
and Frobenius norms, stable rank, and the power-law exponent alpha of the eigenvalue density of W^T W
(eigenvalues lambda = s^2), fitted as weightwatcher does with the `powerlaw` package: the continuous
MLE alpha = 1 + n / sum(log(lambda_i / xmin)) over the tail lambda >= xmin, with xmin the eigenvalue
that minimises the Kolmogorov-Smirnov distance between the tail and the fit (Clauset, Shalizi and
Newman 2009).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from analyze.estimators.base import Context, Estimator, EstimatorError, Option

COLUMNS = {"layer": "int64", "layer_name": str, "shape": str, "spectral_norm": float, "frobenius_norm": float,
           "stable_rank": float, "alpha": float, "xmin": float, "ks_distance": float, "n_tail": "int64",
           "n_eigenvalues": "int64"}


def fit_powerlaw(values: np.ndarray, min_tail: int = 5) -> tuple[float, float, float, int]:
    """(alpha, xmin, KS distance, tail size) of a continuous power law fitted to positive `values`.

    xmin runs over the distinct values that leave at least `min_tail` points in the tail; NaNs (and a
    tail size of 0) when no candidate does.
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    x = x[np.isfinite(x) & (x > 0)]
    n_all = len(x)
    logs = np.log(x)
    suffix = np.concatenate([np.cumsum(logs[::-1])[::-1], [0.0]])  # suffix[i] = sum(logs[i:])
    best = (math.nan, math.nan, math.inf, 0)
    for i in np.unique(x, return_index=True)[1]:
        n = n_all - i
        if n < min_tail:
            break
        log_ratio_sum = suffix[i] - n * logs[i]
        if log_ratio_sum <= 0:  # the whole tail equals xmin: no slope to fit
            continue
        alpha = 1.0 + n / log_ratio_sum
        fitted_cdf = 1.0 - np.exp((1.0 - alpha) * (logs[i:] - logs[i]))
        ranks = np.arange(n)
        ks = max(np.max(np.abs((ranks + 1) / n - fitted_cdf)), np.max(np.abs(ranks / n - fitted_cdf)))
        if ks < best[2]:
            best = (float(alpha), float(x[i]), float(ks), int(n))
    return best if best[3] else (math.nan, math.nan, math.nan, 0)


def matrix_spectrum(weight: torch.Tensor) -> np.ndarray:
    """Singular values (descending, float64) of a weight reshaped to (out, -1)."""
    matrix = weight.detach().to("cpu", torch.float64).reshape(weight.shape[0], -1)
    return torch.linalg.svdvals(matrix).numpy()


class Weights(Estimator):
    name = "weights"
    tables = ("weights",)
    needs_data = False
    options = (Option("min_tail", int, 5, "fewest eigenvalues in the power-law tail; alpha is NaN for smaller layers"),)

    def validate(self) -> None:
        if self.opts["min_tail"] < 2:
            raise EstimatorError("--weights-min-tail: must be at least 2")

    def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
        rows = []
        matrices = [(name, p) for name, p in ctx.model.named_parameters() if p.ndim >= 2]
        for index, (name, param) in enumerate(matrices):
            s = matrix_spectrum(param)
            spectral = float(s[0]) if len(s) else math.nan
            frobenius = float(np.sqrt(np.sum(s ** 2)))
            # Singular values below numpy's matrix-rank tolerance are numerically zero: no log of them.
            tol = spectral * max(param.shape[0], math.prod(param.shape[1:])) * np.finfo(np.float64).eps
            alpha, xmin, ks, n_tail = fit_powerlaw(s[s > tol] ** 2, self.opts["min_tail"])
            rows.append({"layer": index, "layer_name": name.removesuffix(".weight"),
                         "shape": "x".join(str(d) for d in param.shape), "spectral_norm": spectral,
                         "frobenius_norm": frobenius,
                         "stable_rank": frobenius ** 2 / spectral ** 2 if spectral > 0 else math.nan,
                         "alpha": alpha, "xmin": xmin, "ks_distance": ks, "n_tail": n_tail,
                         "n_eigenvalues": len(s)})
        return {"weights": pd.DataFrame(rows, columns=list(COLUMNS)).astype(COLUMNS)}
