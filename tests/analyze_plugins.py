"""Estimators used by the analyzer's tests (imported by module:Class, also by dask workers via PYTHONPATH).

Not collected by pytest (no test_ prefix)."""

from __future__ import annotations

import os
import time

import pandas as pd
import torch

from analyze.estimators.base import Context, Estimator, Option


class Sleepy(Estimator):
    """Sleeps, then reports the checkpoint's parameter count: a slow task for the resume tests."""

    name = "sleepy"
    tables = ("sleepy",)
    needs_data = False
    options = (Option("seconds", float, 0.5, "time to sleep per checkpoint"),)

    def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
        time.sleep(self.opts["seconds"])
        n = sum(p.numel() for p in ctx.model.parameters())
        return {"sleepy": pd.DataFrame({"n_params": [n], "pid": [os.getpid()]})}


class FailOnEpoch(Estimator):
    """Raises on one epoch (the option, or the environment variable FAIL_EPOCH when set)."""

    name = "failing"
    tables = ("failing",)
    needs_data = False
    options = (Option("epoch", int, 1, "the epoch to fail on"),)

    def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
        fail_on = int(os.environ.get("FAIL_EPOCH", self.opts["epoch"]))
        if ctx.checkpoint.epoch == fail_on:
            raise RuntimeError(f"boom at epoch {ctx.checkpoint.epoch}")
        return {"failing": pd.DataFrame({"ok": [True]})}


class Norms(Estimator):
    """docs/estimators.md's example, verbatim."""

    name = "norms"                        # --estimators norms, flags --norms-<option>
    tables = ("norms",)                   # tables it writes (OUT/norms/)
    options = (Option("samples", int, 256, "training samples for the loss"),)
    needs_data = True                     # False: no dataset is loaded (ctx.splits is None)
    version = 1                           # bump when a code change alters results

    def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
        norm = torch.sqrt(sum(p.detach().double().pow(2).sum() for p in ctx.model.parameters())).item()
        x, y = ctx.splits.train.x[: self.opts["samples"]], ctx.splits.train.y[: self.opts["samples"]]
        with torch.no_grad():
            loss = ctx.loss_fn(ctx.model(x.to(ctx.device)), y.to(ctx.device)).item()
        return {"norms": pd.DataFrame({"norm": [norm], "train_loss_subset": [loss]})}
