"""MAML for reinforcement learning: REINFORCE inside, TRPO (or vanilla PG) outside.

Finn et al. 2017, sec. 5.3 and Algorithm 3. For a meta-batch of tasks:
1. collect episodes D_i under θ; fit the linear baseline, compute advantages;
2. φ_i = θ − α ∇_θ L_REINFORCE(θ; D_i)   (more inner steps collect fresh episodes under each φ);
3. collect fresh episodes D'_i under φ_i;
4. the outer objective is the TRPO surrogate of π_{φ_i(θ)} on D'_i, and its trust region the mean
   KL(π_{φ_i(θ_old)} ‖ π_{φ_i(θ)}) on D'_i; both closures recompute φ_i(θ) from the fixed D_i, so
   the gradient and the Fisher-vector products differentiate through the inner step (second order;
   ``first_order`` drops those terms). For the MLP Gaussian policy the gradient and the
   Fisher-vector products at θ_old are computed in closed form instead (same values, several times
   cheaper; see "exact Fisher-vector products" below); the closures remain for the line search
   and for any other policy.
Sampling belongs to the collector, the inner step to :mod:`metarl.adaptation`; this module only
composes them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from ..adaptation import inner_step
from ..advantages import LinearFeatureBaseline, discounted_returns, gae, normalize_advantages
from ..functional import Params, stack
from ..objectives import gaussian_kl, reinforce_loss, step_weights, surrogate_loss
from ..optim import hvp_fn, trpo_step, unflat
from ..threads import torch_threads
from metarl.policies.gaussian import GaussianMLPPolicy, log_prob
from metarl.policies.mlp import MLP


@dataclass
class RLInnerConfig:
    """Inner loop (config section ``inner``)."""
    lr: float = 0.1
    """Inner step size α of the REINFORCE update."""
    steps: int = 1
    """Inner steps in meta-training (each collects fresh episodes under the current φ)."""
    eval_steps: int = 3
    """Inner steps on the evaluation curve."""
    eval_lr: Union[float, list[float], None] = None
    """Step size at evaluation (null = lr); a list gives one per step, its last entry repeating
    (the paper's 2D-navigation test used 0.5 and then a smaller step, see experiments/nav2d.yaml)."""
    episodes: int = 20
    """Episodes per task per inner step (and for the post-update data)."""
    timesteps: Optional[int] = None
    """Meta-training batches sized in steps instead: whole episodes per task until it holds at
    least this many (the paper's code collects 20 x 100 = 2,000 steps per task on 2D navigation,
    so a policy that reaches the goal early contributes more episodes). null = ``episodes``."""
    eval_episodes: Optional[int] = None
    """Episodes per task per step at evaluation (null = episodes)."""
    eval_timesteps: Optional[int] = None
    """At evaluation, collect whole episodes per task per step until it holds at least this many
    steps (rllab's batch_size; the paper's 2D-navigation test: 4000), instead of eval_episodes.
    Adapted policies that end episodes early then get more episodes, as in the paper."""
    eval_protocol: Literal["rounds", "rllab"] = "rounds"
    """How eval_timesteps batches are collected. ``rounds``: whole episodes, unbiased (every
    episode started is kept). ``rllab``: the paper's test sampler (rllab's VectorizedSampler;
    :meth:`Collector.collect_timesteps` with ``lockstep=True``), eval_timesteps / horizon envs per
    task in lock-step, stopped once the finished episodes hold eval_timesteps steps, the episodes
    still running dropped. It over-weights short episodes, so it reads higher wherever some
    episodes end early; use it to compare with the paper's numbers, not as the estimate."""
    eval_lr_grid: Optional[list[float]] = None
    """Choose the test step sizes instead of fixing them: each evaluated method (maml, random,
    pretrain) gets, step by step, the size from this grid with the highest mean return on
    ``eval.validation_tasks`` fresh validation tasks (a seed stream disjoint from the test tasks;
    :func:`select_step_sizes`); ``eval_lr`` is then ignored. The choices and every candidate's
    validation return go to adaptation.json under ``step_sizes``. null = use ``eval_lr``."""
    first_order: bool = False

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

    def validate(self):
        """γ and λ are discount factors in [0, 1]; the baseline's ridge term must be >= 0."""
        from ..config import in_range
        in_range("advantages.gamma", self.gamma, 0, 1)
        in_range("advantages.gae_lambda", self.gae_lambda, 0, 1)
        in_range("advantages.baseline_reg", self.baseline_reg, 0)


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
    fisher: Literal["autograd", "closed_form"] = "closed_form"
    """TRPO's gradient and Fisher-vector products: "autograd" differentiates the closures (double
    backpropagation through the KL); "closed_form" computes the same values for a GaussianMLPPolicy
    with a relu/tanh MLP mean from F_θ = Jᵀ F_φ J (~3x cheaper per product and per TRPO step on
    HalfCheetahVel; other policies fall back to autograd). Equal to rounding (tested in float64),
    but 10 float32 CG iterations on a small ill-conditioned problem (e.g. 2D navigation) amplify
    rounding differences to ~1% of the step, so the two paths' training runs are not bit-identical
    ("autograd" reproduces runs made before closed_form existed bit for bit)."""
    threads: int = 0
    """torch intra-op threads for the TRPO step only, restored afterwards (sampling keeps its own
    setting); 0 = leave the process's setting unchanged. The collector is idle during the step, so
    2 can pay off on a dedicated machine; on a loaded one OpenMP threads wait on each other (2
    threads measured 1.6-2.4x slower than 1 on the shared 2-core dev box)."""
    fvp_subsample: float = 1.0
    """Fraction of each task's post-update episodes used for the Fisher-vector products (rllab's
    subsample_factor); 1.0 = all (exact TRPO). Below 1 the curvature is estimated on a random
    subset of episodes, the same in every task (the gradient and the line search still use all):
    cheaper CG, slightly different step direction. With fisher "closed_form" only the post-update part
    of each product (about a quarter) shrinks, the inner-step part does not."""

    def validate(self):
        """TRPO's trust region and line search (Schulman et al. 2015, appendix C) only make sense
        for a positive KL bound, a backtracking ratio in (0, 1) and at least one step; a subsample
        of 0 episodes has no curvature. Caught here, they would fail later in CG or the search."""
        from ..config import in_range
        in_range("outer.max_kl", self.max_kl, 0, open_low=True)
        in_range("outer.cg_iters", self.cg_iters, 1, 10_000)
        in_range("outer.cg_damping", self.cg_damping, 0)
        in_range("outer.ls_ratio", self.ls_ratio, 0, 1, open_low=True, open_high=True)
        in_range("outer.ls_steps", self.ls_steps, 1, 1_000)
        in_range("outer.lr", self.lr, 0, open_low=True)
        in_range("outer.threads", self.threads, 0, 1_024)
        in_range("outer.fvp_subsample", self.fvp_subsample, 0, 1, open_low=True)


def advantages(episodes, cfg: AdvantageConfig) -> Tensor:
    """GAE advantages [T, Tmax, B] with a linear feature baseline fitted per task (rllab)."""
    returns = discounted_returns(episodes.rewards, episodes.mask, cfg.gamma)
    values = LinearFeatureBaseline(cfg.baseline_reg)(episodes.obs, returns, episodes.mask)
    adv = gae(episodes.rewards, values, episodes.mask, cfg.gamma, cfg.gae_lambda)
    return normalize_advantages(adv, episodes.mask, reduction=cfg.reduction) if cfg.normalize else adv


def inner_loss(policy, episodes, adv: Tensor, reduction: str = "episode"):
    """REINFORCE loss of stacked per-task params on fixed episodes, summed over tasks."""
    def loss(params: Params) -> Tensor:
        mean, log_std = policy.forward_tasks(params, episodes.obs)
        return reinforce_loss(log_prob(mean, log_std, episodes.actions), adv, episodes.mask, reduction).sum()
    return loss


def adapt_on(policy, params: Params, batches, lr, first_order: bool = False, reduction: str = "episode") -> Params:
    """Replay the inner steps on already-collected (episodes, advantages) pairs."""
    for eps, adv in batches:
        params = inner_step(inner_loss(policy, eps, adv, reduction), params, lr, first_order=first_order)
    return params


def step_sizes(lr: Union[float, Sequence[float]], steps: int) -> list[float]:
    """One inner step size per step: a number for all, or a list whose last entry repeats."""
    if isinstance(lr, (int, float)):
        return [float(lr)] * steps
    lrs = [float(x) for x in lr]
    if not lrs:
        raise ValueError("empty list of inner step sizes: give at least one (e.g. inner.eval_lr=[0.5])")
    return (lrs + lrs[-1:] * steps)[:steps]


def _collect(collector, policy, params: Params, tasks, episodes: int, timesteps: Optional[int], lockstep: bool, seed: int):
    """One evaluation batch: ``episodes`` per task, or whole episodes up to ``timesteps`` steps per task."""
    if timesteps is None:
        return collector.collect(policy, params, tasks, episodes, seed=seed)
    return collector.collect_timesteps(policy, params, tasks, timesteps, seed=seed, lockstep=lockstep)


def collect_adapted(policy, collector, theta: Params, tasks, episodes: int, adv_cfg: AdvantageConfig,
                    steps: int, lr: Union[float, Sequence[float]], seed: int, timesteps: Optional[int] = None,
                    lockstep: bool = False):
    """Episodes before and after each of ``steps`` inner steps (``lr``: see :func:`step_sizes`),
    ``episodes`` per task per step, or with ``timesteps`` whole episodes until each task holds at
    least that many steps (:meth:`Collector.collect_timesteps`; ``lockstep``: rllab's sampler).

    Returns ([(episodes, advantages) at θ, φ1, ..., φ_steps], the last φ detached, seconds spent
    sampling and adapting)."""
    params = stack({k: v.detach() for k, v in theta.items()}, len(tasks))
    out, lrs = [], step_sizes(lr, steps)
    timing = {"sample": 0.0, "adapt": 0.0}
    for s in range(steps + 1):
        t0 = time.perf_counter()
        eps = _collect(collector, policy, params, tasks, episodes, timesteps, lockstep, seed * 1000 + s)
        t1 = time.perf_counter()
        adv = advantages(eps, adv_cfg)
        out.append((eps, adv))
        if s < steps:
            params = inner_step(inner_loss(policy, eps, adv, adv_cfg.reduction), params, lrs[s])
        timing["sample"] += t1 - t0
        timing["adapt"] += time.perf_counter() - t1
    return out, params, timing


def check_step_grid(grid: Sequence[float]) -> None:
    """A step-size grid is a non-empty list of finite sizes >= 0 (ValueError naming the grid)."""
    if not grid or any(not math.isfinite(lr) or lr < 0 for lr in grid):
        raise ValueError(f"step-size grid must be a non-empty list of finite sizes >= 0, e.g. [0.05, 0.1, 0.25, 0.5], got {list(grid)}")


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
    params = stack({k: v.detach() for k, v in theta.items()}, len(tasks))
    eps = _collect(collector, policy, params, tasks, episodes, timesteps, lockstep, seed * 1000)
    chosen, table = [], []
    for s in range(steps):
        loss = inner_loss(policy, eps, advantages(eps, adv_cfg), adv_cfg.reduction)
        best, row = None, []
        for lr in grid:
            candidate = inner_step(loss, params, float(lr))
            batch = _collect(collector, policy, candidate, tasks, episodes, timesteps, lockstep,
                             seed * 1000 + s + 1)  # common random numbers, as collect_adapted's step s+1
            row.append(float(batch.mean_returns().mean()))
            if best is None or row[-1] > best[0]:
                best = (row[-1], float(lr), candidate, batch)
        table.append(row)
        chosen.append(best[1])
        params, eps = best[2], best[3]
    return chosen, table


# --------------------------------------------------------------- exact Fisher-vector products
#
# At θ_old the KL's own gradient in the fast weights vanishes (the KL is minimal, zero, where
# φ(θ) = φ_old), so its Hessian through the inner step has no second-order term in φ(θ):
#     F_θ = Jᵀ F_φ J,   J = ∂φ/∂θ = Π_k (I − α ∇²L_in,k)   (one factor per inner step),
# and for a diagonal Gaussian KL(π_old ‖ π) the Hessian in the distribution's parameters at
# π = π_old is the Fisher information: Σ⁻¹ for the mean, 2 per log-std entry, no cross term. So
#     F_φ = Σ_steps w · J_μᵀ Σ⁻¹ J_μ  (+ 2 Σ w per log-std entry),
# with w the steps' weights in the mean KL (see objectives.masked_mean). The products J v, Jᵀ u
# need Hessian-vector products of the REINFORCE inner loss, done below by hand (forward-over-
# reverse through the MLP with everything that does not depend on the vector computed once),
# F_φ needs one Jacobian-vector and one vector-Jacobian product of the policy on the valid data.
# The result is the same matrix-vector product as double backpropagation through the KL closure
# (tests/test_maml_trpo.py checks it against metarl.optim.hvp_fn in float64) at ~1/3 of the cost
# (HalfCheetahVel, 40 tasks × 4000 steps: ~16 [T, 4000, 100]-sized matmuls and a few in-place
# element-wise passes per product, vs ~24 matmuls and many fresh element-wise intermediates).
# The surrogate's gradient Jᵀ ∇_φ L comes from the same pieces. Supported: GaussianMLPPolicy with
# a relu/tanh MLP mean and a scalar inner step size; anything else takes the autograd path.


def _fast_fisher_supported(policy, lr) -> bool:
    return (type(policy) is GaussianMLPPolicy and type(policy.mean) is MLP
            and policy.mean.activation in ("relu", "tanh") and isinstance(lr, (int, float)))


class _Tangent(NamedTuple):
    """What the tangent of a backward pass needs besides the tangent of the output gradient."""
    deltas: list   # the primal gradients with respect to each layer's output z
    hdots: list    # tangents of each layer's input (None for the observation)
    zdots: list    # tangents of the hidden pre-activations (tanh only)
    gh_d2: list    # tanh: (∂/∂h) ⊙ act''(z) per hidden layer
    tangent: list  # tangents of [W | b] per layer


class _LinearizedMLP:
    """``GaussianMLPPolicy.forward_tasks`` at fixed per-task params on one batch, kept for
    Jacobian products: each layer's input with a ones column (so a layer's [W | b] is one
    matrix [T, out, in+1]), the activation derivatives, and work buffers reused across calls."""

    def __init__(self, policy, params: Params, obs: Tensor):
        self.n = n = len(policy.mean.layers)
        self.tanh = policy.mean.activation == "tanh"
        h = obs.reshape(obs.shape[0], -1, obs.shape[-1])
        self.weights = [params[f"mean.layers.{i}.weight"] for i in range(n)]
        self.inputs, self.d1, self.d2 = [], [], []  # layer inputs [T, N, in+1]; act'(z), act''(z) per hidden layer
        for i, layer in enumerate(_layers(params, n)):
            x = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], -1)
            self.inputs.append(x)
            z = torch.bmm(x, layer.transpose(1, 2))
            if i < n - 1:
                if self.tanh:
                    h = torch.tanh(z)
                    self.d1.append(1.0 - h * h)
                    self.d2.append(-2.0 * h * self.d1[-1])
                else:
                    h = torch.relu(z)
                    self.d1.append((z > 0).to(z.dtype))
        self.mean = z
        raw = params["log_std"]
        self.log_std = raw.clamp(min=policy.min_log_std)
        self.clamp_grad = (raw >= policy.min_log_std).to(raw.dtype)  # clamp's derivative, [T, A]
        self.inv_var = torch.exp(-2.0 * self.log_std).unsqueeze(1)   # [T, 1, A]
        self._buffers: dict = {}

    def _buffer(self, key, shape) -> Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape:
            buf = self._buffers[key] = self.mean.new_empty(shape)
        return buf

    def jvp(self, tangent: list[Tensor]):
        """Tangents of the layers (``tangent``: [T, out, in+1] per layer) → (hidden pre-activation
        tangents ż (tanh only), hidden output tangents ḣ (None for the observation), mean
        tangent μ̇). The results live in work buffers: use them before the next call."""
        hdot, hdots, zdots = None, [None], []
        for i in range(self.n):
            x = self.inputs[i]
            zd = torch.bmm(x, tangent[i].transpose(1, 2), out=self._buffer(("z", i), (*x.shape[:2], tangent[i].shape[1])))
            if hdot is not None:
                zd.baddbmm_(hdot, self.weights[i].transpose(1, 2))
            if i < self.n - 1:
                if self.tanh:
                    zdots.append(zd)
                    hdot = torch.mul(zd, self.d1[i], out=self._buffer(("h", i), zd.shape))
                else:
                    hdot = zd.mul_(self.d1[i])
                hdots.append(hdot)
        return zdots, hdots, zd

    def backward(self, delta: Tensor, second: Optional[_Tangent] = None,
                 keep: Optional[tuple[list, list]] = None) -> list[Tensor]:
        """Per-layer gradients [T, out, in+1] of Σ delta·μ (``delta`` [T, N, A]).

        With ``second`` this is the tangent of a backward pass instead (forward-over-reverse):
        ``delta`` is the tangent of the gradient with respect to the mean, and the terms from the
        tangents of the weights and activations are added. ``keep`` = (deltas, gh_d2), two lists
        of length n, receives each layer's gradient with respect to its output z and, for tanh,
        (∂/∂h) ⊙ act''(z) of the layer below (fresh tensors, not buffers): what a later
        ``second`` needs."""
        grads = [None] * self.n
        for i in reversed(range(self.n)):
            if keep is not None:
                keep[0][i] = delta
            g = torch.bmm(delta.transpose(1, 2), self.inputs[i])
            if second is not None and second.hdots[i] is not None:
                g[..., :-1].baddbmm_(second.deltas[i].transpose(1, 2), second.hdots[i])
            grads[i] = g
            if i > 0:
                out = None if keep is not None else self._buffer(("g", i), (*delta.shape[:2], self.weights[i].shape[2]))
                gh = torch.bmm(delta, self.weights[i], out=out)
                if second is not None:
                    gh.baddbmm_(second.deltas[i], second.tangent[i][..., :-1])
                if keep is not None and self.tanh:
                    keep[1][i - 1] = gh * self.d2[i - 1]
                delta = gh.mul_(self.d1[i - 1])
                if second is not None and self.tanh:
                    delta.addcmul_(second.gh_d2[i - 1], second.zdots[i - 1])
        return grads


