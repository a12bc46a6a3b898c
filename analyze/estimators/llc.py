"""`llc`: local learning coefficient and WBIC of each checkpoint by SGLD, with chain diagnostics.

Writes `llc` (one row per checkpoint) and `llc_chains` (every chain's loss trace, burn-in flagged).
See analyze/sgld.py for the sampler and analyze/llc_stats.py for the estimates and diagnostics.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch

from analyze.estimators.base import Context, Estimator, EstimatorError, Option
from analyze.llc_stats import summarize
from analyze.sgld import SAMPLERS, SGLDSettings, sample_losses

# Defaults chosen with `analyze calibrate` on the demo's checkpoints (README, "Calibrating the LLC").
DEFAULTS = dict(chains=4, draws=400, burnin=300, lr=3e-4, localization=100.0, batch_size=128)


def parse_nbeta(text: str, n: int) -> float:
    """'n/log n' (Watanabe's WBIC temperature) or a positive number."""
    if text.replace(" ", "") in ("n/logn", "n/log(n)"):
        return n / math.log(n)
    try:
        value = float(text)
    except ValueError:
        raise EstimatorError(f"--llc-nbeta: {text!r} is neither a number nor 'n/log n'") from None
    if not value > 0:
        raise EstimatorError(f"--llc-nbeta: {text!r} must be positive")
    return value


def full_loss(per_sample_loss, x: torch.Tensor, y: torch.Tensor, model, batch: int = 4096) -> float:
    """L_n(w*): mean loss over the whole training set, eval mode, float64 accumulation."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            total += per_sample_loss(model(x[i:i + batch]), y[i:i + batch]).double().sum().item()
    return total / len(y)


def chance_loss(splits, y: torch.Tensor) -> float:
    """The loss of knowing nothing: uniform class probabilities, or predicting the mean target."""
    if splits.task == "classification":
        return math.log(splits.outputs)
    centred = (y - y.mean(dim=0)).double()
    return float(0.5 * centred.pow(2).reshape(len(y), -1).sum(1).mean() / splits.noise_sigma ** 2)


class LLCEstimator(Estimator):
    name = "llc"
    tables = ("llc", "llc_chains")
    options = (
        Option("chains", int, DEFAULTS["chains"], "number of SGLD chains"),
        Option("draws", int, DEFAULTS["draws"], "kept draws per chain (after burn-in)"),
        Option("burnin", int, DEFAULTS["burnin"], "discarded steps per chain before the draws"),
        Option("lr", float, DEFAULTS["lr"], "SGLD step size eps"),
        Option("localization", float, DEFAULTS["localization"], "strength gamma of the pull back to the checkpoint"),
        Option("nbeta", str, "n/log n", "inverse temperature times n: a number, or 'n/log n' (WBIC's)"),
        Option("batch_size", int, DEFAULTS["batch_size"], "SGLD minibatch size; 0 = full-batch gradients"),
        Option("seed", int, 0, "seed of the chains' batches and noise"),
        Option("sampler", str, "sgld", "sgld, or rmsprop-sgld (diagonal RMSProp preconditioning, as devinterp's)",
               choices=SAMPLERS),
        Option("backend", str, "fast", "fast (this project's vmapped sampler) or devinterp (the reference)",
               choices=("fast", "devinterp")),
        Option("thin", int, 1, "keep every k-th step in llc_chains"),
    )

    def validate(self) -> None:
        o = self.opts
        for key in ("chains", "draws", "thin"):
            if o[key] < 1:
                raise EstimatorError(f"--llc-{key}: must be >= 1")
        if o["burnin"] < 0 or o["batch_size"] < 0:
            raise EstimatorError("--llc-burnin and --llc-batch-size must be >= 0")
        if not (o["lr"] > 0 and o["localization"] >= 0):
            raise EstimatorError("--llc-lr must be > 0 and --llc-localization >= 0")
        parse_nbeta(o["nbeta"], 100)  # syntax check; the value depends on n

    def settings(self, n: int) -> SGLDSettings:
        o = self.opts
        return SGLDSettings(lr=o["lr"], localization=o["localization"], nbeta=parse_nbeta(o["nbeta"], n),
                            chains=o["chains"], draws=o["draws"], burnin=o["burnin"],
                            batch_size=o["batch_size"], seed=o["seed"], sampler=o["sampler"])

    def sample(self, ctx: Context, settings: SGLDSettings) -> np.ndarray:
        x, y = ctx.splits.train.x.to(ctx.device), ctx.splits.train.y.to(ctx.device)
        if self.opts["backend"] == "devinterp":
            from analyze.devinterp_backend import sample_losses_devinterp

            return sample_losses_devinterp(ctx.model, ctx.per_sample_loss, x, y, settings)
        return sample_losses(ctx.model, ctx.per_sample_loss, x, y, settings)

    def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
        start = time.perf_counter()
        x, y = ctx.splits.train.x.to(ctx.device), ctx.splits.train.y.to(ctx.device)
        n = len(y)
        settings = self.settings(n)
        init = full_loss(ctx.per_sample_loss, x, y, ctx.model)
        traces = self.sample(ctx, settings)
        kept = traces[:, settings.burnin:]
        row = summarize(kept, init, settings.nbeta, n, chance_loss(ctx.splits, y))
        row.update(wbic_exact=bool(math.isclose(settings.nbeta, n / math.log(n)) and settings.localization == 0),
                   nbeta=settings.nbeta, lr=settings.lr, localization=settings.localization,
                   n_chains=settings.chains, n_draws=settings.draws, n_burnin=settings.burnin,
                   batch_size=settings.batch_size, n=n, backend=self.opts["backend"],
                   sampler=self.opts["sampler"], seconds=time.perf_counter() - start)
        steps = np.arange(traces.shape[1])[:: self.opts["thin"]]
        chains = pd.DataFrame({
            "chain": np.repeat(np.arange(settings.chains), len(steps)),
            "draw": np.tile(steps - settings.burnin, settings.chains),  # negative during burn-in
            "loss": traces[:, steps].reshape(-1),
        })
        chains["burnin"] = chains["draw"] < 0
        return {"llc": pd.DataFrame([row]), "llc_chains": chains}
