"""`hessian`: trace, top eigenvalues, spectral density and rank of the loss Hessian of a checkpoint.

Everything is about H = the Hessian of the *mean* loss (`ctx.loss_fn`: cross-entropy, or the Gaussian
NLL 0.5 |y - f|^2 / sigma^2) over a fixed, seeded set of training samples (`samples`, default 1280 as
the study used: 10 batches of 128; fewer when the training split is smaller), in eval mode.

- `trace`: a stochastic estimate from exactly `probes` Hessian products, with `trace_stderr`; or, with
  `trace_method=exact`, `trace_exact` below (the fast mode for many checkpoints of a large model, with
  `spectrum=false`: no SLQ), whose `trace_stderr` is then the subsample's (next item).
  `trace_method=hutchpp` (default): Hutch++ (Meyer et al. 2020): a third of the probes sketch the top
  eigenspace Q = orth(H S), tr(Q^T H Q) is taken exactly, and Hutchinson runs on the rest of the space
  with the remaining third; its standard error is that Hutchinson part's (conditional on the sketch).
  Trained networks have a few large outlier eigenvalues that dominate Hutchinson's variance
  (2 * sum of squared off-diagonal entries); the sketch removes them: on a trained digits MLP the error
  was 6x smaller than Hutchinson's at 100 probes. Without outliers (a random initialisation) it is up
  to sqrt(3) worse, as it spends only a third of the probes on Hutchinson. `trace_method=hutchinson`:
  the mean of v^T H v over Rademacher v, standard error std / sqrt(probes) (the study's estimator).
- `trace_exact`: for networks that are piecewise linear in every single weight (Linear/Conv layers,
  ReLU/LeakyReLU/Identity/MaxPool/AvgPool/Flatten/Dropout in eval mode, no shared layers) with
  cross-entropy or the Gaussian NLL, the Hessian's diagonal equals the Gauss-Newton diagonal (the
  second derivative of f along one weight is zero almost everywhere), so the exact trace is one
  BackPACK `DiagGGNExact` pass (`trace_exact_method="diag_ggn"`). Its `trace_exact_stderr` is the
  standard error of a mean over the samples (from per-batch traces): the trace is exact on these
  samples, and this says how far the whole training set's may lie. Otherwise, when the dense Hessian
  was formed for the exact spectrum, its trace (`"dense"`); otherwise NaN.
- `top_eigenvalues`: the `top_k` largest *algebraic* eigenvalues (scipy `eigsh`, `which="LA"`, on a
  Hessian linear operator), or the exact ones when the dense Hessian was formed. `lambda_max` is the
  first of them.
- spectrum and rank: below `exact_below` parameters the dense Hessian is formed (P Hessian-vector
  products) and diagonalised: `hessian_spectrum` holds all P eigenvalues with weight 1/P and
  `rank_estimate` is the count of |lambda| > rank_threshold * lambda_max (`rank_method="exact"`).
  Above it, stochastic Lanczos quadrature (`rank_method="slq"`), deflated: a first Lanczos pass of
  `lanczos_steps` steps locks the eigenpairs above the cut that it has converged (counted exactly:
  `rank_locked`), then `slq_runs` Lanczos runs from Rademacher starts on their orthogonal complement
  give nodes (Ritz values) and weights (squared first components of the tridiagonal matrix's
  eigenvectors); rank_estimate = P * mean over runs of the weight with |node| > rank_threshold *
  lambda_max (see `slq_rank`). Plain SLQ's rank has a relative error of about sqrt(2 / rank) per run
  at any number of steps; too few steps cannot resolve the cut at all (50 steps counted every
  parameter of a 1827-parameter model as nonzero).

Backends (`backend`): `curvlinops` (default) and `pyhessian` (the PyPI 0.1 release, for comparison with
the study's numbers). See `PyHessianOperator` for what is handled about pyhessian. Both feed the same
algorithms here (Hutchinson/Hutch++ loops, eigsh, Lanczos), so they differ only in how H v is computed.
With the default backend the quadratic forms v^T H v (all of Hutchinson's, two thirds of Hutch++'s)
come from one forward-mode second-order (Taylor) pass per block of probes when every layer is supported
(`engine=auto`, see `TaylorQuadratic`): no backward pass and one matrix product per probe in the input
layer instead of two; 1.7x faster than pyhessian's Hessian-vector products on a 784-256-256-10 MLP.
`engine=hvp` uses v^T (H v) from curvlinops instead (same numbers up to rounding).

Rows: `hessian` has one row (trace, trace_stderr, trace_method, trace_exact, trace_exact_stderr, trace_exact_applies,
trace_exact_method, n_probes, top_eigenvalues, lambda_max, rank_estimate, rank_threshold, rank_method,
rank_locked, n_params, n_samples, backend, engine, seconds); `hessian_spectrum` has (slq_run, node,
weight), weights summing to 1 per run.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import pandas as pd
import torch

from analyze.curvature.ggn import diag_ggn_batch_traces, ggn_diagonal_applies, subsample_stderr
from analyze.curvature.operators import CurvlinopsOperator, PyHessianOperator
from analyze.curvature.samples import DTYPES, SAMPLES, batches_of, eval_mode, training_subset
from analyze.curvature.spectrum import dense_hessian, slq_rank, top_eigenvalues
from analyze.curvature.trace import hutchinson, hutchpp
from analyze.estimators.base import Context, Estimator, EstimatorError, Option


class HessianEstimator(Estimator):
    name = "hessian"
    tables = ("hessian", "hessian_spectrum")
    options = (
        Option("samples", int, SAMPLES, "training samples (seeded; fewer if the split is smaller)"),
        Option("batch_size", int, SAMPLES, "samples per forward pass (memory only)"),
        Option("seed", int, 0, "seed of the sample set, the probes and the Lanczos starts"),
        Option("trace_method", str, "hutchpp", "trace estimator: hutchpp or hutchinson (stochastic, any model), "
               "or exact (the diagonal Gauss-Newton alone: equal to Tr(H) for piecewise-linear nets with their "
               "task's NLL, a few backward passes; an error on other models)",
               choices=("hutchinson", "hutchpp", "exact")),
        Option("probes", int, 100, "Hessian products (probe vectors) of the stochastic trace"),
        Option("top_k", int, 5, "largest algebraic eigenvalues to report (0: only lambda_max for the rank)"),
        Option("rank_threshold", float, 1e-2, "rank counts eigenvalues with |lambda| > threshold * lambda_max"),
        Option("exact_below", int, 3000, "form and diagonalise the dense Hessian below this many parameters"),
        Option("lanczos_steps", int, 300, "Lanczos steps per SLQ run (full reorthogonalisation)"),
        Option("slq_runs", int, 2, "SLQ runs after the deflation pass (Rademacher starts; advanced together)"),
        Option("spectrum", bool, True, "also the spectral density and the rank (SLQ, or the dense Hessian below "
               "exact_below: the slow part); false: traces and the top eigenvalues (eigsh) only"),
        Option("backend", str, "curvlinops", "Hessian-vector products", choices=("curvlinops", "pyhessian")),
        Option("engine", str, "auto", "quadratic forms v^T H v of the trace: auto (forward-mode Taylor pass "
               "when every layer is supported, curvlinops backend) or hvp", choices=("auto", "hvp")),
        Option("dtype", str, "float32", "precision of the computation", choices=tuple(DTYPES)),
    )

    def validate(self) -> None:
        o = self.opts
        for name, low in (("samples", 1), ("batch_size", 1), ("probes", 2), ("top_k", 0), ("exact_below", 0),
                          ("lanczos_steps", 2), ("slq_runs", 1)):
            if o[name] < low:
                raise EstimatorError(f"--hessian-{name.replace('_', '-')}: must be at least {low}")
        if o["trace_method"] == "exact" and o["backend"] != "curvlinops":
            raise EstimatorError("--hessian-trace-method exact: runs with --hessian-backend curvlinops only")
        if o["trace_method"] == "hutchpp" and o["probes"] < 6:
            raise EstimatorError("--hessian-probes: hutchpp needs at least 6 (a third sketch, a third "
                                 "exact part, a third Hutchinson)")
        if not 0 < o["rank_threshold"] < 1:
            raise EstimatorError("--hessian-rank-threshold: must lie in (0, 1)")

    def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
        start = time.perf_counter()
        o = self.opts
        dtype = DTYPES[o["dtype"]]
        x, y = training_subset(ctx, o["samples"], o["seed"])
        model = ctx.model
        if next(model.parameters()).dtype != dtype:
            model = copy.deepcopy(model).to(dtype)
        if x.is_floating_point():
            x = x.to(dtype)
        if y.is_floating_point():
            y = y.to(dtype)
        n = len(y)
        batches = batches_of(x, y, o["batch_size"])
        task, sigma = ctx.splits.task, ctx.splits.noise_sigma
        with eval_mode(model):
            row, spectrum = self._compute(model, ctx.loss_fn, batches, n, task, sigma)
        row["seconds"] = time.perf_counter() - start
        return {"hessian": pd.DataFrame([row]), "hessian_spectrum": spectrum}

    def _compute(self, model, loss_fn, batches, n, task, sigma):
        o = self.opts
        seed = o["seed"]
        if o["backend"] == "pyhessian":
            op = PyHessianOperator(model, loss_fn, batches, n)
        else:
            op = CurvlinopsOperator(model, loss_fn, batches, n, engine=o["engine"])
        try:
            applies = ggn_diagonal_applies(model)
            trace_exact, exact_method, sums = math.nan, "", None
            if applies:
                try:
                    sums = diag_ggn_batch_traces(model, task, sigma, loss_fn, batches, n)
                    trace_exact, exact_method = float(sums.sum() / n), "diag_ggn"
                except ValueError:  # ctx.loss_fn is not the task's NLL: the identity does not apply
                    applies = False
            if o["trace_method"] == "exact":
                if not applies:
                    raise EstimatorError("--hessian-trace-method exact: Tr(H) = Tr(GGN) does not hold for this "
                                         "model (it needs piecewise-linear layers and the task's NLL); use hutchpp")
                # exact on these samples; its error is the subsample's, against the whole training set
                trace, stderr = trace_exact, subsample_stderr(sums, batches)
            else:
                estimate = hutchpp if o["trace_method"] == "hutchpp" else hutchinson
                trace, stderr = estimate(op, o["probes"], torch.Generator().manual_seed(seed + 1))

            P = op.P
            if P < max(o["exact_below"], 2) and o["spectrum"]:  # the dense Hessian is P products: only for the spectrum
                eigs = np.linalg.eigvalsh(dense_hessian(op))[::-1]
                top = [float(v) for v in eigs[:o["top_k"]]]
                lambda_max = float(eigs[0])
                rank = float(np.sum(np.abs(eigs) > o["rank_threshold"] * lambda_max)) if lambda_max > 0 else math.nan
                rank_method, deflated = "exact", (int(rank) if lambda_max > 0 else 0)
                spectrum = pd.DataFrame({"slq_run": np.zeros(P, dtype="int64"), "node": eigs[::-1].copy(),
                                         "weight": np.full(P, 1.0 / P)})
                if not exact_method:
                    trace_exact, exact_method = float(np.sum(eigs)), "dense"
            else:
                top = top_eigenvalues(op, min(max(o["top_k"], 1), P - 1), seed + 3)
                lambda_max = top[0]
                top = top[:o["top_k"]]
                if not o["spectrum"]:
                    rank, deflated, spectrum = math.nan, 0, pd.DataFrame({"slq_run": [], "node": [], "weight": []})
                elif lambda_max > 0:
                    rank, deflated, spectrum = slq_rank(op, o["lanczos_steps"], o["slq_runs"],
                                                        o["rank_threshold"] * lambda_max,
                                                        torch.Generator().manual_seed(seed + 2))
                else:  # no positive curvature: the relative threshold is meaningless
                    rank, deflated, spectrum = math.nan, 0, pd.DataFrame({"slq_run": [], "node": [], "weight": []})
                rank_method = "slq" if o["spectrum"] else ""
        finally:
            op.close()
        row = {
            "trace": trace, "trace_stderr": stderr, "trace_method": o["trace_method"],
            "trace_exact": trace_exact,
            "trace_exact_stderr": subsample_stderr(sums, batches) if sums is not None else math.nan,
            "trace_exact_applies": applies, "trace_exact_method": exact_method,
            "n_probes": 0 if o["trace_method"] == "exact" else o["probes"], "top_eigenvalues": top, "lambda_max": lambda_max,
            "rank_estimate": rank, "rank_threshold": o["rank_threshold"], "rank_method": rank_method,
            "rank_locked": deflated,
            "n_params": P, "n_samples": n, "backend": op.name, "engine": op.engine,
        }
        spectrum = spectrum.astype({"slq_run": "int64", "node": float, "weight": float})
        return row, spectrum
