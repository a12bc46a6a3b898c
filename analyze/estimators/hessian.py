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
import warnings
from contextlib import contextmanager
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from analyze.estimators.base import Context, Estimator, EstimatorError, Option

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Probe vectors multiplied at once (vmapped, or one Taylor pass): at most CHUNK, fewer when the
# activations are large, so that CHUNK * batch * widest activation * 8 live copies fit in MEMORY.
CHUNK = 32
MEMORY = 2 ** 30


# ------------------------------------------------------------------------------------------ samples


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


def leaf_modules(model: nn.Module) -> list[nn.Module] | None:
    """The leaf modules in call order when `model` is (nested) plain nn.Sequential, else None."""
    if type(model) is not nn.Sequential:
        return [model] if not list(model.children()) else None
    leaves: list[nn.Module] = []
    for child in model:
        sub = leaf_modules(child)
        if sub is None:
            return None
        leaves.extend(sub)
    return leaves


# Layers through which the network stays piecewise linear in each single weight (a.e.).
PIECEWISE_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU, nn.LeakyReLU, nn.Identity,
                    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                    nn.Flatten, nn.Dropout)


def ggn_diagonal_applies(model: nn.Module) -> bool:
    """True when diag(Hessian) = diag(GGN) for this model with CE or Gaussian NLL (see module docstring)."""
    leaves = leaf_modules(model)
    if not leaves:
        return False
    if any(type(m) not in PIECEWISE_LINEAR for m in leaves):
        return False
    with_params = [m for m in leaves if any(True for _ in m.parameters(recurse=False))]
    # A layer used twice makes f quadratic in its weights; a Dropout must be in eval mode.
    return len({id(m) for m in with_params}) == len(with_params) and not any(
        isinstance(m, nn.Dropout) and m.training for m in leaves)


# ------------------------------------------------------------------------------- exact trace (GGN)


def diag_ggn_trace(model: nn.Module, task: str, sigma: float | None, loss_fn: Callable,
                   batches: list, n: int) -> float:
    """Trace of the exact Gauss-Newton diagonal of the mean NLL, by BackPACK's DiagGGNExact."""
    return diag_ggn_batch_traces(model, task, sigma, loss_fn, batches, n).sum() / n


def subsample_stderr(batch_sums: np.ndarray, batches: list) -> float:
    """Standard error of the mean-per-sample trace from per-batch sums (batch means, size-weighted): how
    far the trace on these samples may lie from the trace on the whole training set. NaN with one batch."""
    sizes = np.array([len(yb) for _, yb in batches], dtype=float)
    if len(sizes) < 2:
        return math.nan
    means = batch_sums / sizes
    mean = batch_sums.sum() / sizes.sum()
    # variance of a ratio estimator over clusters (batches of i.i.d. samples)
    var = np.sum((sizes / sizes.mean()) ** 2 * (means - mean) ** 2) / (len(sizes) * (len(sizes) - 1))
    return float(math.sqrt(var))


def diag_ggn_batch_traces(model: nn.Module, task: str, sigma: float | None, loss_fn: Callable,
                          batches: list, n: int) -> np.ndarray:
    """Per batch, the sum over its samples of each sample's Gauss-Newton trace (n x the mean NLL's scale).

    Runs on a deep copy (BackPACK's `extend` installs hooks and stores inputs on the modules it extends).
    Raises ValueError when `loss_fn` is not the task's NLL as trainer.losses defines it.
    """
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    net = extend(copy.deepcopy(model).eval())
    if task == "classification":
        criterion, scale = extend(nn.CrossEntropyLoss(reduction="sum")), 1.0 / n
    elif task == "regression":
        # 0.5 |y - f|^2 / sigma^2 = sum-MSE * 0.5 / sigma^2; BackPACK's MSELoss Hessian is 2 I.
        criterion, scale = extend(nn.MSELoss(reduction="sum")), 0.5 / (float(sigma) ** 2 * n)
    else:
        raise ValueError(f"unknown task {task!r}")
    sums = []
    for xb, yb in batches:
        out = net(xb)
        target = yb if task == "classification" else yb.reshape(out.shape)
        loss = criterion(out, target)
        expected = loss_fn(out.detach(), yb).item()
        got = loss.item() * scale * n / len(xb)
        if not math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-6):
            raise ValueError(f"ctx.loss_fn ({expected:.6g}) is not the {task} NLL ({got:.6g})")
        with backpack(DiagGGNExact()), warnings.catch_warnings():
            # the first layer's full backward hook fires with no input gradient: expected here
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        total = 0.0
        for p in net.parameters():
            if p.requires_grad:
                total += p.diag_ggn_exact.double().sum().item()
                del p.diag_ggn_exact
            p.grad = None
        sums.append(total * scale * n)
    return np.array(sums)


