"""CAVIA on the meta-RL track (Zintgraf et al. 2019 sec. 5.3): the inner REINFORCE step moves only
the context, its meta-gradient through the shared outer objective matches central differences
in float64, resume is bitwise, and `metarl evaluate` writes the contract under "cavia"."""
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from metarl import config
from metarl.algorithms.meta_rl import RLInnerConfig, adapt_on, outer_objective, task_params
from metarl.fisher import fast_fisher_supported
from metarl.functional import params_of, stack
from metarl.objectives import reinforce_loss
from metarl.policies.context import ContextGaussianPolicy
from metarl.policies.gaussian import log_prob
from metarl.training import train

CTX = "mean.context"


def _fixed_episodes(rng, n_tasks, t_max, batch, obs_dim, act_dim, policy=None):
    """Fixed episodes [T, Tmax, B, ...] with ragged lengths, as the collector lays them out."""
    lengths = rng.integers(1, t_max + 1, size=(n_tasks, batch))
    lengths[:, 0] = t_max
    mask = torch.tensor((np.arange(t_max)[None, :, None] < lengths[:, None, :]).astype(float))
    obs = torch.tensor(rng.normal(size=(n_tasks, t_max, batch, obs_dim)))
    actions = torch.tensor(rng.normal(size=(n_tasks, t_max, batch, act_dim)))
    log_probs = torch.tensor(rng.normal(size=(n_tasks, t_max, batch)) * 0.1 - 1.0)
    adv = torch.tensor(rng.normal(size=(n_tasks, t_max, batch))) * mask
    return SimpleNamespace(obs=obs, actions=actions, mask=mask, log_probs=log_probs), adv


def _tiny(seed=0):
    torch.manual_seed(seed)
    policy = ContextGaussianPolicy(3, 2, context_size=2, hidden=(5,), activation="tanh", init_std=0.7)
    rng = np.random.default_rng(seed)
    train_b = _fixed_episodes(rng, 3, 4, 5, 3, 2)
    valid, valid_adv = _fixed_episodes(rng, 3, 4, 6, 3, 2)
    return policy, [train_b], valid, valid_adv


def test_the_context_is_no_part_of_theta_and_starts_at_zero():
    policy, *_ = _tiny()
    theta = params_of(policy)
    assert CTX not in theta and dict(policy.named_parameters())[CTX].requires_grad is False
    start = task_params(policy, theta)
    assert torch.equal(start[CTX], torch.zeros(2)) and start[CTX].requires_grad
    assert not fast_fisher_supported(policy, 0.5)  # TRPO takes the generic closures for this policy


def test_inner_step_moves_only_the_context_by_its_reinforce_gradient(float64):
    policy, batches, *_ = _tiny(1)
    theta = {k: v.detach() for k, v in params_of(policy).items()}
    start = stack({k: v.detach() for k, v in task_params(policy, theta).items()}, 3)
    lr = 0.7
    phi = adapt_on(policy, start, batches, lr)
    for k in theta:                     # θ untouched, bit for bit
        assert torch.equal(phi[k], start[k]), k
    assert phi[CTX].abs().min() > 0     # every task's context moved
    # reference: central differences of the REINFORCE loss in each context coordinate, task by task
    eps, adv = batches[0]

    def loss_at(ctx):
        p = dict(start, **{CTX: ctx})
        mean, log_std = policy.forward_tasks(p, eps.obs)
        return reinforce_loss(log_prob(mean, log_std, eps.actions), adv, eps.mask).sum()

    h, fd = 1e-6, torch.zeros_like(start[CTX])
    with torch.no_grad():
        for t in range(3):
            for i in range(2):
                e = torch.zeros_like(start[CTX])
                e[t, i] = h
                fd[t, i] = (loss_at(start[CTX] + e) - loss_at(start[CTX] - e)) / (2 * h)
    torch.testing.assert_close(phi[CTX], -lr * fd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_central_differences(float64, first_order):
    """The TRPO surrogate of the context-adapted policy as CAVIA-RL's outer step sees it
    (meta_rl.outer_objective), differentiated by autograd through the context step, against
    central differences of the same function of θ; first_order treats the context gradient as
    a constant, which the reference reproduces by freezing it."""
    policy, train_b, valid, valid_adv = _tiny(2)
    inner = RLInnerConfig(lr=0.9, first_order=first_order)
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params_of(policy).items()}
    with torch.no_grad():
        phi_old = adapt_on(policy, stack(task_params(policy, theta), 3), train_b, inner.lr)
    surrogate, _, _ = outer_objective(policy, train_b, valid, valid_adv, phi_old, inner)
    grads = torch.autograd.grad(surrogate(theta), list(theta.values()))
    assert max(g.abs().max().item() for g in grads) > 1e-3

    if first_order:  # the reference: φ = -α g(θ₀) with g frozen at θ₀
        frozen = phi_old[CTX].detach()

        def reference(p):
            mean, log_std = policy.forward_tasks(dict(stack(p, 3), **{CTX: frozen}), valid.obs)
            from metarl.objectives import surrogate_loss
            return surrogate_loss(log_prob(mean, log_std, valid.actions), valid.log_probs, valid_adv, valid.mask).mean()
    else:
        reference = surrogate
    h = 1e-6
    with torch.no_grad():
        for (name, p), g in zip(theta.items(), grads):
            flat = p.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + h
                up = reference(theta).item()
                flat[i] = old - h
                down = reference(theta).item()
                flat[i] = old
                assert abs(g.view(-1)[i].item() - (up - down) / (2 * h)) < 1e-7, (name, i)


