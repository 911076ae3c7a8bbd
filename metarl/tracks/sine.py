"""Sine-wave regression (Finn et al. 2017 sec. 5.1): the problem, its baselines, its figure.

The method (``algorithm:``, default MAML) learns an MLP 1-40-40-1 on the MSE; two baselines
train in the same loop on the same tasks:
- **pretrain**: the same MLP regressed on every task's points jointly; at evaluation it is
  fine-tuned with SGD, its step size picked on separate validation tasks (as the paper did);
- **oracle**: amplitude and phase as extra inputs; not adapted (its curve is flat).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch

from .. import evaluation
from ..algorithms.base import Problem
from ..algorithms.maml import InnerConfig
from ..config import ConfigError, resumable
from ..evaluation import EvalResult
from ..functional import params_of
from ..objectives import mse
from ..registry import register_track
from ..tasks import sine as sine_tasks
from ..tasks.batch import TaskBatch
from .base import RunConfig
from .supervised import SupervisedTrack
from metarl.policies.mlp import MLP


@dataclass
class ModelConfig:
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    """Hidden layer widths of the MLP (the paper: 40, 40)."""
    activation: Literal["relu", "tanh"] = "relu"
    """Hidden-layer activation."""


@dataclass
class OuterConfig:
    lr: float = 1e-3
    """Adam step size for θ (and for the baselines)."""


@dataclass
class SineEvalExtras:
    query_points: int = 100
    """Query points per evaluation task (the MSE is measured on these)."""
    pretrain_lrs: list[float] = field(default_factory=lambda: [0.001, 0.003, 0.01, 0.02, 0.05, 0.1])
    """Grid for the pretrain baseline's fine-tuning step size, chosen on validation tasks."""
    validation_tasks: int = 100
    """Validation tasks (their own seed stream) on which the pretrain step size is chosen."""
    k_shot: Optional[int] = None
    """Support points at evaluation (null = task.k_shot): test a K=10-trained model with K=5."""


@dataclass
class SineConfig(RunConfig):
    track: str = "sine"
    iterations: int = resumable(70_000, why="length of the run")
    meta_batch: int = 25
    """Tasks per meta-update."""
    torch_threads: int = resumable(1, why="speed only")
    """torch intra-op threads (0: one per core). 1 by default: the sine MLP's ops take microseconds,
    and a second thread only adds synchronisation (benchmarks/sine_speed.py --cli)."""
    task: sine_tasks.SineTaskConfig = field(default_factory=sine_tasks.SineTaskConfig)
    """The task distribution."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The MLP learner."""
    inner: InnerConfig = field(default_factory=InnerConfig)
    """The inner loop of gradient-based methods."""
    outer: OuterConfig = field(default_factory=OuterConfig)
    """The outer optimiser (Adam)."""
    baselines: list[Literal["pretrain", "oracle"]] = field(default_factory=lambda: ["pretrain", "oracle"])
    """Baselines trained in the same loop and drawn on the same curve."""
    sine_eval: SineEvalExtras = resumable(why="evaluation only", default_factory=SineEvalExtras)
    """Sine evaluation settings beyond ``eval``."""

    def validate(self):
        super().validate()
        if self.meta_batch < 1:
            raise ConfigError(f"meta_batch must be >= 1, got {self.meta_batch}")