# ------------------------------------------------------------------ Hessian operators (backends)


class LossModule(nn.Module):
    """`ctx.loss_fn` as the nn.Module with `reduction` that curvlinops expects (mean over samples)."""

    reduction = "mean"

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fn(out, y)


def probe_chunk(model: nn.Module, batches: list) -> int:
    """How many probe vectors to push through the model at once (see CHUNK and MEMORY)."""
    sizes = [batches[0][0][:1].numel()]

    def record(module, inputs, output):
        if torch.is_tensor(output):
            sizes.append(output.numel())

    handles = [m.register_forward_hook(record) for m in model.modules()]
    try:
        with torch.no_grad():
            model(batches[0][0][:1])
    finally:
        for h in handles:
            h.remove()
    itemsize = next(model.parameters()).element_size()
    per_probe = max(sizes) * max(len(b[1]) for b in batches) * itemsize * 8
    return int(max(1, min(CHUNK, MEMORY // per_probe)))


class HessianOperator:
    """H of the mean loss over `batches` (weighted by batch size) as products with (P, k) matrices."""

    name = ""
    engine = "hvp"

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: list, n: int):
        self.model, self.loss_fn, self.batches, self.n = model, loss_fn, batches, n
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.P = sum(p.numel() for p in self.params)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.chunk = probe_chunk(model, batches)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._matmat(V[:, i:i + self.chunk]) for i in range(0, V.shape[1], self.chunk)], dim=1)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quadratic(self, V: torch.Tensor) -> torch.Tensor:
        """v_i^T H v_i for every column v_i of V, in float64."""
        return torch.cat([(Vc.double() * self.matmat(Vc).double()).sum(dim=0)
                          for Vc in V.split(self.chunk, dim=1)])

    def close(self) -> None:
        pass


class CurvlinopsOperator(HessianOperator):
    """curvlinops' HessianLinearOperator: vmapped forward-over-reverse products, functional (the model
    is not modified). `check_deterministic=False`: the model is in eval mode and the data are fixed
    tensors, so its extra passes would only cost time."""

    name = "curvlinops"

    def __init__(self, model, loss_fn, batches, n, engine: str = "auto"):
        super().__init__(model, loss_fn, batches, n)
        with warnings.catch_warnings():
            # torch 2.14 deprecates torch.jit.script yet calls it itself, in the forward-mode AD decompositions it
            # loads on first use (curvlinops' Hessian-vector products), and so does linear_operator, which
            # curvlinops imports: a FutureWarning on every worker about code outside this project. Load both
            # here with exactly that warning silenced.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
            import torch._decomp.decompositions_for_jvp  # noqa: F401
            from curvlinops import HessianLinearOperator

        self.op = HessianLinearOperator(model, LossModule(loss_fn), self.params, batches,
                                        check_deterministic=False, num_data=n)
        self.taylor = TaylorQuadratic.build(model, self.params, loss_fn, batches, n) if engine == "auto" else None
        self.engine = "taylor" if self.taylor is not None else "hvp"

    def _matmat(self, V):
        return self.op @ V

    def quadratic(self, V):
        if self.taylor is not None:
            try:
                return torch.cat([self.taylor(Vc.contiguous()) for Vc in V.split(self.chunk, dim=1)])
            except TaylorUnsupported:
                self.taylor, self.engine = None, "hvp"
        return super().quadratic(V)


