"""Per-sample negative log-likelihoods: what the trainer minimises and what the analyzer estimates with.

Classification: cross-entropy on logits. Regression with Gaussian noise of known sigma:
0.5 * |y - f(x)|^2 / sigma^2 per sample (the log-normaliser is a constant and omitted), because plain
MSE rescales the loss by 2 sigma^2 and with it the LLC estimate.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def nll_loss(task: str, noise_sigma: float | None = None, reduction: str = "mean") -> LossFn:
    if task == "classification":
        return lambda out, y: F.cross_entropy(out, y, reduction=reduction)
    if task == "regression":
        if noise_sigma is None or noise_sigma <= 0:
            raise ValueError("a regression loss needs the noise sigma the data was generated with")
        scale = 0.5 / float(noise_sigma) ** 2

        def gaussian_nll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            per_sample = scale * (out - y).pow(2).reshape(len(y), -1).sum(dim=1)
            return per_sample.mean() if reduction == "mean" else per_sample.sum() if reduction == "sum" else per_sample

        return gaussian_nll
    raise ValueError(f"unknown task {task!r}")


def loss_for(splits) -> LossFn:
    """The mean NLL for a dataset's task."""
    return nll_loss(splits.task, splits.noise_sigma)
