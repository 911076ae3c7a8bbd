"""A small batched quadratic-program solver, differentiable through its optimality (KKT) conditions.

Solves, for every problem b of a batch independently,

    minimise_z  ½ zᵀ Q_b z + p_bᵀ z   subject to   G z ≤ h_b,   A z = c

with a primal-dual interior-point method (Mehrotra's predictor-corrector, as in CVXOPT and qpth)
and returns z*. The backward pass is OptNet's (Amos & Kolter 2017, sec. 3, eq. 6-8): the implicit
function theorem on the KKT conditions at the returned iterate (z, slacks s, inequality duals λ),
one linear solve with the transposed KKT Jacobian,

    [[Q, Gᵀ diag(λ), Aᵀ], [G, −diag(s), 0], [A, 0, 0]] [w; ·; ·] = [∂L/∂z; 0; 0],
    ∂L/∂Q = −½(w zᵀ + z wᵀ),   ∂L/∂p = −w

Only Q and p are differentiated (the SVM dual below puts the features into Q and the labels into
p, G, h, A). With few iterations (MetaOptNet trains with 3) the iterate is not converged and the
backward pass is the KKT derivative at that iterate, as qpth does.

The Crammer–Singer dual of MetaOptNet's SVM head, Q = M ⊗ I_K with G = I and A = I_n ⊗ 1_Kᵀ, has
its own solver, :func:`solve_crammer_singer`: the same start and predictor-corrector iterates, but
each Newton system [[Q + diag(λ/s), Aᵀ], [A, 0]] is solved through its structure (class-major it is
K blocks M + diag(λ_k/s_k), n×n, bordered by the constraint Σ_k α_k = 0; a Cholesky factorisation
per block and one of the n×n Schur complement, :func:`_cs_factor`), and the backward pass solves
the same system at the returned iterate. Memory t·K·n² and time t·K·n³ instead of t·(nK)² and
t·(nK)³: the dense form of a 20-way 15-shot training episode (6,000 unknowns) exhausted the
machine's 24 GB at meta-batch 8; the structured solve holds ~0.2 GB
(``benchmarks/heads_speed.py --qp``: 5-way 15-shot, 8 episodes, d = 64, 3 iterations, forward +
backward, 1 thread on a loaded machine: 0.084 s and 21 MB structured vs 1.37 s and 260 MB dense;
20-way 15-shot 5.5 s, 193 MB). The Woodbury form through the feature dimension (ZZᵀ has rank ≤ d)
factorises 1.9x faster at 20-way 15-shot but needs diag(s/λ), which grows without bound near the
optimum: it agrees at 3 iterations and is 1.6e-5 off at 15 (``--woodbury``), so it is not used.

Why not qpth (the solver MetaOptNet's code uses): qpth 0.0.18 requires ``numpy<2`` and cvxpy at
import time, which would pin this project's numpy; and its solver factorises Q alone, so Q must be
positive definite (MetaOptNet adds 1·I to the Crammer–Singer kernel for that). Here every Newton
system is Q + diag(λ/s), positive definite whenever Q is PSD and G = I, so no jitter is needed.
Speed of the dense :func:`solve_qp` against qpth (measured before the structured solver existed,
``benchmarks/heads_speed.py --qp`` with 256-dim features, 8 episodes, 3 iterations, forward +
backward, medians on a heavily loaded 2-core machine): 5-way 1-shot (25 unknowns) 0.28 s here vs
0.67 s qpth (2 threads); 5-way 15-shot (375 unknowns) 4.8 s here vs 2.3 s qpth (1 thread: qpth
crashes on 2 threads with the batched-LU bug below); the structured solver is 16x faster than the
dense one at 5-way 15-shot (above). qpth is not installed here, so it was not re-measured.

Every solve runs in float64 (the conv net's cost dominates) and z* is returned in Q's (M's) dtype.
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


# --- the Crammer–Singer dual, solved through its structure ---------------------------------------

def crammer_singer_qp(M: Tensor, P: Tensor, H: Tensor):
    """The structured problem of :func:`solve_crammer_singer` as dense QP data (Q, p, G, h, A)
    over z = vec(α) (row-major [n, K]): Q = M ⊗ I_K, G = I, A = I_n ⊗ 1_Kᵀ. The reference the
    structured solver is tested and benchmarked against; it holds (nK)² numbers per problem."""
    t, n, k = P.shape
    Q = torch.einsum("tij,kl->tikjl", M, torch.eye(k, dtype=M.dtype)).reshape(t, n * k, n * k)
    G = torch.eye(n * k, dtype=M.dtype).expand(t, -1, -1)
    A = torch.kron(torch.eye(n, dtype=M.dtype), torch.ones(1, k, dtype=M.dtype)).expand(t, -1, -1)
    return Q, P.reshape(t, n * k), G, H.reshape(t, n * k), A


def crammer_singer_bytes(t: int, n: int, k: int) -> int:
    """Peak bytes :func:`solve_crammer_singer` allocates for t problems of n × K variables, forward
    or backward (the backward refactorises after the forward's factors are freed): R (t·K·n²
    float64), :func:`_cs_factor`'s four buffers, the Schur factor, M in float64 and its gradient,
    and LAPACK's copies (12·t·n² in all: measured 193 MB at t = 8, 20-way 15-shot, where this gives
    190, ``benchmarks/heads_speed.py --qp``), and the [t, n, K] iterates (~40 of them)."""
    return 8 * t * ((k + 12) * n * n + 40 * n * k)


def _cholesky(T: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Batched Cholesky factor of symmetric PSD matrices; one that is numerically singular (not
    positive definite in floating point: with n > rank M and many inactive coordinates near the
    optimum, a block's smallest eigenvalue is λ → 0 against rounding of M's null space) gets
    10⁻¹³·max diag added to its diagonal, ×100 until it factorises. The iterates stay those of the
    exact system where no factorisation fails (every case the tests and benchmarks meet with M
    computed in float64); :class:`_CrammerSinger`'s backward refines its solve against the
    unperturbed system."""
    L, info = torch.linalg.cholesky_ex(T, out=None if out is None else (out, torch.empty(T.shape[:-2], dtype=torch.int32)))
    if bool((info > 0).any()):
        T = T.clone()
        jitter = 1e-13 * T.diagonal(dim1=-2, dim2=-1).amax(-1)
        while bool((info > 0).any()):
            T.diagonal(dim1=-2, dim2=-1).add_((jitter * (info > 0))[..., None])
            jitter = jitter * 100
            L, info = torch.linalg.cholesky_ex(T)
        if out is not None:
            out.copy_(L)
    return L


