"""Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning").

MAML with a learned step size per parameter *element*: the inner update is (sec. 3, eq. 3)

    φ = θ − α ∘ ∇_θ L_support(θ),        α has the shape of θ (∘: elementwise product),

and the meta-objective (eq. 4) min_{θ, α} E_T [L_query(φ)] is minimised over θ *and* α by the
outer optimizer (Adam in the paper's experiments, as here). α is not constrained to be positive:
the paper's point (sec. 3.1) is that α ∘ ∇L learns an update *direction* as well as a rate.
α is initialised uniformly at random in ``meta_sgd.init`` (the paper's regression experiment:
[0.005, 0.1], sec. 4.1) or to a constant (``init: [c]``); training uses one inner step
(``inner.steps: 1``, the paper's "one step of adaptation" throughout). ``inner.lr`` is not used:
α replaces it. At evaluation the same learned α is applied at every step of the curve (α was
trained for ``inner.steps`` steps; later steps reuse it, which can overshoot: the curve shows it).

The inner loop, the batched meta-batch and the task workers are MAML's engine
(:func:`metarl.algorithms.maml.meta_backward` with ``lr`` = the α tensors and ``extra`` = α, so
α's meta-gradient flows through the same backward pass as θ's). α lives in its own module
(checkpoint key ``meta_sgd.lrs``) with its own Adam (``meta_sgd.lrs``; ``meta_sgd.lr`` null uses
``outer.lr``, which makes the pair exactly one Adam over (θ, α) as in the paper: Adam is elementwise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..functional import params_of
from ..registry import algorithm
from ..tasks.batch import TaskBatch
from .base import Problem, finite
from .maml import MAML, adapted_predictions, meta_backward, query_metrics


@dataclass
class MetaSGDConfig:
    """Meta-SGD's own settings (config section ``meta_sgd``)."""
    init: list[float] = field(default_factory=lambda: [0.005, 0.1])
    """α's initial values: [low, high] draws every element uniformly (the paper's regression
    setting: [0.005, 0.1]); one value [c] (or low == high) sets every element to c."""
    lr: Optional[float] = None
    """Adam step size for α (null = outer.lr, i.e. one Adam over θ and α as in the paper)."""

    def validate(self):
        vals = list(self.init)
        if len(vals) not in (1, 2) or not all(math.isfinite(v) for v in vals) or vals[0] > vals[-1]:
            raise ConfigError(f"meta_sgd.init must be [low, high] with low <= high or one value [c], e.g. [0.005, 0.1]; got {vals}")
        if self.lr is not None and not (self.lr > 0):
            raise ConfigError(f"meta_sgd.lr must be > 0 or null (= outer.lr), got {self.lr}")


def _key(name: str) -> str:
    return name.replace(".", "__")  # module attribute names may not contain '.'


class StepSizes(nn.Module):
    """α: one learned step size per element of each adapted parameter tensor of θ (eq. 3)."""

    def __init__(self, params: Mapping[str, Tensor], low: float, high: float):
        super().__init__()
        self.names = list(params)
        self.alpha = nn.ParameterDict()
        for name, p in params.items():
            a = torch.empty_like(p.detach())
            if low == high:
                a.fill_(low)
            else:
                a.uniform_(low, high)
            self.alpha[_key(name)] = nn.Parameter(a)

    def as_dict(self, detach: bool = False) -> dict[str, Tensor]:
        """name of θ's tensor → its α (the ``lr`` mapping :func:`metarl.adaptation.adapt` takes)."""
        return {n: (self.alpha[_key(n)].detach() if detach else self.alpha[_key(n)]) for n in self.names}

    def summary(self) -> dict[str, dict[str, float]]:
        """Per tensor: mean / min / max of α and its number of elements (adaptation.json)."""
        out = {}
        for n, a in self.as_dict(detach=True).items():
            a = a.double()
            out[n] = {"mean": a.mean().item(), "min": a.min().item(), "max": a.max().item(), "numel": a.numel()}
        return out


@algorithm("meta_sgd")
class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017, Algorithm 1): θ and α meta-trained together by Adam on the query
    loss after ``inner.steps`` steps φ ← φ − α ∘ ∇L_support(φ) (the paper: one step)."""
    Config = MetaSGDConfig
    defaults = {
        # sec. 4.1: 60,000 meta-iterations of 4 tasks, Adam 0.001, one step, α ~ U[0.005, 0.1]
        "sine": {"iterations": 60_000, "meta_batch": 4, "inner": {"steps": 1}},
        # sec. 4.2: one step (as MAML's 5-way settings otherwise)
        "fewshot": {"inner": {"steps": 1, "eval_steps": 3}},
    }

    def __init__(self, problem: Problem, cfg):
        super().__init__(problem, cfg)
        own = self.own
        low, high = float(own.init[0]), float(own.init[-1])
        theta = params_of(self.model)
        only = cfg.inner.only
        adapted = {n: p for n, p in theta.items() if only is None or n in set(only)}
        self.lrs = StepSizes(adapted, low, high)
        self.modules[f"{self.name}.lrs"] = self.lrs
        self.optimizers[f"{self.name}.lrs"] = torch.optim.Adam(self.lrs.parameters(), lr=own.lr or cfg.outer.lr)

    def inner_kwargs(self) -> dict:
        kw = super().inner_kwargs()
        kw["lr"] = self.lrs.as_dict()
        return kw

    def meta_backward(self, batch: TaskBatch) -> Tensor:
        """Accumulate ∇θ and ∇α of the mean query loss after adaptation into their ``.grad``
        (eq. 4); returns the query predictions (detached)."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        return meta_backward(self.model, params_of(self.model), batch, self.problem.loss,
                             extra=list(self.lrs.parameters()), **self.inner_kwargs())

    def train_step(self, batch: TaskBatch, iteration: int) -> dict[str, float]:
        preds = self.meta_backward(batch)
        metrics = query_metrics(self.name, self.problem, preds, batch)
        alphas = torch.cat([a.detach().flatten() for a in self.lrs.parameters()])
        metrics["step/alpha_mean"] = alphas.mean().item()
        metrics["step/alpha_abs_max"] = alphas.abs().max().item()
        if finite(metrics):
            for opt in self.optimizers.values():
                opt.step()
        return metrics

    def predict(self, batch: TaskBatch, steps: int) -> list[Tensor]:
        """Query predictions after 0..steps steps of φ ← φ − α ∘ ∇L_support(φ) with the learned α."""
        return adapted_predictions(self.model, params_of(self.model), batch, self.problem.loss, steps=steps,
                                   lr=self.lrs.as_dict(detach=True), only=self.cfg.inner.only)

    def step_sizes(self) -> dict:
        return {"inner_lr": "learned per element (Meta-SGD)", "trained_steps": self.cfg.inner.steps,
                "alpha": self.lrs.summary()}
