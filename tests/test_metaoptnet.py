"""MetaOptNet: the batched QP solver against scipy, the KKT conditions, and gradients vs central
finite differences (float64); the SVM head's dual is the Crammer–Singer SVM; the structured
Crammer–Singer solver against the dense one (same iterates), scipy and central differences; the
memory check refuses in one line before solving and keeps the run's checkpoint."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from metarl.algorithms import metaoptnet
from metarl.algorithms.metaoptnet import svm_logits, svm_problem
from metarl.config import ConfigError
from metarl.qp import crammer_singer_qp, solve_crammer_singer, solve_crammer_singer_with_duals, solve_qp, solve_qp_with_duals
from metarl.training import load_track, train

from test_heads import tiny


def central_differences(f, x, eps):
    """∂f/∂x element by element, (f(x + eps e_i) − f(x − eps e_i)) / 2eps."""
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        d = torch.zeros_like(x).reshape(-1)
        d[i] = eps
        out.reshape(-1)[i] = (f(x + d.reshape(x.shape)) - f(x - d.reshape(x.shape))) / (2 * eps)
    return out


def random_svm(seed, t=3, n_way=3, shot=2, d=4):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(t, n_way * shot, d, generator=g, dtype=torch.float64)
    ys = torch.arange(n_way).repeat_interleave(shot).repeat(t, 1)
    zq = torch.randn(t, 5, d, generator=g, dtype=torch.float64)
    return zs, ys, zq, n_way


def svm_dual(zs, ys, n_way, C):
    """The dense QP data (Q, p, G, h, A) of the SVM head's dual."""
    return crammer_singer_qp(*svm_problem(zs, ys, n_way, C))


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
    the dual's construction (signs, Kronecker layout, box) and of the structured solver."""
    zs, ys, _, k = random_svm(4, t=2)
    C = 0.3
    Q, p, G, h, A = svm_dual(zs, ys, k, C)
    alpha = solve_crammer_singer(*svm_problem(zs, ys, k, C), iterations=50)   # what the SVM head solves
    z = alpha.flatten(1)
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
    torch.testing.assert_close(gp, central_differences(lambda x: f(Q, x), p, eps), atol=1e-6, rtol=1e-5)
    E = torch.zeros_like(Q)
    E[0, 1, 2] = E[0, 2, 1] = eps  # symmetric perturbation of one off-diagonal pair
    num_q = (f(Q + E, p) - f(Q - E, p)) / (2 * eps)
    torch.testing.assert_close(gQ[0, 1, 2] + gQ[0, 2, 1], num_q, atol=1e-6, rtol=1e-5)


def test_large_batched_dual_solves_on_two_threads():
    """A 15-shot 5-way dual (450 KKT unknowns) over a batch, on 2 threads: where torch 2.13's
    batched LU returns bad pivots (metarl.qp._lu_factor works around it); the structured solver's
    batched Cholesky gives the same iterate there."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        zs, ys, zq, k = random_svm(5, t=2, n_way=5, shot=15, d=8)
        Q, p, G, h, A = svm_dual(zs, ys, k, 0.1)
        dense = solve_qp(Q, p, G, h, A, None, 3)
        out = svm_logits(zs, ys, zq, k, C=0.1, iterations=3)
        assert out.shape == (2, 5, 5) and torch.isfinite(dense).all()
        torch.testing.assert_close(out, (zq @ zs.transpose(1, 2)) @ dense.reshape(2, 75, k), atol=1e-10, rtol=0)
    finally:
        torch.set_num_threads(old)


def full_rank_svm(seed, n_way, shot, C):
    """A support set with more feature dimensions than images: M = ZZᵀ is positive definite, so
    the dual's optimum is unique (with M singular, solvers may converge to different optimal α)."""
    zs, ys, _, k = random_svm(seed, t=2, n_way=n_way, shot=shot, d=n_way * shot + 3)
    return svm_problem(zs.relu(), ys, k, C)


@pytest.mark.parametrize("n_way,shot,C,iterations", [(3, 2, 0.1, 3), (4, 3, 1.0, 3), (5, 2, 0.5, 1), (2, 5, 0.3, 8),
                                                     (3, 4, 0.2, 40)])