def _cs_factor(M: Tensor, s: Tensor, lam: Tensor):
    """The Newton matrix [[M ⊗ I + diag(λ/s), Aᵀ], [A, 0]] of :func:`solve_crammer_singer`
    factorised through its structure: per class k the block H_k = M + diag(λ_k/s_k) (n×n), its
    inverse as R_k = S_k^½ (S_k^½ M S_k^½ + Λ_k)⁻¹ S_k^½ (a Cholesky solve that never divides by
    s or λ, either of which goes to 0 on every coordinate near the optimum: H_k itself mixes
    λ/s → ∞ and → 0), and the Schur complement Σ_k R_k of the equality constraint, Cholesky
    factorised. One class at a time into reused buffers: the temporaries stay 4·t·n² (fresh
    allocations of this size cost page faults: measured 1.8x slower) and only R is t·K·n².
    Shapes: M [t, n, n], s and λ [t, n, K]; returns (R [t, K, n, n], chol(Σ_k R_k))."""
    t, n, k = s.shape
    r = s.sqrt()
    R = M.new_empty(t, k, n, n)
    rr, T, L, T_inv = (torch.empty_like(M) for _ in range(4))
    for c in range(k):
        torch.mul(r[..., c, None], r[:, None, :, c], out=rr)          # S_k^½ · S_k^½ as an outer product
        torch.mul(M, rr, out=T)
        T.diagonal(dim1=-2, dim2=-1).add_(lam[..., c])
        _cholesky(T, out=L)
        torch.cholesky_inverse(L, out=T_inv)
        torch.mul(T_inv, rr, out=R[:, c])
    schur = T.zero_()
    for c in range(k):
        schur += R[:, c]
    return R, _cholesky(schur)


def _cs_solve(factor, rhs: Tensor, rhs_eq: Optional[Tensor]):
    """(dz, dν) with [[M ⊗ I + diag(λ/s), Aᵀ], [A, 0]] [dz; dν] = [rhs; rhs_eq] (rhs_eq None: 0),
    from :func:`_cs_factor`: dz_k = R_k (rhs_k − dν), Σ_k dz_k = rhs_eq gives
    (Σ_k R_k) dν = Σ_k R_k rhs_k − rhs_eq. rhs [t, n, K] → dz [t, n, K], dν [t, n]."""
    R, schur = factor
    Rr = R @ rhs.transpose(1, 2).unsqueeze(-1)                         # [t, K, n, 1]
    b = Rr.sum(1) if rhs_eq is None else Rr.sum(1) - rhs_eq.unsqueeze(-1)
    nu = torch.cholesky_solve(b, schur)                                # [t, n, 1]
    dz = Rr - R @ nu.unsqueeze(1)
    return dz.squeeze(-1).transpose(1, 2), nu.squeeze(-1)


