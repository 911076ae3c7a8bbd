"""Diagonal-Gaussian MLP policy for continuous control (the MAML locomotion policy).

Finn et al. (2017, sec. 5.3) use a policy whose mean is a 2×100 ReLU MLP and whose standard
deviation is a learned, state-independent vector, the rllab ``GaussianMLPPolicy`` (Duan et al.
2016). The mean network is a :class:`policies.mlp.MLP` held as the sub-module ``mean``, so the
parameter names are stable and meaningful to the functional engine::

    mean.layers.0.weight, mean.layers.0.bias, ..., mean.layers.{L}.bias, log_std

The module returns the distribution's *parameters* ``(mean, log_std)``, never a
``torch.distributions`` object: the losses (:mod:`metarl.objectives`) and the rollout code need
only these two tensors, they stack over a leading task axis without ceremony, and the pure
functions below (:func:`log_prob`, :func:`entropy`, :func:`sample`, :func:`distribution`) are the
one place that turns them into probabilities. ``metarl.objectives.gaussian_kl`` is the matching KL.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Independent, Normal

from .mlp import MLP

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
INITS = ("torch", "xavier")  # nn.Linear's default (Kaiming-uniform) or Xavier-uniform weights with zero biases


class GaussianMLPPolicy(nn.Module):
    """π(a | s) = N(μ_θ(s), diag(σ²)) with μ an MLP and log σ a free parameter of size act_dim.

    ``min_std`` floors σ (rllab's ``min_std``; pytorch-maml-rl clamps the same way) so that a
    policy that grows too confident cannot produce infinite log-probabilities; the floor is a
    clamp on ``log_std`` and therefore has zero gradient once reached, as in those references.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (100, 100),
                 activation: str = "relu", init_std: float = 1.0, min_std: float = 1e-6, init: str = "torch"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init '{init}': choose one of {INITS}")
        if init_std <= 0 or min_std <= 0:
            raise ValueError(f"init_std ({init_std}) and min_std ({min_std}) must be > 0: pass positive standard deviations")
        if init_std < min_std:
            raise ValueError(f"init_std {init_std} is below min_std {min_std}: raise init_std or lower min_std")
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.mean = MLP(obs_dim, act_dim, hidden=hidden, activation=activation)
        if init == "xavier":  # the MAML paper's code (rllab) and pytorch-maml-rl: Xavier weights, zero biases
            for layer in self.mean.layers:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(init_std)))
        self.min_log_std = math.log(min_std)

    def _clamped(self, log_std: Tensor) -> Tensor:
        return log_std.clamp(min=self.min_log_std)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """obs [..., obs_dim] → (mean [..., act_dim], log_std [act_dim]); log_std broadcasts
        against the mean. Use through :func:`metarl.functional.forward` to run with fast weights."""
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(f"observation has {obs.shape[-1]} features, policy expects {self.obs_dim}: check obs_dim")
        return self.mean(obs), self._clamped(self.log_std)

    def forward_tasks(self, params: Mapping[str, Tensor], obs: Tensor) -> tuple[Tensor, Tensor]:
        """Per-task weights in one batched call (see :func:`metarl.functional.forward_tasks`).

        ``params`` are stacked with a leading task axis T (``metarl.functional.stack``), ``obs`` is
        [T, ..., obs_dim] (e.g. [T, Tmax, B, obs_dim]). Returns mean [T, ..., act_dim] and
        log_std [T, 1, ..., 1, act_dim], which broadcasts against the mean."""
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(f"observation has {obs.shape[-1]} features, policy expects {self.obs_dim}: check obs_dim")
        log_std = params["log_std"]
        if log_std.dim() != 2 or log_std.shape[0] != obs.shape[0]:
            raise ValueError(f"forward_tasks needs stacked params (log_std [T, act_dim]) matching obs [T, ...]; got log_std "
                             f"{tuple(log_std.shape)} and obs {tuple(obs.shape)}: stack them with metarl.functional.stack(params, T)")
        prefix = "mean."
        mean_params = {name[len(prefix):]: p for name, p in params.items() if name.startswith(prefix)}
        mean = self.mean.forward_tasks(mean_params, obs)
        log_std = self._clamped(log_std).reshape(log_std.shape[0], *([1] * (obs.dim() - 2)), log_std.shape[-1])
        return mean, log_std


def log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """log N(a; μ, diag σ²), summed over the action axis: [..., act_dim] → [...].

    Written out (rather than via ``torch.distributions``) so it broadcasts a state-independent
    log_std against any batch shape and stays twice differentiable in μ and log σ for MAML."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - _HALF_LOG_2PI).sum(-1)


def entropy(log_std: Tensor) -> Tensor:
    """Differential entropy of the diagonal Gaussian, Σ_i (½ + ½ log 2π + log σ_i): [..., act_dim] → [...]."""
    return (log_std + 0.5 + _HALF_LOG_2PI).sum(-1)


def sample(mean: Tensor, log_std: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """a = μ + σ ⊙ ε with ε ~ N(0, I) drawn from ``generator`` (reproducible rollouts). Shape of
    ``mean`` broadcast with ``log_std``; the result is detached (actions are data, not a function
    of θ: the policy gradient flows through :func:`log_prob`, not through the sample)."""
    with torch.no_grad():
        mean, log_std = torch.broadcast_tensors(mean, log_std)
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + torch.exp(log_std) * eps


def distribution(mean: Tensor, log_std: Tensor) -> Independent:
    """The same Gaussian as a ``torch.distributions`` object (event = the action axis), for code
    that wants ``.log_prob``/``.entropy``/``kl_divergence``."""
    mean, log_std = torch.broadcast_tensors(mean, log_std)
    return Independent(Normal(mean, torch.exp(log_std)), 1)
