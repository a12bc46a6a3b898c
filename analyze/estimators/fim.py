"""`fim`: traces of the Fisher information matrix of a checkpoint, with nngeometry 0.4.

F = (1/n) sum_i E_{y ~ p(y | x_i, w)} [grad log p(y | x_i, w) grad log p(y | x_i, w)^T], the *true*
(expected) Fisher, averaged (mean, not sum) over a fixed, seeded set of n training samples (`samples`,
default 1280, fewer if the split is smaller; the same samples as `hessian` for the same seed and size).

- Classifiers: F = J^T (diag(p) - p p^T) J with J the Jacobian of the logits: the closed-form
  expectation over the softmax, which is the Gauss-Newton matrix of the cross-entropy, so for ReLU
  networks `trace_diag` equals the `hessian` estimator's `trace_exact` on the same samples.
  nngeometry needs a square root of diag(p) - p p^T. Its own (`variant="classif_logits"`, option
  `root=cholesky`) is the Cholesky factor of Tanabe and Sagae, built from q = 1 - cumsum(p): in float32
  that cancels catastrophically for confident predictions (q < 0, then sqrt of a negative number), so
  the traces come out NaN for a merely 5-epoch digits MLP (30 of 1168 samples with q < 0); and in
  float64 it fails (its cached triangular matrix is made in the default dtype). The default
  (`root=symmetric`) gives nngeometry's `FIM(..., variant="regression")` (identity output metric:
  F = J_o^T J_o / n) the outputs o_c = sqrt(p_c) (z_c - p . z) with p held constant, whose Jacobian
  rows sqrt(p_c) (e_c - p)^T J sum to exactly J^T (diag(p) - p p^T) J, with no cancellation.
- Regression with Gaussian noise of known sigma (the NLL 0.5 |y - f|^2 / sigma^2): F = J^T J / sigma^2,
  i.e. nngeometry's `variant="regression"` (identity noise covariance, F = J^T J) divided by sigma^2.
- `trace_diag`: trace of `PMatDiag` (the exact diagonal, so the exact trace of F).
  `trace_kfac`: trace of `PMatKFAC` (sum over layers of tr(A) tr(G), the Kronecker-factored
  approximation, which is exact for one sample through one layer).

nngeometry pitfalls handled: `FIM(...)` has no `n_output` argument in 0.4; its hooks are registered with
`module.register_forward_hook` and removed only when a computation finishes, so a call that raises
leaves them on the model (the next call then fails or double-counts): every hook added during a call is
removed in a `finally` (see `hooks_removed`). It sets `requires_grad` on the input batches it gets, so
it only ever sees fresh copies of the data. Only Linear, Conv1d/2d, ConvTranspose2d, BatchNorm,
LayerNorm, GroupNorm (and its own WeightNorm/Cosine/Affine) layers may carry parameters.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager

import pandas as pd
import torch
from torch import nn

from analyze.estimators.base import Context, Estimator, EstimatorError, Option
from analyze.curvature.samples import DTYPES, SAMPLES, eval_mode, training_subset

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


@contextmanager
def hooks_removed(model: nn.Module):
    """Remove, on exit (also on an exception), every module hook added to `model` inside the block."""
    before = {id(m): {name: set(getattr(m, name, {}) or {}) for name in _HOOK_DICTS} for m in model.modules()}
    try:
        yield
    finally:
        for m in model.modules():
            old = before.get(id(m), {})
            for name in _HOOK_DICTS:
                hooks = getattr(m, name, None)
                if not hooks:
                    continue
                for key in [k for k in hooks if k not in old.get(name, set())]:
                    del hooks[key]


def softmax_fisher_root(logits: torch.Tensor) -> torch.Tensor:
    """o_c = sqrt(p_c) (z_c - p . z), p constant: sum_c grad o_c grad o_c^T = J^T (diag p - p p^T) J."""
    p = torch.softmax(logits, dim=1).detach()
    return p.sqrt() * (logits - (p * logits).sum(dim=1, keepdim=True))


class FIMEstimator(Estimator):
    name = "fim"
    tables = ("fim",)
    options = (
        Option("samples", int, SAMPLES, "training samples (seeded; fewer if the split is smaller)"),
        Option("batch_size", int, 256, "samples per pass (memory only)"),
        Option("seed", int, 0, "seed of the sample set (the same seed and size give hessian's samples)"),
        Option("dtype", str, "float32", "precision of the computation", choices=tuple(DTYPES)),
        Option("root", str, "symmetric", "classifiers: square root of the softmax Fisher fed to nngeometry: "
               "symmetric (stable) or cholesky (nngeometry's classif_logits; NaN on confident predictions "
               "in float32)", choices=("symmetric", "cholesky")),
    )

    def validate(self) -> None:
        for name in ("samples", "batch_size"):
            if self.opts[name] < 1:
                raise EstimatorError(f"--fim-{name.replace('_', '-')}: must be at least 1")
        if self.opts["root"] == "cholesky" and self.opts["dtype"] != "float32":
            raise EstimatorError("--fim-root cholesky needs --fim-dtype float32 (nngeometry 0.4 builds its "
                                 "triangular matrix in the default dtype)")

    def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
        from nngeometry.layercollection import LayerCollection
        from nngeometry.metrics import FIM
        from nngeometry.object import PMatDiag, PMatKFAC

        start = time.perf_counter()
        o = self.opts
        dtype = DTYPES[o["dtype"]]
        x, _ = training_subset(ctx, o["samples"], o["seed"])  # the true Fisher does not use the labels
        if x.is_floating_point():
            x = x.to(dtype)
        model = ctx.model
        if next(model.parameters()).dtype != dtype:
            model = copy.deepcopy(model).to(dtype)
        task = ctx.splits.task
        function = None  # nngeometry's default: model(inputs)
        if task == "classification" and o["root"] == "cholesky":
            variant, label, scale = "classif_logits", "classif_logits", 1.0
        elif task == "classification":
            variant, label, scale = "regression", "classif_symmetric_root", 1.0

            def function(*batch):
                return softmax_fisher_root(model(batch[0].to(ctx.device)))
        elif task == "regression":
            variant, label, scale = "regression", "regression", 1.0 / float(ctx.splits.noise_sigma) ** 2
        else:
            raise EstimatorError(f"fim: unknown task {task!r}")
        try:
            layers = LayerCollection.from_model(model)
        except Exception as e:  # nngeometry raises a bare Exception for layers it does not know
            raise EstimatorError(f"fim: nngeometry cannot handle this model: {e}") from None
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=o["batch_size"])
        traces = {}
        with eval_mode(model):
            for column, representation in (("trace_diag", PMatDiag), ("trace_kfac", PMatKFAC)):
                with hooks_removed(model):
                    matrix = FIM(model, loader, representation, variant=variant, device=ctx.device,
                                 function=function, layer_collection=layers)
                    traces[column] = float(matrix.trace().item()) * scale
                    del matrix
        row = {**traces, "n_samples": len(x), "n_params": layers.numel(), "variant": label,
               "seconds": time.perf_counter() - start}
        return {"fim": pd.DataFrame([row])}
