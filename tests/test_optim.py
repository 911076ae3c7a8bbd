"""Conjugate gradient, Fisher-vector products, the KL-bounded line search and a full TRPO step."""
import math

import pytest
import torch
from torch.autograd.functional import hessian

from metarl import functional as F
from metarl.adaptation import adapt
from metarl.objectives import gaussian_kl, reinforce_loss, surrogate_loss
from metarl.optim import conjugate_gradient, flat, hessian_vector_product, hvp_fn, line_search, trpo_step, unflat
from metarl.policies.gaussian import GaussianMLPPolicy, log_prob, sample


pytestmark = pytest.mark.usefixtures("float64")  # conftest: float64 default dtype, restored after


def test_flat_unflat_roundtrip():
    d = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    back = unflat(flat(d), d)
    assert list(back) == ["a", "b"] and all(torch.equal(back[k], d[k]) for k in d)
    lst = [torch.randn(3), torch.randn(1, 2)]
    assert all(torch.equal(x, y) for x, y in zip(unflat(flat(lst), lst), lst))
    with pytest.raises(ValueError, match="flat"):
        unflat(torch.zeros(5), d)


def test_conjugate_gradient_solves_spd_system():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(15, 15, generator=g)
    A = M @ M.T + 0.5 * torch.eye(15)
    b = torch.randn(15, generator=g)
    x = conjugate_gradient(lambda v: A @ v, b, iters=200, residual_tol=1e-24)
    assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-8)
    # exact in n steps for a matrix with 3 distinct eigenvalues
    Q, _ = torch.linalg.qr(torch.randn(15, 15, generator=g))
    A3 = Q @ torch.diag(torch.tensor([1.0] * 5 + [2.0] * 5 + [7.0] * 5)) @ Q.T
    x3 = conjugate_gradient(lambda v: A3 @ v, b, iters=3, residual_tol=0.0)
    assert torch.allclose(x3, torch.linalg.solve(A3, b), atol=1e-9)


def _exact_hvp(f, params, v):
    names = list(params)
    like = {n: params[n].detach() for n in names}
    H = hessian(lambda vec: f(unflat(vec, like)), flat(like))
    return H @ v


def test_hvp_equals_exact_hessian_vector_product():
    g = torch.Generator().manual_seed(1)
    params = {"W": torch.randn(3, 2, generator=g).requires_grad_(), "c": torch.randn(2, generator=g).requires_grad_()}
    x = torch.randn(5, 3, generator=g)

    def f(p):
        h = torch.tanh(x @ p["W"] + p["c"])
        return (h.pow(3).sum() + (p["W"] ** 2).sum() * p["c"].exp().sum()) / 5

    v = torch.randn(8, generator=g)
    exact = _exact_hvp(f, params, v)
    assert torch.allclose(hessian_vector_product(f, params, v), exact, atol=1e-10)
    assert torch.allclose(hvp_fn(f, params, damping=0.3)(v), exact + 0.3 * v, atol=1e-10)
    # list params, structured vector
    lst = [params["W"], params["c"]]
    Av = hvp_fn(lambda p: f({"W": p[0], "c": p[1]}), lst)(unflat(v, lst))
    assert torch.allclose(Av, exact, atol=1e-10)
    with pytest.raises(ValueError, match="require"):
        hvp_fn(f, {k: p.detach() for k, p in params.items()})


def _tiny_maml_kl(seed=2, T=2, Tmax=3, B=4):
    """kl_fn(θ) = mean over tasks of KL(π_φ_old ‖ π_φ(θ)) with φ = one REINFORCE step from θ."""
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(2, 1, hidden=(3,), activation="tanh")
    theta = F.params_of(policy)
    obs = torch.randn(T, Tmax, B, 2)
    with torch.no_grad():
        mean, log_std = F.forward_tasks(policy, F.stack(theta, T), obs)
        actions = sample(mean, log_std, torch.Generator().manual_seed(seed))
    adv, mask = torch.randn(T, Tmax, B), torch.ones(T, Tmax, B)
    mask[:, 2:, 0] = 0

    def fast(p):
        def inner(q):
            m, s = F.forward_tasks(policy, q, obs)
            return reinforce_loss(log_prob(m, s, actions), adv, mask).sum()
        return adapt(inner, F.stack(p, T), steps=1, lr=0.3)

    with torch.no_grad():
        old_mean, old_log_std = F.forward_tasks(policy, fast(F.detached(theta)), obs)
        old_logp = log_prob(old_mean, old_log_std, actions)

    def kl_fn(p):
        m, s = F.forward_tasks(policy, fast(p), obs)
        return gaussian_kl(old_mean, old_log_std, m, s, mask).mean()

    def surrogate_fn(p):
        m, s = F.forward_tasks(policy, fast(p), obs)
        return surrogate_loss(log_prob(m, s, actions), old_logp, adv, mask).mean()

    return policy, theta, kl_fn, surrogate_fn


