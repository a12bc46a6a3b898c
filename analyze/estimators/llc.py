"""`llc`: local learning coefficient and WBIC of each checkpoint by SGLD, with chain diagnostics.

Writes `llc` (one row per checkpoint) and `llc_chains` (every chain's loss trace, burn-in flagged).
See analyze/llc/sampler.py for the sampler and analyze/llc/statistics.py for the estimates and diagnostics.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import torch

from analyze.estimators.base import Context, Estimator, EstimatorError, Option
from analyze.llc.statistics import healthy, summarize
from analyze.llc.sampler import SAMPLERS, SGLDSettings, sample_losses
from analyze.llc.stability import top_hessian_eigenvalue
from trainer.truth import true_learning_coefficient

# Defaults that carry over from n = 10^3 to 6 x 10^4 (docs/llc.md; scripts/validate_llc.py measures them):
# - the step is relative to nbeta: the drift (eps/2) nbeta grad L moves by the same amount at every n;
# - the localization is absolute: it sets how far the chains roam along flat directions (1/sqrt(gamma), a
#   matter of the weights' scale, not of n), and its pull against the likelihood (gamma / nbeta) fades as n grows;
# - plain minibatch gradient noise heats the chains in proportion to eps x nbeta^2 / batch, so a fixed batch
#   overestimates at large n (+55% at batch 128 on linear regression at n = 60,000), and the batch that avoids
#   it (AUTO_BATCH x eps x nbeta^2, about nbeta) is expensive there. Control-variate gradients (SGLD-CV) take
#   the noise out near w*, so a small batch no longer heats at any n: they are the default, with `auto` =
#   the smaller of AUTO_BATCH_CV and the plain rule (at small n the plain rule's batch is already small).
# - a fixed burn-in does not carry over across n on singular models: each step's noise is sqrt(eps), which
#   shrinks as 1 / sqrt(nbeta) at a fixed eps x nbeta, while a singular direction's posterior width (quartic and
#   higher loss) shrinks only as nbeta^(-1/4) or slower, so crossing it takes steps growing as sqrt(nbeta) or
#   faster. On the multiplicity-4 deep linear net at n = 59,940, 1,000 burn-in steps gave -18% and `auto`'s
#   6,130 -0% (docs/llc-localization.md). `auto` = AUTO_BURNIN x sqrt(nbeta / AUTO_BURNIN_NBETA), at least AUTO_BURNIN:
#   1,000 steps at n ~ 1,000, where they settle every case of the truth suite; 2,700 at n = 10,000; 6,100 at 60,000.
DEFAULTS = dict(chains=4, draws=1000, burnin="auto", lr="0.03/nbeta", localization="10", batch_size="auto",
                gradient="control-variate")
AUTO_BURNIN = 1000
AUTO_BURNIN_NBETA = 145.0  # n / log n at n = 1,000
GRADIENTS = ("control-variate", "minibatch")
AUTO_BATCH = 32
AUTO_BATCH_CV = 256


def _scaled(text: str, nbeta: float, flag: str, form: str) -> float:
    """A positive number, or '<c>/nbeta' (form '/') or '<c>*nbeta' (form '*'); the value at this nbeta."""
    compact = str(text).replace(" ", "")
    suffix = f"{form}nbeta"
    try:
        if compact.endswith(suffix):
            c = float(compact[:-len(suffix)])
            value = c / nbeta if form == "/" else c * nbeta
        else:
            value = c = float(compact)
    except ValueError:
        raise EstimatorError(f"{flag}: {text!r} is neither a number nor '<number>{suffix}'") from None
    if not (math.isfinite(c) and (c > 0 if form == "/" else c >= 0)):
        raise EstimatorError(f"{flag}: {text!r} must be {'positive' if form == '/' else 'non-negative'}")
    return value


def parse_lr(text: str, nbeta: float) -> float:
    """SGLD step eps: a number, or 'c/nbeta' (the drift's effective step eps x nbeta is then c at every n)."""
    return _scaled(text, nbeta, "--llc-lr", "/")


def parse_localization(text: str, nbeta: float) -> float:
    """Localization gamma: a number, or 'c*nbeta' (gamma / nbeta, its weight against the likelihood, is c)."""
    return _scaled(text, nbeta, "--llc-localization", "*")


def parse_batch_size(text: str, lr: float, nbeta: float, n: int, control_variate: bool = False) -> int:
    """Minibatch: a whole number (0 = full batch), or 'auto': AUTO_BATCH x eps x nbeta^2 rounded up, at most n,
    and with control-variate gradients at most AUTO_BATCH_CV."""
    if str(text).strip() == "auto":
        plain = min(n, max(1, math.ceil(AUTO_BATCH * lr * nbeta ** 2)))
        return min(plain, AUTO_BATCH_CV) if control_variate else plain
    return _whole_number(text, "--llc-batch-size", " (0 = full batch)")


def parse_burnin(text, nbeta: float) -> int:
    """Burn-in steps: a whole number, or 'auto' (AUTO_BURNIN x sqrt(nbeta / AUTO_BURNIN_NBETA), at least
    AUTO_BURNIN: see DEFAULTS)."""
    if str(text).strip() == "auto":
        return max(AUTO_BURNIN, round(AUTO_BURNIN * math.sqrt(nbeta / AUTO_BURNIN_NBETA)))
    return _whole_number(text, "--llc-burnin")


def _whole_number(text, flag: str, zero_means: str = "") -> int:
    """A whole number >= 0 for an option that also takes 'auto' (handled by the caller), or a one-line error."""
    try:
        value = int(text)
    except ValueError:
        raise EstimatorError(f"{flag}: {text!r} is neither a whole number nor 'auto'") from None
    if value < 0:
        raise EstimatorError(f"{flag}: {text!r} must be >= 0{zero_means}")
    return value


def parse_nbeta(text: str, n: int) -> float:
    """'n/log n' (Watanabe's WBIC temperature), 'n' (temperature 1) or a positive number."""
    if text.replace(" ", "") in ("n/logn", "n/log(n)"):
        return n / math.log(n)
    if text.strip() == "n":
        return float(n)
    try:
        value = float(text)
    except ValueError:
        raise EstimatorError(f"--llc-nbeta: {text!r} is neither a number, 'n/log n' nor 'n'") from None
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
    # 2: between-chain standard errors, drift, relative step and localization; 3: control variates;
    # 4: the step's stability at the checkpoint (lambda_max, step_curvature) and the `healthy` verdict;
    # 5: burn-in 'auto' by default (grows as sqrt(nbeta)), burnin_option recorded
    version = 5
    tables = ("llc", "llc_chains")
    options = (
        Option("chains", int, DEFAULTS["chains"], "number of SGLD chains"),
        Option("draws", int, DEFAULTS["draws"], "kept draws per chain (after burn-in)"),
        Option("burnin", str, DEFAULTS["burnin"], "discarded steps per chain before the draws: a whole number, or "
               f"'auto': {AUTO_BURNIN} x sqrt(nbeta / {AUTO_BURNIN_NBETA:g}), at least {AUTO_BURNIN} (1,000 at "
               "n ~ 1,000, 6,100 at n = 60,000: chains need longer to spread through a singular model's flat "
               "directions as n grows)"),
        Option("lr", str, DEFAULTS["lr"], "SGLD step size eps: a number, or 'c/nbeta' (eps x nbeta = c, the same "
               "effective step at every n)"),
        Option("localization", str, DEFAULTS["localization"], "strength gamma of the pull back to the checkpoint: "
               "a number, or 'c*nbeta' (gamma / nbeta = c at every n)"),
        Option("nbeta", str, "n/log n", "inverse temperature times n: a number, 'n/log n' (WBIC's) or 'n' "
               "(temperature 1)"),
        Option("batch_size", str, DEFAULTS["batch_size"], "SGLD minibatch size: a number (0 = full-batch gradients), "
               f"or 'auto': {AUTO_BATCH} x eps x nbeta^2, at most n (plain minibatch noise then heats the chains by the "
               f"same few percent at every n and step), and at most {AUTO_BATCH_CV} with control-variate gradients"),
        Option("gradient", str, DEFAULTS["gradient"], "control-variate (SGLD-CV: grad L_n(w*) + grad L_B(w) - "
               "grad L_B(w*), and the loss likewise; their noise vanishes at the checkpoint, so small batches do not "
               "heat the chains at any n; two passes per step; fast backend only) or minibatch (plain SGLD)",
               choices=GRADIENTS),
        Option("seed", int, 0, "seed of the chains' batches and noise"),
        Option("sampler", str, "sgld", "sgld, or rmsprop-sgld (diagonal RMSProp preconditioning, as devinterp's)",
               choices=SAMPLERS),
        Option("backend", str, "fast", "fast (this project's vmapped sampler) or devinterp (the reference)",
               choices=("fast", "devinterp")),
        Option("thin", int, 1, "keep every k-th step in llc_chains"),
        Option("stability", bool, True, "measure lambda_max, the Hessian's top eigenvalue at the checkpoint (Lanczos "
               "on 1,280 samples), and record step_curvature = eps x nbeta x lambda_max; `healthy` requires it < 2 "
               "(the step is stable in the stiffest direction, analyze/llc/stability.py)"),
    )

    def validate(self) -> None:
        o = self.opts
        for key in ("chains", "draws", "thin"):
            if o[key] < 1:
                raise EstimatorError(f"--llc-{key}: must be >= 1")
        # syntax checks only: the values depend on n
        parse_lr(o["lr"], 1.0)
        parse_localization(o["localization"], 1.0)
        parse_nbeta(o["nbeta"], 100)
        parse_burnin(o["burnin"], 1.0)
        parse_batch_size(o["batch_size"], 1.0, 1.0, 1)
        if o["gradient"] == "control-variate" and o["backend"] == "devinterp":
            raise EstimatorError("--llc-backend devinterp has no control-variate gradients: add --llc-gradient minibatch")

    def settings(self, n: int) -> SGLDSettings:
        o = self.opts
        nbeta = parse_nbeta(o["nbeta"], n)
        lr = parse_lr(o["lr"], nbeta)
        cv = o["gradient"] == "control-variate"
        return SGLDSettings(lr=lr, localization=parse_localization(o["localization"], nbeta), nbeta=nbeta,
                            chains=o["chains"], draws=o["draws"], burnin=parse_burnin(o["burnin"], nbeta),
                            batch_size=parse_batch_size(o["batch_size"], lr, nbeta, n, cv), seed=o["seed"],
                            sampler=o["sampler"], control_variate=cv)

    def sample(self, ctx: Context, settings: SGLDSettings) -> np.ndarray:
        x, y = ctx.splits.train.x.to(ctx.device), ctx.splits.train.y.to(ctx.device)
        if self.opts["backend"] == "devinterp":
            from analyze.llc.devinterp import sample_losses_devinterp

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
        # diverged chains are unhealthy whatever the step (and a checkpoint with non-finite weights has no spectrum)
        measure = self.opts["stability"] and not row["diverged"]
        row["lambda_max"] = top_hessian_eigenvalue(ctx) if measure else math.nan
        row["step_curvature"] = settings.lr * settings.nbeta * row["lambda_max"]
        row["healthy"] = healthy(row)
        meta = ctx.checkpoint.meta
        truth = true_learning_coefficient(meta["model_spec"], meta["dataset_spec"]) if "model_spec" in meta else None
        row.update(wbic_exact=bool(math.isclose(settings.nbeta, n / math.log(n)) and settings.localization == 0),
                   nbeta=settings.nbeta, lr=settings.lr, localization=settings.localization,
                   lr_option=self.opts["lr"], localization_option=self.opts["localization"],
                   batch_size_option=self.opts["batch_size"], burnin_option=str(self.opts["burnin"]),
                   lr_nbeta=settings.lr * settings.nbeta, localization_per_nbeta=settings.localization / settings.nbeta,
                   llc_truth=truth["value"] if truth else math.nan,
                   n_chains=settings.chains, n_draws=settings.draws, n_burnin=settings.burnin,
                   batch_size=settings.batch_size, gradient=self.opts["gradient"], n=n, backend=self.opts["backend"],
                   sampler=self.opts["sampler"], seconds=time.perf_counter() - start)
        steps = np.arange(traces.shape[1])[:: self.opts["thin"]]
        chains = pd.DataFrame({
            "chain": np.repeat(np.arange(settings.chains), len(steps)),
            "draw": np.tile(steps - settings.burnin, settings.chains),  # negative during burn-in
            "loss": traces[:, steps].reshape(-1),
        })
        chains["burnin"] = chains["draw"] < 0
        return {"llc": pd.DataFrame([row]), "llc_chains": chains}
