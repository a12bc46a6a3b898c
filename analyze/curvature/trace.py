"""Stochastic trace estimators on a Hessian operator: Hutchinson and Hutch++ (Meyer et al. 2020)."""

from __future__ import annotations

import math

import torch

from analyze.curvature.operators import CHUNK, HessianOperator


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
