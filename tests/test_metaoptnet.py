"""MetaOptNet: the batched QP solver against scipy, the KKT conditions, and gradients vs central
finite differences (float64); the SVM head's dual is the Crammer–Singer SVM."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from metarl.algorithms.metaoptnet import svm_dual, svm_logits
from metarl.qp import solve_qp, solve_qp_with_duals


def random_svm(seed, t=3, n_way=3, shot=2, d=4):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(t, n_way * shot, d, generator=g, dtype=torch.float64)
    ys = torch.arange(n_way).repeat_interleave(shot).repeat(t, 1)
    zq = torch.randn(t, 5, d, generator=g, dtype=torch.float64)
    return zs, ys, zq, n_way


def scipy_qp(Q, p, G, h, A):
    """The same QP by SLSQP (an independent solver), one problem at a time."""
    n = Q.shape[0]
    cons = [{"type": "ineq", "fun": lambda z: h - G @ z, "jac": lambda z: -G},
            {"type": "eq", "fun": lambda z: A @ z, "jac": lambda z: A}]
    res = minimize(lambda z: 0.5 * z @ Q @ z + p @ z, np.zeros(n), jac=lambda z: Q @ z + p, constraints=cons,
                   method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
    assert res.success, res.message
    return res.x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_svm_qp_matches_scipy_and_satisfies_kkt(seed):
    zs, ys, _, k = random_svm(seed)
    C = 0.1 * (seed + 1)
    Q, p, G, h, A = svm_dual(zs, ys, k, C)
    z, s, lam, nu, res = solve_qp_with_duals(Q, p, G, h, A, None, iterations=50)
    assert (res < 1e-8).all(), res
    for b in range(zs.shape[0]):
        ref = scipy_qp(*(x[b].numpy() for x in (Q, p, G, h, A)))
        np.testing.assert_allclose(z[b].numpy(), ref, atol=1e-6)
    # KKT: stationarity, primal feasibility, dual feasibility, complementary slackness
    stat = Q @ z[..., None] + p[..., None] + G.transpose(1, 2) @ lam[..., None] + A.transpose(1, 2) @ nu[..., None]
    assert stat.abs().max() < 1e-8
    assert ((G @ z[..., None]).squeeze(-1) - h).max() < 1e-8 and (A @ z[..., None]).abs().max() < 1e-8
    assert lam.min() >= 0 and (lam * (h - (G @ z[..., None]).squeeze(-1))).abs().max() < 1e-8


def test_crammer_singer_dual_gives_the_primal_svm(float64):
    """The dual solution's w_k = Σ α_n^k x_n attains the primal Crammer–Singer objective value
    ½Σ‖w_k‖² + C Σ_n max_k(1 − δ + w_k·x_n − w_{y_n}·x_n): strong duality, an independent check of
    the dual's construction (signs, Kronecker layout, box)."""
    zs, ys, _, k = random_svm(4, t=2)
    C = 0.3
    Q, p, G, h, A = svm_dual(zs, ys, k, C)
    z = solve_qp(Q, p, G, h, A, None, iterations=50)
    alpha = z.reshape(zs.shape[0], zs.shape[1], k)
    w = alpha.transpose(1, 2) @ zs                             # [T, K, D]
    scores = zs @ w.transpose(1, 2)                            # [T, n, K]
    delta = torch.nn.functional.one_hot(ys, k).double()
    margin = (1 - delta + scores - scores.gather(-1, ys[..., None])).amax(-1)
    primal = 0.5 * (w ** 2).sum((1, 2)) + C * margin.sum(-1)
    dual = -(0.5 * (z[:, None, :] @ Q @ z[..., None]).squeeze() + (p * z).sum(-1))
    torch.testing.assert_close(primal, dual, atol=1e-7, rtol=1e-7)


def test_qp_gradient_matches_central_differences(float64):
    """d(query loss)/d(support features, query features) through the KKT conditions vs central
    finite differences of the converged solver."""
    zs, ys, zq, k = random_svm(7, t=2)
    wq = torch.randn(zq.shape[0], zq.shape[1], k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f = lambda a, b: (svm_logits(a, ys, b, k, C=0.5, iterations=60) * wq).sum()
    zs_, zq_ = zs.clone().requires_grad_(), zq.clone().requires_grad_()
    gs, gq = torch.autograd.grad(f(zs_, zq_), (zs_, zq_))
    eps = 1e-4  # the solver stops at a 1e-10 KKT residual: a smaller step would measure its noise
    for x, g, which in ((zs, gs, 0), (zq, gq, 1)):
        num = torch.zeros_like(x)
        flat = x.reshape(-1)
        for i in range(flat.numel()):
            plus, minus = flat.clone(), flat.clone()
            plus[i] += eps
            minus[i] -= eps
            args_p = (plus.reshape(x.shape), zq) if which == 0 else (zs, plus.reshape(x.shape))
            args_m = (minus.reshape(x.shape), zq) if which == 0 else (zs, minus.reshape(x.shape))
            num.reshape(-1)[i] = (f(*args_p) - f(*args_m)) / (2 * eps)
        torch.testing.assert_close(g, num, atol=1e-5, rtol=1e-4)


def test_qp_gradient_wrt_linear_term_and_no_equality(float64):
    """A generic QP (no equality constraint): ∂z*/∂p by the KKT backward vs central differences."""
    g = torch.Generator().manual_seed(3)
    M = torch.randn(2, 4, 4, generator=g)
    Q = M @ M.transpose(1, 2) + 0.1 * torch.eye(4)
    p = torch.randn(2, 4, generator=g)
    G = torch.randn(2, 6, 4, generator=g)
    h = torch.rand(2, 6, generator=g)
    w = torch.randn(2, 4, generator=g)
    f = lambda q, pp: (solve_qp(q, pp, G, h, iterations=60) * w).sum()
    Q_, p_ = Q.clone().requires_grad_(), p.clone().requires_grad_()
    gQ, gp = torch.autograd.grad(f(Q_, p_), (Q_, p_))
    eps = 1e-4  # the solver stops at a 1e-10 KKT residual: a smaller step would measure its noise
    num_p = torch.zeros_like(p)
    for i in range(p.numel()):
        d = torch.zeros_like(p).reshape(-1)
        d[i] = eps
        num_p.reshape(-1)[i] = (f(Q, p + d.reshape(p.shape)) - f(Q, p - d.reshape(p.shape))) / (2 * eps)
    torch.testing.assert_close(gp, num_p, atol=1e-6, rtol=1e-5)
    E = torch.zeros_like(Q)
    E[0, 1, 2] = E[0, 2, 1] = eps  # symmetric perturbation of one off-diagonal pair
    num_q = (f(Q + E, p) - f(Q - E, p)) / (2 * eps)
    torch.testing.assert_close(gQ[0, 1, 2] + gQ[0, 2, 1], num_q, atol=1e-6, rtol=1e-5)


def test_large_batched_dual_solves_on_two_threads():
    """A 15-shot 5-way dual (450 KKT unknowns) over a batch, on 2 threads: where torch 2.13's
    batched LU returns bad pivots (metarl.qp._lu_factor works around it)."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        zs, ys, zq, k = random_svm(5, t=2, n_way=5, shot=15, d=8)
        out = svm_logits(zs, ys, zq, k, C=0.1, iterations=3)
        assert out.shape == (2, 5, 5) and torch.isfinite(out).all()
    finally:
        torch.set_num_threads(old)
