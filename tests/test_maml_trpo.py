"""MAML-TRPO's outer step: the closed-form gradient and Fisher-vector products against autograd,
and the optimised TRPO step against the straightforward one."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from metarl import functional as F
from metarl.algorithms.maml_trpo import meta_update
from metarl.algorithms.meta_rl import AdvantageConfig, RLInnerConfig, adapt_on, outer_objective
from metarl.algorithms.trpo import RLOuterConfig, trpo_outer_step
from metarl.fisher import MAMLLinearization
from metarl.envs.navigation import Navigation2DEnv
from metarl.optim import conjugate_gradient, flat, hvp_fn, line_search, unflat
from metarl.policies.gaussian import GaussianMLPPolicy, log_prob, sample
from metarl.rollouts import Collector

float64 = pytest.mark.usefixtures("float64")  # conftest: float64 default dtype, restored after

T, TMAX, B, OBS, ACT = 3, 6, 4, 3, 2


def _episodes(policy, params, gen, lengths=True, empty=False):
    """Episodes [T, Tmax, B] sampled from the per-task ``params``, some of them cut short; with
    ``empty``, some are empty (the padding of tasks with fewer episodes, Collector.collect_timesteps)."""
    obs = torch.randn(T, TMAX, B, OBS, generator=gen)
    with torch.no_grad():
        mean, log_std = policy.forward_tasks(params, obs)
        actions = sample(mean, log_std, gen)
        logp = log_prob(mean, log_std, actions)
    mask = torch.ones(T, TMAX, B)
    if lengths:
        mask[0, 4:, 1] = 0
        mask[2, 2:, 3] = 0
        mask[1, 1:, 0] = 0
    if empty:
        mask[0, :, 3] = 0
        mask[2, :, 2:] = 0
    adv = torch.randn(T, TMAX, B, generator=gen) * mask
    return SimpleNamespace(obs=obs, actions=actions, mask=mask, log_probs=logp), adv


def _problem(seed=0, activation="relu", steps=1, first_order=False, clamp=False, reduction="episode", empty=False):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy = GaussianMLPPolicy(OBS, ACT, hidden=(6, 5), activation=activation, init_std=0.8, min_std=0.3)
    if clamp:  # one log-std entry below the floor: its gradient is zero through the clamp
        with torch.no_grad():
            policy.log_std[1] = math.log(0.2)
    theta = F.params_of(policy)
    inner = RLInnerConfig(lr=0.4, steps=steps, first_order=first_order)
    params = F.stack(F.detached(theta), T)
    train = []
    for _ in range(steps):
        eps, adv = _episodes(policy, params, gen, empty=empty)
        train.append((eps, adv))
        with torch.no_grad():
            params = adapt_on(policy, params, [(eps, adv)], inner.lr, reduction=reduction)
    valid, valid_adv = _episodes(policy, params, gen, empty=empty)
    return policy, theta, train, valid, valid_adv, params, inner


CASES = [dict(activation=a, steps=s, first_order=fo, clamp=c)
         for a, s, fo, c in [("relu", 1, False, False), ("tanh", 1, False, True), ("relu", 2, False, True),
                             ("tanh", 2, False, False), ("relu", 1, True, False), ("tanh", 2, True, True),
                             ("relu", 0, False, True)]]  # 0 inner steps: plain TRPO
CASES += [dict(CASES[i], reduction="step") for i in (1, 2, 4)]  # rllab's weighting of the steps
CASES += [dict(CASES[2], empty=True), dict(CASES[2], empty=True, reduction="step")]  # tasks with fewer episodes


@float64
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_closed_form_fisher_and_gradient_equal_autograd(case):
    """F_θ = Jᵀ F_φ J (closed form) vs double backpropagation through the real MAML KL closure,
    and the closed-form surrogate gradient vs autograd, in float64."""
    policy, theta, train, valid, valid_adv, phi_old, inner = _problem(seed=len(str(case)), **case)
    reduction = case.get("reduction", "episode")
    surrogate, kl, _ = outer_objective(policy, train, valid, valid_adv, phi_old, inner, reduction)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    lin = MAMLLinearization(policy, leaves, train, inner.lr, inner.first_order, T, reduction)
    reference, fast = hvp_fn(kl, leaves), lin.fisher(valid)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(flat(leaves).numel(), generator=gen)
        want = reference(v)
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(fast(v), want, rtol=1e-10, atol=1e-12 * want.abs().max().item())
    loss = surrogate(leaves)
    want_g = flat(list(torch.autograd.grad(loss, list(leaves.values()))))
    got_loss, got_g = lin.surrogate_and_grad(valid, valid_adv)
    assert abs(got_loss.item() - loss.item()) < 1e-12
    torch.testing.assert_close(got_g, want_g, rtol=1e-10, atol=1e-12 * want_g.abs().max().item())


def _straightforward_trpo(theta, surrogate, kl, outer):
    """The textbook step: autograd gradient, double-backprop Fisher-vector products, one more
    product for sᵀFs, a line search calling the surrogate and the KL closures separately."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    g = flat(list(torch.autograd.grad(surrogate(leaves), list(leaves.values()))))
    Fvp = hvp_fn(kl, leaves, outer.cg_damping)
    s = conjugate_gradient(Fvp, -g, iters=outer.cg_iters)
    full_step = math.sqrt(2.0 * outer.max_kl / float(s @ Fvp(s))) * s
    with torch.no_grad():
        old_loss = float(surrogate(leaves))
    new, info = line_search(leaves, full_step, lambda p: (surrogate(p), kl(p)), outer.max_kl, float(-(g @ full_step)),
                            ratio=outer.ls_ratio, max_steps=outer.ls_steps, old_loss=old_loss)
    return new, info