class SineTrack(SupervisedTrack):
    def __init__(self, cfg: SineConfig):
        mk = lambda d_in: MLP(d_in, 1, cfg.model.hidden, cfg.model.activation)
        n = len(cfg.model.hidden)
        super().__init__(cfg, Problem(track="sine", make_model=lambda: mk(1), loss=mse, metric=mse, metric_name="mse",
                                      higher_is_better=False, head=(f"layers.{n}.weight", f"layers.{n}.bias")))
        self.train_tasks = sine_tasks.SineTasks(cfg.task)
        if "pretrain" in cfg.baselines:
            self.modules["pretrain"] = mk(1)
        if "oracle" in cfg.baselines:
            self.modules["oracle"] = mk(3)
        for k in ("pretrain", "oracle"):
            if k in self.modules:
                self.optimizers[k] = torch.optim.Adam(self.modules[k].parameters(), lr=cfg.outer.lr)

    def baseline_losses(self, batch: TaskBatch, rng):
        x_all = torch.cat([batch.x_support, batch.x_query], 1)
        y_all = torch.cat([batch.y_support, batch.y_query], 1)
        losses = {}
        if "pretrain" in self.modules:
            losses["pretrain"] = mse(self.modules["pretrain"](x_all), y_all).mean()
        if "oracle" in self.modules:
            losses["oracle"] = mse(self.modules["oracle"](sine_tasks.with_task_inputs(x_all, batch.info)), y_all).mean()
        return losses, {}

    # ---- evaluation -------------------------------------------------------------------------
    def eval_batches(self, n: int, seed: int, stream: int = 1):
        k = self.cfg.sine_eval.k_shot or self.cfg.task.k_shot
        dist = sine_tasks.SineTasks(self.cfg.task, k_shot=k, k_query=self.cfg.sine_eval.query_points)
        return [dist.sample(n, np.random.default_rng([seed, stream]))]

    def pretrain_lr(self, steps: int, seed: int) -> tuple[float, dict]:
        """Fine-tuning step size for the pretrain baseline: the grid value with the lowest mean
        MSE over steps 1..K on validation tasks (a stream disjoint from the test tasks)."""
        ev = self.cfg.sine_eval
        val = self.eval_batches(ev.validation_tasks, seed, stream=2)
        m = self.modules["pretrain"]
        score = lambda lr: self.fine_tune_curve(m, params_of(m), val, max(steps, 1), lr)[:, 1:].mean()
        lr, scores = evaluation.choose_step_size(score, ev.pretrain_lrs, higher_is_better=False)
        return lr, evaluation.step_size_record(lr, ev.pretrain_lrs, scores, ev.validation_tasks, "one size for all steps")

    def baseline_curves(self, n: int, steps: int, seed: int):
        curves, sizes = {}, {}
        test = self.eval_batches(n, seed)
        if "pretrain" in self.modules:
            m = self.modules["pretrain"]
            lr, sizes["pretrain"] = self.pretrain_lr(steps, seed)
            curves["pretrain"] = self.fine_tune_curve(m, params_of(m), test, steps, lr)
        if "oracle" in self.modules:
            batch = test[0]
            with torch.no_grad():
                pred = self.modules["oracle"](sine_tasks.with_task_inputs(batch.x_query, batch.info))
                flat = mse(pred, batch.y_query).double().numpy()
            curves["oracle"] = np.repeat(flat[:, None], steps + 1, axis=1)
        return curves, sizes

    def evaluate(self, n_tasks: int, steps: int, seed: int) -> EvalResult:
        result = super().evaluate(n_tasks, steps, seed)
        pre = result.step_sizes.get("pretrain", {}).get("chosen")
        result.figures["sine_fits.png"] = lambda path: self._panels(path, self.eval_batches(n_tasks, seed)[0].task(0), steps, pre)
        return result

    def _panels(self, path, batch: TaskBatch, steps: int, pretrain_lr):
        """Fits of one test task after 0, 1 and K steps: the method's and the pretrain baseline's."""
        from ..plotting import sine_panels

        x_grid = np.linspace(*self.cfg.task.x_range, 200)
        xg = torch.as_tensor(x_grid, dtype=torch.float32)[None, :, None]
        y_true = sine_tasks.targets(batch.info, x_grid[None, :, None])
        grid = TaskBatch(batch.x_support, batch.y_support, xg, torch.as_tensor(y_true, dtype=torch.float32), info=batch.info)
        shown = sorted({0, 1, steps})
        runs = {self.method.name: self.method.predict(grid, steps)}
        if "pretrain" in self.modules:
            m = self.modules["pretrain"]
            from ..algorithms.maml import adapted_predictions
            runs["pretrain"] = adapted_predictions(m, params_of(m), grid, mse, steps=steps, lr=pretrain_lr)
        fits = {name: {s: preds[s][0, :, 0].numpy() for s in shown} for name, preds in runs.items()}
        sine_panels(path, x_grid, y_true[0, :, 0], batch.x_support[0, :, 0].numpy(), batch.y_support[0, :, 0].numpy(), fits)


register_track("sine", kind="supervised", config=SineConfig, cls=SineTrack)
