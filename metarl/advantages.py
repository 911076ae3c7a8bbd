"""Returns, baselines and advantages for padded episode batches.

Every per-step tensor is [..., Tmax, B]: optional leading task axes, then time, then episodes,
with a {0, 1} ``mask`` marking valid steps. Episodes may end early (termination); their valid
steps must form a prefix of the time axis. After an episode's last valid step the value is 0:
the end of an episode (early or at Tmax) is treated as terminal, as rllab and pytorch-maml-rl do
for MAML's fixed-horizon tasks (no bootstrapping of time-limit truncation).

All functions are vectorised over the task axes: one meta-batch is processed with one call
(one batched linear solve for the baseline), never with a Python loop over tasks.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .objectives import masked_mean


def _check_padded(name: str, x: Tensor, mask: Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"{name} must be [..., Tmax, B], got shape {tuple(x.shape)}: keep the time and episode axes")
    if x.shape != mask.shape:
        raise ValueError(f"{name} shape {tuple(x.shape)} != mask shape {tuple(mask.shape)}: give one mask entry per step")


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go R_t = Σ_{k≥t} γ^{k−t} r_k within each episode, 0 on padded steps: [..., Tmax, B]."""
    _check_padded("rewards", rewards, mask)
    mask = mask.to(rewards.dtype)
    r = rewards * mask
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[..., 0, :])
    for t in range(r.shape[-2] - 1, -1, -1):
        running = r[..., t, :] + gamma * running
        out[..., t, :] = running
    return out * mask


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16): [..., Tmax, B] → same.

    δ_t = r_t + γ V(s_{t+1}) − V(s_t), with V(s_{t+1}) = 0 past an episode's last valid step
    (terminal), and  = Σ_l (γλ)^l δ_{t+l} within the episode. Padded steps get advantage 0.
    λ = 1 gives R_t − V(s_t) (Monte-Carlo), λ = 0 the one-step TD error. Values are treated as
    data (detached): the policy gradient must not flow into the baseline.
    """
    _check_padded("rewards", rewards, mask)
    _check_padded("values", values, mask)
    mask = mask.to(rewards.dtype)
    v = values.detach() * mask
    r = rewards * mask
    next_v = torch.cat([v[..., 1:, :], torch.zeros_like(v[..., :1, :])], dim=-2)
    deltas = (r + gamma * next_v - v) * mask
    out = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[..., 0, :])
    for t in range(deltas.shape[-2] - 1, -1, -1):
        running = deltas[..., t, :] + gamma * lam * running * mask[..., t, :]
        out[..., t, :] = running
    return out


def normalize_advantages(advantages: Tensor, mask: Tensor, eps: float = 1e-8, reduction: str = "episode") -> Tensor:
    """Per task, (A − mean) / (std + eps) over the valid steps; padded steps stay 0.

    pytorch-maml-rl normalises the advantages of each task's batch before the REINFORCE and TRPO
    losses (``BatchEpisodes(normalize_advantages=True)``); it reduces a scale that differs by orders
    of magnitude between tasks (e.g. goal velocities), which makes one inner learning rate work for
    all. Mean and (biased) variance use :func:`metarl.objectives.masked_mean` with the same
    ``reduction`` as the losses (default "episode", pytorch-maml-rl's ``weighted_normalize``).
    """
    _check_padded("advantages", advantages, mask)
    mask = mask.to(advantages.dtype)
    mean = masked_mean(advantages, mask, reduction)[..., None, None]
    centered = (advantages - mean) * mask
    std = masked_mean(centered.pow(2), mask, reduction).sqrt()[..., None, None]
    return centered / (std + eps)


class LinearFeatureBaseline:
    """rllab's linear value baseline (Duan et al. 2016), fitted per task, all tasks at once.

    Features per step: [o, o², t/100, (t/100)², (t/100)³, 1] with o the observation clipped to
    [−10, 10] and t the step index within the episode. Coefficients solve the ridge system
    (XᵀX + c·I) w = Xᵀ R on the discounted returns R of the valid steps of one task; when the
    solve fails (singular or non-finite), c is multiplied by 10 and the solve retried, up to 5
    attempts, as rllab does. Here every task of a meta-batch has its own system and its own c, and
    all systems are solved with one batched ``torch.linalg.solve_ex``; on a retry only the tasks
    that failed take the new solution (and the larger c). The solve runs in float64 (rllab uses
    numpy float64): the features mix o² ≈ 100 with (t/100)³, and float32 normal equations lose
    most of their digits.

    Usage: ``values = LinearFeatureBaseline().fit(obs, returns, mask).predict(obs, mask)`` with
    obs [..., Tmax, B, obs_dim]; ``coeffs`` is [..., n_features] after ``fit``.
    """

    MAX_ATTEMPTS = 5

    def __init__(self, reg_coeff: float = 1e-5):
        if not reg_coeff > 0:
            raise ValueError(f"reg_coeff must be > 0 (rllab uses 1e-5), got {reg_coeff}")
        self.reg_coeff = reg_coeff
        self.coeffs: Optional[Tensor] = None
        self.reg_used: Optional[Tensor] = None  # the per-task coefficient c that succeeded

    @staticmethod
    def features(obs: Tensor, mask: Tensor) -> Tensor:
        """[..., Tmax, B, obs_dim] → [..., Tmax, B, 2·obs_dim + 4]; rows of padded steps are 0."""
        if obs.dim() < 3 or obs.shape[:-1] != mask.shape:
            raise ValueError(f"obs {tuple(obs.shape)} must be mask {tuple(mask.shape)} + (obs_dim,): pass obs as [..., Tmax, B, obs_dim]")
        o = obs.clamp(-10.0, 10.0)
        t_max = obs.shape[-3]
        t = (torch.arange(t_max, dtype=obs.dtype, device=obs.device) / 100.0).view(t_max, 1, 1)
        t = t.expand(*obs.shape[:-1], 1)
        ones = torch.ones_like(t)
        feats = torch.cat([o, o.pow(2), t, t.pow(2), t.pow(3), ones], dim=-1)
        return feats * mask.to(obs.dtype).unsqueeze(-1)

    def fit(self, obs: Tensor, returns: Tensor, mask: Tensor) -> "LinearFeatureBaseline":
        """Fit one coefficient vector per task on the valid steps; returns self."""
        _check_padded("returns", returns, mask)
        x = self.features(obs, mask).to(torch.float64)
        x = x.flatten(-3, -2)  # [..., N, F], N = Tmax·B; padded rows are zero and drop out
        y = (returns * mask).to(torch.float64).flatten(-2, -1).unsqueeze(-1)  # [..., N, 1]
        xtx = x.transpose(-1, -2) @ x
        xty = x.transpose(-1, -2) @ y
        eye = torch.eye(xtx.shape[-1], dtype=xtx.dtype, device=xtx.device)
        batch = xtx.shape[:-2]
        reg = torch.full(batch, self.reg_coeff, dtype=xtx.dtype, device=xtx.device)
        coeffs = torch.zeros_like(xty)
        todo = torch.ones(batch, dtype=torch.bool, device=xtx.device)
        for attempt in range(self.MAX_ATTEMPTS):
            sol, info = torch.linalg.solve_ex(xtx + reg[..., None, None] * eye, xty)
            ok = (info == 0) & torch.isfinite(sol).all(-1).all(-1)
            coeffs = torch.where((todo & ok)[..., None, None], sol, coeffs)
            todo = todo & ~ok
            if not todo.any():
                break
            if attempt == self.MAX_ATTEMPTS - 1:
                raise RuntimeError(f"linear baseline fit failed for {int(todo.sum())} task(s) even with reg_coeff "
                                   f"{float(reg.max()):.1e}: check observations and returns for NaN/inf")
            reg = torch.where(todo, reg * 10.0, reg)
        self.coeffs = coeffs.squeeze(-1).to(obs.dtype)
        self.reg_used = reg
        return self

    def predict(self, obs: Tensor, mask: Tensor) -> Tensor:
        """Values V(s_t) [..., Tmax, B] (0 on padded steps) with the coefficients from :meth:`fit`."""
        if self.coeffs is None:
            raise RuntimeError("LinearFeatureBaseline.predict before fit: call fit(obs, returns, mask) first")
        feats = self.features(obs, mask)
        if feats.shape[:-3] != self.coeffs.shape[:-1] or feats.shape[-1] != self.coeffs.shape[-1]:
            raise ValueError(f"baseline was fitted for task shape {tuple(self.coeffs.shape[:-1])} and "
                             f"{self.coeffs.shape[-1]} features, got obs {tuple(obs.shape)}: refit on this batch")
        return (feats * self.coeffs.to(feats.dtype)[..., None, None, :]).sum(-1)

    def __call__(self, obs: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
        """Fit on a batch and return its values, the usual MAML-RL use (fit then predict on the
        same episodes before computing advantages)."""
        return self.fit(obs, returns, mask).predict(obs, mask)
