"""SGLD chains around a checkpoint, all chains advanced together with torch.func (the `fast` backend).

Update (the same rule as devinterp and the seed study):

    w <- w - (eps / 2) * (nbeta * grad L_B(w) + gamma * (w - w*)) + sqrt(eps) * N(0, I)

`rmsprop-sgld` (Li et al. 2016, as devinterp 2 implements it) preconditions drift and noise with a
running average V of the squared minibatch gradient, per chain and coordinate:

    V <- alpha V + (1 - alpha) grad^2,   G = 1 / (sqrt(V) + delta)     (alpha 0.99, delta 0.1; V_0 = 0)
    w <- w - (eps / 2) * G * (nbeta * grad L_B(w) + gamma * (w - w*)) + sqrt(eps * G) * N(0, I)

Chains are stacked along a leading axis: one vmapped forward pass (torch.func.functional_call under
vmap) and one ordinary backward give every chain its gradient, and the update is applied in place.
A chain costs about the same as a bare forward+backward pass plus its Gaussian draw
(scripts/bench_llc.py). Each chain owns two generators (minibatches and Gaussian noise) seeded from
(seed, chain), so chain c is the same whatever the number of chains, and chains are independent.
The recorded loss of a step is L_B at the point before the step (devinterp records the same), in eval
mode (no dropout noise).

Minibatches are drawn uniformly and independently at every step (with replacement), not by walking
through shuffled epochs. Within an epoch, the batch at step t holds exactly the samples the chain has
not yet stepped on in that epoch, while the earlier steps pushed the loss of the others down: L_B(w_t)
then overestimates L_n(w_t), and the LLC with it (+3% on a digits 3x64 MLP: 18.84 / 18.58 against
18.36 / 18.14 with independent batches and 18.24 through devinterp, whose batches are independent too).

`control_variate=True` (SGLD-CV, Baker, Fearnhead, Fox & Nemeth 2019) replaces the minibatch gradient and
loss by their control-variate forms around the checkpoint w*:

    grad L_B(w)  ->  grad L_n(w*) + grad L_B(w) - grad L_B(w*)
    L_B(w)       ->  L_n(w*)      + L_B(w)      - L_B(w*)

Both stay unbiased, and their noise shrinks with |w - w*|, which the localized posterior keeps of order
1/sqrt(nbeta): the gradient noise that heats plain SGLD in proportion to eps x nbeta^2 / batch falls by a
factor of order nbeta, so a small batch suffices at any n. The cost is a second forward and backward pass
per chain (at w*, on the chain's own batch) and one full pass for grad L_n(w*).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.func import functional_call, vmap


@dataclass(frozen=True)
class SGLDSettings:
    lr: float  # eps
    localization: float  # gamma
    nbeta: float
    chains: int
    draws: int  # kept draws per chain
    burnin: int  # discarded steps before the draws
    batch_size: int  # 0 or >= n: full-batch gradients
    seed: int
    sampler: str = "sgld"  # or "rmsprop-sgld"
    control_variate: bool = False  # SGLD-CV gradients and losses (module docstring); no effect at full batch

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}")

    @property
    def steps(self) -> int:
        return self.burnin + self.draws


SAMPLERS = ("sgld", "rmsprop-sgld")
RMSPROP_ALPHA, RMSPROP_DELTA = 0.99, 0.1  # devinterp 2's defaults


def chain_seed(seed: int, chain: int, stream: int) -> int:
    """Independent, reproducible seed for one chain's stream (0 = batches, 1 = noise)."""
    return int(np.random.SeedSequence([seed, chain, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _BatchStream:
    """Independent uniform minibatches of row indices, from one generator (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        return torch.randint(0, self.n, (self.batch_size,), generator=self.generator)


def sample_losses(model: torch.nn.Module, per_sample_loss: Callable, x: torch.Tensor, y: torch.Tensor,
                  settings: SGLDSettings, progress=None) -> np.ndarray:
    """Run the chains; return the minibatch loss of every step, shape (chains, burnin + draws), float64.

    `per_sample_loss(outputs, targets)` returns one loss per sample (reduction "none"); L_B is its mean.

    A chain whose loss becomes non-finite keeps NaN from then on (its parameters are frozen at NaN);
    the caller flags it instead of averaging it in.
    """
    model = model.eval()
    names = [name for name, _ in model.named_parameters()]
    w_star = [p.detach() for _, p in model.named_parameters()]
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    device, dtype = w_star[0].device, w_star[0].dtype
    C, n = settings.chains, len(y)
    full_batch = settings.batch_size <= 0 or settings.batch_size >= n
    control_variate = settings.control_variate and not full_batch
    copies = 2 if control_variate else 1
    # Chain-stacked parameters (chain axis first) are the leaves of the graph. With control variates they
    # hold C more rows that stay at w*, each evaluated on the same batch as its chain; `w` are the chains.
    stacked = [p.unsqueeze(0).repeat(copies * C, *([1] * p.ndim)).requires_grad_(True) for p in w_star]
    w = [s[:C] for s in stacked]
    anchor = [p.unsqueeze(0).expand_as(wc) for p, wc in zip(w_star, w)]  # w* broadcast, not copied

    def forward(params, xb):
        return functional_call(model, (dict(zip(names, params)), buffers), (xb,))

    # vmap batches only the forward pass; the loss is taken outside it on (chains x batch) outputs (a
    # vmapped cross-entropy runs a slow decomposition), and one ordinary backward of the summed chain
    # losses gives every chain its own gradient (chains share no parameters), which is cheaper than
    # vmapping grad() (scripts/bench_llc.py measures the result).
    chain_outputs = vmap(forward, in_dims=(0, None) if full_batch else (0, 0))
    y_all = y.unsqueeze(0).expand(C, *y.shape).reshape(C * n, *y.shape[1:]) if full_batch else None

    def chain_losses(xb, yb):
        """L_B of every stacked row; xb is (C, B, ...) per-chain batches, or all of x at full batch."""
        if copies > 1:
            xb, yb = torch.cat([xb] * copies), torch.cat([yb] * copies)
        out = chain_outputs(stacked, xb)  # (copies x C, B, ...)
        return per_sample_loss(out.flatten(0, 1), yb).view(copies * C, -1).mean(dim=1)

    if control_variate:
        loss_star, grad_star = full_loss_and_gradient(forward, w_star, per_sample_loss, x, y)
        # d/dw of sum_c [L_B(w_c) - L_B(w*)]: the reference rows' gradients come out negated
        sign = torch.ones(copies * C, device=device, dtype=dtype)
        sign[C:] = -1

    batches = [] if full_batch else [_BatchStream(n, settings.batch_size, chain_seed(settings.seed, c, 0))
                                     for c in range(C)]
    noise_gens = [torch.Generator(device=device).manual_seed(chain_seed(settings.seed, c, 1)) for c in range(C)]
    # Row c of `noise` is chain c's N(0, I) draw over all parameters; `noise_views` cut it per tensor.
    sizes = [p.numel() for p in w_star]
    noise = torch.empty(C, sum(sizes), device=device, dtype=dtype)
    noise_views = [block.view_as(wc) for block, wc in zip(noise.split(sizes, dim=1), w)]
    losses = torch.empty(C, settings.steps, dtype=torch.float64, device=device)
    rmsprop = settings.sampler == "rmsprop-sgld"
    square_avg = [torch.zeros_like(wc) for wc in w] if rmsprop else None

    for t in range(settings.steps):
        if full_batch:
            loss = chain_losses(x, y_all)
        else:
            idx = torch.cat([b.next() for b in batches]).to(x.device)  # chain after chain
            # index_select is several times faster than fancy indexing for this gather
            loss = chain_losses(x.index_select(0, idx).view(C, -1, *x.shape[1:]), y.index_select(0, idx))
        if control_variate:
            grads = torch.autograd.grad((sign * loss).sum(), stacked)
            with torch.no_grad():  # grad L_B(w) - grad L_B(w*) + grad L_n(w*);  L_B(w) - L_B(w*) + L_n(w*)
                grads = [g[:C] + g[C:] + g_star for g, g_star in zip(grads, grad_star)]
                loss = loss[:C].double() - loss[C:].double() + loss_star
        else:
            grads = torch.autograd.grad(loss.sum(), stacked)
        losses[:, t] = loss.detach()
        with torch.no_grad():
            for row, g in zip(noise, noise_gens):
                row.normal_(generator=g)
            if rmsprop:
                rmsprop_step(w, anchor, grads, noise_views, square_avg, settings)
            else:
                sgld_step(w, anchor, grads, noise_views, settings)
        if progress is not None:
            progress.update(1)
    return losses.cpu().numpy()


def full_loss_and_gradient(forward, w_star, per_sample_loss, x, y, batch: int = 4096):
    """L_n(w*) (float64) and grad L_n(w*) over the whole training set, in chunks; forward(params, x)."""
    params = [p.detach().requires_grad_(True) for p in w_star]
    grads = [torch.zeros_like(p) for p in params]
    total = 0.0
    for i in range(0, len(y), batch):
        chunk = per_sample_loss(forward(params, x[i:i + batch]), y[i:i + batch]).sum()
        for g, gi in zip(grads, torch.autograd.grad(chunk, params)):
            g.add_(gi)
        total += chunk.detach().double().item()
    return total / len(y), [g.div_(len(y)) for g in grads]


def sgld_step(w, anchor, grads, noise, settings: SGLDSettings) -> None:
    """w <- w - (eps/2) (nbeta grad + gamma (w - w*)) + sqrt(eps) noise, every chain, in place."""
    for wc, a in zip(w, anchor):
        wc.lerp_(a, settings.lr / 2 * settings.localization)  # w - (eps/2) gamma (w - w*), one pass
    torch._foreach_add_(w, grads, alpha=-settings.lr / 2 * settings.nbeta)
    torch._foreach_add_(w, noise, alpha=settings.lr ** 0.5)


def rmsprop_step(w, anchor, grads, noise, square_avg, settings: SGLDSettings) -> None:
    """One RMSProp-SGLD update of every chain, in place (see the module docstring)."""
    torch._foreach_mul_(square_avg, RMSPROP_ALPHA)
    torch._foreach_addcmul_(square_avg, grads, grads, value=1 - RMSPROP_ALPHA)
    precond = torch._foreach_sqrt(square_avg)
    torch._foreach_add_(precond, RMSPROP_DELTA)
    torch._foreach_reciprocal_(precond)  # G
    drift = torch._foreach_sub(w, anchor)
    torch._foreach_mul_(drift, settings.localization)
    torch._foreach_add_(drift, grads, alpha=settings.nbeta)
    torch._foreach_mul_(drift, precond)
    torch._foreach_add_(w, drift, alpha=-settings.lr / 2)
    torch._foreach_sqrt_(precond)  # sqrt(G)
    torch._foreach_addcmul_(w, noise, precond, value=settings.lr ** 0.5)
