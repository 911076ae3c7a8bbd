"""A small batched quadratic-program solver, differentiable through its optimality (KKT) conditions.

Solves, for every problem b of a batch independently,

    minimise_z  ½ zᵀ Q_b z + p_bᵀ z   subject to   G z ≤ h_b,   A z = c

with a primal-dual interior-point method (Mehrotra's predictor-corrector, as in CVXOPT and qpth)
and returns z*. The backward pass is OptNet's (Amos & Kolter 2017, sec. 3, eq. 6-8): the implicit
function theorem on the KKT conditions at the returned iterate (z, slacks s, inequality duals λ),
one linear solve with the transposed KKT Jacobian,

    [[Q, Gᵀ diag(λ), Aᵀ], [G, −diag(s), 0], [A, 0, 0]] [w; ·; ·] = [∂L/∂z; 0; 0],
    ∂L/∂Q = −½(w zᵀ + z wᵀ),   ∂L/∂p = −w

Only Q and p are differentiated (the closed-form heads of :mod:`metarl.algorithms.metaoptnet`
put the features into Q and the labels into p, G, h, A). With few iterations (MetaOptNet trains
with 3) the iterate is not converged and the backward pass is the KKT derivative at that iterate,
as qpth does.

Why not qpth (the solver MetaOptNet's code uses): qpth 0.0.18 requires ``numpy<2`` and cvxpy at
import time, which would pin this project's numpy; and its solver factorises Q alone, so Q must be
positive definite (MetaOptNet adds 1·I to the Crammer–Singer kernel for that). Here every Newton
system is Q + diag(λ/s), positive definite whenever Q is PSD and G = I, so no jitter is needed.
Speed against qpth (``benchmarks/heads_speed.py --qp``, 8 episodes, 3 iterations, forward +
backward, medians on a heavily loaded 2-core machine): 5-way 1-shot (25 unknowns) 0.28 s here vs
0.67 s qpth (2 threads); 5-way 15-shot (375 unknowns) 4.8 s here vs 2.3 s qpth (1 thread: qpth
crashes on 2 threads with the batched-LU bug below). So this solver is faster on the 1- and 5-shot
episodes the toolkit tests on, qpth about 2x faster on MetaOptNet's 15-shot training episodes
(float32 and a reduced backward system there; this one solves in float64, unreduced).

Every solve runs in float64 (these systems are at most a few hundred unknowns; the conv net's
cost dominates) and z* is returned in Q's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _bordered(H: Tensor, A: Optional[Tensor]) -> Tensor:
    """[[H, Aᵀ], [A, 0]] (batched), or H alone without equality constraints."""
    if A is None:
        return H
    n_eq = A.shape[-2]
    top = torch.cat([H, A.transpose(-1, -2)], -1)
    bottom = torch.cat([A, A.new_zeros(*A.shape[:-2], n_eq, n_eq)], -1)
    return torch.cat([top, bottom], -2)


def _lu_factor(K: Tensor):
    """Batched LU, one matrix at a time from 128 unknowns on: torch 2.13's CPU build (oneMKL)
    returns garbage pivots for batched ``lu_factor`` / ``linalg.solve`` of 200×200 and larger
    systems on 2 threads ("Parameter 6 was incorrect on entry to DLASWP"; batch size 1 and 1
    thread are fine, Cholesky too), which a 15-shot 5-way SVM dual (450 unknowns) hits."""
    if K.dim() == 2 or K.shape[-1] < 128:
        return torch.linalg.lu_factor(K)
    parts = [torch.linalg.lu_factor(k) for k in K.reshape(-1, *K.shape[-2:])]
    return (torch.stack([a for a, _ in parts]).reshape(K.shape),
            torch.stack([b for _, b in parts]).reshape(*K.shape[:-1]))


def _solve(K: Tensor, rhs: Tensor) -> Tensor:
    """K⁻¹ rhs for a batch of square systems, rhs [..., n] (see :func:`_lu_factor`)."""
    return torch.linalg.lu_solve(*_lu_factor(K), rhs.unsqueeze(-1)).squeeze(-1)


def _step_to_boundary(v: Tensor, dv: Tensor) -> Tensor:
    """Largest t in (0, 1] with v + t dv ≥ 0 per batch row (v > 0)."""
    ratio = torch.where(dv < 0, -v / dv, torch.full_like(v, float("inf")))
    return ratio.min(-1).values.clamp(max=1.0)


def solve_qp_with_duals(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Optional[Tensor] = None,
                        c: Optional[Tensor] = None, iterations: int = 20, tol: float = 1e-10):
    """The interior-point iterations (no autograd): returns (z, s, λ, ν, residual) after
    ``iterations`` predictor-corrector steps or when every problem's KKT residual is below ``tol``.
    Shapes: Q [B, n, n], p [B, n], G [B, m, n], h [B, m], A [B, e, n], c [B, e]."""
    Q, p, G, h = (t.double() for t in (Q, p, G, h))
    if A is not None:
        A = A.double()
        c = torch.zeros(A.shape[:-1], dtype=torch.float64) if c is None else c.double()
    n, m = Q.shape[-1], G.shape[-2]
    Gt = G.transpose(-1, -2)

    def factor(d: Tensor):
        """LU of the bordered Newton matrix [[Q + Gᵀ diag(d) G, Aᵀ], [A, 0]]."""
        return _lu_factor(_bordered(Q + Gt @ (d.unsqueeze(-1) * G), A))

    def solve(lu, rhs_z: Tensor, rhs_eq: Optional[Tensor]):
        rhs = rhs_z if A is None else torch.cat([rhs_z, rhs_eq], -1)
        x = torch.linalg.lu_solve(*lu, rhs.unsqueeze(-1)).squeeze(-1)
        return (x, None) if A is None else (x[..., :n], x[..., n:])

    # start (CVXOPT's rule): the KKT solution with unit scaling, slacks shifted into the interior
    z, nu = solve(factor(torch.ones_like(h)), -p + (Gt @ h.unsqueeze(-1)).squeeze(-1), c)
    s = h - (G @ z.unsqueeze(-1)).squeeze(-1)
    s = s + (1.0 - s.min(-1, keepdim=True).values).clamp(min=0.0)
    lam = torch.ones_like(s)
    if nu is None and A is not None:
        nu = torch.zeros_like(c)
    residual = torch.full(h.shape[:-1], float("inf"), dtype=torch.float64)
    for _ in range(iterations):
        rx = (Q @ z.unsqueeze(-1)).squeeze(-1) + p + (Gt @ lam.unsqueeze(-1)).squeeze(-1)
        if A is not None:
            rx = rx + (A.transpose(-1, -2) @ nu.unsqueeze(-1)).squeeze(-1)
            ry = (A @ z.unsqueeze(-1)).squeeze(-1) - c
        rz = (G @ z.unsqueeze(-1)).squeeze(-1) + s - h
        mu = (s * lam).sum(-1) / m
        residual = torch.stack([rx.abs().amax(-1), rz.abs().amax(-1), mu] +
                               ([ry.abs().amax(-1)] if A is not None else []), -1).amax(-1)
        if bool((residual < tol).all()):
            break
        lu = factor(lam / s)

        def direction(rs: Tensor):
            # eliminate ds = −rz − G dz and dλ = (−rs + λ∘rz + λ∘G dz) / s
            rhs_z = -rx - (Gt @ ((-rs + lam * rz) / s).unsqueeze(-1)).squeeze(-1)
            dz, dnu = solve(lu, rhs_z, None if A is None else -ry)
            ds = -rz - (G @ dz.unsqueeze(-1)).squeeze(-1)
            dlam = (-rs - lam * ds) / s
            return dz, ds, dlam, dnu

        dz, ds, dlam, _ = direction(s * lam)                       # affine-scaling predictor
        t = torch.minimum(_step_to_boundary(s, ds), _step_to_boundary(lam, dlam)).unsqueeze(-1)
        mu_aff = ((s + t * ds) * (lam + t * dlam)).sum(-1) / m
        sigma = (mu_aff / mu).clamp(min=0.0) ** 3
        dz, ds, dlam, dnu = direction(s * lam + ds * dlam - (sigma * mu).unsqueeze(-1))  # corrector
        t = (0.99 * torch.minimum(_step_to_boundary(s, ds), _step_to_boundary(lam, dlam))).clamp(max=1.0).unsqueeze(-1)
        z, s, lam = z + t * dz, s + t * ds, lam + t * dlam
        if A is not None:
            nu = nu + t * dnu
    return z, s, lam, nu, residual


class _QP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Q, p, G, h, A, c, iterations):
        z, s, lam, _, _ = solve_qp_with_duals(Q, p, G, h, A, c, iterations)
        ctx.save_for_backward(Q, G, A if A is not None else torch.empty(0), z, s, lam)
        ctx.has_eq = A is not None
        return z.to(Q.dtype)

    @staticmethod
    def backward(ctx, grad_z):
        Q, G, A, z, s, lam = ctx.saved_tensors
        A = A.double() if ctx.has_eq else None
        Q64, G64 = Q.double(), G.double()
        n, m = Q.shape[-1], G.shape[-2]
        # the transposed KKT Jacobian, unsymmetric and unreduced: [[Q, Gᵀ diag(λ), Aᵀ],
        # [G, −diag(s), 0], [A, 0, 0]]. Eliminating λ (the module docstring's form) divides by
        # s → 0 on active constraints and loses ~12 digits near convergence; this one stays bounded.
        top = torch.cat([Q64, G64.transpose(-1, -2) * lam.unsqueeze(-2)], -1)
        mid = torch.cat([G64, torch.diag_embed(-s)], -1)
        K = torch.cat([top, mid], -2)
        if A is not None:
            e = A.shape[-2]
            K = torch.cat([torch.cat([K, torch.cat([A.transpose(-1, -2), A.new_zeros(*A.shape[:-2], m, e)], -2)], -1),
                           torch.cat([A, A.new_zeros(*A.shape[:-2], e, m + e)], -1)], -2)
        rhs = torch.cat([grad_z.double(), grad_z.new_zeros(*grad_z.shape[:-1], K.shape[-1] - n, dtype=torch.float64)], -1)
        w = _solve(K, rhs)[..., :n]
        dQ = -0.5 * (w.unsqueeze(-1) * z.unsqueeze(-2) + z.unsqueeze(-1) * w.unsqueeze(-2))
        return dQ.to(Q.dtype), (-w).to(Q.dtype), None, None, None, None, None


def solve_qp(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Optional[Tensor] = None, c: Optional[Tensor] = None,
             iterations: int = 20) -> Tensor:
    """z* of the batched QP (module docstring), differentiable in ``Q`` and ``p`` through the KKT
    conditions; ``G``, ``h``, ``A``, ``c`` are constants. ``iterations``: interior-point steps (it
    stops earlier once every problem's KKT residual is below 1e-10)."""
    if iterations < 1:
        raise ValueError(f"solve_qp needs at least one interior-point iteration, got {iterations}")
    return _QP.apply(Q, p, G.detach(), h.detach(), None if A is None else A.detach(), None if c is None else c.detach(), iterations)
