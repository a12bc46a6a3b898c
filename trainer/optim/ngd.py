"""Online natural gradient descent (Povey, Zhang and Khudanpur 2015, arXiv:1410.7455).

What this is: each parameter tensor's gradient G is preconditioned, axis by
axis, with the inverse of a smoothed running estimate of a Fisher factor
F_a ~ E[X^T X / N], where X is G viewed with axis a last (the other axes act
as samples).  The statistics are those of *minibatch-mean* gradients (not of
per-example gradients), so the preconditioner damps the directions that recent
minibatch gradients shared and boosts the rarely visited ones.  The result is
rescaled to the norm of G, so NGD changes the step's direction only; momentum
and the learning rate then apply exactly as in ``torch.optim.SGD``.

Each estimate is kept as "top R eigenpairs plus one scalar for the rest"
(R = min((d + 1) // 2, 80)) and refreshed on the first 10 steps, then every 4
steps; truncation uses a small Gram matrix when the update has low rank.  A
step costs more than an SGD step (and is not promised to train faster).

``refresh="exact"`` (the default, the algorithm's definition) finds the top R
eigenpairs with a full eigendecomposition.  ``refresh="subspace"`` finds them
approximately: one block power step from the previous eigenvectors, then
Rayleigh-Ritz, so only an R x R matrix is decomposed (close in spirit to Povey
et al.'s own implementation, which also updates its estimate with an R x R
eigendecomposition).  rho still comes from the exact trace, and the floors
still apply.  The first step, axes where the exact decomposition costs about as
little (min(d, K) < 2R), and estimates with fewer than R directions to start
from stay exact.

``dense_natural_direction`` and ``truncate_fisher`` are plain dense reference
implementations of the same maths, for tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["NGD", "REFRESH_MODES", "dense_natural_direction", "truncate_fisher", "fisher_rank"]

REFRESH_MODES = ("exact", "subspace")

# Eigenvalues of the Gram matrix below this fraction of the largest are treated
# as exact zeros: mapping their eigenvectors back (M v / sqrt(s)) would amplify
# rounding error, and an eigenvalue that small never survives the delta floor.
_GRAM_RTOL = 1e-10


def fisher_rank(d: int) -> int:
    """Number R of eigenpairs kept for a d x d Fisher factor."""
    return min((d + 1) // 2, 80)


def memory_bytes(shapes: list[tuple[int, ...]], element_size: int = 4) -> float:
    """Memory NGD takes for parameters of these shapes beyond the parameters, their gradients and momentum:
    the kept factors of every axis (U_a, lam_a, rho_a), plus the largest step's transients. A refresh of axis a
    of an n-element parameter holds the gradient's copy X, its float64 square (for the trace, 4n), M, its
    extension and its rescaled copy (d x K each, K = n / d + R), the d x d or K x K Gram matrix with its
    eigenvectors and LAPACK's workspace (4 min(d, K)^2), and the new U_a; the preconditioning and Nesterov
    step add a few copies of n. Counted with some slack (10n): tests/test_ngd.py checks that the peak RSS of
    real steps stays below it, and not far below. A float: products of file numbers can exceed any int64."""
    kept, peak = 0.0, 0.0
    for shape in shapes:
        n = math.prod(float(d) for d in shape)
        for d in shape:
            if d <= 1:
                continue
            R = fisher_rank(d)
            K = n / d + R
            kept += d * R + R + 1.0
            peak = max(peak, 10.0 * n + 3.0 * d * K + 4.0 * min(d, K) ** 2 + 2.0 * d * R)
    return (kept + peak) * element_size


def _update_due(step: int) -> bool:
    """Refresh schedule: each of the first 10 steps, then every 4 steps."""
    return step <= 10 or (step - 10) % 4 == 0


# ----------------------------------------------------------------------------
# Dense reference implementations (used by the tests)
# ----------------------------------------------------------------------------


def truncate_fisher(F: Tensor, epsilon: float, delta: float) -> Tensor:
    """Dense d x d matrix of the low-rank-plus-identity truncation of symmetric F.

    Keeps the top R eigenpairs, replaces the other d - R eigenvalues by their
    mean rho, and floors kept eigenvalues and rho at max(epsilon, delta * lam_max).
    """
    d = F.shape[0]
    R = fisher_rank(d)
    evals, evecs = torch.linalg.eigh(F)
    evals, evecs = evals.flip(0), evecs.flip(1)
    lam, U = evals[:R], evecs[:, :R]
    rho = evals[R:].mean()
    floor = max(epsilon, delta * float(evals[0]))
    lam = lam.clamp_min(floor)
    rho = rho.clamp_min(floor)
    eye = torch.eye(d, dtype=F.dtype, device=F.device)
    return (U * lam) @ U.T + rho * (eye - U @ U.T)


def dense_natural_direction(grad: Tensor, fishers: list[Tensor | None], alpha: float) -> Tensor:
    """Dense reference of the preconditioning and rescaling (steps 3-4).

    ``fishers[a]`` is the d_a x d_a estimate for axis a, or None to skip it.
    """
    if grad.dim() == 0:
        return grad.clone()
    out = grad
    for a, F in enumerate(fishers):
        if F is None:
            continue
        d = F.shape[0]
        c = alpha * torch.trace(F) / d
        Fs = F + c * torch.eye(d, dtype=F.dtype, device=F.device)
        Y = out.movedim(a, -1)
        shape = Y.shape
        X = Y.reshape(-1, d)
        # X Fs^-1 = (Fs^-1 X^T)^T, Fs symmetric.
        X = torch.linalg.solve(Fs, X.T).T
        out = X.reshape(shape).movedim(-1, a)
    gnorm = grad.norm()
    if gnorm == 0:
        return torch.zeros_like(grad)
    return out * (gnorm / out.norm())


# ----------------------------------------------------------------------------
# Low-rank machinery
# ----------------------------------------------------------------------------


def _floored(lam: Tensor, trace: Tensor, d: int, R: int, epsilon: float, delta: float) -> tuple[Tensor, Tensor]:
    """(lam, rho) with rho = mean of the other d - R eigenvalues (from the trace), both floored
    at max(epsilon, delta * lam_max). lam: float64, descending."""
    rho = (trace - lam.sum()) / (d - R)
    floor = torch.clamp_min(delta * lam[0], epsilon)
    return torch.maximum(lam, floor), torch.maximum(rho, floor)


def _truncate_lowrank(
    M: Tensor, c0: float | Tensor, trace: Tensor, R: int, epsilon: float, delta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Truncate F = c0 * I + M M^T (M: d x K) to (U, lam, rho), floors applied.

    ``trace`` is tr F, known in closed form, so rho needs only the kept eigenvalues.
    """
    d, K = M.shape
    # Decompose M / s, s = max |M|: eigenvectors do not change and squares cannot overflow float32
    # (a diverging run reaches |g| ~ 1e22 before its loss turns non-finite and the trainer stops it).
    peak = M.abs().max().double()
    s2 = peak.square() if peak > 0 else torch.ones((), dtype=torch.float64)  # all-zero M: nothing to scale
    M = M / s2.sqrt().to(M.dtype)
    c0 = c0 / s2
    if K < d:
        # F's spectrum is c0 plus that of M M^T, whose nonzero part is that of
        # the small K x K Gram matrix M^T M: no d x d decomposition needed.
        s, V = torch.linalg.eigh(M.T @ M)
        s, V = s.flip(0)[:R], V.flip(1)[:, :R]
        keep = s > _GRAM_RTOL * s[0]
        s = torch.where(keep, s, torch.zeros_like(s))
        # Dropped/null directions get zero columns: their eigenvalue is c0,
        # which is then also rho (up to rounding), so they carry no weight in F or F^-1.
        scale = torch.where(keep, s.clamp_min(torch.finfo(s.dtype).tiny).rsqrt(), torch.zeros_like(s))
        U = (M @ V) * scale
        if s.shape[0] < R:  # fewer than R columns: pad with null directions
            pad = R - s.shape[0]
            s = torch.cat([s, s.new_zeros(pad)])
            U = torch.cat([U, U.new_zeros(d, pad)], dim=1)
        lam = s + c0
    else:
        F = M @ M.T
        F.diagonal().add_(c0)
        evals, evecs = torch.linalg.eigh(F)
        lam, U = evals.flip(0)[:R], evecs.flip(1)[:, :R]
    lam = lam.double() * s2
    return U, *_floored(lam, trace, d, R, epsilon, delta)


