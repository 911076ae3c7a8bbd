"""Losses, reduced per task: every function keeps leading task axes and averages over examples.

A meta-batch's inner loss is ``per_task.sum()`` (so each task's inner gradient is its own) and its
outer loss ``per_task.mean()`` (Finn et al. 2017, Algorithm 2, line 10).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over the example axis (and output features): [..., N, D] → [...]."""
    if pred.shape != target.shape:
        raise ValueError(f"mse: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    return (pred - target).pow(2).flatten(start_dim=pred.dim() - 2).mean(-1)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the example axis: logits [..., N, C], labels [..., N] → [...]."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return flat.reshape(labels.shape).mean(-1)


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of correct argmax predictions over the example axis: [..., N, C] → [...]."""
    return (logits.argmax(-1) == labels).float().mean(-1)


# ---------------------------------------------------------------------------------------------
# Reinforcement-learning losses (MAML-RL: REINFORCE inner loop, TRPO outer loop; Finn et al. 2017
# sec. 5.3). Episodes are padded to a common length: every per-step tensor is [..., Tmax, B]
# (leading task axes, time, episodes) with a {0, 1} ``mask`` marking the valid steps; padded
# steps may hold anything and are ignored. Each function returns one value per task: [...].
# ---------------------------------------------------------------------------------------------

REDUCTIONS = ("episode", "step")


def step_weights(mask: Tensor, reduction: str = "episode") -> Tensor:
    """The weight of each step in :func:`masked_mean`: [..., Tmax, B], zero on padded steps and
    summing to 1 per task. Under "episode", empty episodes (no valid step: the padding of tasks
    with fewer episodes, see ``Collector.collect_timesteps``) are left out of the episode count.
    The closed-form TRPO products (:mod:`metarl.algorithms.maml_trpo`) weight their terms with it too."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction '{reduction}': choose one of {REDUCTIONS}")
    if reduction == "episode":
        per_episode = mask.sum(-2, keepdim=True)
        n_episodes = (per_episode > 0).sum(-1, keepdim=True).clamp(min=1).to(mask.dtype)
        return mask / per_episode.clamp(min=1.0) / n_episodes
    return mask / mask.sum((-2, -1), keepdim=True).clamp(min=1.0)


def masked_mean(x: Tensor, mask: Tensor, reduction: str = "episode") -> Tensor:
    """Average of ``x`` over the valid steps of a padded batch: [..., Tmax, B] → [...].

    ``reduction="episode"`` (default) is pytorch-maml-rl's ``weighted_mean(..., lengths)``
    followed by ``.mean()``: each episode is averaged over its own valid steps, then the episodes
    are averaged. ``reduction="step"`` is Σ mask·x / Σ mask, every valid step weighted equally
    (rllab, the MAML paper's code). The two coincide when all episodes have the same length
    (fixed-horizon tasks). Episodes with no valid step are left out under "episode".
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction '{reduction}': choose one of {REDUCTIONS}")
    if x.dim() < 2:
        raise ValueError(f"expected per-step values [..., Tmax, B], got shape {tuple(x.shape)}: keep the time and episode axes")
    x, mask = torch.broadcast_tensors(x, mask.to(x.dtype))
    return (x * step_weights(mask, reduction)).sum((-2, -1))


def reinforce_loss(log_probs: Tensor, advantages: Tensor, mask: Tensor, reduction: str = "episode") -> Tensor:
    """Vanilla policy-gradient surrogate, −mean(log π(a|s) · A) over valid steps: [..., Tmax, B] → [...].

    Its gradient is the score-function (REINFORCE, Williams 1992) estimator; MAML's inner loop
    takes one step on it (Finn et al. 2017, sec. 3.3). Advantages and mask are data: they are
    detached here so the gradient flows through ``log_probs`` only. Normalisation: see
    :func:`masked_mean` (default: per-episode mean, then mean over episodes, as pytorch-maml-rl).
    For a meta-batch, the inner loss is ``reinforce_loss(...).sum()`` (one gradient per task).
    """
    return -masked_mean(log_probs * advantages.detach(), mask.detach(), reduction)


def surrogate_loss(new_log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, mask: Tensor,
                   reduction: str = "episode") -> Tensor:
    """TRPO's surrogate, −L(θ) = −mean(π_θ(a|s) / π_old(a|s) · A) (Schulman et al. 2015, eq. 14):
    [..., Tmax, B] → [...].

    ``old_log_probs`` are those of the policy that sampled the data (for MAML-TRPO: the adapted
    policy at the current θ), treated as constants (detached here). At θ = θ_old the ratio is 1
    and the gradient equals :func:`reinforce_loss`'s. Same normalisation as :func:`reinforce_loss`.
    """
    ratio = torch.exp(new_log_probs - old_log_probs.detach())
    return -masked_mean(ratio * advantages.detach(), mask.detach(), reduction)


def gaussian_kl(mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor, mask: Tensor,
                reduction: str = "episode") -> Tensor:
    """Mean KL(p ‖ q) between diagonal Gaussians over the valid steps, per task:
    means [..., Tmax, B, act_dim] (log-stds broadcastable to them), mask [..., Tmax, B] → [...].

    Per step, KL = Σ_i [log σq_i − log σp_i + (σp_i² + (μp_i − μq_i)²) / (2 σq_i²) − ½], summed
    over action dimensions. Direction: pass the OLD policy as p and the NEW one as q, i.e.
    KL(π_old ‖ π_θ), TRPO's constraint (Schulman et al. 2015, eq. 12). (pytorch-maml-rl computes
    KL(π_θ ‖ π_old); both have the same value, zero gradient and same Hessian (the Fisher
    matrix) at θ = θ_old, so the natural-gradient direction is identical and only the line search
    check differs at second order.) Nothing is detached: detach p yourself when it is the old
    policy. Averaged with :func:`masked_mean`'s ``reduction``.
    """
    var_ratio = torch.exp(2.0 * (log_std_p - log_std_q))
    maha = (mean_p - mean_q).pow(2) * torch.exp(-2.0 * log_std_q)
    per_step = (0.5 * (var_ratio + maha - 1.0) - (log_std_p - log_std_q)).sum(-1)
    return masked_mean(per_step, mask, reduction)


def clipped_surrogate_loss(new_log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, mask: Tensor,
                           clip: float, reduction: str = "episode") -> Tensor:
    """PPO's clipped surrogate, −mean(min(r·A, clip(r, 1−ε, 1+ε)·A)) with r = π_θ(a|s) / π_old(a|s)
    (Schulman et al. 2017, eq. 7; ProMP's J^CLIP, Rothfuss et al. 2019): [..., Tmax, B] → [...].

    The minimum removes the incentive to move r outside [1−ε, 1+ε]: once a step's ratio has moved
    past the bound in the direction its advantage favours, its gradient is zero. At r = 1 it equals
    :func:`surrogate_loss` in value and gradient. ``old_log_probs`` and advantages are data
    (detached here); same normalisation as :func:`reinforce_loss`.
    """
    ratio = torch.exp(new_log_probs - old_log_probs.detach())
    adv = advantages.detach()
    clipped = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)
    return -masked_mean(clipped, mask.detach(), reduction)
