"""SGLD chains around a checkpoint, all chains advanced together with torch.func (the `fast` backend).

Update (the same rule as devinterp and the seed study):

    w <- w - (eps / 2) * (nbeta * grad L_B(w) + gamma * (w - w*)) + sqrt(eps) * N(0, I)

Chains are stacked along a leading axis and stepped with one vmapped gradient call. Each chain owns
two generators (minibatch order and Gaussian noise) seeded from (seed, chain), so chain c is the same
whatever the number of chains, and chains are independent. The recorded loss of a step is L_B at the
point before the step (devinterp records the same), in eval mode (no dropout noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, vmap


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

    @property
    def steps(self) -> int:
        return self.burnin + self.draws


def chain_seed(seed: int, chain: int, stream: int) -> int:
    """Independent, reproducible seed for one chain's stream (0 = batches, 1 = noise)."""
    return int(np.random.SeedSequence([seed, chain, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _BatchStream:
    """Successive shuffles of range(n), cut into minibatches (drop-last), from one generator."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(n, generator=self.generator), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.generator), 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx


def sample_losses(model: torch.nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
                  settings: SGLDSettings, progress=None) -> np.ndarray:
    """Run the chains; return the minibatch loss of every step, shape (chains, burnin + draws), float64.

    A chain whose loss becomes non-finite keeps NaN from then on (its parameters are frozen at NaN);
    the caller flags it instead of averaging it in.
    """
    model = model.eval()
    device = next(model.parameters()).device
    names = [n for n, p in model.named_parameters()]
    w_star = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    C = settings.chains
    w = {n: p.unsqueeze(0).repeat(C, *([1] * p.ndim)).clone() for n, p in w_star.items()}
    sizes = [w_star[n].numel() for n in names]

    def loss_of(params, xb, yb):
        return loss_fn(functional_call(model, (params, buffers), (xb,)), yb)

    n = len(y)
    full_batch = settings.batch_size <= 0 or settings.batch_size >= n
    step_fn = vmap(grad_and_value(loss_of), in_dims=(0, None, None) if full_batch else (0, 0, 0))
    batches = [] if full_batch else [_BatchStream(n, settings.batch_size, chain_seed(settings.seed, c, 0))
                                     for c in range(C)]
    noise_gens = [torch.Generator(device=device).manual_seed(chain_seed(settings.seed, c, 1)) for c in range(C)]
    P = sum(sizes)
    half_eps, gamma, nbeta = settings.lr / 2, settings.localization, settings.nbeta
    noise_scale = settings.lr ** 0.5
    losses = np.empty((C, settings.steps), dtype=np.float64)

    for t in range(settings.steps):
        if full_batch:
            grads, loss = step_fn(w, x, y)
        else:
            idx = torch.stack([b.next() for b in batches]).to(x.device)  # (C, B)
            grads, loss = step_fn(w, x[idx], y[idx])
        losses[:, t] = loss.detach().double().cpu().numpy()
        noise = torch.stack([torch.randn(P, generator=g, device=device, dtype=w_star[names[0]].dtype)
                             for g in noise_gens]).split(sizes, dim=1)
        with torch.no_grad():
            for name, eta in zip(names, noise):
                drift = nbeta * grads[name] + gamma * (w[name] - w_star[name])
                w[name] = w[name] - half_eps * drift + noise_scale * eta.view_as(w[name])
        if progress is not None:
            progress.update(1)
    return losses
