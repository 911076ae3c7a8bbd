"""R2-D2: ridge regression as a differentiable closed-form head (Bertinetto, Henriques, Torr &
Vedaldi 2019, "Meta-learning with differentiable closed-form solvers", ICLR; sec. 3).

Per episode, the support embeddings X = f_θ(x_S) [n, D] are regressed onto one-hot targets
Y [n, K] by ridge regression, solved in closed form; with the Woodbury identity the system is the
size of the support set, not of the feature dimension (sec. 3.2):

    W = (XᵀX + λI_D)⁻¹ XᵀY = Xᵀ (XXᵀ + λI_n)⁻¹ Y,

and the query logits are α · X_q W + β with learned scalars: the regulariser λ (here
log-parametrised, λ = exp(log λ) > 0) and a scale α and offset β that calibrate the regression
outputs for the softmax cross-entropy. The embedding is meta-learned through the solve (a batched
Cholesky factorisation of XXᵀ + λI, positive definite for λ > 0), every task of the meta-batch at
once. :func:`ridge_fit` picks the smaller of the two equal systems (n×n dual or D×D primal), so a
60-way 5-shot episode on a 256-dimensional embedding solves 256×256, not 300×300.

Note on β: a scalar added to every class's logit cancels in the softmax, so under the
cross-entropy its gradient is zero up to float rounding; Adam normalises that rounding noise into
steps of about ``outer.lr``, so β wanders a little without changing any prediction. It is kept
because the paper states it (it matters for their logistic-regression variant).

Differences from the paper's setting: their embedding is a wider 4-block CNN (96-192-384-512
filters, features of the last two blocks concatenated, dropout); this one is the toolkit's Conv4.
Few-shot classification only (the ridge head could regress sine targets, but the sine MLP has no
trunk/feature split; ``__init__`` raises a ConfigError there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..registry import algorithm
from .protonet import EmbeddingHead, EpisodeOverrides, one_hot


def ridge_fit(X: Tensor, Y: Tensor, lam: Tensor | float) -> Tensor:
    """Ridge weights W [T, D, K] = Xᵀ(XXᵀ + λI)⁻¹Y (= (XᵀX + λI)⁻¹XᵀY) for X [T, n, D], Y [T, n, K],
    batched over tasks and differentiable in X and λ; solves whichever system is smaller."""
    n, d = X.shape[-2:]
    if n <= d:  # Woodbury / dual form: n×n
        gram = X @ X.transpose(-1, -2)
        eye = torch.eye(n, dtype=X.dtype)
        L = torch.linalg.cholesky(gram + lam * eye)
        return X.transpose(-1, -2) @ torch.cholesky_solve(Y, L)
    gram = X.transpose(-1, -2) @ X  # primal form: D×D
    L = torch.linalg.cholesky(gram + lam * torch.eye(d, dtype=X.dtype))
    return torch.cholesky_solve(X.transpose(-1, -2) @ Y, L)


def ridge_logits(zs: Tensor, ys: Tensor, zq: Tensor, n_way: int, lam: Tensor | float) -> Tensor:
    """X_q W: the ridge regression of one-hot support labels, evaluated on the queries [T, Nq, K]."""
    return zq @ ridge_fit(zs, one_hot(ys, n_way, zs.dtype), lam)


class RidgeHead(nn.Module):
    """R2-D2's meta-parameters: log λ, α, β (scalars)."""

    def __init__(self, lam: float, scale: float, bias: float):
        super().__init__()
        self.log_lambda = nn.Parameter(torch.tensor(math.log(lam)))
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    @property
    def lam(self) -> Tensor:
        return self.log_lambda.exp()


@dataclass
class R2D2Config(EpisodeOverrides):
    """R2-D2 (config section ``r2d2``)."""
    lambda_init: float = 1.0
    """Initial ridge regulariser λ (learned, log-parametrised; Bertinetto et al.'s code starts at 1)."""
    scale_init: float = 1.0
    """Initial logit scale α (learned)."""
    bias_init: float = 0.0
    """Initial logit offset β (learned; cancels in the softmax, see the module docstring)."""

    def validate(self):
        super().validate()
        if not self.lambda_init > 0:
            raise ConfigError(f"r2d2.lambda_init must be > 0 (it is log-parametrised), got {self.lambda_init}")


@algorithm("r2d2")
class R2D2(EmbeddingHead):
    """R2-D2 (Bertinetto et al. 2019): α · X_q Xᵀ(XXᵀ + λI)⁻¹Y + β on the Conv4 embedding."""
    Config = R2D2Config

    def build_head(self):
        c = self.own
        return RidgeHead(c.lambda_init, c.scale_init, c.bias_init)

    def logits(self, zs, ys, zq, n_way, training):
        h = self.head
        return h.scale * ridge_logits(zs, ys, zq, n_way, h.lam) + h.bias

    def step_sizes(self) -> dict:
        h = self.head
        return {"lambda": h.lam.item(), "scale": h.scale.item(), "bias": h.bias.item()}
