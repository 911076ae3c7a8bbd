"""MAML and first-order MAML for supervised tasks (Finn et al. 2017, Algorithm 2).

The outer objective is the mean over tasks of the query loss at the adapted weights φ_i; its
gradient with respect to θ flows through :func:`metarl.adaptation.adapt` (second order) or treats
the inner gradients as constants (``first_order``, sec. 5.2). Two paths compute the same numbers:
- ``batched`` (default): θ is stacked once per task and the whole meta-batch is adapted with one
  forward and one backward pass (``metarl.functional.forward_tasks``);
- the per-task loop, kept as the reference and as the fallback for models whose tasks cannot share
  one batched call (tests/test_maml.py checks they agree).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..adaptation import adapt, trajectory
from ..config import resumable
from ..functional import Params, forward, forward_tasks, params_of, stack
from ..registry import algorithm
from ..tasks.batch import TaskBatch
from ..threads import resolve_workers, task_pool
from .base import Method, PerTaskLoss, Problem, finite


@dataclass
class InnerConfig:
    """The inner loop (config section ``inner``)."""
    lr: float = 0.01
    """Inner step size α (sine: 0.01, Omniglot 5-way: 0.4)."""
    steps: int = 1
    """Inner gradient steps during meta-training."""
    eval_steps: int = resumable(10, why="evaluation only")
    """Inner steps recorded by ``metarl evaluate`` (the adaptation curve's x axis)."""
    first_order: bool = False
    """First-order MAML: drop the second-order terms (Finn et al. 2017 sec. 5.2)."""
    only: Optional[list[str]] = None
    """Adapt only these parameters (e.g. the head); null adapts all."""
    batched: bool = True
    """One batched pass over the meta-batch (fast) instead of a per-task loop (reference)."""
    task_workers: int = 1
    """Threads that each adapt and backpropagate a contiguous share of the meta-batch, one torch
    thread apiece (0: one per torch thread, so both cores here; 1: all in the calling thread).
    Speed only: the meta-gradient is the same sum (tests/test_conv_meta_gradient.py). Pays off for
    conv nets (Omniglot: the few-shot default is 0); the sine MLP's microsecond ops keep 1."""

    def training_kwargs(self) -> dict:
        """Keyword arguments of :func:`meta_backward` for one meta-training step."""
        return {"steps": self.steps, "lr": self.lr, "first_order": self.first_order, "only": self.only,
                "batched": self.batched, "workers": self.task_workers}

    def validate(self):
        from ..config import in_range
        in_range("inner.lr", self.lr, 0, open_low=True)
        in_range("inner.steps", self.steps, 0, 10_000), in_range("inner.eval_steps", self.eval_steps, 0, 10_000)
        in_range("inner.task_workers", self.task_workers, 0, 1_024)


def _task_losses(model: nn.Module, loss: PerTaskLoss):
    def support_sum(x, y):
        return lambda p: loss(forward_tasks(model, p, x), y).sum()
    return support_sum


def query_predictions(model: nn.Module, params: Mapping[str, Tensor], batch: TaskBatch, loss: PerTaskLoss, *,
                      steps: int, lr, first_order: bool = False, only=None, batched: bool = True) -> Tensor:
    """Model outputs on each task's query set after ``steps`` inner steps on its support set:
    [T, Nq, ...], differentiable in θ."""
    if batched:
        stacked = stack(params, batch.n_tasks)
        phi = adapt(lambda p: loss(forward_tasks(model, p, batch.x_support), batch.y_support).sum(),
                    stacked, steps=steps, lr=lr, first_order=first_order, only=only)
        return forward_tasks(model, phi, batch.x_query)
    out = []
    for i in range(batch.n_tasks):
        xs, ys = batch.x_support[i], batch.y_support[i]
        phi = adapt(lambda p: loss(forward(model, p, xs)[None], ys[None]).sum(),
                    params, steps=steps, lr=lr, first_order=first_order, only=only)
        out.append(forward(model, phi, batch.x_query[i]))
    return torch.stack(out)


def query_losses(model: nn.Module, params: Mapping[str, Tensor], batch: TaskBatch, loss: PerTaskLoss, **inner) -> Tensor:
    """Query loss of each task after adaptation: [T], differentiable in θ (MAML's outer objective
    is its mean). ``inner``: steps, lr, first_order, only, batched as in :func:`query_predictions`."""
    return loss(query_predictions(model, params, batch, loss, **inner), batch.y_query)


def meta_backward(model: nn.Module, params: Mapping[str, Tensor], batch: TaskBatch, loss: PerTaskLoss, *,
                  workers: int = 1, predictions: Callable = query_predictions, extra: Sequence[Tensor] = (),
                  objective: Optional[Callable[[TaskBatch], tuple[Tensor, Tensor]]] = None,
                  **inner) -> Tensor:
    """Accumulate ∇θ of MAML's outer objective (the mean query loss over the meta-batch) into the
    ``.grad`` of ``params`` (leaf tensors, e.g. a module's parameters), as
    ``query_losses(...).mean().backward()`` would, and return the query predictions, detached.

    ``workers`` > 1 (0: one per torch thread, :func:`metarl.threads.resolve_workers`) cuts the
    meta-batch into that many contiguous shards; each is adapted and backpropagated on its own
    thread (:func:`metarl.threads.task_pool`), and the shards' gradients are added in shard order,
    so the result does not depend on which thread finishes first. Tasks are independent given θ,
    so this is the same gradient, regrouped: a sum of per-shard sums instead of one sum.
    ``inner``: steps, lr, first_order, only, batched as in :func:`query_predictions`;
    ``predictions`` (same signature) replaces it for a method that adapts another way (ANIL's
    head-only inner loop on features computed once, ``anil.py``); ``extra``: further leaf tensors
    the outer objective depends on through ``inner`` (learned step sizes passed as ``lr``:
    Meta-SGD's α, Alpha MAML's α), whose ``.grad`` is accumulated too.

    ``objective(part) -> (query predictions, per-task outer loss [T])`` replaces MAML's query
    loss for methods that adapt or score another way (MAML++'s multi-step loss); ``params`` (and
    ``extra``) then hold every meta-parameter it uses, and ``inner`` is not read."""
    tensors = [p for p in params.values() if p.requires_grad] + [t for t in extra if t.requires_grad]
    n = batch.n_tasks
    shards = resolve_workers(workers, n)
    bounds = [(i * n // shards, (i + 1) * n // shards) for i in range(shards)]

    def shard(bound):
        part = batch.tasks(*bound)
        if objective is None:
            preds = predictions(model, params, part, loss, **inner)
            per_task = loss(preds, part.y_query)
        else:
            preds, per_task = objective(part)
        total = per_task.sum() / n
        return preds.detach(), torch.autograd.grad(total, tensors, allow_unused=True)

    results = [shard(bounds[0])] if shards == 1 else list(task_pool(shards).map(shard, bounds))
    for i, p in enumerate(tensors):
        parts = [grads[i] for _, grads in results if grads[i] is not None]
        if parts:
            g = sum(parts[1:], parts[0])
            p.grad = g if p.grad is None else p.grad + g
    return torch.cat([preds for preds, _ in results])


def adapted_predictions(model: nn.Module, params: Mapping[str, Tensor], batch: TaskBatch, loss: PerTaskLoss, *,
                        steps: int, lr, only=None) -> list[Tensor]:
    """Query predictions after 0..steps inner steps, per task: steps + 1 tensors [T, Nq, ...]
    (evaluation: no outer graph; the adaptation curve is the metric on each)."""
    stacked = stack({k: v.detach() for k, v in params.items()}, batch.n_tasks)
    phis = trajectory(lambda p: loss(forward_tasks(model, p, batch.x_support), batch.y_support).sum(),
                      stacked, steps, lr=lr, only=only)
    with torch.no_grad():
        return [forward_tasks(model, phi, batch.x_query) for phi in phis]


@algorithm("maml")
class MAML(Method):
    """MAML (Finn et al. 2017, Algorithm 2): θ is the model's initial weights; a task adapts by
    ``inner.steps`` SGD steps of size ``inner.lr`` on its support loss; Adam (``outer.lr``)
    minimises the mean query loss at φ, differentiated through the inner steps (second order)
    unless ``inner.first_order``. It owns nothing beyond θ."""
    first_order = False

    def __init__(self, problem: Problem, cfg):
        super().__init__(problem, cfg)
        self.model = problem.make_model()
        self.modules[self.name] = self.model
        self.optimizers[self.name] = torch.optim.Adam(self.model.parameters(), lr=cfg.outer.lr)

    def inner_kwargs(self) -> dict:
        kw = self.cfg.inner.training_kwargs()
        kw["first_order"] = kw["first_order"] or self.first_order
        return kw

    def train_step(self, batch: TaskBatch, iteration: int) -> dict[str, float]:
        opt = self.optimizers[self.name]
        opt.zero_grad(set_to_none=True)  # meta_backward accumulates into .grad; the step waits for the finiteness check
        preds = meta_backward(self.model, params_of(self.model), batch, self.problem.loss, **self.inner_kwargs())
        metrics = query_metrics(self.name, self.problem, preds, batch)
        if finite(metrics):
            opt.step()
        return metrics

    def predict(self, batch: TaskBatch, steps: int) -> list[Tensor]:
        i = self.cfg.inner
        return adapted_predictions(self.model, params_of(self.model), batch, self.problem.loss, steps=steps, lr=i.lr, only=i.only)

    def step_sizes(self) -> dict:
        return {"inner_lr": self.cfg.inner.lr}


def query_metrics(name: str, problem: Problem, preds: Tensor, batch: TaskBatch) -> dict[str, float]:
    """The training metrics of a meta-batch's query predictions: ``loss/<name>`` and, for
    classification, ``accuracy/<name>``."""
    out = {f"loss/{name}": problem.loss(preds, batch.y_query).mean().item()}
    if problem.higher_is_better:
        out[f"{problem.metric_name}/{name}"] = problem.metric(preds, batch.y_query).mean().item()
    return out
