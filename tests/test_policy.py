"""Gaussian MLP policy, its distribution helpers and the RL losses against torch.distributions."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from metarl import functional as F
from metarl.objectives import gaussian_kl, masked_mean, reinforce_loss, surrogate_loss
from metarl.policies.gaussian import GaussianMLPPolicy, distribution, entropy, log_prob, sample


pytestmark = pytest.mark.usefixtures("float64")  # conftest: float64 default dtype, restored after


def _policy(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("hidden", (8, 8))
    return GaussianMLPPolicy(3, 2, **kw).double()


def test_param_names_are_stable():
    names = sorted(n for n, _ in _policy().named_parameters())
    assert names == sorted(["log_std", "mean.layers.0.weight", "mean.layers.0.bias", "mean.layers.1.weight",
                            "mean.layers.1.bias", "mean.layers.2.weight", "mean.layers.2.bias"])
    assert torch.allclose(_policy(init_std=0.5).log_std, torch.full((2,), math.log(0.5)))


def test_log_prob_and_entropy_match_torch_normal():
    torch.manual_seed(1)
    mean, log_std, a = torch.randn(4, 5, 2), torch.randn(2) * 0.3, torch.randn(4, 5, 2)
    ref = Normal(mean, log_std.exp())
    assert torch.allclose(log_prob(mean, log_std, a), ref.log_prob(a).sum(-1))
    assert torch.allclose(entropy(log_std), ref.entropy()[0, 0].sum())
    assert torch.allclose(distribution(mean, log_std).log_prob(a), log_prob(mean, log_std, a))


def test_forward_and_min_std():
    policy = _policy(min_std=0.1)
    with torch.no_grad():
        policy.log_std.fill_(-10.0)
    mean, log_std = policy(torch.randn(6, 3))
    assert mean.shape == (6, 2)
    assert torch.allclose(log_std, torch.full((2,), math.log(0.1)))


def test_forward_tasks_equals_per_task_forward():
    policy = _policy(activation="tanh")
    T = 3
    theta = F.params_of(policy)
    per_task = [{n: p + 0.1 * torch.randn_like(p) for n, p in theta.items()} for _ in range(T)]
    stacked = {n: torch.stack([q[n] for q in per_task]) for n in theta}
    obs = torch.randn(T, 4, 5, 3)
    mean, log_std = F.forward_tasks(policy, stacked, obs)
    assert mean.shape == (T, 4, 5, 2) and log_std.shape == (T, 1, 1, 2)
    for t in range(T):
        m_t, ls_t = F.forward(policy, per_task[t], obs[t])
        assert torch.allclose(mean[t], m_t)
        assert torch.allclose(log_std[t].expand_as(m_t), ls_t.expand_as(m_t))
    with pytest.raises(ValueError, match="stack"):
        policy.forward_tasks(theta, obs)


def test_sample_is_reproducible_and_has_the_right_moments():
    mean, log_std = torch.tensor([1.0, -2.0]), torch.tensor([0.0, math.log(0.5)])
    a1 = sample(mean.expand(20000, 2), log_std, torch.Generator().manual_seed(3))
    a2 = sample(mean.expand(20000, 2), log_std, torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2) and not a1.requires_grad
    assert torch.allclose(a1.mean(0), mean, atol=0.03)
    assert torch.allclose(a1.std(0), log_std.exp(), atol=0.03)


def test_gaussian_kl_matches_torch_and_is_old_to_new():
    torch.manual_seed(2)
    Tmax, B = 4, 3
    mp, mq = torch.randn(2, Tmax, B, 2), torch.randn(2, Tmax, B, 2)
    lp, lq = torch.randn(2, 1, 1, 2) * 0.3, torch.randn(2, 1, 1, 2) * 0.3
    mask = torch.ones(2, Tmax, B)
    mask[:, 2:, 0] = 0.0  # episode 0 ends after 2 steps
    ref = kl_divergence(Normal(mp, lp.exp().expand_as(mp)), Normal(mq, lq.exp().expand_as(mq))).sum(-1)
    for red in ("episode", "step"):
        assert torch.allclose(gaussian_kl(mp, lp, mq, lq, mask, red), masked_mean(ref, mask, red))
    # explicit episode convention: per-episode mean over its valid steps, then over episodes
    by_hand = torch.stack([ref[:, :2, 0].mean(1), ref[:, :, 1].mean(1), ref[:, :, 2].mean(1)], -1).mean(-1)
    assert torch.allclose(gaussian_kl(mp, lp, mq, lq, mask), by_hand)
    step = (ref * mask).sum((1, 2)) / mask.sum((1, 2))
    assert torch.allclose(gaussian_kl(mp, lp, mq, lq, mask, "step"), step)
    assert torch.allclose(gaussian_kl(mp, lp, mp, lp, mask), torch.zeros(2))


def test_reinforce_gradient_is_the_score_function_estimator():
    # one linear-Gaussian task, 1-D action: mean = w·x + b, log σ = s. The REINFORCE gradient is
    # −(1/B) Σ_i A_i ∇ log π(a_i | x_i) with ∇_w = (a−μ)x/σ², ∇_b = (a−μ)/σ², ∇_s = (a−μ)²/σ² − 1.
    torch.manual_seed(4)
    policy = GaussianMLPPolicy(2, 1, hidden=()).double()
    B = 5
    x, a, adv = torch.randn(1, B, 2), torch.randn(1, B, 1), torch.randn(1, B)
    mask = torch.ones(1, B)
    mean, log_std = policy(x)
    loss = reinforce_loss(log_prob(mean, log_std, a), adv, mask)
    loss.backward()
    with torch.no_grad():
        w, b, s = policy.mean.layers[0].weight[0], policy.mean.layers[0].bias, policy.log_std
        z = a[0, :, 0] - (x[0] @ w + b)
        var = torch.exp(2 * s)
        gw = -(adv[0, :, None] * z[:, None] * x[0] / var).mean(0)
        gb = -(adv[0] * z / var).mean(0, keepdim=True)
        gs = -(adv[0] * (z ** 2 / var - 1)).mean(0, keepdim=True)
    assert torch.allclose(policy.mean.layers[0].weight.grad[0], gw)
    assert torch.allclose(policy.mean.layers[0].bias.grad, gb)
    assert torch.allclose(policy.log_std.grad, gs)


def test_losses_keep_task_axes_and_ignore_padding():
    torch.manual_seed(5)
    T, Tmax, B = 3, 4, 2
    lp, adv = torch.randn(T, Tmax, B), torch.randn(T, Tmax, B)
    mask = torch.ones(T, Tmax, B)
    mask[:, 3:, 1] = 0.0
    loss = reinforce_loss(lp, adv, mask)
    assert loss.shape == (T,)
    garbage = lp.clone()
    garbage[:, 3:, 1] = 1e6  # padded steps must not matter
    assert torch.allclose(reinforce_loss(garbage, adv, mask), loss)
    expected = -(((lp * adv)[:, :, 0].mean(1) + (lp * adv)[:, :3, 1].mean(1)) / 2)
    assert torch.allclose(loss, expected)
    with pytest.raises(ValueError, match="reduction"):
        reinforce_loss(lp, adv, mask, reduction="sum")


def test_surrogate_at_old_policy_has_reinforce_gradient():
    torch.manual_seed(6)
    lp = torch.randn(2, 3, 4, requires_grad=True)
    adv, mask = torch.randn(2, 3, 4), torch.ones(2, 3, 4)
    surr = surrogate_loss(lp, lp.detach(), adv, mask)
    assert torch.allclose(surr, -masked_mean(adv, mask))
    g_surr, = torch.autograd.grad(surr.sum(), lp)
    g_rf, = torch.autograd.grad(reinforce_loss(lp, adv, mask).sum(), lp)
    assert torch.allclose(g_surr, g_rf)


def test_xavier_init_option():
    """policy.init "xavier" (the paper's code): zero biases, weights within the Xavier-uniform bound."""
    torch.manual_seed(0)
    pol = GaussianMLPPolicy(3, 2, hidden=(50, 40), init="xavier")
    for layer in pol.mean.layers:
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert torch.count_nonzero(layer.bias) == 0
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    torch.manual_seed(0)
    default = GaussianMLPPolicy(3, 2, hidden=(50, 40))
    assert torch.count_nonzero(default.mean.layers[0].bias) > 0
    with pytest.raises(ValueError, match="unknown init"):
        GaussianMLPPolicy(3, 2, init="orthogonal")
