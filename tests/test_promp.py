"""ProMP (and MAML-PPO): the LVC meta-gradient against the exact gradient of the expected
post-update return, the clipped objective, the KL penalty and its adaptive coefficient against
hand computations, and `metarl train` / `--resume` / `metarl evaluate` for both."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from metarl import config
from metarl import functional as F
from metarl.algorithms.meta_rl import RLInnerConfig, adapt_on, outer_objective
from metarl.algorithms.ppo import clipped_objective, old_distributions
from metarl.algorithms.promp import adapt_kl_coeff
from metarl.objectives import clipped_surrogate_loss, gaussian_kl
from metarl.policies.gaussian import GaussianMLPPolicy, log_prob
from metarl.training import load_track, train

float64 = pytest.mark.usefixtures("float64")  # conftest: float64 default dtype, restored after

# ------------------------------------------------------------------ the LVC meta-gradient in expectation
# A one-step (bandit) version of the suite's linear-Gaussian problem (tests/test_pg_meta_gradient.py):
# context x drawn uniformly from the rows of X, action a ~ N(w·x + b, e^{2s}), reward r = −(a − g·x)².
# One-step episodes make everything exact: the expected return J̄(θ) = −mean_x (w·x + b − g·x)² − e^{2s}
# is a closed form, and LVC's curvature is unbiased for horizon 1 (its bias is the dropped cross-time terms).
X = np.array([[1.0, 0.0], [0.3, -1.2], [-0.8, 0.5]])
GOAL = np.array([0.9, -0.6])
THETA = np.array([0.2, 0.4, -0.3, math.log(0.6)])  # (w1, w2, b, s)
ALPHA = 0.05  # small enough that the O(α²/N) finite-batch gap (see the test) is far inside the tolerance
BASELINE = -1.0  # a constant baseline: unbiased, lowers the variance


def _expected_return(th):
    w, b, s = th[:2], th[2], th[3]
    err = X @ (w - GOAL) + b
    return -np.mean(err ** 2) - math.exp(2 * s)


def _expected_return_grad(th):
    w, b, s = th[:2], th[2], th[3]
    err = X @ (w - GOAL) + b
    return np.concatenate([-2 * (err[:, None] * X).mean(0), [-2 * err.mean()], [-2 * math.exp(2 * s)]])


def _meta_objective(th):
    """J(θ) = J̄(θ + α ∇J̄(θ)): the post-update return when the inner step is the expected policy
    gradient (ProMP's formulation II). The expected post-update return with an N-sample inner step
    differs from it by O(α²/N) (the inner gradient's variance through J̄'s curvature)."""
    return _expected_return(th + ALPHA * _expected_return_grad(th))


def _exact_meta_gradient(th, h=1e-5):
    """Central differences of the closed form, in numpy (independent of the engine)."""
    return np.array([(_meta_objective(th + h * e) - _meta_objective(th - h * e)) / (2 * h) for e in np.eye(len(th))])


def _score_outer_product_term(th):
    """E[∇log π ∇log πᵀ (r − c)] by Gauss-Hermite quadrature over a (exact: the integrand is a
    polynomial in a) and an exact mean over the contexts: the curvature MAML's estimator drops."""
    w, b, s = th[:2], th[2], th[3]
    sigma = math.exp(s)
    nodes, weights = np.polynomial.hermite.hermgauss(12)
    out = np.zeros((4, 4))
    for x in X:
        mu = x @ w + b
        for t, wt in zip(nodes, weights):
            z = math.sqrt(2) * sigma * t
            score = np.concatenate([z * x / sigma ** 2, [z / sigma ** 2], [z ** 2 / sigma ** 2 - 1]])
            r = -(mu + z - x @ GOAL) ** 2 - BASELINE
            out += wt / math.sqrt(math.pi) * np.outer(score, score) * r / len(X)
    return out


def _bandit_batch(policy, params, n_tasks, n_episodes, gen):
    """One-step episodes [T, 1, B] sampled from per-task ``params``; advantages r − c."""
    x = torch.as_tensor(X)[torch.randint(len(X), (n_tasks, 1, n_episodes), generator=gen)]
    with torch.no_grad():
        mean, log_std = policy.forward_tasks(params, x)
        actions = mean + log_std.exp() * torch.randn(mean.shape, generator=gen)
        logp = log_prob(mean, log_std, actions)
    reward = -(actions[..., 0] - x @ torch.as_tensor(GOAL)) ** 2
    eps = SimpleNamespace(obs=x, actions=actions, mask=torch.ones(n_tasks, 1, n_episodes), log_probs=logp)
    return eps, reward - BASELINE


def _policy():
    policy = GaussianMLPPolicy(2, 1, hidden=(), init_std=1.0)
    with torch.no_grad():
        policy.mean.layers[0].weight.copy_(torch.as_tensor(THETA[None, :2]))
        policy.mean.layers[0].bias.fill_(THETA[2])
        policy.log_std.fill_(THETA[3])
    return policy


def _as_vector(grads):
    return np.concatenate([g.detach().numpy().ravel() for g in grads])


@float64
def test_lvc_meta_gradient_is_unbiased_where_mamls_misses_the_sampling_term():
    """Many independent meta-batches at θ: the mean ProMP meta-gradient (LVC inner loss, clipped
    outer objective with the KL penalty, at θ = θ_old) matches the exact ∇J(θ) within 4 standard
    errors in every coordinate; MAML-TRPO's (pre-update episodes fixed) sits many standard errors
    away, and where the theory says: at ∇J(θ) − α E[∇log π ∇log πᵀ (r − c)] ∇J̄(φ̄).

    Tolerance: the estimate is a mean of G = 40 group means (each over 50 tasks × 200 one-step
    episodes), its standard error (SE, ~0.01) measured from the groups. Both references are for
    an inner step on the expected gradient; an N-episode inner step has an expectation that
    differs by O(α²/N) (the inner gradient's noise through the curvature of J̄ and its covariance
    with the Hessian estimate). Measured at α = 0.25 that gap is ~0.25 at N = 100 and ~0.03 at
    N = 1000 (∝ 1/N); scaled by α² to α = 0.05, N = 200 it is ~0.005, half an SE, so 4 SE holds.
    The omitted sampling term, by contrast, is O(α) and independent of N: 0.3-0.7 here (>30 SE)."""
    policy = _policy()
    theta = F.params_of(policy)
    names = ["mean.layers.0.weight", "mean.layers.0.bias", "log_std"]  # the order of THETA
    inner = RLInnerConfig(lr=ALPHA)
    gen = torch.Generator().manual_seed(0)
    lvc, maml = [], []
    for _ in range(40):
        n_tasks, n_eps = 50, 200
        train = [_bandit_batch(policy, F.stack(F.detached(theta), n_tasks), n_tasks, n_eps, gen)]
        with torch.no_grad():
            phi_old = adapt_on(policy, F.stack(F.detached(theta), n_tasks), train, ALPHA)
        valid, valid_adv = _bandit_batch(policy, phi_old, n_tasks, n_eps, gen)
        promp = clipped_objective(policy, train, valid, valid_adv, inner, clip=0.3, estimator="lvc",
                                  kl_coeffs=torch.ones(1), old_dists=old_distributions(policy, theta, train, inner))
        loss, kl, _ = promp(theta)
        assert abs(kl.item()) < 1e-12  # at θ_old the penalty and its gradient vanish
        lvc.append(-_as_vector(torch.autograd.grad(loss, [theta[n] for n in names])))
        surrogate, _, _ = outer_objective(policy, train, valid, valid_adv, phi_old, inner)
        maml.append(-_as_vector(torch.autograd.grad(surrogate(theta), [theta[n] for n in names])))
    exact = _exact_meta_gradient(THETA)
    phi_bar = THETA + ALPHA * _expected_return_grad(THETA)
    maml_expected = exact - ALPHA * _score_outer_product_term(THETA) @ _expected_return_grad(phi_bar)
    lvc, maml = np.array(lvc), np.array(maml)
    se_lvc, se_maml = lvc.std(0, ddof=1) / math.sqrt(len(lvc)), maml.std(0, ddof=1) / math.sqrt(len(maml))
    np.testing.assert_array_less(np.abs(lvc.mean(0) - exact), 4 * se_lvc)
    np.testing.assert_array_less(np.abs(maml.mean(0) - maml_expected), 4 * se_maml)
    assert (np.abs(maml.mean(0) - exact) / se_maml).min() > 20  # the omitted sampling term is real in every coordinate


# ------------------------------------------------------------------ clipped objective, KL penalty, η rule

def test_clipped_surrogate_against_hand_computation():
    """ε = 0.2, ratios 1.5, 0.5, 1.5, 0.5 with advantages 1, 1, −1, −2 (and one padded step):
    min(rA, clip(r)A) = 1.2, 0.5, −1.5, −1.6, mean −0.35; the gradient flows only where the
    unclipped term is the minimum (entries 2 and 3: d(rA)/d log π = rA)."""
    old = torch.zeros(1, 5, 1)
    new = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5, 3.0])).reshape(1, 5, 1).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0, 9.0]).reshape(1, 5, 1)
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]).reshape(1, 5, 1)
    loss = clipped_surrogate_loss(new, old, adv, mask, clip=0.2, reduction="step")
    assert math.isclose(loss.item(), 0.35, rel_tol=1e-6)
    (grad,) = torch.autograd.grad(loss.sum(), new)
    torch.testing.assert_close(grad.flatten(), -torch.tensor([0.0, 0.5, -1.5, 0.0, 0.0]) / 4)
    # at r = 1 it is TRPO's surrogate, in value and gradient
    from metarl.objectives import surrogate_loss
    lp = torch.randn(2, 4, 3, requires_grad=True)
    a, m = torch.randn(2, 4, 3), torch.ones(2, 4, 3)
    g1 = torch.autograd.grad(clipped_surrogate_loss(lp, lp.detach(), a, m, 0.3).sum(), lp)[0]
    g2 = torch.autograd.grad(surrogate_loss(lp, lp.detach(), a, m).sum(), lp)[0]
    torch.testing.assert_close(g1, g2)