@float64
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("max_kl", [0.01, 1.0])
def test_optimised_trpo_step_gives_the_straightforward_update(case, max_kl):
    """Same new θ (to 1e-6 relative) from the closed-form / fused step and the textbook one.
    Five CG iterations: on a problem this small (~70 parameters) ten iterations drive the
    residual so close to zero that CG amplifies rounding differences of 1e-16 in the products to
    1e-5 in the step, whichever way they are computed (not the case at full size, where ten
    iterations are far from converged)."""
    policy, theta, train, valid, valid_adv, phi_old, inner = _problem(seed=3, **case)
    outer = RLOuterConfig(max_kl=max_kl, cg_iters=5, threads=0)
    surrogate, kl, _ = outer_objective(policy, train, valid, valid_adv, phi_old, inner)
    before = flat(F.detached(theta)).clone()
    want, want_info = _straightforward_trpo(theta, surrogate, kl, outer)
    for fisher in ("closed_form", "autograd"):
        with torch.no_grad():
            for k, p in theta.items():
                p.copy_(unflat(before, theta)[k])
        info = trpo_outer_step(policy, theta, train, valid, valid_adv, phi_old, inner,
                               RLOuterConfig(max_kl=max_kl, cg_iters=5, fisher=fisher))
        assert info["accepted"] == want_info["accepted"] and info["backtracks"] == want_info["backtracks"]
        step, want_step = flat(F.detached(theta)) - before, flat(want) - before
        assert want_step.norm() > 0
        assert (step - want_step).norm() <= 1e-6 * want_step.norm(), fisher
        assert math.isclose(info["kl"], want_info["kl"], rel_tol=1e-6)
    if max_kl == 1.0:
        assert want_info["backtracks"] > 0  # the line search's fused closure is exercised past the first candidate


@float64
def test_fvp_subsample_option():
    policy, theta, train, valid, valid_adv, phi_old, inner = _problem(seed=5)
    before = {k: v.detach().clone() for k, v in theta.items()}
    results = {}
    for fisher in ("closed_form", "autograd"):
        for frac in (1.0, 0.5):
            with torch.no_grad():
                for k, p in theta.items():
                    p.copy_(before[k])
            info = trpo_outer_step(policy, theta, train, valid, valid_adv, phi_old, inner,
                                   RLOuterConfig(fisher=fisher, fvp_subsample=frac, cg_iters=5), seed=7)
            assert info["kl"] <= RLOuterConfig().max_kl
            results[fisher, frac] = flat(F.detached(theta)) - flat(before)
    for frac in (1.0, 0.5):  # both Fisher paths see the same subset
        torch.testing.assert_close(results["closed_form", frac], results["autograd", frac], rtol=1e-8, atol=1e-12)
    assert (results["closed_form", 1.0] - results["closed_form", 0.5]).norm() > 1e-6 * results["closed_form", 1.0].norm()
    with pytest.raises(ValueError, match="fvp_subsample"):
        trpo_outer_step(policy, theta, train, valid, valid_adv, phi_old, inner, RLOuterConfig(fvp_subsample=0.0))