class PyHessianOperator(HessianOperator):
    """pyhessian 0.1 (PyPI) used for its Hessian-vector products only, because the rest is unsafe:

    - `hessian(..., cuda=True)` is its default and moves data with `.cuda()`: we pass cuda=False on CPU.
    - `trace()` stops as soon as |mean - previous mean| / (previous mean + 1e-6) < tol, which also
      triggers whenever the running mean is negative, so its probe count is random and small (errors of
      17% median); we run our own Hutchinson loop over exactly `probes` Rademacher vectors with its hvp.
    - `density()` calls `torch.eig`, removed from torch: we run our own stochastic Lanczos quadrature
      with its hvp and never call density().
    - `eigenvalues()` is power iteration, i.e. the *largest magnitude* eigenvalue ("top"); we report
      the largest algebraic ones with scipy eigsh on its hvp, as for the default backend.
    - it calls loss.backward(create_graph=True) on the model, leaving graph-carrying `.grad`s (and it
      adds to any existing .grad): it runs on a deep copy whose grads start at None and are cleared.
    One batch: its single-batch mode (graph built once, each product is one double-backward pass);
    several batches: its dataloader mode (forward + backward per batch per product, size-weighted).
    """

    name = "pyhessian"

    def __init__(self, model, loss_fn, batches, n):
        from pyhessian import hessian

        model = copy.deepcopy(model).eval()
        for p in model.parameters():
            p.grad = None
        super().__init__(model, loss_fn, batches, n)
        cuda = self.device.type == "cuda"
        with _quiet_create_graph():
            if len(batches) == 1:
                self.h = hessian(model, loss_fn, data=batches[0], cuda=cuda)
            else:
                self.h = hessian(model, loss_fn, dataloader=batches, cuda=cuda)
        self.shapes = [p.shape for p in self.h.params]

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        from pyhessian.utils import hessian_vector_product

        vs = [t.reshape(s) for t, s in zip(v.split([math.prod(s) for s in self.shapes]), self.shapes)]
        if self.h.full_dataset:
            with _quiet_create_graph():
                _, hv = self.h.dataloader_hv_product(vs)
        else:
            hv = hessian_vector_product(self.h.gradsH, self.h.params, vs)
        return torch.cat([t.reshape(-1) for t in hv]).to(self.dtype)

    def _matmat(self, V):
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def close(self):
        self.h = None
        for p in self.model.parameters():
            p.grad = None


