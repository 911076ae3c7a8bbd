"""The supervised tracks' shared training step and evaluation (sine and few-shot: the horizon-1
case of meta-RL, Finn et al. 2017 Algorithm 2).

A supervised track supplies the problem (:class:`metarl.algorithms.base.Problem`), a task
distribution for training (``sample(n, rng) -> TaskBatch``), fixed evaluation batches, and its
baselines; the method named by ``algorithm:`` does the learning. One meta-iteration: sample a
meta-batch, let the method take its outer step, then step the baselines on the same iteration's
data, so one checkpoint holds the whole comparison and resume is exact for all of it. Under
torchrun every rank samples the whole meta-batch, the method learns on the rank's share
(:func:`metarl.distributed.sharded_train_step`), and every rank steps the baselines, cheap next
to the method, on the whole batch alike.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
from torch import Tensor

from .. import distributed, evaluation, registry
from ..algorithms.base import Problem, finite
from ..algorithms.maml import adapted_predictions
from ..evaluation import EvalResult
from ..tasks.batch import TaskBatch, TaskDistribution
from .base import Track


class SupervisedTrack(Track):
    train_tasks: TaskDistribution

    def __init__(self, cfg, problem: Problem):
        super().__init__(cfg)
        self.problem = problem
        self.method = registry.find_algorithm(cfg.algorithm, cfg.track)(problem, cfg)
        self.model = getattr(self.method, "model", None)
        self.modules.update(self.method.modules)
        self.optimizers.update(self.method.optimizers)

    # ---- training -------------------------------------------------------------------------
    def train_step(self, iteration: int, rng: np.random.Generator) -> dict[str, float]:
        batch = self.train_tasks.sample(self.cfg.meta_batch, rng)  # the whole meta-batch, on every rank
        metrics = distributed.sharded_train_step(self.method, batch, iteration)  # the method on this rank's share
        losses, extra = self.baseline_losses(batch, rng)
        metrics.update(extra)
        metrics.update({f"loss/{k}": v.item() for k, v in losses.items()})
        if finite(metrics):  # else the loop stops the run before any step touches a baseline
            self.step_baselines(losses)
        return metrics

    def baseline_losses(self, batch: TaskBatch, rng: np.random.Generator) -> tuple[dict[str, Tensor], dict[str, float]]:
        """(losses of the baselines trained in the loop, extra metrics); none by default."""
        return {}, {}

    # ---- evaluation -----------------------------------------------------------------------
    def eval_batches(self, n: int, seed: int, stream: int = 1) -> Iterable[TaskBatch]:
        """The fixed evaluation tasks of ``seed`` (stream 1: test, 2: validation), in chunks."""
        raise NotImplementedError

    def fine_tune_curve(self, model, start: dict, batches: Iterable[TaskBatch], steps: int, lr: float, only=None) -> np.ndarray:
        """A baseline's curve: ``steps`` SGD steps of size ``lr`` from ``start`` (fine-tuning)."""
        loss = self.problem.loss
        return evaluation.curve(lambda b: adapted_predictions(model, start, b, loss, steps=steps, lr=lr, only=only),
                                batches, self.problem.metric)

    def baseline_curves(self, n: int, steps: int, seed: int) -> tuple[dict[str, np.ndarray], dict]:
        """(baseline curves on the same test tasks, their step-size records); none by default."""
        return {}, {}

    def evaluate(self, n_tasks: int, steps: int, seed: int) -> EvalResult:
        m, p = self.method, self.problem
        curves = {m.name: evaluation.curve(lambda b: m.predict(b, steps), self.eval_batches(n_tasks, seed), p.metric)}
        sizes = {m.name: m.step_sizes()} if m.step_sizes() else {}
        more, more_sizes = self.baseline_curves(n_tasks, steps, seed)
        curves.update(more)
        sizes.update(more_sizes)
        return EvalResult(p.metric_name, p.higher_is_better, curves, step_sizes=sizes, algorithm=m.name,
                          curve_axis=m.curve_axis)
