"""Eigenvalues of a Hessian operator: the dense Hessian, the top eigenvalues (eigsh), Lanczos with full
reorthogonalisation, and deflated stochastic Lanczos quadrature (SLQ) for the spectral density and rank."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from analyze.curvature.operators import HessianOperator
from analyze.curvature.trace import rademacher


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
    return sorted(_extreme_eigenvalues(op, k, seed, "LA"), reverse=True)


def bottom_eigenvalues(op: HessianOperator, k: int, seed: int) -> list[float]:
    """The k smallest algebraic eigenvalues (which="SA"), ascending: negative ones are directions in which the
    loss curves down (the checkpoint is not at a minimum). The bottom of a trained net's spectrum is a dense
    cluster near 0, where Lanczos converges slowly: a basis of 20 and a relative tolerance of 1e-3 (enough to
    tell a negative curvature's size) keep it to about a minute on the study's 269k-parameter MLP."""
    return sorted(_extreme_eigenvalues(op, k, seed, "SA", basis=20, tol=1e-3))


def _extreme_eigenvalues(op: HessianOperator, k: int, seed: int, which: str, basis: int = 12,
                         tol: float | None = None) -> list[float]:
    from scipy.sparse.linalg import LinearOperator, eigsh

    def matvec(v):
        t = torch.as_tensor(np.asarray(v).reshape(op.P, -1), dtype=op.dtype, device=op.device)
        return op.matmat(t).double().cpu().numpy().reshape(np.shape(v))

    lin = LinearOperator((op.P, op.P), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(op.P)
    # Residual tolerance relative to |lambda|; the eigenvalue error is at most that (usually its
    # square over the gap). float32 products carry ~1e-7 relative noise, so ask no more than 1e-6.
    tol = tol if tol is not None else 1e-6 if op.dtype == torch.float32 else 1e-10
    # A basis of 12 Lanczos vectors for the top, not ARPACK's default 20: the first restart comes after ncv
    # products, and the top eigenvalue usually converges in ~12 (21 -> 13 products per lambda_max on the study's
    # MLP; never slower there for k = 1 or 5, and the same values to every printed digit).
    ncv = min(op.P, max(2 * k + 1, basis))
    vals = eigsh(lin, k=k, ncv=ncv, which=which, v0=v0, tol=tol, return_eigenvectors=False)
    return [float(v) for v in vals]


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
