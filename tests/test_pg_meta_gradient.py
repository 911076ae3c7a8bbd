"""The MAML-RL meta-gradient through the engine's ``adapt`` against independent references.

Problem: a contextual linear-Gaussian bandit family (Finn et al. 2017 sec. 5.3 in miniature).
Task k: context x, action a ~ N(w·x + b, e^{2s}), reward −(a − g_k·x)². Episodes are FIXED
(sampled once), so the meta-objective is a deterministic function of θ = (w, b, s):

    J(θ) = mean_k  L_out,k(φ_k(θ)),   φ_k = θ − α ∇L_in,k(θ)   (one or two inner steps)

with L_in the REINFORCE loss on the task's train episodes and L_out TRPO's surrogate on its
validation episodes (old log-probs fixed). Episodes are padded with early termination so the
per-episode weighting of the losses is exercised. References, in float64:
1. an analytic meta-gradient written in numpy from closed-form ∇ log π and ∇² log π of the
   linear-Gaussian policy, chained through the inner steps: Jᵀ ∇_φ L_out with
   J = Π (I − α ∇² L_in) (Finn et al. 2017, sec. 2.2);
2. central finite differences of J(θ), computed once in numpy (fully independent of torch) and
   once through the engine itself (for a policy with a hidden tanh layer, where no closed form
   is written).
"""
import math

import numpy as np
import pytest
import torch

from metarl import functional as F
from metarl.adaptation import adapt
from metarl.advantages import discounted_returns, normalize_advantages
from metarl.objectives import reinforce_loss, surrogate_loss
from metarl.policies.gaussian import GaussianMLPPolicy, log_prob

D, T, TMAX, B_TRAIN, B_VALID, ALPHA = 2, 3, 3, 4, 5, 0.15


pytestmark = pytest.mark.usefixtures("float64")  # conftest: float64 default dtype, restored after


def _episodes(rng, B, goals):
    """Fixed episodes for every task: x [T, Tmax, B, D], a [T, Tmax, B, 1], advantages and mask [T, Tmax, B]."""
    x = rng.normal(size=(T, TMAX, B, D))
    a = rng.normal(size=(T, TMAX, B, 1)) * 1.3 + 0.2
    lengths = rng.integers(1, TMAX + 1, size=(T, B))
    lengths[:, 0] = TMAX
    mask = (np.arange(TMAX)[None, :, None] < lengths[:, None, :]).astype(float)
    rewards = -(a[..., 0] - np.einsum("tsbd,td->tsb", x, goals)) ** 2
    returns = discounted_returns(torch.tensor(rewards), torch.tensor(mask), 0.9)
    adv = normalize_advantages(returns, torch.tensor(mask)).numpy()  # per task, as pytorch-maml-rl
    return x, a, adv, mask


def _weights(mask):
    """pytorch-maml-rl weighting (objectives.masked_mean, 'episode'): 1 / (length · B) per valid step."""
    return mask / mask.sum(-2, keepdims=True) / mask.shape[-1]


# --------------------------------------------------------------------- closed-form linear policy

def _logp_terms(theta, x, a):
    """log π, ∇ log π [.., D+2] and ∇² log π [.., D+2, D+2] at θ = (w, b, s) for every sample."""
    w, b, s = theta[:D], theta[D], theta[D + 1]
    u = np.concatenate([x, np.ones(x.shape[:-1] + (1,))], -1)  # ∂μ/∂(w, b)
    z = a[..., 0] - (x @ w + b)
    q = math.exp(-2 * s)
    logp = -0.5 * z ** 2 * q - s - 0.5 * math.log(2 * math.pi)
    grad = np.concatenate([z[..., None] * u * q, (z ** 2 * q - 1)[..., None]], -1)
    n = D + 2
    hess = np.zeros(z.shape + (n, n))
    hess[..., :D + 1, :D + 1] = -q * u[..., :, None] * u[..., None, :]
    hess[..., :D + 1, D + 1] = hess[..., D + 1, :D + 1] = -2 * q * z[..., None] * u
    hess[..., D + 1, D + 1] = -2 * q * z ** 2
    return logp, grad, hess


def _inner_grad_hess(theta, x, a, adv, mask):
    _, grad, hess = _logp_terms(theta, x, a)
    c = _weights(mask) * adv  # L_in = −Σ c · log π
    n = D + 2
    return -(c[..., None] * grad).reshape(-1, n).sum(0), -(c[..., None, None] * hess).reshape(-1, n, n).sum(0)


def _outer_loss_grad(phi, x, a, adv, mask, old_logp):
    logp, grad, _ = _logp_terms(phi, x, a)
    c = _weights(mask) * adv * np.exp(logp - old_logp)
    return -c.sum(), -(c[..., None] * grad).reshape(-1, D + 2).sum(0)


