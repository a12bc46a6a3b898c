"""The exact trace of the Gauss-Newton diagonal (BackPACK's DiagGGNExact), and when it equals Tr(H).

For networks that are piecewise linear in every single weight (Linear/Conv layers, ReLU/LeakyReLU/
Identity/MaxPool/AvgPool/Flatten/Dropout in eval mode, no shared layers) with cross-entropy or the
Gaussian NLL, the Hessian's diagonal equals the Gauss-Newton diagonal (the second derivative of f
along one weight is zero almost everywhere), so Tr(H) is one DiagGGNExact pass.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Callable

import numpy as np
from torch import nn


def leaf_modules(model: nn.Module) -> list[nn.Module] | None:
    """The leaf modules in call order when `model` is (nested) plain nn.Sequential, else None."""
    if type(model) is not nn.Sequential:
        return [model] if not list(model.children()) else None
    leaves: list[nn.Module] = []
    for child in model:
        sub = leaf_modules(child)
        if sub is None:
            return None
        leaves.extend(sub)
    return leaves


# Layers through which the network stays piecewise linear in each single weight (a.e.).
PIECEWISE_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU, nn.LeakyReLU, nn.Identity,
                    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                    nn.Flatten, nn.Dropout)


def ggn_diagonal_applies(model: nn.Module) -> bool:
    """True when diag(Hessian) = diag(GGN) for this model with CE or Gaussian NLL (see module docstring)."""
    leaves = leaf_modules(model)
    if not leaves:
        return False
    if any(type(m) not in PIECEWISE_LINEAR for m in leaves):
        return False
    with_params = [m for m in leaves if any(True for _ in m.parameters(recurse=False))]
    # A layer used twice makes f quadratic in its weights; a Dropout must be in eval mode.
    return len({id(m) for m in with_params}) == len(with_params) and not any(
        isinstance(m, nn.Dropout) and m.training for m in leaves)


def diag_ggn_trace(model: nn.Module, task: str, sigma: float | None, loss_fn: Callable,
                   batches: list, n: int) -> float:
    """Trace of the exact Gauss-Newton diagonal of the mean NLL, by BackPACK's DiagGGNExact."""
    return diag_ggn_batch_traces(model, task, sigma, loss_fn, batches, n).sum() / n


def subsample_stderr(batch_sums: np.ndarray, batches: list) -> float:
    """Standard error of the mean-per-sample trace from per-batch sums (batch means, size-weighted): how
    far the trace on these samples may lie from the trace on the whole training set. NaN with one batch."""
    sizes = np.array([len(yb) for _, yb in batches], dtype=float)
    if len(sizes) < 2:
        return math.nan
    means = batch_sums / sizes
    mean = batch_sums.sum() / sizes.sum()
    # variance of a ratio estimator over clusters (batches of i.i.d. samples)
    var = np.sum((sizes / sizes.mean()) ** 2 * (means - mean) ** 2) / (len(sizes) * (len(sizes) - 1))
    return float(math.sqrt(var))


def diag_ggn_batch_traces(model: nn.Module, task: str, sigma: float | None, loss_fn: Callable,
                          batches: list, n: int) -> np.ndarray:
    """Per batch, the sum over its samples of each sample's Gauss-Newton trace (n x the mean NLL's scale).

    Runs on a deep copy (BackPACK's `extend` installs hooks and stores inputs on the modules it extends).
    Raises ValueError when `loss_fn` is not the task's NLL as trainer.losses defines it.
    """
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    net = extend(copy.deepcopy(model).eval())
    if task == "classification":
        criterion, scale = extend(nn.CrossEntropyLoss(reduction="sum")), 1.0 / n
    elif task == "regression":
        # 0.5 |y - f|^2 / sigma^2 = sum-MSE * 0.5 / sigma^2; BackPACK's MSELoss Hessian is 2 I.
        criterion, scale = extend(nn.MSELoss(reduction="sum")), 0.5 / (float(sigma) ** 2 * n)
    else:
        raise ValueError(f"unknown task {task!r}")
    sums = []
    for xb, yb in batches:
        out = net(xb)
        target = yb if task == "classification" else yb.reshape(out.shape)
        loss = criterion(out, target)
        expected = loss_fn(out.detach(), yb).item()
        got = loss.item() * scale * n / len(xb)
        if not math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-6):
            raise ValueError(f"ctx.loss_fn ({expected:.6g}) is not the {task} NLL ({got:.6g})")
        with backpack(DiagGGNExact()), warnings.catch_warnings():
            # the first layer's full backward hook fires with no input gradient: expected here
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        total = 0.0
        for p in net.parameters():
            if p.requires_grad:
                total += p.diag_ggn_exact.double().sum().item()
                del p.diag_ggn_exact
            p.grad = None
        sums.append(total * scale * n)
    return np.array(sums)
