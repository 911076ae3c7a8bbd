"""MAML for reinforcement learning: REINFORCE inside, TRPO (or vanilla PG) outside.

Finn et al. 2017, sec. 5.3 and Algorithm 3. For a meta-batch of tasks:
1. collect episodes D_i under θ; fit the linear baseline, compute advantages;
2. φ_i = θ − α ∇_θ L_REINFORCE(θ; D_i)   (more inner steps collect fresh episodes under each φ);
3. collect fresh episodes D'_i under φ_i;
4. the outer objective is the TRPO surrogate of π_{φ_i(θ)} on D'_i, and its trust region the mean
   KL(π_{φ_i(θ_old)} ‖ π_{φ_i(θ)}) on D'_i; both closures recompute φ_i(θ) from the fixed D_i, so
   the gradient and the Fisher-vector products differentiate through the inner step (second order;
   ``first_order`` drops those terms).
Sampling belongs to the collector, the inner step to :mod:`metarl.adaptation`; this module only
composes them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from ..adaptation import inner_step
from ..advantages import LinearFeatureBaseline, discounted_returns, gae, normalize_advantages
from ..functional import Params, stack
from ..objectives import gaussian_kl, reinforce_loss, surrogate_loss
from ..optim import trpo_step
from metarl.policies.gaussian import log_prob


@dataclass
class RLInnerConfig:
    """Inner loop (config section ``inner``)."""
    lr: float = 0.1
    """Inner step size α of the REINFORCE update."""
    steps: int = 1
    """Inner steps in meta-training (each collects fresh episodes under the current φ)."""
    eval_steps: int = 3
    """Inner steps on the evaluation curve."""
    eval_lr: Optional[float] = None
    """Step size at evaluation (null = lr)."""
    episodes: int = 20
    """Episodes per task per inner step (and for the post-update data)."""
    eval_episodes: Optional[int] = None
    """Episodes per task per step at evaluation (null = episodes)."""
    first_order: bool = False


@dataclass
class AdvantageConfig:
    gamma: float = 0.99
    gae_lambda: float = 1.0
    """GAE λ (1.0 = Monte-Carlo returns minus the baseline, as in pytorch-maml-rl)."""
    normalize: bool = True
    """Normalise advantages per task (mean 0, std 1 over valid steps)."""
    baseline_reg: float = 1e-5


@dataclass
class RLOuterConfig:
    optimizer: Literal["trpo", "vpg"] = "trpo"
    max_kl: float = 0.01
    cg_iters: int = 10
    cg_damping: float = 1e-5
    ls_ratio: float = 0.8
    ls_steps: int = 15
    lr: float = 1e-3
    """Adam step size when optimizer is vpg."""


def advantages(episodes, cfg: AdvantageConfig) -> Tensor:
    """GAE advantages [T, Tmax, B] with a linear feature baseline fitted per task (rllab)."""
    returns = discounted_returns(episodes.rewards, episodes.mask, cfg.gamma)
    values = LinearFeatureBaseline(cfg.baseline_reg)(episodes.obs, returns, episodes.mask)
    adv = gae(episodes.rewards, values, episodes.mask, cfg.gamma, cfg.gae_lambda)
    return normalize_advantages(adv, episodes.mask) if cfg.normalize else adv


def inner_loss(policy, episodes, adv: Tensor):
    """REINFORCE loss of stacked per-task params on fixed episodes, summed over tasks."""
    def loss(params: Params) -> Tensor:
        mean, log_std = policy.forward_tasks(params, episodes.obs)
        return reinforce_loss(log_prob(mean, log_std, episodes.actions), adv, episodes.mask).sum()
    return loss


def adapt_on(policy, params: Params, batches, lr, first_order: bool = False) -> Params:
    """Replay the inner steps on already-collected (episodes, advantages) pairs."""
    for eps, adv in batches:
        params = inner_step(inner_loss(policy, eps, adv), params, lr, first_order=first_order)
    return params


def collect_adapted(policy, collector, theta: Params, tasks, episodes: int, adv_cfg: AdvantageConfig,
                    steps: int, lr: float, seed: int):
    """Episodes before and after each of ``steps`` inner steps.

    Returns ([(episodes, advantages) at θ, φ1, ..., φ_steps], the last φ detached, seconds spent
    sampling and adapting)."""
    params = stack({k: v.detach() for k, v in theta.items()}, len(tasks))
    out = []
    timing = {"sample": 0.0, "adapt": 0.0}
    for s in range(steps + 1):
        t0 = time.perf_counter()
        eps = collector.collect(policy, params, tasks, episodes, seed=seed * 1000 + s)
        t1 = time.perf_counter()
        adv = advantages(eps, adv_cfg)
        out.append((eps, adv))
        if s < steps:
            params = inner_step(inner_loss(policy, eps, adv), params, lr)
        timing["sample"] += t1 - t0
        timing["adapt"] += time.perf_counter() - t1
    return out, params, timing


def meta_update(policy, collector, tasks, inner: RLInnerConfig, adv_cfg: AdvantageConfig, outer: RLOuterConfig,
                seed: int, optimizer=None) -> dict[str, float]:
    """One meta-iteration: sample, adapt, sample again, outer step on θ. Returns diagnostics."""
    theta = {k: p for k, p in policy.named_parameters()}
    data, phi_old, timing = collect_adapted(policy, collector, theta, tasks, inner.episodes, adv_cfg, inner.steps, inner.lr, seed)
    train, (valid, valid_adv) = data[:-1], data[-1]
    with torch.no_grad():
        old_mean, old_log_std = policy.forward_tasks(phi_old, valid.obs)

    def adapted(p: Params) -> Params:
        return adapt_on(policy, stack(p, len(tasks)), train, inner.lr, inner.first_order)

    def surrogate(p: Params) -> Tensor:
        mean, log_std = policy.forward_tasks(adapted(p), valid.obs)
        lp = log_prob(mean, log_std, valid.actions)
        return surrogate_loss(lp, valid.log_probs, valid_adv, valid.mask).mean()

    def kl(p: Params) -> Tensor:
        mean, log_std = policy.forward_tasks(adapted(p), valid.obs)
        return gaussian_kl(old_mean, old_log_std, mean, log_std, valid.mask).mean()

    metrics = {"return/pre": data[0][0].returns.mean().item(), "return/post": valid.returns.mean().item()}
    metrics.update({f"time/{k}": v for k, v in timing.items()})
    t_outer = time.perf_counter()
    if outer.optimizer == "trpo":
        info = trpo_step(theta, surrogate, kl, max_kl=outer.max_kl, cg_iters=outer.cg_iters,
                         damping=outer.cg_damping, ls_ratio=outer.ls_ratio, ls_steps=outer.ls_steps)
        metrics.update({"trpo/kl": info["kl"], "trpo/accepted": float(info["accepted"]),
                        "trpo/step_fraction": info["step_fraction"], "loss/surrogate": info["loss_before"]})
    else:
        loss = surrogate(theta)
        metrics["loss/surrogate"] = loss.item()
        if torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    metrics["time/outer"] = time.perf_counter() - t_outer
    metrics["policy/std"] = theta["log_std"].detach().exp().mean().item()
    return metrics
