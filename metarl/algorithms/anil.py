"""ANIL, "Almost No Inner Loop" (Raghu, Raghu, Bengio & Vinyals 2020, "Rapid Learning or Feature
Reuse? Towards Understanding the Effectiveness of MAML", sec. 4).

MAML with the inner loop restricted to the network's head (the output layer, ``problem.head``):

    φ_head = θ_head − α ∇_head L_support(θ_body, θ_head)   (k steps; the body is never adapted)
    θ ← θ − β ∇_θ mean_i L_query(θ_body, φ_head,i)          (the body is learned by the outer loop alone)

The paper's finding (sec. 3-4): MAML's inner loop barely changes the body anyway (feature reuse),
so removing it from the body keeps the accuracy (Omniglot 20-way 1-shot 96.2%, 5-shot 98.0%) at a
fraction of the cost. The second-order terms that remain are the head's: the meta-gradient still
reaches the body through the support features the head's inner steps depend on, and through the
query features.

Why it is much cheaper here, not just ``only=head``: the body does not change during the inner
loop, so each task's support and query features are computed ONCE (Conv4 ``features_tasks`` /
the MLP's hidden layers), and every inner step (forward, gradient, and for the outer gradient its
double backward) runs on the linear head alone, [T, N, F] × [F, n_way]. The full-network path
(``anil.features_once: false``; MAML with ``inner.only`` = the head) recomputes the body at every
inner step and differentiates the inner gradient through it; tests/test_anil.py checks both give
the same meta-gradient to 1e-10 in float64. Measured (benchmarks/anil_speed.py, random
Omniglot-sized 5-way 1-shot episodes, Conv4 64 filters, meta-batch 32, second order, one torch
thread, medians of 3 interleaved repeats on a 2-core machine shared by 8 jobs, load ~35, so
absolute seconds are inflated and ratios are rough): with 1 inner step MAML 10.1 s per
meta-iteration, ANIL 3.9 s (2.6x cheaper); MAML with ``only=head`` through the full network
3.4 s, i.e. at ONE step the two head-only paths cost the same (both run the body forward once
per set and backward once; the difference is noise). With 5 inner steps (2 repeats): MAML 52.9 s,
full-network head-only 15.1 s, ANIL 5.3 s: 9.9x cheaper than MAML, 2.8x than ``only=head``. The
fast path's advantage is per extra inner step: each costs a [T, N, F] x [F, n_way] product here instead of a body forward, a body
backward and a double backward, so ANIL's cost is nearly flat in ``inner.steps`` while MAML's
(and full-network head-only) grow linearly.

Evaluation adapts the head on the fixed support features (``inner.eval_steps`` steps of size
``inner.lr``), the query features scored after each step: a 0..K curve for the price of two body
forward passes. Hyper-parameters are MAML's (the paper reuses them): the ``inner`` section means
what it means for MAML, with ``inner.only`` fixed to the head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..adaptation import adapt, trajectory
from ..config import ConfigError
from ..functional import params_of, stack
from ..registry import algorithm
from ..tasks.batch import TaskBatch
from .base import PerTaskLoss, Problem
from .maml import MAML, query_predictions


@dataclass
class ANILConfig:
    """ANIL's own settings (config section ``anil``); the inner loop is the ``inner`` section."""
    features_once: bool = True
    """Compute the body's support and query features once per task and run the inner loop on the
    head alone (fast); false: the full network at every inner step with only the head adapted
    (MAML with ``only`` = head: the reference, same numbers)."""


def _head_names(head: Sequence[str]) -> tuple[str, str]:
    """(weight, bias) names of a linear output layer."""
    w = [n for n in head if n.endswith("weight")]
    b = [n for n in head if n.endswith("bias")]
    if len(w) != 1 or len(b) != 1 or len(head) != 2:
        raise ConfigError(f"anil: the problem's head {tuple(head)} is not one linear layer (weight, bias): "
                          f"set anil.features_once=false to adapt it through the full network")
    return w[0], b[0]