def nav_cfg(**extra):
    data = {"track": "rl", "algorithm": "cavia", "iterations": 4, "checkpoint_every": 2, "log_every": 1, "meta_batch": 3,
            "env": {"id": "metarl/Navigation2D-v0", "kwargs": {"horizon": 10}}, "policy": {"hidden": [8, 8]},
            "inner": {"episodes": 3}, "sampler": {"workers": 0}, "eval": {"tasks": 3, "steps": 1}}
    return config.from_dict(config.merge(data, extra))


def test_training_changes_theta_and_resume_is_bitwise(tmp_path):
    full = train(nav_cfg(), tmp_path / "full", tensorboard=False)
    train(nav_cfg(iterations=2), tmp_path / "split", tensorboard=False)
    resumed = train(nav_cfg(), tmp_path / "split", resume=True, tensorboard=False)
    fresh = train(nav_cfg(iterations=0), tmp_path / "zero", tensorboard=False)
    try:
        moved = False
        for k, p in full.modules["cavia"].named_parameters():
            assert torch.equal(p, dict(resumed.modules["cavia"].named_parameters())[k]), k
            moved |= not torch.equal(p, dict(fresh.modules["cavia"].named_parameters())[k])
        assert moved  # TRPO updated θ
        assert torch.equal(dict(full.modules["cavia"].named_parameters())[CTX], torch.zeros(5))  # φ₀ stays 0
    finally:
        for t in (full, resumed, fresh):
            t.close()


def test_cli_evaluate_writes_the_contract(tmp_path):
    rd = tmp_path / "cavia"
    sets = ["iterations=1", "meta_batch=3", "inner.episodes=3", "inner.eval_timesteps=null", "policy.hidden=[8,8]",
            "sampler.workers=0", "eval.tasks=3"]
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "train", "experiments/cavia_nav2d.yaml", "--run-dir", str(rd),
                        *[a for s in sets for a in ("--set", s)], "--evaluate"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    data = json.loads((rd / "eval" / "adaptation.json").read_text())
    assert data["algorithm"] == "cavia" and data["metric"] == "return" and data["curve_axis"] == "inner steps"
    assert set(data["methods"]) == {"cavia", "random"} and len(data["methods"]["cavia"]["mean"]) == len(data["steps"])


@pytest.mark.slow
def test_context_adaptation_learns_on_navigation(tmp_path):
    """A short CAVIA-RL run on 2D navigation (the paper's env conventions, 15 iterations): one
    context step improves the return on 20 fresh goals by much more than the same step does
    for an untrained context policy."""
    cfg = config.load("experiments/cavia_nav2d.yaml", ["iterations=15", "meta_batch=10", "inner.episodes=10",
                                                        "sampler.workers=0", "inner.eval_timesteps=null",
                                                        "inner.eval_episodes=20"])
    track = train(cfg, tmp_path / "run", tensorboard=False)
    try:
        curves = track.evaluate(20, 1, seed=7).curves
    finally:
        track.close()
    gain = curves["cavia"][:, 1] - curves["cavia"][:, 0]
    random_gain = curves["random"][:, 1] - curves["random"][:, 0]
    assert gain.mean() > 5.0 and gain.mean() > 3 * gain.std(ddof=1) / np.sqrt(len(gain))
    assert gain.mean() > random_gain.mean() + 5.0