def test_meta_update_with_the_closed_form_on_navigation():
    """Through meta_update with a real collector (float32, episodes ending early): the closed-form
    step agrees with the autograd one (3 CG iterations, where float32 CG is not chaotic)."""
    out = {}
    for fisher in ("autograd", "closed_form"):
        torch.manual_seed(0)
        policy = GaussianMLPPolicy(2, 2, hidden=(32, 32))
        tasks = Navigation2DEnv.sample_tasks(4, np.random.default_rng(0))
        with Collector("metarl/Navigation2D-v0", {"goal_radius": 0.1, "horizon": 30}, n_workers=0) as col:
            m = meta_update(policy, col, tasks, RLInnerConfig(lr=0.1, episodes=5), AdvantageConfig(),
                            RLOuterConfig(fisher=fisher, cg_iters=3), seed=3)
        assert m["trpo/accepted"] == 1.0 and 0 < m["trpo/kl"] <= 0.01
        out[fisher] = (m, flat(F.detached(F.params_of(policy))))
    (ma, ta), (mc, tc) = out["autograd"], out["closed_form"]
    assert math.isclose(ma["loss/surrogate"], mc["loss/surrogate"], rel_tol=1e-5, abs_tol=1e-7)
    torch.manual_seed(0)
    t0 = flat(F.detached(F.params_of(GaussianMLPPolicy(2, 2, hidden=(32, 32)))))
    assert (tc - ta).norm() <= 1e-5 * (ta - t0).norm()  # measured ~1e-6


def test_advantage_normalisation_follows_the_configured_reduction():
    """advantages.reduction reaches the normalisation: with episodes of unequal length the two
    weightings give different statistics, and each matches normalize_advantages by hand."""
    from metarl.advantages import normalize_advantages
    from metarl.algorithms.meta_rl import advantages

    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 5, 3)
    mask[0, 2:, 0] = 0
    mask[1, 4:, 2] = 0
    eps = SimpleNamespace(obs=torch.randn(2, 5, 3, 2, generator=gen), rewards=torch.randn(2, 5, 3, generator=gen) * mask,
                          mask=mask)
    out = {r: advantages(eps, AdvantageConfig(reduction=r)) for r in ("episode", "step")}
    raw = advantages(eps, AdvantageConfig(normalize=False))
    for r, adv in out.items():
        torch.testing.assert_close(adv, normalize_advantages(raw, mask, reduction=r))
    assert not torch.allclose(out["episode"], out["step"])


def test_meta_update_with_batches_sized_in_timesteps():
    """inner.timesteps: every task's pre- and post-update batch holds at least that many steps in
    whole episodes (different episode counts per task), and the TRPO step still respects the KL
    bound and agrees between the closed form and autograd."""
    out = {}
    for fisher in ("autograd", "closed_form"):
        torch.manual_seed(0)
        policy = GaussianMLPPolicy(2, 2, hidden=(32, 32))
        tasks = [{"goal": [0.05, 0.0]}, {"goal": [0.4, 0.4]}, {"goal": [-0.1, 0.05]}]
        with Collector("metarl/Navigation2D-v0", {"goal_radius": 0.2, "horizon": 30}, n_workers=0) as col:
            m = meta_update(policy, col, tasks, RLInnerConfig(lr=0.1, timesteps=120), AdvantageConfig(),
                            RLOuterConfig(fisher=fisher, cg_iters=3), seed=3)
        assert m["trpo/accepted"] == 1.0 and 0 < m["trpo/kl"] <= 0.01
        assert math.isfinite(m["return/pre"]) and math.isfinite(m["return/post"])
        out[fisher] = flat(F.detached(F.params_of(policy)))
    torch.manual_seed(0)
    t0 = flat(F.detached(F.params_of(GaussianMLPPolicy(2, 2, hidden=(32, 32)))))
    assert (out["closed_form"] - out["autograd"]).norm() <= 1e-4 * (out["autograd"] - t0).norm()
