"""`evaluate`: full-dataset loss and accuracy of a checkpoint on its train, validation and test splits."""

from __future__ import annotations

import pandas as pd
import torch

from analyze.estimators.base import Context, Estimator, EstimatorError, Option
from trainer.loop import mean_loss_and_accuracy

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

    def evaluate(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, classification: bool) -> tuple[float, float]:
        """Mean NLL (the training objective's per-sample loss) and accuracy; NaN accuracy for regression."""
        return mean_loss_and_accuracy(ctx.model, ctx.per_sample_loss, x, y, batch_size=self.opts["batch_size"],
                                      classification=classification, device=ctx.device)