def test_structured_solver_takes_the_dense_solver_s_iterates(n_way, shot, C, iterations):
    """solve_crammer_singer_with_duals is solve_qp_with_duals on the same QP with the Newton systems
    solved through their structure: the same iterate (α, s, λ, ν) and residual at equal iteration
    counts, unconverged (MetaOptNet's 3 training iterations) or converged."""
    M, P, H = full_rank_svm(n_way + shot, n_way, shot, C)
    a, s, lam, nu, res = solve_crammer_singer_with_duals(M, P, H, iterations)
    z, s2, lam2, nu2, res2 = solve_qp_with_duals(*crammer_singer_qp(M, P, H), None, iterations)
    for mine, ref in ((a, z), (s, s2), (lam, lam2), (nu, nu2)):
        torch.testing.assert_close(mine.flatten(1), ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(res, res2, atol=1e-10, rtol=1e-8)
    if iterations <= 3:
        assert (res > 1e-3).all()                                      # really unconverged
    if iterations == 40:
        assert (res < 1e-10).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_structured_solver_matches_scipy_and_satisfies_kkt(seed):
    zs, ys, _, k = random_svm(seed, n_way=3, shot=3, d=5)   # d < n: M singular, α need not be unique
    C = 0.2 + 0.5 * seed
    M, P, H = svm_problem(zs, ys, k, C)
    a, s, lam, nu, res = solve_crammer_singer_with_duals(M, P, H, 50)
    assert (res < 1e-8).all(), res
    for b in range(zs.shape[0]):
        ref = scipy_qp(*(x[b].numpy() for x in crammer_singer_qp(M, P, H)))
        alpha_ref = torch.from_numpy(ref).reshape(a.shape[1:])
        # the classifiers w_k = Σ_n α_n^k x_n (unique: the primal is strictly convex) and the objective
        torch.testing.assert_close(a[b].T @ zs[b], alpha_ref.T @ zs[b], atol=1e-5, rtol=0)
        obj = lambda x: 0.5 * (x * (M[b] @ x)).sum() + (P[b] * x).sum()
        torch.testing.assert_close(obj(a[b]), obj(alpha_ref), atol=1e-7, rtol=0)
    # KKT: stationarity M α_k + P_k + λ_k + ν = 0, α ≤ H, Σ_k α_k = 0, λ ≥ 0, λ∘(H − α) = 0
    assert (M @ a + P + lam + nu[..., None]).abs().max() < 1e-8
    assert (a - H).max() < 1e-8 and a.sum(-1).abs().max() < 1e-8
    assert lam.min() >= 0 and (lam * (H - a)).abs().max() < 1e-8


def test_structured_backward_is_the_dense_kkt_derivative_at_three_iterations():
    """Unconverged (3 iterations) the backward pass is the KKT derivative at the iterate, not the
    iterate's derivative (finite differences cannot check it): it must equal the dense solver's,
    which solves the unreduced transposed KKT system."""
    M, P, H = full_rank_svm(3, 4, 3, 0.1)
    g = torch.randn(P.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    M1, P1, M2, P2 = (x.clone().requires_grad_() for x in (M, P, M, P))
    gM, gP = torch.autograd.grad((solve_crammer_singer(M1, P1, H, 3) * g).sum(), (M1, P1))
    Q, p, G, h, A = crammer_singer_qp(M2, P2, H)
    gM2, gP2 = torch.autograd.grad((solve_qp(Q, p, G, h, A, None, 3) * g.flatten(1)).sum(), (M2, P2))
    torch.testing.assert_close(gM, gM2, atol=1e-10, rtol=0)
    torch.testing.assert_close(gP, gP2, atol=1e-10, rtol=0)


def test_structured_gradient_wrt_gram_matrix_and_linear_term(float64):
    """∂(loss)/∂M and ∂/∂P of the converged structured solver vs central finite differences (symmetric
    perturbations of M: the solver reads M as symmetric)."""
    M, P, H = full_rank_svm(9, 3, 2, 0.4)
    w = torch.randn(P.shape, generator=torch.Generator().manual_seed(2))
    f = lambda m, pp: (solve_crammer_singer(m, pp, H, 60) * w).sum()
    M_, P_ = M.clone().requires_grad_(), P.clone().requires_grad_()
    gM, gP = torch.autograd.grad(f(M_, P_), (M_, P_))
    eps = 1e-5
    for (i, j) in [(0, 0), (1, 4), (2, 3)]:
        E = torch.zeros_like(M)
        E[0, i, j] = E[0, j, i] = eps
        num = (f(M + E, P) - f(M - E, P)) / (2 * eps) / (1 if i == j else 2)
        torch.testing.assert_close((gM[0, i, j] + gM[0, j, i]) / 2, num, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gP, central_differences(lambda x: f(M, x), P, eps), atol=1e-6, rtol=1e-5)


def test_memory_check_refuses_before_solving_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """With too little memory available the SVM head stops with a one-line ConfigError naming the
    settings to lower, before the solver is called, and the checkpoint already saved still loads."""
    make = lambda n: tiny("metaoptnet", f"iterations={n}", "meta_batch=2", "checkpoint_every=2", "model.hidden=8")
    train(make(2), tmp_path, tensorboard=False)
    need = metaoptnet.crammer_singer_bytes(2, 5 * 2, 5)                # meta_batch 2, train_shot 2, 5-way
    monkeypatch.setattr(metaoptnet, "available_memory", lambda: need - 1)

    def solver(*args):
        raise AssertionError("the solver was called")
    monkeypatch.setattr(metaoptnet, "solve_crammer_singer", solver)
    with pytest.raises(ConfigError, match=r"^metaoptnet: the SVM dual of 2 episodes x 10 support images x 5 classes .* "
                                          r"lower metaoptnet.train_shot, metaoptnet.train_way or meta_batch$") as e:
        train(make(4), tmp_path, resume=True, tensorboard=False)
    assert "\n" not in str(e.value)
    assert load_track(tmp_path)[2] == 2
    monkeypatch.setattr(metaoptnet, "available_memory", lambda: need)   # just enough: passes the check
    metaoptnet.check_svm_fits(2, 10, 5, True)


def test_cholesky_fallback_factorises_a_numerically_singular_block():
    """metarl.qp._cholesky: a PSD matrix that rounding made indefinite (what a block S^½ M S^½ + Λ
    with n > rank M and λ → 0 becomes) gets the smallest diagonal jitter that factorises it; a
    positive definite matrix of the same batch gets its exact factor."""
    from metarl.qp import _cholesky
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    T = Z @ Z.transpose(1, 2)
    T[0] -= 1e-12 * torch.eye(6, dtype=torch.float64)                # rank 3, pushed just below PSD
    T[1] += torch.eye(6, dtype=torch.float64)
    assert torch.linalg.cholesky_ex(T).info[0] > 0
    L = _cholesky(T)
    torch.testing.assert_close(L[1], torch.linalg.cholesky(T[1]), atol=0, rtol=0)
    assert (L[0] @ L[0].T - T[0]).abs().max() < 1e-9 * T[0].diagonal().max()