def _layers(params: Params, n: int) -> list[Tensor]:
    """[W | b] per layer, [T, out, in+1]."""
    return [torch.cat([params[f"mean.layers.{i}.weight"], params[f"mean.layers.{i}.bias"].unsqueeze(-1)], -1)
            for i in range(n)]


def _unlayer(grads: list[Tensor], log_std: Tensor) -> Params:
    out = {}
    for i, g in enumerate(grads):
        out[f"mean.layers.{i}.weight"], out[f"mean.layers.{i}.bias"] = g[..., :-1], g[..., -1]
    out["log_std"] = log_std
    return out


class _InnerCurvature:
    """The summed REINFORCE inner loss on one batch around fixed per-task params: its gradient
    (``grad``) and Hessian-vector products (:meth:`hvp`)."""

    def __init__(self, policy, params: Params, episodes, adv: Tensor, reduction: str):
        self.net = net = _LinearizedMLP(policy, params, episodes.obs)
        T, A = episodes.actions.shape[0], episodes.actions.shape[-1]
        c = (adv.detach() * step_weights(episodes.mask, reduction)).reshape(T, -1, 1)  # loss = −Σ c · log π
        self.r = episodes.actions.reshape(T, -1, A) - net.mean
        self.c_iv = c * net.inv_var
        self.deltas, self.gh_d2 = [None] * net.n, [None] * net.n
        grads = net.backward(-self.c_iv * self.r, keep=(self.deltas, self.gh_d2))
        g_log_std = (c * (1.0 - self.r * self.r * net.inv_var)).sum(1) * net.clamp_grad
        self.grad = _unlayer(grads, g_log_std)

    def hvp(self, v: Params) -> Params:
        net = self.net
        tangent = _layers(v, net.n)
        zdots, hdots, mudot = net.jvp(tangent)
        sdot = (v["log_std"] * net.clamp_grad).unsqueeze(1)
        ddot = self.c_iv * (mudot + 2.0 * self.r * sdot)
        g_log_std = 2.0 * (self.c_iv * self.r * (mudot + self.r * sdot)).sum(1) * net.clamp_grad
        grads = net.backward(ddot, second=_Tangent(self.deltas, hdots, zdots, self.gh_d2, tangent))
        return _unlayer(grads, g_log_std)


