"""The inner loop against independent references: finite differences and hand-unrolled steps."""
import pytest
import torch
from torch import nn

from metarl.adaptation import adapt, trajectory
from metarl.algorithms.maml import query_losses
from metarl.functional import forward, params_of
from metarl.objectives import mse
from metarl.tasks.batch import TaskBatch
from metarl.policies.mlp import MLP


def tiny_problem(seed=0, tasks=3):
    g = torch.Generator().manual_seed(seed)
    model = MLP(2, 1, hidden=[5], activation="tanh").double()
    batch = TaskBatch(torch.randn(tasks, 4, 2, generator=g, dtype=torch.float64), torch.randn(tasks, 4, 1, generator=g, dtype=torch.float64),
                      torch.randn(tasks, 6, 2, generator=g, dtype=torch.float64), torch.randn(tasks, 6, 1, generator=g, dtype=torch.float64))
    return model, batch


def meta_loss_value(model, flat_theta, batch, steps, lr):
    """The MAML objective as a plain function of a flat θ, with the inner steps unrolled by hand."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    total = 0.0
    for i in range(batch.n_tasks):
        chunks = torch.split(flat_theta, [s.numel() for s in shapes])
        p = {n: c.view(s).clone().requires_grad_(True) for n, c, s in zip(names, chunks, shapes)}
        for _ in range(steps):
            loss = ((forward(model, p, batch.x_support[i]) - batch.y_support[i]) ** 2).mean()
            grads = torch.autograd.grad(loss, list(p.values()))
            p = {n: (v - lr * g).detach().requires_grad_(True) for (n, v), g in zip(p.items(), grads)}
        total += ((forward(model, p, batch.x_query[i]) - batch.y_query[i]) ** 2).mean().item()
    return total / batch.n_tasks


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("batched", [True, False])
def test_second_order_meta_gradient_matches_central_finite_differences(steps, batched):
    model, batch = tiny_problem()
    lr = 0.3
    params = params_of(model)
    loss = query_losses(model, params, batch, mse, steps=steps, lr=lr, batched=batched).mean()
    grads = torch.autograd.grad(loss, list(params.values()))
    analytic = torch.cat([g.reshape(-1) for g in grads])
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
    eps = 1e-6
    numeric = torch.zeros_like(theta)
    for j in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[j] = eps
        numeric[j] = (meta_loss_value(model, theta + e, batch, steps, lr) - meta_loss_value(model, theta - e, batch, steps, lr)) / (2 * eps)
    assert torch.allclose(analytic, numeric, rtol=1e-6, atol=1e-8), (analytic - numeric).abs().max()
    # the second-order terms matter here: first order gives a different gradient
    fo = query_losses(model, params, batch, mse, steps=steps, lr=lr, first_order=True, batched=batched).mean()
    fo_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(fo, list(params.values()))])
    assert (fo_grad - analytic).abs().max() > 1e-4


def test_first_order_gradient_is_the_query_gradient_at_phi():
    """FOMAML's meta-gradient is ∇_φ L_query(φ), evaluated at the adapted weights (Finn et al. 2017 sec. 5.2)."""
    model, batch = tiny_problem(1, tasks=1)
    params = params_of(model)
    lr = 0.2
    loss = query_losses(model, params, batch, mse, steps=2, lr=lr, first_order=True).mean()
    got = torch.autograd.grad(loss, list(params.values()))
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    for _ in range(2):
        l_s = mse(forward(model, p, batch.x_support[0]), batch.y_support[0])
        gs = torch.autograd.grad(l_s, list(p.values()))
        p = {k: (v - lr * g).detach().requires_grad_(True) for (k, v), g in zip(p.items(), gs)}
    want = torch.autograd.grad(mse(forward(model, p, batch.x_query[0]), batch.y_query[0]), list(p.values()))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-12)


def test_batched_path_equals_loop_path_for_native_and_vmap_models():
    model, batch = tiny_problem(2, tasks=5)
    seq = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).double()  # no forward_tasks: vmap fallback
    for m in (model, seq):
        params = params_of(m)
        a = query_losses(m, params, batch, mse, steps=2, lr=0.1, batched=True)
        b = query_losses(m, params, batch, mse, steps=2, lr=0.1, batched=False)
        assert torch.allclose(a, b, atol=1e-12)
        ga = torch.autograd.grad(a.mean(), list(params.values()))
        gb = torch.autograd.grad(b.mean(), list(params.values()))
        for x, y in zip(ga, gb):
            assert torch.allclose(x, y, atol=1e-12)


def test_per_parameter_and_learned_learning_rates():
    """Meta-SGD style per-element step sizes: φ = θ − α ⊙ ∇L, and the meta-gradient reaches α."""
    model, batch = tiny_problem(3, tasks=1)
    params = params_of(model)
    alphas = {k: torch.full_like(v, 0.05).requires_grad_(True) for k, v in params.items()}
    loss_fn = lambda p: mse(forward(model, p, batch.x_support[0]), batch.y_support[0])
    phi = adapt(loss_fn, params, steps=1, lr=alphas)
    g = torch.autograd.grad(loss_fn(params), list(params.values()))
    for (k, v), gk in zip(params.items(), g):
        assert torch.allclose(phi[k], v - 0.05 * gk, atol=1e-12)
    outer = mse(forward(model, phi, batch.x_query[0]), batch.y_query[0])
    d_alpha = torch.autograd.grad(outer, list(alphas.values()))
    # dL/dα = −∇_φ L_q ⊙ ∇_θ L_s at first order in α, exactly here since φ is linear in α
    phi_leaf = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    gq = torch.autograd.grad(mse(forward(model, phi_leaf, batch.x_query[0]), batch.y_query[0]), list(phi_leaf.values()))
    for da, a, b in zip(d_alpha, gq, g):
        assert torch.allclose(da, -a * b, atol=1e-12)
    # a scalar per tensor works too, and a missing entry raises
    phi2 = adapt(loss_fn, params, lr={k: 0.1 for k in params})
    assert torch.allclose(phi2["layers.0.weight"], params["layers.0.weight"] - 0.1 * g[0])
    with pytest.raises(KeyError, match="no inner learning rate"):
        adapt(loss_fn, params, lr={"layers.0.weight": 0.1})


def test_only_adapts_the_named_subset():
    model, batch = tiny_problem(4, tasks=1)
    params = params_of(model)
    loss_fn = lambda p: mse(forward(model, p, batch.x_support[0]), batch.y_support[0])
    phi = adapt(loss_fn, params, steps=3, lr=0.1, only=["layers.1.weight", "layers.1.bias"])
    assert phi["layers.0.weight"] is params["layers.0.weight"]
    assert not torch.equal(phi["layers.1.weight"], params["layers.1.weight"])
    with pytest.raises(KeyError, match="unknown parameters"):
        adapt(loss_fn, params, only=["head.weight"])


def test_trajectory_decreases_support_loss_and_keeps_no_graph_in_evaluation():
    model, batch = tiny_problem(5, tasks=1)
    params = {k: v.detach() for k, v in params_of(model).items()}
    loss_fn = lambda p: mse(forward(model, p, batch.x_support[0]), batch.y_support[0])
    phis = trajectory(loss_fn, params, 5, lr=0.1)
    losses = [loss_fn(p).item() for p in phis]
    assert len(phis) == 6 and losses[-1] < losses[0]
    assert all(not v.requires_grad for p in phis[1:] for v in p.values())