@float64
def test_kl_penalty_against_the_closed_form_gaussian_kl():
    """Moving θ by δ on the bias and ε on log σ of a linear policy shifts every pre-update
    action distribution the same way, so the penalty is η · [ε + (1 + δ² e^{−2 s})·e^{−2ε}/2 − ½]
    per action dimension (KL(N(μ, σ²) ‖ N(μ + δ, σ² e^{2ε})) by hand), added to the clipped loss."""
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(3, 2, hidden=(), init_std=0.7)
    theta = F.params_of(policy)
    gen = torch.Generator().manual_seed(1)
    T, B = 2, 4
    obs = torch.randn(T, 3, B, 3, generator=gen)
    with torch.no_grad():
        mean, log_std = policy.forward_tasks(F.stack(F.detached(theta), T), obs)
        actions = mean + log_std.exp() * torch.randn(mean.shape, generator=gen)
    eps = SimpleNamespace(obs=obs, actions=actions, mask=torch.ones(T, 3, B), log_probs=log_prob(mean, log_std, actions))
    adv = torch.randn(T, 3, B, generator=gen)
    inner = RLInnerConfig(lr=0.1)
    old = old_distributions(policy, theta, [(eps, adv)], inner)
    valid = SimpleNamespace(**vars(eps))
    delta, eps_s, eta = 0.3, -0.2, 0.7
    moved = {k: v.detach().clone() for k, v in theta.items()}
    moved["mean.layers.0.bias"] += delta
    moved["log_std"] += eps_s
    plain = clipped_objective(policy, [(eps, adv)], valid, adv, inner, 0.3, old_dists=old)
    penalised = clipped_objective(policy, [(eps, adv)], valid, adv, inner, 0.3, kl_coeffs=torch.tensor([eta]), old_dists=old)
    s = math.log(0.7)
    by_hand = 2 * (eps_s + (1 + delta ** 2 * math.exp(-2 * s)) * math.exp(-2 * eps_s) / 2 - 0.5)  # two action dims
    loss0, kl0, _ = plain(moved)
    loss1, kl1, _ = penalised(moved)
    assert math.isclose(kl0.item(), by_hand, rel_tol=1e-10) and math.isclose(kl1.item(), by_hand, rel_tol=1e-10)
    assert math.isclose(loss1.item() - loss0.item(), eta * by_hand, rel_tol=1e-10)