class _MAMLLinearization:
    """The outer objective linearised at θ_old: the inner steps' curvature on the train batches
    and the adapted policy φ_old = φ(θ_old); gives the surrogate's value and exact gradient, and
    the exact Fisher-vector products of the mean KL (see the section comment)."""

    def __init__(self, policy, theta: Params, train, lr: float, first_order: bool, n_tasks: int,
                 reduction: str = "episode"):
        self.policy, self.names, self.reduction = policy, list(theta), reduction
        self.like = {k: t.detach() for k, t in theta.items()}
        self.n_tasks = n_tasks
        params = stack(self.like, self.n_tasks)
        self.lr, self.first_order, self.inner = float(lr), first_order, []
        for eps, adv in train:
            curv = _InnerCurvature(policy, params, eps, adv, reduction)
            self.inner.append(curv)
            params = {k: params[k] - self.lr * curv.grad[k] for k in params}
        self.phi = params
        self._valid: dict = {}

    def _net(self, episodes) -> _LinearizedMLP:
        key = id(episodes.obs)
        if key not in self._valid:
            self._valid[key] = (episodes.obs, _LinearizedMLP(self.policy, self.phi, episodes.obs))
        return self._valid[key][1]

    def keep_only(self, episodes) -> None:
        """Free the linearisations on batches other than ``episodes``."""
        self._valid = {k: v for k, v in self._valid.items() if v[0] is episodes.obs}

    def _transpose_jacobian(self, u: Params) -> Tensor:
        """Jᵀ u for per-task cotangents u in φ, summed over tasks: a flat vector in θ."""
        u = self._through_inner(u, reversed(self.inner))
        return torch.cat([u[k].sum(0).reshape(-1) for k in self.names])

    def _through_inner(self, v: Params, order) -> Params:
        if not self.first_order:
            for curv in order:
                hv = curv.hvp(v)
                v = {k: v[k] - self.lr * hv[k] for k in self.names}
        return v

    def surrogate_and_grad(self, valid, adv: Tensor) -> tuple[Tensor, Tensor]:
        """(surrogate loss at θ_old, its gradient in θ as a flat vector): the mean over tasks
        of −Σ w·A·ρ with ρ = π_φ/π_behaviour, and Jᵀ ∇_φ of it."""
        net = self._net(valid)
        T, A = self.n_tasks, valid.actions.shape[-1]
        actions = valid.actions.reshape(T, -1, A)
        logp = log_prob(net.mean, net.log_std.unsqueeze(1), actions)
        wa = ((step_weights(valid.mask, self.reduction) * adv.detach()).reshape(T, -1) / T) * torch.exp(logp - valid.log_probs.reshape(T, -1))
        loss = -wa.sum()
        r = actions - net.mean
        wa = wa.unsqueeze(-1)
        g_mean = -wa * r * net.inv_var                                               # ∂loss/∂μ
        g_log_std = -(wa * (r * r * net.inv_var - 1.0)).sum(1) * net.clamp_grad      # ∂loss/∂log σ
        return loss, self._transpose_jacobian(_unlayer(net.backward(g_mean), g_log_std))

    def fisher(self, valid):
        """v ↦ F_θ v (flat) for the mean over tasks of KL(π_φ_old ‖ π_φ(θ)) on ``valid``."""
        net = self._net(valid)
        w = (step_weights(valid.mask, self.reduction) / self.n_tasks).reshape(self.n_tasks, -1, 1)
        w_iv, w_log_std = w * net.inv_var, 2.0 * w.sum(1) * net.clamp_grad

        def product(vec: Tensor) -> Tensor:
            v = unflat(vec.detach(), self.like)
            v = {k: t.expand(self.n_tasks, *t.shape) for k, t in v.items()}
            v = self._through_inner(v, self.inner)                                  # J v
            _, _, mudot = net.jvp(_layers(v, net.n))
            u = _unlayer(net.backward(w_iv * mudot), w_log_std * v["log_std"])      # F_φ J v
            return self._transpose_jacobian(u)                                      # Jᵀ F_φ J v
        return product


