"""One epoch of training and a full-split evaluation, on in-memory tensors."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from trainer.data import Split
from trainer.losses import LossFn


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}")
        self.step, self.loss = step, loss


@dataclass
class EpochResult:
    train_loss: float  # mean minibatch loss during the epoch (train mode), as the study logged it
    train_acc: float
    steps: list[dict] = field(default_factory=list)  # one row per optimizer step
    seconds: float = 0.0


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, data: Split,
                batch_size: int, generator: torch.Generator, *, epoch: int, first_step: int,
                on_step: Callable[[int], None] | None = None, progress=None) -> EpochResult:
    """Shuffle with `generator`, take one optimizer step per minibatch, log loss and update norm per step."""
    start = time.perf_counter()
    model.train()
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    # One buffer reused across steps for the update norm: a fresh clone per step costs page faults.
    previous = [p.clone() for p in params]
    order = torch.randperm(len(data), generator=generator).to(data.x.device)
    rows, loss_sum, correct, seen = [], 0.0, 0, 0
    step = first_step
    for begin in range(0, len(data), batch_size):
        idx = order[begin:begin + batch_size]
        xb, yb = data.x[idx], data.y[idx]
        torch._foreach_copy_(previous, params)
        optimizer.zero_grad(set_to_none=True)
        out = model(xb)
        loss = loss_fn(out, yb)
        value = loss.item()
        step += 1
        if not math.isfinite(value):
            raise NonFiniteLoss(step, value)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_sub_(previous, params)  # previous := old - new
            update_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(previous))).item()
            if out.ndim == 2 and yb.ndim == 1:
                correct += (out.argmax(1) == yb).sum().item()
        rows.append({"epoch": epoch, "step": step, "loss": value, "update_norm": update_norm,
                     "lr": optimizer.param_groups[0]["lr"]})
        loss_sum += value * len(idx)
        seen += len(idx)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{value:.4f}", refresh=False)
        if on_step is not None:
            on_step(step)
    acc = correct / seen if data.y.ndim == 1 else math.nan
    return EpochResult(loss_sum / seen, acc, rows, time.perf_counter() - start)


@torch.no_grad()
def mean_loss_and_accuracy(model: nn.Module, per_sample_loss: LossFn, x: torch.Tensor, y: torch.Tensor, *,
                           batch_size: int, classification: bool, device: torch.device | str | None = None,
                           sum_dtype: torch.dtype | None = torch.float64) -> tuple[float, float]:
    """Mean per-sample loss and accuracy (NaN for regression, or when the outputs are not finite) over
    x, y in batches, in eval mode; NaN for both on no samples. The trainer's `evaluate` and the analyzer's
    `evaluate` estimator both use it.

    sum_dtype: each batch's losses are summed in this dtype (float64: the mean does not depend on the
    batch size beyond float32 rounding); None sums in the loss's own dtype, as the trainer's logs always
    have (changing it would change the losses stored in every checkpoint, hence their hashes).
    device: where batches go first (None: they are already on the model's device).
    """
    n = len(y)
    if n == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    total, correct, finite = 0.0, 0, True
    try:
        for begin in range(0, n, batch_size):
            xb, yb = x[begin:begin + batch_size], y[begin:begin + batch_size]
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            out = model(xb)
            losses = per_sample_loss(out, yb)
            total += (losses if sum_dtype is None else losses.to(sum_dtype)).sum().item()
            if classification:
                correct += (out.argmax(1) == yb).sum().item()
                finite = finite and bool(torch.isfinite(out).all())
    finally:
        model.train(was_training)
    # argmax of NaN logits is class 0: an accuracy from non-finite outputs would look plausible
    return total / n, (correct / n if classification and finite else math.nan)


EVAL_BATCH = 2048  # samples per forward pass when the trainer evaluates a whole split


def evaluate(model: nn.Module, per_sample_loss: LossFn, data: Split, batch_size: int = EVAL_BATCH) -> tuple[float, float]:
    """Mean loss and accuracy (NaN for regression) over a whole split, in eval mode, as the logs record them."""
    return mean_loss_and_accuracy(model, per_sample_loss, data.x, data.y, batch_size=batch_size,
                                  classification=data.y.ndim == 1, sum_dtype=None)