def test_adaptive_kl_coefficient_rule():
    """PPO's rule as ProMP's code applies it: halve below target/1.5, double above 1.5·target."""
    assert adapt_kl_coeff(1.0, 0.001, 0.01) == 0.5
    assert adapt_kl_coeff(1.0, 0.02, 0.01) == 2.0
    assert adapt_kl_coeff(1.0, 0.01, 0.01) == 1.0
    assert adapt_kl_coeff(1.0, 0.01 / 1.5, 0.01) == 1.0 and adapt_kl_coeff(1.0, 0.015, 0.01) == 1.0  # bounds keep η
    assert adapt_kl_coeff(0.25, 0.0, 0.01) == 0.125


# ------------------------------------------------------------------ training, resume, evaluate

def nav_cfg(**extra):
    data = {"track": "rl", "algorithm": "promp", "iterations": 2, "checkpoint_every": 1, "meta_batch": 4,
            "env": {"id": "metarl/Navigation2D-v0", "kwargs": {"normalize_actions": True, "goal_radius": 0.01, "horizon": 20}},
            "policy": {"hidden": [16]}, "inner": {"lr": 0.1, "episodes": 4, "eval_steps": 1},
            "sampler": {"workers": 0}, "eval": {"tasks": 3, "steps": 1}}
    data.update(extra)
    return config.from_dict(data)