def test_fisher_vector_product_through_the_inner_step():
    """The HVP differentiates through adapt (third-order terms) and equals the exact Hessian."""
    policy, theta, kl_fn, _ = _tiny_maml_kl()
    leaves = {n: p.detach().clone().requires_grad_() for n, p in theta.items()}
    v = torch.randn(flat(leaves).numel(), generator=torch.Generator().manual_seed(3))
    exact = _exact_hvp(kl_fn, leaves, v)
    got = hvp_fn(kl_fn, leaves)(v)
    assert torch.allclose(got, exact, atol=1e-10)
    assert exact.abs().max() > 1e-3  # a non-trivial Fisher matrix


def test_line_search_respects_the_kl_bound():
    p0 = {"x": torch.zeros(3)}
    c = torch.tensor([1.0, -2.0, 0.5])

    def loss_and_kl(p):  # linear loss, quadratic KL: the full step overshoots the trust region
        return -(c @ p["x"]), 0.5 * (p["x"] ** 2).sum()

    max_kl = 0.01
    full_step = 3.0 * c  # KL(full) = 4.5 * |c|² / 1 = 23.6 >> max_kl
    assert loss_and_kl({"x": full_step})[1] > max_kl
    new, info = line_search(p0, full_step, loss_and_kl, max_kl, expected_improvement=float(c @ full_step), ratio=0.5, max_steps=20)
    loss, kl = loss_and_kl(new)
    assert info["accepted"] and kl <= max_kl and info["improvement"] > 0
    assert math.isclose(info["kl"], float(kl)) and info["step_fraction"] < 1
    # it is the FIRST admissible fraction: the previous (larger) one violates the bound
    assert loss_and_kl({"x": 2 * info["step_fraction"] * full_step})[1] > max_kl
    assert torch.allclose(new["x"], info["step_fraction"] * full_step)

    # a step that never improves is rejected: the old parameters come back
    new, info = line_search(p0, -full_step, loss_and_kl, max_kl, expected_improvement=1.0)
    assert not info["accepted"] and torch.equal(new["x"], p0["x"]) and new["x"] is not p0["x"]
    # too few backtracks to get inside the bound: rejected too
    new, info = line_search(p0, full_step, loss_and_kl, max_kl, 1.0, ratio=0.8, max_steps=3)
    assert not info["accepted"] and torch.equal(new["x"], p0["x"])


def test_trpo_step_on_a_gaussian_policy_keeps_kl_and_improves():
    torch.manual_seed(4)
    policy = GaussianMLPPolicy(3, 2, hidden=(8,), activation="tanh")
    obs = torch.randn(10, 6, 3)  # [Tmax, B, obs]
    mask = torch.ones(10, 6)
    mask[7:, :2] = 0
    with torch.no_grad():
        old_mean, old_log_std = policy(obs)
        actions = sample(old_mean, old_log_std, torch.Generator().manual_seed(5))
        old_logp = log_prob(old_mean, old_log_std, actions)
    adv = -(actions - 0.5).pow(2).sum(-1)  # prefer actions near 0.5
    adv = adv - adv.mean()

    def surrogate_fn(p):
        m, s = F.forward(policy, p, obs)
        return surrogate_loss(log_prob(m, s, actions), old_logp, adv, mask)

    def kl_fn(p):
        m, s = F.forward(policy, p, obs)
        return gaussian_kl(old_mean, old_log_std, m, s, mask)

    params = F.params_of(policy)
    before = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        loss_before = surrogate_fn(params).item()
    max_kl = 0.01
    info = trpo_step(params, surrogate_fn, kl_fn, max_kl=max_kl)
    with torch.no_grad():
        loss_after, kl_after = surrogate_fn(params).item(), kl_fn(params).item()
    assert info["accepted"]
    assert kl_after <= max_kl and math.isclose(kl_after, info["kl"], rel_tol=1e-9)
    assert loss_after < loss_before and math.isclose(loss_before - loss_after, info["improvement"], rel_tol=1e-9)
    assert info["kl"] > 0.2 * max_kl  # the step goes a good way to the trust-region boundary
    assert any(not torch.equal(before[n], p) for n, p in policy.named_parameters())  # updated in place


def test_trpo_step_through_maml_inner_step_and_list_params():
    policy, theta, kl_fn, surrogate_fn = _tiny_maml_kl(seed=6)
    names = list(theta)
    as_dict = lambda lst: dict(zip(names, lst))
    params = list(theta.values())
    with torch.no_grad():
        loss_before = surrogate_fn(theta).item()
    info = trpo_step(params, lambda p: surrogate_fn(as_dict(p)), lambda p: kl_fn(as_dict(p)), max_kl=0.005)
    with torch.no_grad():
        assert info["accepted"] and kl_fn(theta).item() <= 0.005
        assert surrogate_fn(theta).item() < loss_before


def test_trpo_step_zero_gradient_is_a_no_op():
    p = {"x": torch.ones(2)}
    info = trpo_step(p, lambda q: (q["x"] * 0).sum(), lambda q: (q["x"] ** 2).sum())
    assert not info["accepted"] and torch.equal(p["x"], torch.ones(2))
