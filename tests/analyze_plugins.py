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


class SlowNorms(Estimator):
    """Sleeps, then reports each parameter tensor's norm: deterministic rows from a slow task (for the
    fault tests). With ANALYZE_TEST_STARTED set, first drops a file `<pid>-<run>-<epoch>-<step>` there."""

    name = "slownorms"
    tables = ("slownorms",)
    needs_data = False
    options = (Option("seconds", float, 0.5, "time to sleep per checkpoint"),)

    def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
        folder = os.environ.get("ANALYZE_TEST_STARTED")
        if folder:
            c = ctx.checkpoint
            with open(os.path.join(folder, f"{os.getpid()}-{c.run}-{c.epoch}-{c.step}"), "w"):
                pass
        time.sleep(self.opts["seconds"])
        rows = [{"tensor": name, "norm": p.detach().double().norm().item()} for name, p in ctx.model.named_parameters()]
        return {"slownorms": pd.DataFrame(rows)}


class Crash(Estimator):
    """Kills its own worker process (SIGKILL) on checkpoints of epoch `epoch` every time, and on those of
    epoch `once_epoch` only the first time (a flag file in ANALYZE_TEST_FLAGS remembers it)."""

    name = "crash"
    tables = ("crash",)
    needs_data = False
    options = (Option("epoch", int, 1, "epoch whose tasks always kill their worker"),
               Option("once_epoch", int, 2, "epoch whose tasks kill their worker on the first attempt only"))

    def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
        import signal

        c = ctx.checkpoint
        if c.epoch == self.opts["epoch"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if c.epoch == self.opts["once_epoch"]:
            flag = os.path.join(os.environ["ANALYZE_TEST_FLAGS"], f"{c.run}-{c.epoch}-{c.step}")
            if not os.path.exists(flag):
                open(flag, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        return {"crash": pd.DataFrame({"survived": [True]})}


class Big(Estimator):
    """A large, incompressible table (random floats seeded by the checkpoint): for the full-disk tests."""

    name = "big"
    tables = ("big",)
    needs_data = False
    options = (Option("rows", int, 200_000, "rows of random float64"),)

    def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
        import numpy as np

        seed = int(ctx.checkpoint.hash[:8], 16)
        return {"big": pd.DataFrame({"x": np.random.default_rng(seed).standard_normal(self.opts["rows"])})}


class EscapingTable(Estimator):
    """Declares a table name that would be a path out of the output folder: must be refused."""

    name = "escaping"
    tables = ("../../outside",)
    needs_data = False

    def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
        return {"../../outside": pd.DataFrame({"x": [1]})}


class BrokenConfig(Estimator):
    """A bug in an estimator's own code outside its run (config raises): analyze's unexpected-error path."""

    name = "brokenconfig"
    tables = ("brokenconfig",)
    needs_data = False

    def config(self):
        raise RuntimeError("a bug in config()")

    def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
        return {}