def _same_state(a, b):
    for k in a.modules:
        sa, sb = a.modules[k].state_dict(), b.modules[k].state_dict()
        assert all(torch.equal(sa[n], sb[n]) for n in sa), k
    for k in a.optimizers:
        sa, sb = a.optimizers[k].state_dict()["state"], b.optimizers[k].state_dict()["state"]
        assert sa.keys() == sb.keys() and sa
        for i in sa:
            assert all(torch.equal(sa[i][f], sb[i][f]) for f in sa[i]), (k, i)


def _csv(run_dir):
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    head = rows[0].split(",")
    return {h: np.array([float(r.split(",")[i]) for r in rows[1:]]) for i, h in enumerate(head)}


@pytest.mark.parametrize("extra", [{}, {"algorithm": "maml", "outer": {"optimizer": "ppo", "epochs": 3, "minibatches": 3}}],
                         ids=["promp", "maml-ppo"])
def test_train_resume_is_bitwise_and_evaluate_writes_the_contract(tmp_path, extra):
    """Two iterations straight vs one then --resume: same θ, same Adam state, same η (ProMP's extra
    state); the η logged each iteration follows adapt_kl_coeff of the KL logged the iteration before;
    `metarl evaluate` writes adaptation.json under the method's name."""
    name = extra.get("algorithm", "promp")
    if name == "promp":  # a target near what 5 Adam steps move (1e-5..1e-3), so the η rule acts
        extra = {**extra, "promp": {"init_kl_coeff": 0.05, "target_kl": 1e-4}}
    full = train(nav_cfg(iterations=3, **extra), tmp_path / "full", tensorboard=False)
    full.close()
    train(nav_cfg(iterations=1, **extra), tmp_path / "split", tensorboard=False).close()
    resumed = train(nav_cfg(iterations=3, **extra), tmp_path / "split", resume=True, tensorboard=False)
    resumed.close()
    _same_state(full, resumed)
    assert name in full.optimizers
    adam_steps = {int(st["step"]) for st in full.optimizers[name].state_dict()["state"].values()}
    per_iteration = 5 if name == "promp" else 3 * 3  # outer.epochs x outer.minibatches (4 tasks in 3 groups)
    assert adam_steps == {3 * per_iteration}
    m = _csv(tmp_path / "full")
    assert np.isfinite(m["loss/surrogate"]).all() and np.isfinite(m["ppo/loss_after"]).all()
    if name == "promp":
        torch.testing.assert_close(full.method.kl_coeffs, resumed.method.kl_coeffs, rtol=0, atol=0)
        eta, kl = m["promp/kl_coeff0"], m["ppo/inner_kl0"]
        assert eta[0] == 0.05 and all(eta[i + 1] == adapt_kl_coeff(eta[i], kl[i], 1e-4) for i in range(2))
        assert len(set(eta)) > 1  # the rule acted
    rd = tmp_path / "full"
    from metarl import cli
    assert cli.main(["evaluate", str(rd), "--tasks", "3", "--steps", "1"]) == 0  # in-process: no interpreter start-up
    data = json.loads((rd / "eval" / "adaptation.json").read_text())
    assert data["algorithm"] == name and data["metric"] == "return" and data["steps"] == [0, 1]
    assert set(data["methods"]) == {name, "random"}


