"""MAML for reinforcement learning: REINFORCE inside, TRPO (or vanilla PG, or PPO) outside.

Finn et al. 2017, sec. 5.3 and Algorithm 3. For a meta-batch of tasks:
1. collect episodes D_i under θ; fit the linear baseline, compute advantages;
2. φ_i = θ − α ∇_θ L_REINFORCE(θ; D_i)   (more inner steps collect fresh episodes under each φ);
3. collect fresh episodes D'_i under φ_i;
4. the outer objective is the TRPO surrogate of π_{φ_i(θ)} on D'_i, and its trust region the mean
   KL(π_{φ_i(θ_old)} ‖ π_{φ_i(θ)}) on D'_i; both closures recompute φ_i(θ) from the fixed D_i, so
   the gradient and the Fisher-vector products differentiate through the inner step (second order;
   ``first_order`` drops those terms). For the MLP Gaussian policy the gradient and the
   Fisher-vector products at θ_old are computed in closed form instead (same values, several times
   cheaper; :mod:`metarl.fisher`); the closures remain for the line search and any other policy.

The pre-update episodes D_i are fixed data in the outer objective: the meta-gradient leaves out
the term that comes from θ generating D_i (the score-function term of the sampling distribution),
as the MAML paper's code did. ProMP (Rothfuss et al. 2019; ``algorithm: promp``,
:mod:`metarl.algorithms.promp`) includes it through its LVC inner loss.

``outer.optimizer: ppo`` (MAML-PPO) replaces step 4 by several Adam passes over PPO's clipped
surrogate of π_{φ_i(θ)} on D'_i (:mod:`metarl.algorithms.ppo`, the rule ProMP uses), with the
same REINFORCE inner step and the same fixed D_i.

Homes: steps 1-3 and the outer objective are the shared meta-RL data path
(:mod:`metarl.algorithms.meta_rl`), step 4's rule is :mod:`metarl.algorithms.trpo` (or
:mod:`metarl.algorithms.ppo`); this module composes them into one meta-iteration and the
``algorithm: maml`` method of the RL track.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from .. import distributed
from ..functional import params_of
from ..registry import algorithm
from ..threads import torch_threads
from .base import Method
from .meta_rl import AdvantageConfig, RLInnerConfig, collect_adapted, outer_objective
from .ppo import ppo_outer_step
from .trpo import RLOuterConfig, trpo_outer_step


def meta_update(policy, collector, tasks, inner: RLInnerConfig, adv_cfg: AdvantageConfig, outer: RLOuterConfig,
                seed: int, optimizer=None, estimator: str = "reinforce", kl_coeffs=None) -> dict[str, float]:
    """One meta-iteration: sample, adapt, sample again, outer step on θ. Returns diagnostics.
    ``estimator`` and ``kl_coeffs`` reach the PPO outer step only (ProMP's LVC inner loss and
    penalty; :func:`metarl.algorithms.ppo.ppo_outer_step`); the sampling path is the same for all.

    Under torchrun (:mod:`metarl.distributed`) each rank collects and adapts its contiguous
    share of ``tasks`` (the whole meta-batch, the same on every rank), with the episodes the
    single-process collection gives those tasks; the outer step's surrogate, gradient,
    Fisher-vector products and line search (TRPO), or the gradient (vpg), are reduced over the
    ranks, so every rank takes the single-process step (PPO's epochs are refused under torchrun)."""
    world = distributed.world()
    lo, hi = world.shard(len(tasks))
    shard = None if world.size == 1 else (lo, len(tasks))
    reduce = None if world.size == 1 else world.task_mean(hi - lo, len(tasks))
    tasks = tasks[lo:hi]
    theta = params_of(policy)  # θ: the trainable tensors (not a policy's fixed context start, CAVIA)
    data, phi_old, timing = collect_adapted(policy, collector, theta, tasks, inner.episodes, adv_cfg, inner.steps, inner.lr,
                                            seed, timesteps=inner.timesteps, shard=shard)
    train, (valid, valid_adv) = data[:-1], data[-1]
    returns = torch.stack([data[0][0].mean_returns().mean(), valid.mean_returns().mean()])
    pre, post = (returns if reduce is None else reduce(returns.double())).tolist()
    metrics = {"return/pre": pre, "return/post": post}
    if "success" in valid.infos:  # Meta-World: episodes with the success flag at any step (Episodes.any_step)
        rates = torch.stack([data[0][0].any_step_rate("success").mean(), valid.any_step_rate("success").mean()])
        metrics["success/pre"], metrics["success/post"] = (rates if reduce is None else reduce(rates.double())).tolist()
    metrics.update({f"time/{k}": v for k, v in timing.items()})
    t_outer = time.perf_counter()
    if outer.optimizer == "trpo":
        with torch_threads(outer.threads):
            info = trpo_outer_step(policy, theta, train, valid, valid_adv, phi_old, inner, outer, seed, adv_cfg.reduction,
                                   reduce=reduce)
        metrics.update({"trpo/kl": info["kl"], "trpo/accepted": float(info["accepted"]),
                        "trpo/step_fraction": info["step_fraction"], "loss/surrogate": info["loss_before"]})
    elif outer.optimizer == "ppo":
        info = ppo_outer_step(policy, theta, optimizer, train, valid, valid_adv, inner, outer, seed, adv_cfg.reduction,
                              estimator, kl_coeffs)
        metrics.update({"loss/surrogate": info["loss_before"], "ppo/loss_after": info["loss_after"],
                        "ppo/clip_fraction": info["clip_fraction"]})
        metrics.update({f"ppo/inner_kl{k}": kl for k, kl in enumerate(info["inner_kl"])})
    else:
        surrogate, _, _ = outer_objective(policy, train, valid, valid_adv, phi_old, inner, adv_cfg.reduction)
        loss = surrogate(theta)
        optimizer.zero_grad(set_to_none=True)
        if reduce is not None:  # every rank takes the same decision on the whole batch's loss and gradient
            loss.backward()
            params = list(theta.values())
            both = reduce(torch.cat([loss.detach().reshape(1)] + [p.grad.reshape(-1) for p in params]))
            loss, offset = both[0], 1
            for p in params:
                p.grad, offset = both[offset:offset + p.numel()].view_as(p).clone(), offset + p.numel()
        metrics["loss/surrogate"] = loss.item()
        if torch.isfinite(loss):
            if reduce is None:
                loss.backward()
            optimizer.step()
    metrics["time/outer"] = time.perf_counter() - t_outer
    metrics["policy/std"] = theta["log_std"].detach().exp().mean().item()
    return metrics


# ------------------------------------------------------------------------------- the method

@algorithm("maml", kinds=("rl",))
class MAMLTRPO(Method):
    """MAML-TRPO (Finn et al. 2017, Algorithm 3) as the RL track's ``algorithm: maml``: owns the
    Gaussian MLP policy θ (and Adam when ``outer.optimizer`` is vpg or ppo); one meta-iteration is
    :func:`meta_update`. The pre-update episodes D_i are held fixed in the outer objective, so the
    meta-gradient omits the term from θ's influence on sampling D_i, as the paper's code did
    (ProMP, Rothfuss et al. 2019, restores it)."""
    first_order = False

    def __init__(self, track, cfg):
        super().__init__(track, cfg)
        self.policy = self.new_policy()
        self.modules[self.name] = self.policy
        if cfg.outer.optimizer in ("vpg", "ppo"):
            self.optimizers[self.name] = torch.optim.Adam(params_of(self.policy).values(), lr=cfg.outer.lr)
        self.collector = track.collector

    def new_policy(self):
        """A fresh policy of the method's family: θ here, and the track's ``random`` baseline."""
        return self.problem._new_policy()

    def not_shardable(self):
        if self.cfg.inner.timesteps is not None:
            return "inner.timesteps sizes each task's batch by rounds over the tasks still short; use inner.episodes"
        if self.cfg.outer.optimizer == "ppo":
            return "outer.optimizer ppo takes several Adam steps on each rank's share; use trpo or vpg to shard"
        return None

    def train_step(self, tasks, seed: int) -> dict[str, float]:
        inner = self.cfg.inner
        if self.first_order and not inner.first_order:
            inner = dataclasses.replace(inner, first_order=True)
        return meta_update(self.policy, self.collector, tasks, inner, self.cfg.advantages, self.cfg.outer, seed,
                           optimizer=self.optimizers.get(self.name))
