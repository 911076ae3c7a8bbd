"""The meta-RL data path every RL method shares (Finn et al. 2017, Algorithm 3, lines 3-8).

For a meta-batch of tasks: collect episodes D_i under θ (the collector), fit the linear baseline
and compute advantages (:func:`advantages`), take the REINFORCE inner step φ_i = θ − α ∇_θ
L_REINFORCE(θ; D_i) (:func:`inner_loss` with :func:`metarl.adaptation.inner_step`), collect
again under φ_i (:func:`collect_adapted`); :func:`outer_objective` turns the fixed data into
closures of θ for an outer rule (TRPO in :mod:`metarl.algorithms.trpo`, Adam for vpg, PPO
epochs in :mod:`metarl.algorithms.ppo`, used by MAML-PPO and ProMP). The same path gives the
evaluation curves and the validation step-size search (:func:`select_step_sizes`). Sampling
belongs to the collector, the inner step to :mod:`metarl.adaptation`; this module only composes them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor

from ..adaptation import inner_step
from ..advantages import LinearFeatureBaseline, discounted_returns, gae, normalize_advantages
from ..config import resumable
from ..evaluation import check_step_grid, choose_step_sizes_greedy
from ..functional import Params, stack
from ..objectives import gaussian_kl, reinforce_loss, surrogate_loss
from metarl.policies.gaussian import log_prob


@dataclass
class RLInnerConfig:
    """Inner loop (config section ``inner``)."""
    lr: float = 0.1
    """Inner step size α of the REINFORCE update."""
    steps: int = 1
    """Inner steps in meta-training (each collects fresh episodes under the current φ)."""
    eval_steps: int = resumable(3, why="evaluation only")
    """Inner steps on the evaluation curve."""
    eval_lr: Union[float, list[float], None] = resumable(None, why="evaluation only")
    """Step size at evaluation (null = lr); a list gives one per step, its last entry repeating
    (the paper's 2D-navigation test used 0.5 and then a smaller step, see experiments/nav2d.yaml)."""
    episodes: int = 20
    """Episodes per task per inner step (and for the post-update data)."""
    timesteps: Optional[int] = None
    """Meta-training batches sized in steps instead: whole episodes per task until it holds at
    least this many (the paper's code collects 20 x 100 = 2,000 steps per task on 2D navigation,
    so a policy that reaches the goal early contributes more episodes). null = ``episodes``."""
    eval_episodes: Optional[int] = resumable(None, why="evaluation only")
    """Episodes per task per step at evaluation (null = episodes)."""
    eval_timesteps: Optional[int] = resumable(None, why="evaluation only")
    """At evaluation, collect whole episodes per task per step until it holds at least this many
    steps (rllab's batch_size; the paper's 2D-navigation test: 4000), instead of eval_episodes.
    Adapted policies that end episodes early then get more episodes, as in the paper."""
    eval_protocol: Literal["rounds", "rllab"] = resumable("rounds", why="evaluation only")
    """How eval_timesteps batches are collected. ``rounds``: whole episodes, unbiased (every
    episode started is kept). ``rllab``: the paper's test sampler (rllab's VectorizedSampler;
    :meth:`Collector.collect_timesteps` with ``lockstep=True``), eval_timesteps / horizon envs per
    task in lock-step, stopped once the finished episodes hold eval_timesteps steps, the episodes
    still running dropped. It over-weights short episodes, so it reads higher wherever some
    episodes end early; use it to compare with the paper's numbers, not as the estimate."""
    eval_lr_grid: Optional[list[float]] = resumable(None, why="evaluation only")
    """Choose the test step sizes instead of fixing them: each evaluated method (maml, random,
    pretrain) gets, step by step, the size from this grid with the highest mean return on
    ``eval.validation_tasks`` fresh validation tasks (a seed stream disjoint from the test tasks;
    :func:`select_step_sizes`); ``eval_lr`` is then ignored. The choices and every candidate's
    validation return go to adaptation.json under ``step_sizes``. null = use ``eval_lr``."""
    first_order: bool = False
    """First-order MAML-RL: the outer gradient treats the inner REINFORCE gradients as constants."""

    def validate(self):
        """Bad values fail here in one line rather than as a traceback (or a silent ascent for a
        negative step size) mid-run; the upper bounds stop settings so absurd that one iteration
        would never end (each inner step collects a fresh batch per task)."""
        from ..config import in_range
        in_range("inner.lr", self.lr, 0, open_low=True)
        in_range("inner.eval_lr", self.eval_lr, 0)
        in_range("inner.eval_lr_grid", self.eval_lr_grid, 0)
        in_range("inner.steps", self.steps, 0, 100)
        in_range("inner.eval_steps", self.eval_steps, 0, 100)
        in_range("inner.episodes", self.episodes, 1, 100_000)
        in_range("inner.eval_episodes", self.eval_episodes, 1, 100_000)
        in_range("inner.timesteps", self.timesteps, 1, 100_000_000)
        in_range("inner.eval_timesteps", self.eval_timesteps, 1, 100_000_000)


@dataclass
class AdvantageConfig:
    gamma: float = 0.99
    """Discount factor of returns and advantages."""
    gae_lambda: float = 1.0
    """GAE λ (1.0 = Monte-Carlo returns minus the baseline, as in pytorch-maml-rl)."""
    normalize: bool = True
    """Normalise advantages per task (mean 0, std 1 over valid steps)."""
    reduction: Literal["episode", "step"] = "episode"
    """How the valid steps of a task's batch are averaged, in the advantage normalisation and in
    every loss (REINFORCE, TRPO surrogate, KL): "episode" averages each episode over its own steps,
    then the episodes (pytorch-maml-rl); "step" weights every valid step equally (rllab, the MAML
    paper's code). Identical for fixed-horizon tasks; they differ when episodes end early (2D
    navigation's goal radius), where "episode" gives each step of a short episode more weight."""
    baseline_reg: float = 1e-5
    """Ridge regulariser of the linear feature baseline's least-squares fit (rllab's reg_coeff)."""

    def validate(self):
        """γ and λ are discount factors in [0, 1]; the baseline's ridge term must be >= 0."""
        from ..config import in_range
        in_range("advantages.gamma", self.gamma, 0, 1)
        in_range("advantages.gae_lambda", self.gae_lambda, 0, 1)
        in_range("advantages.baseline_reg", self.baseline_reg, 0)


def advantages(episodes, cfg: AdvantageConfig) -> Tensor:
    """GAE advantages [T, Tmax, B] with a linear feature baseline fitted per task (rllab)."""
    returns = discounted_returns(episodes.rewards, episodes.mask, cfg.gamma)
    values = LinearFeatureBaseline(cfg.baseline_reg)(episodes.obs, returns, episodes.mask)
    adv = gae(episodes.rewards, values, episodes.mask, cfg.gamma, cfg.gae_lambda)
    return normalize_advantages(adv, episodes.mask, reduction=cfg.reduction) if cfg.normalize else adv


def task_params(policy, theta: Params) -> Params:
    """θ plus the entries a policy adds at the start of every task (CAVIA's zero context:
    ``policy.task_start()``, policies/context.py); θ itself for other policies."""
    start = getattr(policy, "task_start", None)
    return {**theta, **start()} if start is not None else dict(theta)


def inner_step_of(policy, eps, adv: Tensor, params: Params, lr, first_order: bool = False, reduction: str = "episode",
                  estimator: str = "reinforce") -> Params:
    """One inner step (REINFORCE, or ProMP's LVC surrogate) on the entries the policy adapts
    (``policy.adapt_only``, e.g. CAVIA's context; all of them by default)."""
    return inner_step(inner_loss(policy, eps, adv, reduction, estimator), params, lr, first_order=first_order,
                      only=getattr(policy, "adapt_only", None))


ESTIMATORS = ("reinforce", "lvc")


def inner_loss(policy, episodes, adv: Tensor, reduction: str = "episode", estimator: str = "reinforce"):
    """The inner loss of stacked per-task params on fixed episodes, summed over tasks.

    ``reinforce``: −mean(log π_θ(a|s) · A), MAML's (Finn et al. 2017). ``lvc``: ProMP's
    low-variance curvature (LVC) surrogate −mean(π_θ(a|s) / π_θo(a|s) · A) (Rothfuss et al.
    2019), π_θo the policy that sampled the episodes (``episodes.log_probs``, a constant). At
    θ = θo both have the same value and gradient, so the inner step φ is the same; their Hessians
    differ: LVC's, Σ_t (∇²log π + ∇log π ∇log πᵀ) A_t, adds the per-step outer product, which
    carries (in expectation, to first order in the step size) the part of the meta-gradient that
    comes from θ sampling the pre-update episodes, the part MAML's fixed-data estimator omits.
    It is exact for one-step episodes; for longer ones it drops the cross-time products (the "low
    variance" of its name: a small bias for much less variance than DiCE). Away from θo
    (ProMP's later outer epochs) LVC's gradient is importance-weighted by the ratio, REINFORCE's is not."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown inner estimator '{estimator}': choose one of {ESTIMATORS}")

    def loss(params: Params) -> Tensor:
        mean, log_std = policy.forward_tasks(params, episodes.obs)
        lp = log_prob(mean, log_std, episodes.actions)
        if estimator == "lvc":
            return surrogate_loss(lp, episodes.log_probs, adv, episodes.mask, reduction).sum()
        return reinforce_loss(lp, adv, episodes.mask, reduction).sum()
    return loss


def adapt_on(policy, params: Params, batches, lr, first_order: bool = False, reduction: str = "episode",
             estimator: str = "reinforce") -> Params:
    """Replay the inner steps on already-collected (episodes, advantages) pairs."""
    for eps, adv in batches:
        params = inner_step_of(policy, eps, adv, params, lr, first_order, reduction, estimator)
    return params


def step_sizes(lr: Union[float, Sequence[float]], steps: int) -> list[float]:
    """One inner step size per step: a number for all, or a list whose last entry repeats."""
    if isinstance(lr, (int, float)):
        return [float(lr)] * steps
    lrs = [float(x) for x in lr]
    if not lrs:
        raise ValueError("empty list of inner step sizes: give at least one (e.g. inner.eval_lr=[0.5])")
    return (lrs + lrs[-1:] * steps)[:steps]


def _collect(collector, policy, params: Params, tasks, episodes: int, timesteps: Optional[int], lockstep: bool, seed: int,
             shard: Optional[tuple[int, int]] = None):
    """One batch: ``episodes`` per task, or whole episodes up to ``timesteps`` steps per task
    (``shard``: a torchrun rank's share of the meta-batch, :meth:`Collector.collect`)."""
    if timesteps is None:
        if shard is not None:
            return collector.collect(policy, params, tasks, episodes, seed=seed, shard=shard)
        return collector.collect(policy, params, tasks, episodes, seed=seed)
    if shard is not None:
        raise ValueError("batches sized in timesteps cannot be sharded across ranks: use inner.episodes")
    return collector.collect_timesteps(policy, params, tasks, timesteps, seed=seed, lockstep=lockstep)


def collect_adapted(policy, collector, theta: Params, tasks, episodes: int, adv_cfg: AdvantageConfig,
                    steps: int, lr: Union[float, Sequence[float]], seed: int, timesteps: Optional[int] = None,
                    lockstep: bool = False, shard: Optional[tuple[int, int]] = None):
    """Episodes before and after each of ``steps`` inner steps (``lr``: see :func:`step_sizes`),
    ``episodes`` per task per step, or with ``timesteps`` whole episodes until each task holds at
    least that many steps (:meth:`Collector.collect_timesteps`; ``lockstep``: rllab's sampler).
    ``shard`` = (first, total): ``tasks`` are one torchrun rank's share of a meta-batch of
    ``total``, collected as their slice of the whole batch would be (:mod:`metarl.distributed`).

    Returns ([(episodes, advantages) at θ, φ1, ..., φ_steps], the last φ detached, seconds spent
    sampling and adapting)."""
    params = stack({k: v.detach() for k, v in task_params(policy, theta).items()}, len(tasks))
    out, lrs = [], step_sizes(lr, steps)
    timing = {"sample": 0.0, "adapt": 0.0}
    for s in range(steps + 1):
        t0 = time.perf_counter()
        eps = _collect(collector, policy, params, tasks, episodes, timesteps, lockstep, seed * 1000 + s, shard)
        t1 = time.perf_counter()
        adv = advantages(eps, adv_cfg)
        out.append((eps, adv))
        if s < steps:
            params = inner_step_of(policy, eps, adv, params, lrs[s], reduction=adv_cfg.reduction)
        timing["sample"] += t1 - t0
        timing["adapt"] += time.perf_counter() - t1
    return out, params, timing


def select_step_sizes(policy, collector, theta: Params, tasks, episodes: int, adv_cfg: AdvantageConfig,
                      steps: int, grid: Sequence[float], seed: int, timesteps: Optional[int] = None,
                      lockstep: bool = False) -> tuple[list[float], list[list[float]]]:
    """Test-time step sizes chosen on validation ``tasks``, greedily, one inner step at a time.

    MAML shapes θ for the step size it is trained with; later test steps start from φ_k, where the
    same size can overshoot (2D navigation: the paper's second step of 0.25 overshoots far goals,
    RESULTS.md). So, as the MAML paper picked its baselines' step sizes on validation tasks
    (sec. 5.1), step k takes the size from ``grid`` whose adapted policy returns the most after
    that step, given the sizes already chosen for steps 1..k−1. Every candidate of a step starts
    from the same batch and gradient and is scored with the same sampling seed (common random
    numbers: the comparison sees the step size, not the sampling noise); the chosen candidate's
    batch is the next step's data. Batches and seeds are those of :func:`collect_adapted`, so a
    one-size grid reproduces its curve. Returns (one size per step, the mean
    validation return of every candidate: [steps][len(grid)])."""
    check_step_grid(grid)
    params = stack({k: v.detach() for k, v in task_params(policy, theta).items()}, len(tasks))
    start = (params, _collect(collector, policy, params, tasks, episodes, timesteps, lockstep, seed * 1000))

    def advance(state, lr: float, s: int):
        params, eps = state
        candidate = inner_step_of(policy, eps, advantages(eps, adv_cfg), params, lr, reduction=adv_cfg.reduction)
        batch = _collect(collector, policy, candidate, tasks, episodes, timesteps, lockstep,
                         seed * 1000 + s + 1)  # common random numbers, as collect_adapted's step s+1
        return (candidate, batch), float(batch.mean_returns().mean())

    return choose_step_sizes_greedy(start, advance, grid, steps, higher_is_better=True)


def outer_objective(policy, train, valid, valid_adv: Tensor, phi_old: Params, inner: RLInnerConfig,
                    reduction: str = "episode"):
    """Closures of the outer step on fixed data, θ ↦ (surrogate, mean KL, (surrogate, KL)): each
    recomputes φ(θ) by replaying the inner steps on ``train``, then evaluates the adapted
    policy on ``valid`` (the KL against the policy at ``phi_old``, the fast weights at θ_old)."""
    n_tasks = valid.obs.shape[0]
    with torch.no_grad():
        old_mean, old_log_std = policy.forward_tasks(phi_old, valid.obs)

    def adapted(p: Params) -> Params:
        return adapt_on(policy, stack(task_params(policy, p), n_tasks), train, inner.lr, inner.first_order, reduction)

    def surrogate_of(mean, log_std):
        lp = log_prob(mean, log_std, valid.actions)
        return surrogate_loss(lp, valid.log_probs, valid_adv, valid.mask, reduction).mean()

    def kl_of(mean, log_std):
        return gaussian_kl(old_mean, old_log_std, mean, log_std, valid.mask, reduction).mean()

    def surrogate(p: Params) -> Tensor:
        return surrogate_of(*policy.forward_tasks(adapted(p), valid.obs))

    def kl(p: Params) -> Tensor:
        return kl_of(*policy.forward_tasks(adapted(p), valid.obs))

    def loss_and_kl(p: Params) -> tuple[Tensor, Tensor]:  # one adaptation and one forward pass for both
        out = policy.forward_tasks(adapted(p), valid.obs)
        return surrogate_of(*out), kl_of(*out)

    return surrogate, kl, loss_and_kl