def linear_head(params: Mapping[str, Tensor], feats: Tensor, names: tuple[str, str]) -> Tensor:
    """Per-task output layer: feats [T, N, F] with weight [T, out, F], bias [T, out] → [T, N, out]."""
    w, b = params[names[0]], params[names[1]]
    return torch.baddbmm(b.unsqueeze(1), feats, w.transpose(1, 2))


def features(model: nn.Module, params: Mapping[str, Tensor], head: Sequence[str], x: Tensor) -> Tensor:
    """The body's features [T, N, F] of x [T, N, ...] under θ_body (stacked once per task)."""
    body = {n: p for n, p in params.items() if n not in head}
    return model.features_tasks(stack(body, x.shape[0]), x)


def head_query_predictions(model: nn.Module, params: Mapping[str, Tensor], batch: TaskBatch, loss: PerTaskLoss, *,
                           steps: int, lr, first_order: bool = False, only=None, batched: bool = True) -> Tensor:
    """ANIL's query predictions [T, Nq, ...], differentiable in θ (body and head): the body's
    features of support and query once, then ``steps`` inner steps on the head alone. Same
    signature as :func:`metarl.algorithms.maml.query_predictions` (``only`` = the head's names)."""
    names = _head_names(only)
    f_s = features(model, params, only, batch.x_support)  # separate calls: each set keeps its own
    f_q = features(model, params, only, batch.x_query)    # batch-norm statistics (transductive)
    head = stack({n: params[n] for n in names}, batch.n_tasks)
    phi = adapt(lambda h: loss(linear_head(h, f_s, names), batch.y_support).sum(), head, steps=steps, lr=lr,
                first_order=first_order)
    return linear_head(phi, f_q, names)


@algorithm("anil")
class ANIL(MAML):
    """ANIL (Raghu et al. 2020): MAML whose inner loop adapts only ``problem.head``; everything else
    (outer Adam, first_order, task workers, evaluation contract) is MAML's."""
    Config = ANILConfig

    def __init__(self, problem: Problem, cfg):
        super().__init__(problem, cfg)
        only = cfg.inner.only
        if only is not None and set(only) != set(problem.head):
            raise ConfigError(f"anil adapts exactly the head {list(problem.head)}: drop inner.only (got {only})")
        self.fast = self.own.features_once and hasattr(self.model, "features_tasks")
        if self.fast:
            _head_names(problem.head)

    def inner_kwargs(self) -> dict:
        kw = super().inner_kwargs()
        kw["only"] = list(self.problem.head)
        if self.fast:
            kw["predictions"] = head_query_predictions
        return kw

    def query_predictions(self, batch: TaskBatch, params=None) -> Tensor:
        """Query predictions after the training inner loop (for tests and tools), differentiable in θ."""
        kw = self.inner_kwargs()
        kw.pop("workers")
        predict = kw.pop("predictions", query_predictions)
        return predict(self.model, params if params is not None else params_of(self.model), batch, self.problem.loss, **kw)

    def predict(self, batch: TaskBatch, steps: int) -> list[Tensor]:
        lr, head = self.cfg.inner.lr, list(self.problem.head)
        if not self.fast:
            from .maml import adapted_predictions
            return adapted_predictions(self.model, params_of(self.model), batch, self.problem.loss, steps=steps, lr=lr, only=head)
        names = _head_names(head)
        with torch.no_grad():
            theta = {n: p.detach() for n, p in params_of(self.model).items()}
            f_s = features(self.model, theta, head, batch.x_support)
            f_q = features(self.model, theta, head, batch.x_query)
        phis = trajectory(lambda h: self.problem.loss(linear_head(h, f_s, names), batch.y_support).sum(),
                          stack({n: theta[n] for n in names}, batch.n_tasks), steps, lr=lr)
        with torch.no_grad():
            return [linear_head(phi, f_q, names) for phi in phis]

    def step_sizes(self) -> dict:
        return {"inner_lr": self.cfg.inner.lr, "adapted": list(self.problem.head)}
