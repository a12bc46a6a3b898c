"""v^T H v for a block of directions by one forward pass of second-order Taylor coefficients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from analyze.curvature.ggn import leaf_modules


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
