"""The fixed, seeded set of training samples that curvature is measured on, shared by `hessian` and
`fim` so that the same seed and size give the same samples in both; batches and eval mode."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from analyze.estimators.base import Context, EstimatorError

DTYPES = {"float32": torch.float32, "float64": torch.float64}
SAMPLES = 1280  # the default curvature sample: 10 batches of 128, as the study's Hessian (hessian, fim, llc stability)


def training_subset(ctx: Context, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed, seeded sample set (min(samples, n_train) training samples, in index order) on ctx.device.

    Shared by `hessian` and `fim`, so that the same seed and size give the same samples in both.
    The tensors are fresh copies (indexing), never views of the split.
    """
    if ctx.splits is None:
        raise EstimatorError("this estimator needs the checkpoint's data (ctx.splits is None)")
    train = ctx.splits.train
    n = len(train)
    if n == 0:
        raise EstimatorError("the training split is empty")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    idx = order[:min(int(samples), n)].sort().values
    return train.x[idx].to(ctx.device), train.y[idx].to(ctx.device)


def batches_of(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


@contextmanager
def eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
