"""PPO as the outer rule of gradient-based meta-RL (Schulman et al. 2017; Rothfuss et al. 2019).

Where TRPO takes one natural-gradient step per meta-batch, PPO takes ``outer.epochs`` Adam passes
over the same data (``outer.minibatches`` Adam steps per pass, each on a subset of the tasks),
kept near the sampling policies by clipping the likelihood ratio of the adapted policies on
their post-update episodes (:func:`metarl.objectives.clipped_surrogate_loss`). Each evaluation
of the objective replays the inner steps from the current θ on the fixed pre-update episodes, so
the gradient differentiates through them as MAML-TRPO's does.

Two methods use it:
- ``algorithm: maml`` with ``outer.optimizer: ppo`` (MAML-PPO): REINFORCE inner loss, no penalty;
- ``algorithm: promp`` (:mod:`metarl.algorithms.promp`): the LVC inner loss and a penalty
  η_k · KL(π_{φ_k(θ_old)} ‖ π_{φ_k(θ)}) on the data of each inner step k (φ_0 = θ), which keeps
  the pre-update policies, whose ratios the clipped objective cannot see, near the ones that
  sampled. ProMP adapts η_k between iterations (:func:`metarl.algorithms.promp.adapt_kl_coeff`).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from ..adaptation import inner_step
from ..functional import Params, stack
from ..objectives import clipped_surrogate_loss, gaussian_kl
from metarl.policies.gaussian import log_prob
from .meta_rl import RLInnerConfig, inner_loss
from .trpo import RLOuterConfig


def clipped_objective(policy, train, valid, valid_adv: Tensor, inner: RLInnerConfig, clip: float,
                      reduction: str = "episode", estimator: str = "reinforce",
                      kl_coeffs: Optional[Tensor] = None, old_dists=None):
    """θ ↦ (loss, inner KLs [K], clip fraction) on fixed data: the inner steps replayed from θ on
    ``train`` (K (episodes, advantages) pairs, inner loss ``estimator``), then the clipped
    surrogate of the adapted policies on ``valid`` against the policies that sampled it, averaged
    over tasks. With ``kl_coeffs`` [K] the loss adds mean_k η_k · KL_k, KL_k the mean over tasks
    of KL(old_dists[k] ‖ π_{φ_k(θ)}) on step k's episodes (ProMP's penalty); the KLs are returned
    whenever ``old_dists`` is given (empty otherwise). The clip fraction is the share of valid
    post-update steps whose ratio lies outside [1−ε, 1+ε] (a diagnostic, no gradient)."""
    n_tasks = valid.obs.shape[0]

    def objective(p: Params) -> tuple[Tensor, Tensor, float]:
        params, kls = stack(p, n_tasks), []
        for k, (eps, adv) in enumerate(train):
            if old_dists is not None:
                mean, log_std = policy.forward_tasks(params, eps.obs)
                kls.append(gaussian_kl(*old_dists[k], mean, log_std, eps.mask, reduction).mean())
            params = inner_step(inner_loss(policy, eps, adv, reduction, estimator), params, inner.lr,
                                first_order=inner.first_order)
        lp = log_prob(*policy.forward_tasks(params, valid.obs), valid.actions)
        loss = clipped_surrogate_loss(lp, valid.log_probs, valid_adv, valid.mask, clip, reduction).mean()
        kl = torch.stack(kls) if kls else torch.zeros(0)
        if kl_coeffs is not None and len(kls):
            loss = loss + (kl_coeffs.to(kl.dtype) * kl).mean()
        outside = ((lp.detach() - valid.log_probs).exp() - 1.0).abs() > clip
        clip_fraction = float((outside * valid.mask).sum() / valid.mask.sum().clamp(min=1.0))
        return loss, kl, clip_fraction

    return objective


def _tasks(episodes, idx: Tensor):
    """The fields the objective reads, restricted to the tasks ``idx`` (axis 0)."""
    return SimpleNamespace(**{f: getattr(episodes, f)[idx] for f in ("obs", "actions", "mask", "log_probs")})


def old_distributions(policy, theta: Params, train, inner: RLInnerConfig, reduction: str = "episode",
                      estimator: str = "reinforce") -> list[tuple[Tensor, Tensor]]:
    """(mean, log_std) of π_{φ_k(θ_old)} on each inner step's episodes, k = 0..K−1 (φ_0 = θ_old):
    the sampling policies of the pre-update data, replayed without a graph."""
    params = stack({k: v.detach() for k, v in theta.items()}, train[0][0].obs.shape[0]) if train else None
    out = []
    with torch.no_grad():
        for eps, adv in train:
            out.append(tuple(t.detach() for t in policy.forward_tasks(params, eps.obs)))
            params = inner_step(inner_loss(policy, eps, adv, reduction, estimator), params, inner.lr)
    return out


def ppo_outer_step(policy, theta: Params, optimizer: torch.optim.Optimizer, train, valid, valid_adv: Tensor,
                   inner: RLInnerConfig, outer: RLOuterConfig, seed: int = 0, reduction: str = "episode",
                   estimator: str = "reinforce", kl_coeffs: Optional[Tensor] = None) -> dict:
    """``outer.epochs`` passes of Adam on :func:`clipped_objective`, θ updated in place; each pass
    shuffles the tasks (``seed``) into ``outer.minibatches`` groups, one step each. A non-finite
    loss restores θ (and Adam) to where the call began and reports the loss, so the training loop
    stops on an intact checkpoint. Returns the loss before and after, the inner KLs after (one per
    inner step) and the clip fraction after."""
    n_tasks = valid.obs.shape[0]
    if outer.minibatches > n_tasks:
        raise ValueError(f"outer.minibatches ({outer.minibatches}) exceeds the meta-batch ({n_tasks} tasks)")
    old = old_distributions(policy, theta, train, inner, reduction, estimator)
    start = {k: v.detach().clone() for k, v in theta.items()}
    start_opt = copy.deepcopy(optimizer.state_dict())  # Adam updates its state tensors in place
    gen = torch.Generator().manual_seed(seed)

    def on(idx: Tensor):
        return clipped_objective(policy, [(_tasks(eps, idx), adv[idx]) for eps, adv in train], _tasks(valid, idx),
                                 valid_adv[idx], inner, outer.clip, reduction, estimator, kl_coeffs,
                                 [(m[idx], s[idx]) for m, s in old])

    every = clipped_objective(policy, train, valid, valid_adv, inner, outer.clip, reduction, estimator, kl_coeffs, old)
    with torch.no_grad():
        loss_before = every(theta)[0].item()
    for _ in range(outer.epochs):
        order = torch.randperm(n_tasks, generator=gen) if outer.minibatches > 1 else torch.arange(n_tasks)
        for idx in torch.tensor_split(order, outer.minibatches):  # exactly minibatches groups, sizes within one
            loss = on(idx)(theta)[0]
            if not torch.isfinite(loss):
                with torch.no_grad():
                    for k, p in theta.items():
                        p.copy_(start[k])
                optimizer.load_state_dict(start_opt)
                return {"loss_before": loss_before, "loss_after": loss.item(), "inner_kl": [float("nan")] * len(train),
                        "clip_fraction": float("nan")}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        loss_after, kl, clip_fraction = every(theta)
    return {"loss_before": loss_before, "loss_after": loss_after.item(), "inner_kl": kl.tolist(),
            "clip_fraction": clip_fraction}