def _truncate_subspace(
    X: Tensor, k: float, U: Tensor, w: Tensor, c0: Tensor, trace: Tensor, R: int, epsilon: float, delta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Approximate ``_truncate_lowrank`` of F = c0 * I + M M^T, M = [k X^T, U diag(sqrt w)], warm-started from U.

    X: N x d; U: d x R, the previous eigenvectors (orthonormal); w >= 0 (float64).
    One block power step from U, then Rayleigh-Ritz: only an R x R matrix is
    decomposed.  One step suffices because U already holds most of the top
    subspace, and the preconditioner needs accurately only the eigenpairs well
    above alpha * tr(F) / d, which converge fastest (tests/test_ngd.py).  The
    shift c0 is left out of the step (same eigenvectors, faster convergence).
    """
    d = X.shape[1]
    # Work with M / s, s^2 = tr F >= |M|_F^2 (known in closed form): no product of M / s can overflow.
    s2 = trace if trace > 0 else torch.ones((), dtype=torch.float64)
    inv = 1.0 / math.sqrt(float(s2))
    A = X * (k * inv)  # M / s = [A^T, C]
    C = U * (w.sqrt() * inv).to(U.dtype)
    # One power step (U^T U = I, so C C^T U = U diag(w) / s^2); Householder QR keeps the columns
    # orthonormal even where M M^T U is rank-deficient.
    Q = torch.linalg.qr(A.T @ (A @ U) + U * (w * inv**2).to(U.dtype)).Q
    AQ, CQ = A @ Q, C.T @ Q
    theta, W = torch.linalg.eigh(AQ.T @ AQ + CQ.T @ CQ)  # Q^T M M^T Q / s^2
    lam = theta.flip(0).double() * s2 + c0
    return Q @ W.flip(1), *_floored(lam, trace, d, R, epsilon, delta)


class NGD(torch.optim.Optimizer):
    """Online natural gradient with SGD-style (optionally Nesterov) momentum.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (required).
        alpha: smoothing, F~ = F^ + alpha * tr(F^)/d * I.
        eta: forgetting factor, F_t = eta * S_t + (1 - eta) * F^_{t-1}.
        epsilon: absolute eigenvalue floor.
        delta: eigenvalue floor relative to the largest eigenvalue.
        momentum, nesterov: as in ``torch.optim.SGD`` (dampening 0); unlike
            SGD, nesterov=True with momentum 0 is accepted (and is a no-op).
        weight_decay: L2 term added to the gradient before preconditioning.
        refresh: "exact" (full eigendecomposition, the algorithm's definition)
            or "subspace" (warm-started subspace iteration, cheaper; see the
            module docstring).

    Step 1 initialises each estimate from its own gradient (no eta mixing) and
    is preconditioned with it; later refresh steps precondition with the old
    estimate, then update it.  0-dim parameters get plain SGD.

    Per-parameter state (tensors only): ``step`` (int64 scalar), and for each
    axis a of size > 1 ``U_a`` (d x R), ``lam_a`` (R), ``rho_a`` (scalar);
    ``momentum_buffer`` when momentum != 0.
    """

    def __init__(
        self,
        params,
        lr: float,
        alpha: float = 0.1,
        eta: float = 0.9,
        epsilon: float = 1e-10,
        delta: float = 5e-4,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        refresh: str = "exact",
    ):
        if lr is None or lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if alpha <= 0.0:
            raise ValueError(f"alpha must be > 0 (the smoothing keeps F~ invertible): {alpha}")
        if not 0.0 < eta <= 1.0:
            raise ValueError(f"eta must be in (0, 1]: {eta}")
        if epsilon <= 0.0:
            raise ValueError(f"epsilon must be > 0: {epsilon}")
        if delta < 0.0:
            raise ValueError(f"delta must be >= 0: {delta}")
        if momentum < 0.0:
            raise ValueError(f"invalid momentum: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if refresh not in REFRESH_MODES:
            raise ValueError(f"refresh must be one of {', '.join(REFRESH_MODES)}: {refresh!r}")
        defaults = dict(
            lr=lr, alpha=alpha, eta=eta, epsilon=epsilon, delta=delta,
            momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, refresh=refresh,
        )
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict):
        modes = [group["refresh"] for group in self.param_groups]
        super().load_state_dict(state_dict)  # the saved groups' settings replace these, as in torch
        for group, mode in zip(self.param_groups, modes):
            group.setdefault("refresh", mode)  # a state dict saved before the option existed

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("NGD does not support sparse gradients")
                self._step_param(p, group)
        return loss

    def _step_param(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        g = p.grad
        if group["weight_decay"] != 0.0:
            g = g.add(p, alpha=group["weight_decay"])
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.int64)
        state["step"] += 1
        step = int(state["step"])

        if g.dim() == 0:
            direction = g.clone()  # nothing to precondition: plain SGD
        else:
            direction = self._natural_direction(g, state, step, group)

        momentum = group["momentum"]
        if momentum != 0.0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = direction.clone()
                state["momentum_buffer"] = buf
            else:
                buf.mul_(momentum).add_(direction)
            if group["nesterov"]:
                direction = direction.add(buf, alpha=momentum)
            else:
                direction = buf
        p.add_(direction, alpha=-group["lr"])

    def _natural_direction(self, g: Tensor, state: dict, step: int, group: dict) -> Tensor:
        axes = [a for a, d in enumerate(g.shape) if d > 1]
        if step == 1:
            # No previous estimate: initialise from this gradient, then use it.
            for a in axes:
                self._refresh(g, a, state, group, init=True)
        out = g
        for a in axes:
            out = self._apply_inverse(out, a, state, group["alpha"])
        if step > 1 and _update_due(step):
            # Update after preconditioning, from the raw gradient.
            for a in axes:
                self._refresh(g, a, state, group, init=False)
        gnorm = g.norm()
        # F~^-1 is positive definite, so out = 0 only if g = 0; then scale = 0.
        return out * (gnorm / out.norm().clamp_min(torch.finfo(out.dtype).tiny))

    @staticmethod
    def _apply_inverse(t: Tensor, a: int, state: dict, alpha: float) -> Tensor:
        """t with axis a mapped by F~^-1, using only the low-rank factors."""
        U, lam, rho = state[f"U_{a}"], state[f"lam_{a}"], state[f"rho_{a}"]
        d, R = U.shape
        c = alpha * (lam.sum() + (d - R) * rho) / d
        # Apply (rho + c) * F~^-1 = I + U diag((rho + c) / (lam + c) - 1) U^T:
        # the factor rho + c cancels in the final rescaling, and leaving it out
        # keeps magnitudes O(|G|) (1/c per axis would underflow float32 norms
        # for large alpha on tensors with many axes).
        coef = (rho + c) / (lam + c) - 1.0
        Y = t.movedim(a, -1)
        X = Y.reshape(-1, d)  # a view for 1-D/2-D tensors (2-D: maybe transposed)
        out = torch.addmm(X, (X @ U) * coef, U.T)
        return out.reshape(Y.shape).movedim(-1, a)

    @staticmethod
    def _refresh(g: Tensor, a: int, state: dict, group: dict, init: bool) -> None:
        """Update (or initialise) axis a's truncated Fisher estimate from raw g."""
        d = g.shape[a]
        R = fisher_rank(d)
        # Decompose in the parameter's dtype: float32 LAPACK is ~2x faster than float64 and its
        # rounding (~1e-7 of the largest eigenvalue) sits far below the delta floor (5e-4 of it).
        # Only the trace, which sets rho, is accumulated in float64.
        work = g.dtype if g.dtype in (torch.float32, torch.float64) else torch.float32
        X = g.movedim(a, -1).reshape(-1, d).to(work)
        N = X.shape[0]
        # Subspace iteration saves decomposing a min(d, K)-square matrix (K = N + R at most); below 2R
        # that is about as cheap as its QR and extra products. Its warm start must span R directions: the
        # exact truncation leaves zero columns for null directions (statistics of rank < R, e.g. from fewer
        # than R samples), and a power step cannot turn those towards new directions.
        subspace = (not init and group["refresh"] == "subspace" and min(d, N + R) >= 2 * R
                    and bool(state[f"U_{a}"].any(0).all()))
        if subspace:  # the same sum without a float64 copy of X (the exact mode keeps its bits)
            sq = torch.linalg.vector_norm(X, dtype=torch.float64).square()
        else:
            sq = X.to(torch.float64).square().sum()
        # Squares of float32 (or narrower) values cannot overflow float64, so there sq is finite exactly
        # when g is: a free test (an elementwise one takes ~0.5 ms on a 256 x 784 gradient).
        if not (torch.isfinite(g).all() if g.dtype == torch.float64 else torch.isfinite(sq)):
            # A non-finite gradient carries no curvature information: keep the previous estimate (or
            # start from the identity) and let the non-finite loss stop the run where it is checked.
            if init:
                state[f"U_{a}"] = g.new_zeros(d, R)
                state[f"lam_{a}"], state[f"rho_{a}"] = g.new_ones(R), g.new_ones(())
            return
        if init:
            eta, c0, cols = 1.0, 0.0, None
            trace = sq / N
        else:
            eta = group["eta"]
            U = state[f"U_{a}"].to(work)
            lam = state[f"lam_{a}"].to(torch.float64)
            rho = state[f"rho_{a}"].to(torch.float64)
            c0 = (1.0 - eta) * rho
            trace = eta * sq / N + (1.0 - eta) * (lam.sum() + (d - R) * rho)
            w = ((1.0 - eta) * (lam - rho)).clamp_min(0.0)
        if subspace:
            U_new, lam_new, rho_new = _truncate_subspace(
                X, math.sqrt(eta / N), U, w, c0, trace, R, group["epsilon"], group["delta"]
            )
        else:
            if not init:
                live = w > 0  # floored directions (lam == rho) add nothing to M M^T
                cols = U[:, live] * w[live].sqrt().to(work)
            M = X.T * math.sqrt(eta / N)
            if cols is not None and cols.shape[1] > 0:
                M = torch.cat([M, cols], dim=1)
            U_new, lam_new, rho_new = _truncate_lowrank(
                M, float(c0), trace, R, group["epsilon"], group["delta"]
            )
        dtype = g.dtype
        state[f"U_{a}"] = U_new.to(dtype).contiguous()
        state[f"lam_{a}"] = lam_new.to(dtype)
        state[f"rho_{a}"] = rho_new.to(dtype)