# ------------------------------------------------------------------------------- the outer step

def _subsample_episodes(episodes, adv: Tensor, fraction: float, generator: torch.Generator):
    """(episodes, advantages) restricted to the same random subset of episode slots (axis B) in
    every task, at least one; only the fields the outer objective reads are kept."""
    B = episodes.obs.shape[2]
    k = max(1, int(round(fraction * B)))
    if k >= B:
        return episodes, adv
    idx = torch.randperm(B, generator=generator)[:k].sort().values
    sub = SimpleNamespace(**{name: getattr(episodes, name)[:, :, idx] for name in ("obs", "actions", "mask", "log_probs")})
    return sub, adv[:, :, idx]


def meta_update(policy, collector, tasks, inner: RLInnerConfig, adv_cfg: AdvantageConfig, outer: RLOuterConfig,
                seed: int, optimizer=None) -> dict[str, float]:
    """One meta-iteration: sample, adapt, sample again, outer step on θ. Returns diagnostics."""
    theta = {k: p for k, p in policy.named_parameters()}
    data, phi_old, timing = collect_adapted(policy, collector, theta, tasks, inner.episodes, adv_cfg, inner.steps, inner.lr,
                                            seed, timesteps=inner.timesteps)
    train, (valid, valid_adv) = data[:-1], data[-1]
    metrics = {"return/pre": data[0][0].mean_returns().mean().item(), "return/post": valid.mean_returns().mean().item()}
    metrics.update({f"time/{k}": v for k, v in timing.items()})
    t_outer = time.perf_counter()
    if outer.optimizer == "trpo":
        with torch_threads(outer.threads):
            info = trpo_outer_step(policy, theta, train, valid, valid_adv, phi_old, inner, outer, seed, adv_cfg.reduction)
        metrics.update({"trpo/kl": info["kl"], "trpo/accepted": float(info["accepted"]),
                        "trpo/step_fraction": info["step_fraction"], "loss/surrogate": info["loss_before"]})
    else:
        surrogate, _, _ = outer_objective(policy, train, valid, valid_adv, phi_old, inner, adv_cfg.reduction)
        loss = surrogate(theta)
        metrics["loss/surrogate"] = loss.item()
        if torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    metrics["time/outer"] = time.perf_counter() - t_outer
    metrics["policy/std"] = theta["log_std"].detach().exp().mean().item()
    return metrics