def _numpy_meta(theta, data, steps, first_order=False):
    """(J(θ), analytic ∇J(θ)) from the closed forms, task by task."""
    (xt, at, advt, mt), (xv, av, advv, mv), old_logp = data
    total, grad = 0.0, np.zeros_like(theta)
    for k in range(T):
        phi, jac = theta.copy(), np.eye(len(theta))
        for _ in range(steps):
            g, h = _inner_grad_hess(phi, xt[k], at[k], advt[k], mt[k])
            if not first_order:
                jac = (np.eye(len(theta)) - ALPHA * h) @ jac
            phi = phi - ALPHA * g
        loss, g_out = _outer_loss_grad(phi, xv[k], av[k], advv[k], mv[k], old_logp[k])
        total += loss / T
        grad += jac.T @ g_out / T
    return total, grad


# ----------------------------------------------------------------------------- the engine's side

def _engine_objective(policy, data, steps, first_order=False):
    (xt, at, advt, mt), (xv, av, advv, mv), old_logp = [tuple(torch.tensor(v) for v in d) if isinstance(d, tuple)
                                                         else torch.tensor(d) for d in data]

    def objective(theta):
        def inner(p):
            mean, log_std = F.forward_tasks(policy, p, xt)
            return reinforce_loss(log_prob(mean, log_std, at), advt, mt).sum()  # sum: one gradient per task

        phi = adapt(inner, F.stack(theta, T), steps=steps, lr=ALPHA, first_order=first_order)
        mean, log_std = F.forward_tasks(policy, phi, xv)
        return surrogate_loss(log_prob(mean, log_std, av), old_logp, advv, mv).mean()

    return objective


def _setup(seed, hidden=()):
    rng = np.random.default_rng(seed)
    goals = rng.normal(size=(T, D))
    train, valid = _episodes(rng, B_TRAIN, goals), _episodes(rng, B_VALID, goals)
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(D, 1, hidden=hidden, activation="tanh", init_std=0.8)
    theta = F.params_of(policy)
    old_logp = rng.normal(size=valid[3].shape) * 0.1 - 1.0  # any constants: the "old" policy's log-probs
    return policy, theta, (train, valid, old_logp)


def _theta_vector(theta):
    return np.concatenate([theta["mean.layers.0.weight"].detach().numpy().ravel(),
                           theta["mean.layers.0.bias"].detach().numpy(), theta["log_std"].detach().numpy()])


def _engine_grad_vector(theta, objective):
    loss = objective(theta)
    g = torch.autograd.grad(loss, [theta["mean.layers.0.weight"], theta["mean.layers.0.bias"], theta["log_std"]])
    return loss.item(), np.concatenate([gi.numpy().ravel() for gi in g])


@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_matches_analytic_formula(steps):
    policy, theta, data = _setup(seed=steps)
    loss, grad = _engine_grad_vector(theta, _engine_objective(policy, data, steps))
    ref_loss, ref_grad = _numpy_meta(_theta_vector(theta), data, steps)
    assert abs(loss - ref_loss) < 1e-12
    assert np.abs(grad).max() > 1e-2  # not trivially zero
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-9, atol=1e-10)
    # the second-order term matters here: the first-order (FOMAML) gradient is measurably different
    _, fo_ref = _numpy_meta(_theta_vector(theta), data, steps, first_order=True)
    assert np.abs(fo_ref - ref_grad).max() > 1e-3
    _, fo = _engine_grad_vector(theta, _engine_objective(policy, data, steps, first_order=True))
    np.testing.assert_allclose(fo, fo_ref, rtol=1e-9, atol=1e-10)


def test_meta_gradient_matches_numpy_finite_differences():
    policy, theta, data = _setup(seed=7)
    _, grad = _engine_grad_vector(theta, _engine_objective(policy, data, steps=1))
    th0, h = _theta_vector(theta), 1e-5
    fd = np.zeros_like(th0)
    for i in range(len(th0)):
        e = np.zeros_like(th0)
        e[i] = h
        fd[i] = (_numpy_meta(th0 + e, data, 1)[0] - _numpy_meta(th0 - e, data, 1)[0]) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


def test_meta_gradient_of_an_mlp_policy_matches_engine_finite_differences():
    """No closed form here (hidden tanh layer): central differences of the engine's own J(θ),
    whose evaluation under no_grad takes the inner step on detached leaves, vs the second-order
    autograd meta-gradient."""
    policy, theta, data = _setup(seed=8, hidden=(4,))
    objective = _engine_objective(policy, data, steps=1)
    names = list(theta)
    grads = torch.autograd.grad(objective(theta), [theta[n] for n in names])
    h = 1e-5
    with torch.no_grad():
        for n, g in zip(names, grads):
            base = theta[n].detach()
            fd = torch.zeros_like(base)
            for i in range(base.numel()):
                e = torch.zeros_like(base).view(-1)
                e[i] = h
                e = e.view_as(base)
                plus = objective({**F.detached(theta), n: base + e})
                minus = objective({**F.detached(theta), n: base - e})
                fd.view(-1)[i] = (plus - minus) / (2 * h)
            torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)