def solve_crammer_singer_with_duals(M: Tensor, P: Tensor, H: Tensor, iterations: int = 20, tol: float = 1e-10):
    """:func:`solve_qp_with_duals` on :func:`crammer_singer_qp` (M, P, H), the same start and the
    same predictor-corrector iterates, with each Newton system solved by :func:`_cs_factor` /
    :func:`_cs_solve` instead of a dense (nK + n)² LU. Shapes: M [t, n, n] (PSD), P and H
    [t, n, K]; returns (α, s, λ [t, n, K], ν [t, n], residual [t])."""
    M, P, H = M.double(), P.double(), H.double()
    m = P.shape[1] * P.shape[2]
    flat = lambda x: x.flatten(1)

    ones = torch.ones_like(H)
    z, nu = _cs_solve(_cs_factor(M, ones, ones), -P + H, None)         # start (CVXOPT's rule)
    s = H - z
    s = s + (1.0 - s.amin((1, 2), keepdim=True)).clamp(min=0.0)
    lam = torch.ones_like(s)
    residual = torch.full(H.shape[:1], float("inf"), dtype=torch.float64)
    for _ in range(iterations):
        rx = M @ z + P + lam + nu.unsqueeze(-1)
        ry = z.sum(-1)
        rz = z + s - H
        mu = (s * lam).sum((1, 2)) / m
        residual = torch.stack([flat(rx).abs().amax(-1), flat(rz).abs().amax(-1), mu, ry.abs().amax(-1)], -1).amax(-1)
        if bool((residual < tol).all()):
            break
        factor = _cs_factor(M, s, lam)

        def direction(rs: Tensor):
            # eliminate ds = −rz − dz and dλ = (−rs + λ∘rz + λ∘dz) / s, as solve_qp_with_duals
            dz, dnu = _cs_solve(factor, -rx - (-rs + lam * rz) / s, -ry)
            ds = -rz - dz
            return dz, ds, (-rs - lam * ds) / s, dnu

        dz, ds, dlam, _ = direction(s * lam)                           # affine-scaling predictor
        t = torch.minimum(_step_to_boundary(flat(s), flat(ds)), _step_to_boundary(flat(lam), flat(dlam)))[:, None, None]
        mu_aff = ((s + t * ds) * (lam + t * dlam)).sum((1, 2)) / m
        sigma = (mu_aff / mu).clamp(min=0.0) ** 3
        dz, ds, dlam, dnu = direction(s * lam + ds * dlam - (sigma * mu)[:, None, None])  # corrector
        del factor
        t = (0.99 * torch.minimum(_step_to_boundary(flat(s), flat(ds)),
                                  _step_to_boundary(flat(lam), flat(dlam)))).clamp(max=1.0)[:, None, None]
        z, s, lam, nu = z + t * dz, s + t * ds, lam + t * dlam, nu + t[..., 0] * dnu
    return z, s, lam, nu, residual


class _CrammerSinger(torch.autograd.Function):
    @staticmethod
    def forward(ctx, M, P, H, iterations):
        z, s, lam, _, _ = solve_crammer_singer_with_duals(M, P, H, iterations)
        ctx.save_for_backward(M, z, s, lam)
        return z.to(M.dtype)

    @staticmethod
    def backward(ctx, grad):
        M, z, s, lam = ctx.saved_tensors
        # _QP.backward's transposed KKT system [[Q, diag(λ), Aᵀ], [I, −diag(s), 0], [A, 0, 0]]:
        # its second row gives v = w/s, which leaves the Newton matrix at the returned (s, λ),
        # [[Q + diag(λ/s), Aᵀ], [A, 0]] [w; u] = [∂L/∂α; 0], solved as in the forward pass
        # without dividing by s or λ (_cs_factor), so it stays bounded near convergence too.
        M64, g = M.double(), grad.double()
        factor = _cs_factor(M64, s, lam)
        w, u = _cs_solve(factor, g, None)
        for _ in range(2):  # iterative refinement: near the optimum a block H_k can be ill-conditioned (n > rank M)
            dw, du = _cs_solve(factor, g - (M64 @ w + lam / s * w + u.unsqueeze(-1)), -w.sum(-1))
            w, u = w + dw, u + du
        dM = -0.5 * (w @ z.transpose(1, 2) + z @ w.transpose(1, 2))    # ∂L/∂Q = −½(w zᵀ + z wᵀ), summed over K
        return dM.to(M.dtype), (-w).to(M.dtype), None, None


def solve_crammer_singer(M: Tensor, P: Tensor, H: Tensor, iterations: int = 20) -> Tensor:
    """α* [t, n, K] of, for every problem of the batch,

        minimise_α  ½ Σ_k α_kᵀ M α_k + ⟨P, α⟩   subject to   α ≤ H,   Σ_k α_{·k} = 0,

    (α_k: column k; the Crammer–Singer SVM dual has M = ZZᵀ, P = −Y, H = C·Y), by the interior
    point of :func:`solve_qp` using the structure: memory t·K·n² and time t·K·n³ per Newton system
    instead of t·(nK)² and t·(nK)³. Differentiable in ``M`` and ``P`` (the KKT derivative at the
    returned iterate, as :func:`solve_qp`); ``H`` is a constant."""
    if iterations < 1:
        raise ValueError(f"solve_crammer_singer needs at least one interior-point iteration, got {iterations}")
    return _CrammerSinger.apply(M, P, H.detach(), iterations)