def test_maml_ppo_with_one_epoch_is_the_vpg_step(tmp_path):
    """At θ_old every ratio is 1, where the clipped surrogate has the surrogate's gradient: one PPO
    epoch on one minibatch is exactly one Adam step on MAML's surrogate, the `vpg` option (an
    independent code path: meta_rl.outer_objective). Five epochs move θ further (and differently)."""
    runs = {"vpg": {"optimizer": "vpg"}, "ppo1": {"optimizer": "ppo", "epochs": 1}, "ppo5": {"optimizer": "ppo", "epochs": 5}}
    theta = {}
    for key, outer in runs.items():
        track = train(nav_cfg(algorithm="maml", outer={**outer, "lr": 0.01}), tmp_path / key, tensorboard=False)
        track.close()
        theta[key] = {n: p.detach().clone() for n, p in track.policy.named_parameters()}
    init = train(nav_cfg(algorithm="maml", iterations=0, outer={"optimizer": "vpg"}), tmp_path / "init", tensorboard=False)
    init.close()
    start = {n: p.detach() for n, p in init.policy.named_parameters()}
    for n in start:
        torch.testing.assert_close(theta["ppo1"][n], theta["vpg"][n], rtol=1e-5, atol=1e-6)
    moved = lambda k: sum((theta[k][n] - start[n]).norm() ** 2 for n in start) ** 0.5
    assert moved("ppo5") > 2 * moved("vpg") > 0


def test_bad_ppo_settings_fail_in_one_line():
    with pytest.raises(config.ConfigError, match="outer.minibatches"):
        nav_cfg(algorithm="maml", outer={"optimizer": "ppo", "minibatches": 5})
    with pytest.raises(config.ConfigError, match="outer.clip"):
        nav_cfg(outer={"clip": 1.5})
    from metarl.tracks.rl import RLTrack
    with pytest.raises(config.ConfigError, match="set outer.optimizer=ppo"):
        RLTrack(nav_cfg(outer={"optimizer": "trpo"}))


@float64
def test_a_non_finite_epoch_restores_theta_and_adam():
    """An absurd Adam step (lr 1e200) makes the second epoch's loss non-finite: θ and Adam's state
    return to where the outer step began, and the reported loss is non-finite (the training loop
    then stops on its last checkpoint)."""
    from metarl.algorithms.ppo import ppo_outer_step
    from metarl.algorithms.trpo import RLOuterConfig

    policy = _policy()
    theta = F.params_of(policy)
    adam = torch.optim.Adam(policy.parameters(), lr=1e200)  # θ ~ 1e200 after one step: the KL penalty overflows
    gen = torch.Generator().manual_seed(0)
    train = [_bandit_batch(policy, F.stack(F.detached(theta), 3), 3, 5, gen)]
    with torch.no_grad():
        phi_old = adapt_on(policy, F.stack(F.detached(theta), 3), train, ALPHA)
    valid, valid_adv = _bandit_batch(policy, phi_old, 3, 5, gen)
    before = {k: v.detach().clone() for k, v in theta.items()}
    info = ppo_outer_step(policy, theta, adam, train, valid, valid_adv, RLInnerConfig(lr=ALPHA), RLOuterConfig(epochs=3),
                          estimator="lvc", kl_coeffs=torch.ones(1))
    assert math.isfinite(info["loss_before"]) and not math.isfinite(info["loss_after"])
    assert all(torch.equal(theta[k], before[k]) for k in theta) and adam.state_dict()["state"] == {}