def outer_objective(policy, train, valid, valid_adv: Tensor, phi_old: Params, inner: RLInnerConfig,
                    reduction: str = "episode"):
    """Closures of the outer step on fixed data, θ ↦ (surrogate, mean KL, (surrogate, KL)): each
    recomputes φ(θ) by replaying the inner steps on ``train``, then evaluates the adapted
    policy on ``valid`` (the KL against the policy at ``phi_old``, the fast weights at θ_old)."""
    n_tasks = valid.obs.shape[0]
    with torch.no_grad():
        old_mean, old_log_std = policy.forward_tasks(phi_old, valid.obs)

    def adapted(p: Params) -> Params:
        return adapt_on(policy, stack(p, n_tasks), train, inner.lr, inner.first_order, reduction)

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


def trpo_outer_step(policy, theta: Params, train, valid, valid_adv: Tensor, phi_old: Params, inner: RLInnerConfig,
                    outer: RLOuterConfig, seed: int = 0, reduction: str = "episode") -> dict:
    """TRPO on θ (updated in place) for the outer objective of :func:`outer_objective`."""
    surrogate, kl, loss_and_kl = outer_objective(policy, train, valid, valid_adv, phi_old, inner, reduction)
    if not 0.0 < outer.fvp_subsample <= 1.0:
        raise ValueError(f"outer.fvp_subsample must be in (0, 1], got {outer.fvp_subsample}")
    if outer.fisher not in ("autograd", "closed_form"):
        raise ValueError(f"unknown outer.fisher '{outer.fisher}': choose autograd or closed_form")
    fisher_valid, fisher_adv = _subsample_episodes(valid, valid_adv, outer.fvp_subsample, torch.Generator().manual_seed(seed))
    fvp_fn = loss_and_grad_fn = None
    if outer.fisher == "closed_form" and _fast_fisher_supported(policy, inner.lr):
        cache: dict = {}

        def linearization(p: Params) -> _MAMLLinearization:
            lin = cache.get("lin")
            if lin is None or any(not torch.equal(lin.like[k], p[k].detach()) for k in lin.like):
                lin = cache["lin"] = _MAMLLinearization(policy, p, train, inner.lr, inner.first_order, valid.obs.shape[0], reduction)
            return lin

        def loss_and_grad_fn(p: Params):
            return linearization(p).surrogate_and_grad(valid, valid_adv)

        def fvp_fn(p: Params):
            lin = linearization(p)
            cache.clear()  # the product alone keeps it alive, and trpo_step drops that before the line search
            lin.keep_only(fisher_valid)
            return lin.fisher(fisher_valid)
    elif fisher_valid is not valid:
        _, kl_sub, _ = outer_objective(policy, train, fisher_valid, fisher_adv, phi_old, inner, reduction)

        def fvp_fn(p: Params):
            return hvp_fn(kl_sub, p)
    return trpo_step(theta, surrogate, kl, max_kl=outer.max_kl, cg_iters=outer.cg_iters, damping=outer.cg_damping,
                     ls_ratio=outer.ls_ratio, ls_steps=outer.ls_steps, loss_and_kl_fn=loss_and_kl, fvp_fn=fvp_fn,
                     loss_and_grad_fn=loss_and_grad_fn)
