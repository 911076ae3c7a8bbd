"""iMAML (Rajeswaran et al. 2019): the implicit gradient against the closed form of a quadratic
task and against the unrolled gradient as the inner problem converges (float64); batched CG
equals per-task CG; the inner loop keeps no graph; short runs learn; resume and evaluate."""

import numpy as np
import pytest
import torch

from tests.checks import resume_round_trip, cli_train_and_evaluate
from metarl import config
from metarl.adaptation import adapt
from metarl.algorithms.base import Problem
from metarl.algorithms.imaml import IMAML, implicit_gradient, proximal_objective, proximal_solve, proximal_steps
from metarl.functional import forward_tasks, stack
from metarl.objectives import mse
from metarl.optim import conjugate_gradient, conjugate_gradient_batched
from metarl.policies.mlp import MLP
from metarl.tasks.sine import SineTasks, SineTaskConfig
from metarl.training import load_track, train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def quadratic(T=3, d=4, seed=0):
    """Per task t: support ½(φ−a_t)ᵀA_t(φ−a_t) (A_t SPD), query ½‖φ−b_t‖² + Σ sin φ (not quadratic)."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(T, d, d, generator=g)
    A = M @ M.transpose(1, 2) + 0.5 * torch.eye(d)
    a, b, theta = (torch.randn(T, d, generator=g) for _ in range(3))
    support = lambda p: 0.5 * torch.einsum("ti,tij,tj->t", p["w"] - a, A, p["w"] - a)  # [T]
    query = lambda w: (0.5 * ((w - b) ** 2).sum(1) + torch.sin(w).sum(1))  # [T]
    return A, a, theta[0], support, query


def test_batched_cg_is_each_task_own_cg(float64):
    torch.manual_seed(0)
    T, n = 4, 6
    M = torch.randn(T, n, n)
    A = M @ M.transpose(1, 2) + 0.1 * torch.eye(n)
    B = torch.randn(T, n)
    for iters in (1, 3, 20):
        X = conjugate_gradient_batched(lambda V: torch.einsum("tij,tj->ti", A, V), B, iters=iters)
        for t in range(T):
            ref = conjugate_gradient(lambda v: A[t] @ v, B[t], iters=iters)
            assert torch.allclose(X[t], ref, rtol=1e-10, atol=1e-12), (iters, t)
    assert torch.allclose(X, torch.linalg.solve(A, B.unsqueeze(-1)).squeeze(-1), atol=1e-8)


def test_implicit_gradient_equals_the_closed_form_on_a_quadratic_task(float64):
    """φ* = (A + λI)⁻¹(Aa + λθ), so dφ*/dθ = λ(A + λI)⁻¹ and ∇θ L_q(φ*) = λ(A + λI)⁻¹ ∇L_q(φ*)."""
    A, a, theta, support, query = quadratic()
    T, d = a.shape
    lam = 1.5
    I = torch.eye(d).expand(T, d, d)
    lr = 1.0 / (torch.linalg.eigvalsh(A).max().item() + lam)
    phi, taken = proximal_solve(support, {"w": stack({"w": theta}, T)["w"]}, lam, lr=lr, steps=5000, tol=1e-12)
    star = torch.linalg.solve(A + lam * I, (torch.einsum("tij,tj->ti", A, a) + lam * theta).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(phi["w"], star, atol=1e-10)
    assert (taken < 5000).all() and (taken > 10).all()  # the tolerance stopped every task, each at its own step
    w = star.clone().requires_grad_(True)
    gq = torch.autograd.grad(query(w).sum(), w)[0]
    x = implicit_gradient(support, {"w": star}, {"w": gq}, lam, cg_steps=d)["w"]  # CG is exact in d steps
    exact = lam * torch.linalg.solve(A + lam * I, gq.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(x, exact, rtol=1e-9, atol=1e-11)
    # and the same through autograd on the closed-form solution itself
    th = theta.expand(T, d).clone().requires_grad_(True)
    star_of = torch.linalg.solve(A + lam * I, (torch.einsum("tij,tj->ti", A, a) + lam * th).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(x, torch.autograd.grad(query(star_of).sum(), th)[0], rtol=1e-9, atol=1e-11)


def test_safeguarded_solve_converges_where_a_fixed_step_diverges(float64):
    """A step size 3x beyond 2/L (L the largest curvature of support + λ/2‖·‖²): plain gradient
    descent blows up, the safeguarded solver rejects rising steps, halves that task's step, descends
    monotonically per task and reaches the closed-form φ* = (A + λI)⁻¹(Aa + λθ)."""
    A, a, theta, support, _ = quadratic(seed=2)
    T, d = a.shape
    lam = 1.0
    L = (torch.linalg.eigvalsh(A).max(-1).values + lam)  # [T]
    lr = 3 * 2.0 / L.min().item()
    start = {"w": stack({"w": theta}, T)["w"]}
    star = torch.linalg.solve(A + lam * torch.eye(d), (torch.einsum("tij,tj->ti", A, a) + lam * theta).unsqueeze(-1)).squeeze(-1)
    plain, _ = proximal_solve(support, start, lam, lr=lr, steps=60, safeguard=False)
    assert not torch.isfinite(plain["w"]).all() or (plain["w"] - star).norm() > 1e3
    objective = proximal_objective(support, start, lam, per_task=True)
    values = [objective(start)] + [objective(phi) for phi, _ in proximal_steps(support, start, lam, lr=lr, steps=3000)]
    assert all((v2 <= v1).all() for v1, v2 in zip(values, values[1:]))
    phi, taken = proximal_solve(support, start, lam, lr=lr, steps=3000)
    assert (taken == 3000).all()
    assert torch.allclose(phi["w"], star, atol=1e-8)


def test_implicit_gradient_approaches_the_unrolled_gradient_as_the_inner_problem_converges(float64):
    """MAML through K steps of gradient descent on the same proximal objective (anchor = θ): the
    gap to the implicit gradient at φ_K shrinks with K, to rounding when the solve has converged."""
    A, a, theta, support, query = quadratic(seed=1)
    T, d = a.shape
    lam = 2.0
    lr = 1.0 / (torch.linalg.eigvalsh(A).max().item() + lam)
    errors = []
    for K in (2, 8, 32, 128, 256):
        th = theta.clone().requires_grad_(True)
        stacked = {"w": th.expand(T, d)}
        phi = adapt(proximal_objective(support, stacked, lam), stacked, steps=K, lr=lr)  # second order, anchor and start θ
        unrolled = torch.autograd.grad(query(phi["w"]).mean(), th)[0]
        w = phi["w"].detach().requires_grad_(True)
        gq = torch.autograd.grad(query(w).sum(), w)[0]
        implicit = implicit_gradient(support, {"w": w.detach()}, {"w": gq}, lam, cg_steps=d)["w"].mean(0)
        errors.append((implicit - unrolled).norm().item() / unrolled.norm().item())
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-2 and errors[-1] < 1e-9, errors


def sine_method(**own):
    cfg = config.from_dict({"track": "sine", "algorithm": "imaml", "imaml": own})
    problem = Problem(track="sine", make_model=lambda: MLP(1, 1, (8, 8)), loss=mse, metric=mse, metric_name="mse",
                      higher_is_better=False, head=())
    return IMAML(problem, cfg)


def sine_batch(n=3, seed=0):
    return SineTasks(SineTaskConfig(k_shot=5, k_query=7)).sample(n, np.random.default_rng(seed)).to(torch.get_default_dtype())


def test_meta_gradient_on_an_mlp_matches_the_unrolled_gradient_of_a_solved_proximal_problem(float64):
    """A real model: iMAML's meta-gradient (inner solve to a tolerance, CG run to exactness) against
    autograd through 60 steps of gradient descent on the same proximal objective."""
    torch.manual_seed(3)
    lam, lr, steps = 40.0, 0.02, 60
    m, batch = sine_method(lam=lam, lr=lr, steps=steps, tol=1e-10, cg_steps=100), sine_batch(2)
    grads, _, taken = m.meta_gradient(batch)
    assert (taken < steps).all(), "the inner solve must have met its tolerance"
    theta = dict(m.model.named_parameters())
    stacked = stack(theta, batch.n_tasks)
    phi = adapt(proximal_objective(m.support_loss(batch), stacked, lam), stacked, steps=steps, lr=lr)
    q = mse(forward_tasks(m.model, phi, batch.x_query), batch.y_query).mean()
    unrolled = dict(zip(theta, torch.autograd.grad(q, list(theta.values()))))
    num = sum(((grads[k] - unrolled[k]) ** 2).sum() for k in theta).sqrt()
    den = sum((unrolled[k] ** 2).sum() for k in theta).sqrt()
    assert den > 1e-2 and num / den < 1e-7, (num / den).item()
    # first order (no CG) is measurably different: the test can tell the implicit correction apart
    m.own.cg_steps = 0
    fo, _, _ = m.meta_gradient(batch)
    assert sum(((fo[k] - unrolled[k]) ** 2).sum() for k in theta).sqrt() / den > 1e-2


def count_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        todo.extend(g for g, _ in f.next_functions)
    return len(seen)


def test_inner_loop_keeps_no_graph():
    """Memory does not grow with the inner steps, structurally: φ comes back detached even when θ
    requires grad, and the query loss's graph is the same size after 2 or 40 inner steps."""
    torch.manual_seed(4)
    m, batch = sine_method(), sine_batch()
    theta = stack(dict(m.model.named_parameters()), batch.n_tasks)
    assert all(v.requires_grad for v in theta.values())
    sizes = []
    for steps in (2, 40):
        with torch.enable_grad():
            phi, _ = proximal_solve(m.support_loss(batch), theta, 2.0, lr=0.01, steps=steps)
        assert all(v.grad_fn is None and not v.requires_grad for v in phi.values())
        leaves = {k: v.requires_grad_(True) for k, v in phi.items()}
        sizes.append(count_nodes(mse(forward_tasks(m.model, leaves, batch.x_query), batch.y_query).sum()))
    assert sizes[0] == sizes[1]