@contextmanager
def _quiet_create_graph():
    """pyhessian calls backward(create_graph=True), which warns of the .grad reference cycle; we break
    it in PyHessianOperator.close (grads set to None)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        yield


# --------------------------------------------------- forward-mode second-order quadratic forms


class TaylorUnsupported(Exception):
    """Raised by TaylorQuadratic on a layer input it does not handle (callers fall back to HVPs)."""


class TaylorQuadratic:
    """v^T H v for a block of directions by one forward pass of second-order Taylor coefficients.

    Along theta(t) = theta + t v, every activation a(t) = a + t a' + t^2/2 a'' + ...; the loss's second
    derivative at t = 0 is exactly v^T H v. Linear/Conv layers are bilinear in (weight, input), so
    z' = W' a + W a' + b' and z'' = 2 W' a' + W a''; elementwise activations use s' and s''; pooling,
    flatten and eval-mode dropout are linear (max pooling picks the primal's argmax). The loss's part is
    d^2/dt^2 loss(z + t z' + t^2/2 z'') by nested forward differentiation of `loss_fn` itself. The primal
    pass is computed once and shared by all probes; the input layer needs one matrix product per probe
    (a Hessian-vector product needs two), and nothing runs backwards. Tangents are laid out
    (samples, probes, features...) so that every product is one large matrix multiplication without
    copies. Only (nested) plain nn.Sequential models of the supported layers; otherwise `build` returns
    None (and the caller uses Hessian-vector products).
    """

    LINEAR_BATCHWISE = (nn.Flatten, nn.Identity, nn.Dropout, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
    MAXPOOL = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}
    SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU, nn.LeakyReLU, nn.Tanh,
                 nn.Sigmoid) + tuple(MAXPOOL) + LINEAR_BATCHWISE

    @classmethod
    def build(cls, model, params, loss_fn, batches, n) -> "TaylorQuadratic | None":
        leaves = leaf_modules(model)
        if not leaves:
            return None
        for m in leaves:
            if type(m) not in cls.SUPPORTED or (isinstance(m, nn.Dropout) and m.training):
                return None
            if isinstance(m, nn.modules.conv._ConvNd) and (m.groups != 1 or m.padding_mode != "zeros"):
                return None
            if isinstance(m, nn.Flatten) and m.start_dim != 1:
                return None
        model_params = {id(p) for p in model.parameters()}
        leaf_params = {id(p) for m in leaves for p in m.parameters(recurse=False)}
        if leaf_params != model_params:
            return None
        return cls(leaves, params, loss_fn, batches, n)

    def __init__(self, leaves, params, loss_fn, batches, n):
        self.leaves, self.loss_fn, self.batches, self.n = leaves, loss_fn, batches, n
        self.slices, start = {}, 0
        for p in params:
            self.slices[id(p)] = (start, start + p.numel(), p.shape)
            start += p.numel()
        self.P = start
        self._primal: list | None = None

    def _block(self, V: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor | None:
        """The rows of V for parameter p, viewed as (*p.shape, k); None if p is not probed."""
        if p is None or id(p) not in self.slices:
            return None
        a, b, shape = self.slices[id(p)]
        return V[a:b].view(*shape, V.shape[1])

    @torch.no_grad()
    def _primal_pass(self) -> list:
        cache = []
        for xb, yb in self.batches:
            a, steps = xb, []
            for m in self.leaves:
                extra = None
                if isinstance(m, nn.modules.conv._ConvNd):
                    z = m._conv_forward(a, m.weight, m.bias)
                elif isinstance(m, nn.Linear):
                    if a.dim() != 2:
                        raise TaylorUnsupported("Linear on inputs with more than one feature axis")
                    z = F.linear(a, m.weight, m.bias)
                elif isinstance(m, nn.ReLU):
                    z, extra = F.relu(a), (a > 0).to(a.dtype)
                elif isinstance(m, nn.LeakyReLU):
                    z = F.leaky_relu(a, m.negative_slope)
                    extra = torch.where(a > 0, torch.ones_like(a), torch.full_like(a, m.negative_slope))
                elif isinstance(m, nn.Tanh):
                    z = torch.tanh(a)
                    d1 = 1 - z * z
                    extra = (d1, -2 * z * d1)
                elif isinstance(m, nn.Sigmoid):
                    z = torch.sigmoid(a)
                    d1 = z * (1 - z)
                    extra = (d1, d1 * (1 - 2 * z))
                elif type(m) in self.MAXPOOL:
                    z, extra = self.MAXPOOL[type(m)](a, m.kernel_size, m.stride, m.padding, m.dilation,
                                                     ceil_mode=m.ceil_mode, return_indices=True)
                else:  # linear and batchwise: Flatten, Identity, eval Dropout, AvgPool
                    z = m(a)
                steps.append((a, extra))
                a = z
            cache.append((steps, a, yb))
        return cache

    @staticmethod
    def _batchwise(fn, t: torch.Tensor | None) -> torch.Tensor | None:
        """Apply a per-sample map to a (samples, probes, ...) tangent."""
        if t is None:
            return None
        nb, k = t.shape[:2]
        out = fn(t.reshape(nb * k, *t.shape[2:]))
        return out.view(nb, k, *out.shape[1:])

    def _linear(self, m: nn.Linear, a, ad, add, Wd, bd, k):
        nb = a.shape[0]
        out_f, in_f = m.weight.shape
        zd = zdd = None
        if Wd is not None:  # a W'^T for all probes: one (nb, in) x (in, k*out) product, bias fused
            Wmat = Wd.permute(1, 2, 0).reshape(in_f, k * out_f)
            bias = bd.T.reshape(k * out_f) if bd is not None else None
            zd = (torch.addmm(bias, a, Wmat) if bias is not None else a @ Wmat).view(nb, k, out_f)
        elif bd is not None:
            zd = bd.T.expand(nb, k, out_f).clone()
        if ad is not None:
            prod = ad.reshape(nb * k, in_f) @ m.weight.T
            zd = prod.view(nb, k, out_f) if zd is None else zd.add_(prod.view(nb, k, out_f))
            if Wd is not None:  # cross term 2 W'_j a'_j, probe by probe
                cross = torch.bmm(ad.transpose(0, 1), Wd.permute(2, 1, 0))  # (k, nb, out)
                zdd = cross.transpose(0, 1).mul(2)
        if add is not None:
            prod = (add.reshape(nb * k, in_f) @ m.weight.T).view(nb, k, out_f)
            zdd = prod if zdd is None else zdd.add_(prod)
        return zd, zdd

    def _conv(self, m, a, ad, add, Wd, bd, k):
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[m.weight.dim() - 2]
        opts = dict(stride=m.stride, padding=m.padding, dilation=m.dilation)
        nb = a.shape[0]
        zd = zdd = None
        Wk = Wd.permute(-1, *range(Wd.dim() - 1)).reshape(-1, *Wd.shape[1:-1]) if Wd is not None else None
        if Wk is not None:  # (nb, k*C_out, ...) viewed as (nb, k, C_out, ...)
            out = conv(a, Wk, **opts)
            zd = out.view(nb, k, -1, *out.shape[2:])
        if bd is not None:
            bias = bd.T.reshape(1, k, -1, *([1] * (a.dim() - 2)))
            zd = bias.expand(nb, *bias.shape[1:]).clone() if zd is None else zd.add_(bias)
        if ad is not None:
            prod = self._batchwise(lambda t: conv(t, m.weight, **opts), ad)
            zd = prod if zd is None else zd.add_(prod)
            if Wk is not None:  # per-probe input with per-probe weight: one grouped convolution
                out = conv(ad.reshape(nb, -1, *ad.shape[3:]), Wk, groups=k, **opts)
                zdd = out.view(nb, k, -1, *out.shape[2:]).mul_(2)
        if add is not None:
            prod = self._batchwise(lambda t: conv(t, m.weight, **opts), add)
            zdd = prod if zdd is None else zdd.add_(prod)
        return zd, zdd

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        if self._primal is None:
            self._primal = self._primal_pass()
        k = V.shape[1]
        total = torch.zeros(k, dtype=torch.float64, device=V.device)
        for steps, z, yb in self._primal:
            ad = add = None
            for m, (a, extra) in zip(self.leaves, steps):
                if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                    Wd, bd = self._block(V, m.weight), self._block(V, m.bias)
                    layer = self._linear if isinstance(m, nn.Linear) else self._conv
                    ad, add = layer(m, a, ad, add, Wd, bd, k)
                elif isinstance(m, (nn.ReLU, nn.LeakyReLU)):
                    mask = extra.unsqueeze(1)
                    ad = ad.mul_(mask) if ad is not None else None
                    add = add.mul_(mask) if add is not None else None
                elif isinstance(m, (nn.Tanh, nn.Sigmoid)):
                    d1, d2 = extra[0].unsqueeze(1), extra[1].unsqueeze(1)
                    new_add = add.mul_(d1) if add is not None else None
                    if ad is not None:
                        new_add = _add(new_add, d2 * ad * ad)
                        ad = ad.mul_(d1)
                    add = new_add
                elif type(m) in self.MAXPOOL:
                    idx = extra.flatten(2).unsqueeze(1)  # (nb, 1, C, L_out)

                    def gather(t, idx=idx, shape=extra.shape):
                        picked = t.flatten(3).gather(3, idx.expand(-1, t.shape[1], -1, -1))
                        return picked.view(t.shape[0], t.shape[1], *shape[1:])

                    ad = gather(ad) if ad is not None else None
                    add = gather(add) if add is not None else None
                else:
                    ad, add = self._batchwise(m, ad), self._batchwise(m, add)
            zd = ad if ad is not None else torch.zeros(z.shape[0], k, *z.shape[1:], dtype=z.dtype, device=z.device)
            zdd = add if add is not None else torch.zeros_like(zd)
            total += self._loss_second_derivative(z, yb, zd, zdd).double() * (len(yb) / self.n)
        return total

    def _loss_second_derivative(self, z, y, zd, zdd):
        loss_fn = self.loss_fn
        t0 = torch.zeros((), dtype=z.dtype, device=z.device)

        def second(zd1, zdd1):
            def phi(t):
                return loss_fn(z + t * zd1 + (0.5 * t * t) * zdd1, y)
            return torch.func.jacfwd(torch.func.jacfwd(phi))(t0)

        return torch.func.vmap(second, in_dims=(1, 1))(zd, zdd)


def _add(a, b):
    return b if a is None else a + b


# ------------------------------------------------------------------------------ algorithms


def rademacher(k: int, P: int, gen: torch.Generator, dtype, device) -> torch.Tensor:
    """(P, k) matrix of +-1, drawn on the CPU from `gen` (reproducible across devices and backends)."""
    bits = torch.randint(0, 2, (P, k), generator=gen, dtype=torch.int8)
    return torch.empty((P, k), dtype=dtype).copy_(bits).mul_(2).sub_(1).to(device)


def hutchinson(op: HessianOperator, probes: int, gen: torch.Generator) -> tuple[float, float]:
    values = torch.cat([op.quadratic(rademacher(min(CHUNK, probes - i), op.P, gen, op.dtype, op.device))
                        for i in range(0, probes, CHUNK)])
    return values.mean().item(), _stderr(values)


def hutchpp(op: HessianOperator, probes: int, gen: torch.Generator) -> tuple[float, float]:
    """Hutch++ (Meyer et al. 2020): k = probes // 3 products sketch the top subspace Q = orth(H S),
    tr(Q^T H Q) is taken exactly (k quadratic forms) and Hutchinson runs on (I - QQ^T) with the rest."""
    k = probes // 3
    S = rademacher(k, op.P, gen, op.dtype, op.device)
    Q, _ = torch.linalg.qr(op.matmat(S).double())
    Q = Q.to(op.dtype)
    exact_part = op.quadratic(Q).sum().item()
    G = rademacher(probes - 2 * k, op.P, gen, op.dtype, op.device)
    G = G - Q @ (Q.T @ G)
    values = op.quadratic(G)
    return exact_part + values.mean().item(), _stderr(values)


def _stderr(values: torch.Tensor) -> float:
    return values.std(unbiased=True).item() / math.sqrt(len(values)) if len(values) > 1 else math.nan


def dense_hessian(op: HessianOperator) -> np.ndarray:
    """The P x P Hessian in float64 (symmetrised) from P Hessian-vector products."""
    H = np.empty((op.P, op.P))
    for i in range(0, op.P, op.chunk):
        cols = torch.zeros(op.P, min(op.chunk, op.P - i), dtype=op.dtype, device=op.device)
        cols[i:i + cols.shape[1]].fill_diagonal_(1.0)
        H[:, i:i + cols.shape[1]] = op.matmat(cols).double().cpu().numpy()
    return (H + H.T) / 2


def top_eigenvalues(op: HessianOperator, k: int, seed: int) -> list[float]:
    """The k largest algebraic eigenvalues by ARPACK's Lanczos (scipy eigsh, which="LA"), descending."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    def matvec(v):
        t = torch.as_tensor(np.asarray(v).reshape(op.P, -1), dtype=op.dtype, device=op.device)
        return op.matmat(t).double().cpu().numpy().reshape(np.shape(v))

    lin = LinearOperator((op.P, op.P), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(op.P)
    # Residual tolerance relative to |lambda|; the eigenvalue error is at most that (usually its
    # square over the gap). float32 products carry ~1e-7 relative noise, so ask no more than 1e-6.
    tol = 1e-6 if op.dtype == torch.float32 else 1e-10
    vals = eigsh(lin, k=k, which="LA", v0=v0, tol=tol, return_eigenvectors=False)
    return sorted((float(v) for v in vals), reverse=True)


def lanczos(op: HessianOperator, steps: int, starts: torch.Tensor, deflate: torch.Tensor | None = None):
    """Independent Lanczos runs, one per column of `starts` (advanced together: one product with all
    columns per step), with full reorthogonalisation (also against the orthonormal columns of
    `deflate`, whose span the runs then exclude).

    Returns (tridiagonals, basis, residuals): per run the tridiagonal matrix (float64), the Lanczos
    vectors (runs, steps, P) and the norm of the next residual (0 where a run found an invariant
    subspace: it stops there and is exact). Memory: steps * P * runs values of the operator's dtype.
    """
    P, runs = starts.shape
    steps = max(1, min(steps, P - (0 if deflate is None else deflate.shape[1])))
    q = starts / starts.norm(dim=0)
    basis = torch.zeros(runs, steps, P, dtype=op.dtype, device=op.device)  # run-major: bmm-friendly
    alphas, betas = np.zeros((steps, runs)), np.zeros((steps, runs))
    length = np.full(runs, steps)
    active = np.ones(runs, dtype=bool)
    tiny = 100 * torch.finfo(op.dtype).eps
    for j in range(steps):
        basis[:, j] = q.T
        w = op.matmat(q)
        alpha = (w * q).sum(dim=0)
        alphas[j] = alpha.double().cpu().numpy()
        w = w - alpha * q
        if j > 0:
            w = w - torch.as_tensor(betas[j - 1], dtype=op.dtype, device=op.device) * basis[:, j - 1].T
        # Full reorthogonalisation by classical Gram-Schmidt, repeated when it removed much of w
        # (Kahan-Parlett "twice is enough"; after the three-term recurrence one pass usually suffices).
        # Matrix-vector products run by run: much faster than bmm on these shapes.
        for _ in range(2):
            before = w.norm(dim=0)
            w = torch.stack([w[:, r] - (basis[r, :j + 1] @ w[:, r]) @ basis[r, :j + 1] for r in range(runs)], 1)
            if deflate is not None:
                w = w - deflate @ (deflate.T @ w)
            if bool((w.norm(dim=0) >= 0.7 * before).all()):
                break
        beta = w.norm(dim=0).double().cpu().numpy()
        scale = np.maximum(np.abs(alphas[:j + 1]).max(axis=0), betas[:j + 1].max(axis=0))
        stopped = active & (beta <= tiny * np.maximum(scale, 1e-30))
        length[stopped] = j + 1
        active &= ~stopped
        beta[~active] = 0.0
        betas[j] = beta
        if not active.any():
            break
        q = w / torch.as_tensor(np.where(active, beta, 1.0), dtype=op.dtype, device=op.device)
        q[:, ~torch.as_tensor(active, device=op.device)] = 0
    tridiagonals, residuals = [], []
    for r in range(runs):
        m = length[r]
        a, b = alphas[:m, r], betas[:m - 1, r]
        tridiagonals.append(np.diag(a) + np.diag(b, 1) + np.diag(b, -1))
        residuals.append(float(betas[m - 1, r]))
    return tridiagonals, basis, residuals


def slq_rank(op: HessianOperator, steps: int, runs: int, cut: float, gen: torch.Generator):
    """Stochastic Lanczos quadrature of the spectrum, deflated, and the count of |lambda| > cut.

    Plain SLQ estimates rank = P * (weight above the cut) with a relative standard deviation of about
    sqrt(2 / rank) per run (15% at rank 80), whatever the number of steps. So a first Lanczos pass
    finds the eigenpairs above the cut that it resolves to a residual below 1e-3 * cut (those are
    counted exactly: c of them, span U), and the `runs` SLQ runs then sample only the spectrum on the
    orthogonal complement of U (dimension P - c): rank = c + (P - c) * (weight above the cut).
    Each run's rows in the spectrum: U's eigenvalues with weight 1/P, then its nodes with the Lanczos
    weights times (P - c) / P, so the weights of a run sum to 1 and P * (weight above the cut) is the
    run's rank estimate, as for plain SLQ. Returns (rank, c, spectrum frame).
    """
    P = op.P
    (T,), basis, (beta,) = lanczos(op, steps, rademacher(1, P, gen, op.dtype, op.device))
    theta, S = np.linalg.eigh(T)
    keep = (np.abs(beta * S[-1]) <= 1e-3 * cut) & (np.abs(theta) > cut)
    locked, c, U = theta[keep], int(keep.sum()), None
    if c:
        U = basis[0, :len(theta)].T @ torch.as_tensor(S[:, keep], dtype=op.dtype, device=op.device)
        U = torch.linalg.qr(U.double())[0].to(op.dtype)
    del basis
    results = [(np.zeros(0), np.zeros(0))] * runs
    if P - c >= 1:
        # Runs advance together (one product per step for all), in groups that keep the basis < 1 GB.
        group = max(1, min(runs, (2 ** 30 // op.params[0].element_size()) // (steps * P)))
        starts = rademacher(runs, P, gen, op.dtype, op.device)
        if U is not None:
            starts = starts - U @ (U.T @ starts)
        results = []
        for i in range(0, runs, group):
            tridiagonals, _, _ = lanczos(op, steps, starts[:, i:i + group], deflate=U)
            for T in tridiagonals:
                nodes, vecs = np.linalg.eigh(T)
                results.append((nodes, vecs[0] ** 2 * (P - c) / P))
    frames, ranks = [], []
    for r, (nodes, weights) in enumerate(results):
        ranks.append(c + P * weights[np.abs(nodes) > cut].sum())
        frames.append(pd.DataFrame({"slq_run": r, "node": np.concatenate([locked, nodes]),
                                    "weight": np.concatenate([np.full(c, 1.0 / P), weights])}))
    return float(np.mean(ranks)), c, pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------ estimator


class HessianEstimator(Estimator):
    name = "hessian"
    tables = ("hessian", "hessian_spectrum")
    options = (
        Option("samples", int, 1280, "training samples (seeded; fewer if the split is smaller)"),
        Option("batch_size", int, 1280, "samples per forward pass (memory only)"),
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
