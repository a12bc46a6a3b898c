"""The Hessian of the mean loss over a set of batches as a linear operator: products with (P, k) matrices.

Backends: curvlinops (default; its quadratic forms by a forward-mode Taylor pass where every layer is
supported, see analyze.curvature.taylor) and pyhessian 0.1 (for comparison with the study's numbers).
Both feed the same algorithms (analyze.curvature.trace, analyze.curvature.spectrum).
"""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from analyze.curvature.taylor import TaylorQuadratic, TaylorUnsupported

# Probe vectors multiplied at once (vmapped, or one Taylor pass): at most CHUNK, fewer when the
# activations are large, so that CHUNK * batch * widest activation * 8 live copies fit in MEMORY.
CHUNK = 32
MEMORY = 2 ** 30


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