def test_train_step_leaves_theta_alone_on_a_non_finite_loss():
    m, batch = sine_method(), sine_batch()
    batch.y_support[0, 0] = float("nan")
    before = {k: v.detach().clone() for k, v in m.model.named_parameters()}
    metrics = m.train_step(batch, 0)
    assert not np.isfinite(list(metrics.values())).all()
    assert all(torch.equal(v, before[k]) for k, v in m.model.named_parameters())


def sine_cfg(**extra):
    data = {"track": "sine", "algorithm": "imaml", "iterations": 12, "checkpoint_every": 6, "log_every": 3,
            "meta_batch": 5, "eval": {"tasks": 20}}
    data.update(extra)
    return config.from_dict(data)


def test_resume_is_bitwise_identical(tmp_path):
    full, _ = resume_round_trip(lambda n: sine_cfg(iterations=n), tmp_path, sine_cfg().iterations, 6)
    assert "imaml" in full.modules


@pytest.mark.slow  # CI budget (15 min on 2 cores): run by `make test-slow` / .ci/slow
def test_short_omniglot_run_clearly_beats_chance(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("METARL_CACHE", cache)
    cfg = config.load("experiments/imaml_omniglot_5w1s.yaml", [
        "iterations=40", "meta_batch=8", "checkpoint_every=40", "log_every=20", "model.hidden=16", "baselines=[]",
        "imaml.steps=8", "eval.steps=8"])
    assert (cfg.imaml.lam, cfg.imaml.cg_steps) == (2.0, 5)
    train(cfg, tmp_path, tensorboard=False)
    track, _, _ = load_track(tmp_path)
    res = track.evaluate(100, 8, seed=11)
    acc = res.curves["imaml"]
    assert acc.shape == (100, 9)
    # measured (seeded, 1 thread): 0.20 before adaptation, 0.35-0.36 after 2-5 steps, 0.33 after 8
    mean, sd = acc[:, 4].mean(), acc[:, 4].std(ddof=1)
    assert mean - 2 * sd / np.sqrt(100) > 0.2 + 0.1, acc.mean(0)
    assert acc[:, 8].mean() > acc[:, 0].mean() + 0.1


def test_cli_evaluate_writes_the_imaml_curve(tmp_path):
    out = cli_train_and_evaluate("experiments/imaml_sine.yaml", tmp_path / "run",
                                 ["iterations=4", "checkpoint_every=4", "meta_batch=4", "baselines=[oracle]"],
                                 ["--tasks", "10", "--steps", "3"])
    assert out["algorithm"] == "imaml" and out["steps"] == [0, 1, 2, 3]
    assert len(out["methods"]["imaml"]["mean"]) == 4 and "oracle" in out["methods"]
    assert out["step_sizes"]["imaml"]["lam"] == config.load("experiments/imaml_sine.yaml").imaml.lam
