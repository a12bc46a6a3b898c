"""`evaluate`: full-dataset loss and accuracy of a checkpoint on its train, validation and test splits."""

from __future__ import annotations

import math

import pandas as pd
import torch

from analyze.estimators.base import Context, Estimator, EstimatorError, Option

SPLITS = ("train", "val", "test")


class Evaluate(Estimator):
    name = "evaluate"
    tables = ("evaluate",)
    options = (Option("batch_size", int, 4096, "samples per forward pass (memory only; results do not depend on it)"),)

    def validate(self) -> None:
        if self.opts["batch_size"] < 1:
            raise EstimatorError("--evaluate-batch-size: must be at least 1")

    def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
        rows = []
        for split in SPLITS:
            data = ctx.splits.split(split)
            loss, acc = self.evaluate(ctx, data.x, data.y, classification=ctx.splits.task == "classification")
            rows.append({"split": split, "loss": loss, "accuracy": acc, "n": len(data)})
        return {"evaluate": pd.DataFrame(rows).astype({"split": str, "loss": float, "accuracy": float, "n": "int64"})}

    @torch.inference_mode()
    def evaluate(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, classification: bool) -> tuple[float, float]:
        """Mean NLL (the training objective's per-sample loss) and accuracy; NaN accuracy for regression."""
        n = len(y)
        if n == 0:
            return math.nan, math.nan
        total, correct, finite = 0.0, 0, True
        size = self.opts["batch_size"]
        for start in range(0, n, size):
            xb, yb = x[start:start + size].to(ctx.device), y[start:start + size].to(ctx.device)
            out = ctx.model(xb)
            # sum in float64 so the mean does not depend on the batch size beyond float32 rounding
            total += ctx.per_sample_loss(out, yb).double().sum().item()
            if classification:
                correct += (out.argmax(dim=1) == yb).sum().item()
                finite = finite and bool(torch.isfinite(out).all())
        # argmax of NaN logits is class 0: an accuracy of non-finite outputs would look plausible, so NaN
        return total / n, (correct / n if classification and finite else math.nan)
