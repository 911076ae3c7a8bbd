"""Sine-wave regression with MAML, the pretrain baseline and the oracle (Finn et al. 2017 sec. 5.1).

All three models train in the same loop on the same tasks, so one checkpoint holds the whole
comparison and resume is exact for all of them:
- **maml**: MLP 1-40-40-1, adapted by ``inner.steps`` SGD steps, Adam on the post-update query MSE;
- **pretrain**: the same MLP regressed on every task's points jointly; at evaluation it is
  fine-tuned like MAML, with its step size picked on separate validation tasks (as the paper did);
- **oracle**: amplitude and phase as extra inputs; not adapted (its curve is flat).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch

from ..algorithms.maml import InnerConfig, adaptation_curve, meta_backward
from ..config import ConfigError, register_track
from ..evaluation import EvalResult
from ..functional import forward, params_of
from ..objectives import mse
from ..tasks import sine as sine_tasks
from .base import RunConfig, Track
from metarl.policies.mlp import MLP


@dataclass
class ModelConfig:
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    activation: Literal["relu", "tanh"] = "relu"


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
    k_shot: Optional[int] = None
    """Support points at evaluation (null = task.k_shot): test a K=10-trained model with K=5."""


@register_track("sine")
@dataclass
class SineConfig(RunConfig):
    track: str = "sine"
    iterations: int = 70_000
    meta_batch: int = 25
    task: sine_tasks.SineTaskConfig = field(default_factory=sine_tasks.SineTaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    baselines: list[Literal["pretrain", "oracle"]] = field(default_factory=lambda: ["pretrain", "oracle"])
    sine_eval: SineEvalExtras = field(default_factory=SineEvalExtras)

    def validate(self):
        super().validate()
        if self.meta_batch < 1:
            raise ConfigError(f"meta_batch must be >= 1, got {self.meta_batch}")


class SineTrack(Track):
    def __init__(self, cfg: SineConfig):
        super().__init__(cfg)
        mk = lambda d_in: MLP(d_in, 1, cfg.model.hidden, cfg.model.activation)
        self.model = mk(1)
        self.modules["maml"] = self.model
        if "pretrain" in cfg.baselines:
            self.modules["pretrain"] = mk(1)
        if "oracle" in cfg.baselines:
            self.modules["oracle"] = mk(3)
        self.optimizers = {k: torch.optim.Adam(m.parameters(), lr=cfg.outer.lr) for k, m in self.modules.items()}

    def train_step(self, iteration: int, rng: np.random.Generator) -> dict[str, float]:
        cfg = self.cfg
        tasks = sine_tasks.sample_tasks(cfg.task, cfg.meta_batch, rng)
        batch = sine_tasks.make_batch(cfg.task, tasks, cfg.task.k_shot, cfg.task.k_query, rng)
        self.optimizers["maml"].zero_grad(set_to_none=True)
        preds = meta_backward(self.model, params_of(self.model), batch, mse, **cfg.inner.training_kwargs())
        losses = {"maml": mse(preds, batch.y_query).mean()}
        x_all = torch.cat([batch.x_support, batch.x_query], 1)
        y_all = torch.cat([batch.y_support, batch.y_query], 1)
        if "pretrain" in self.modules:
            losses["pretrain"] = mse(self.modules["pretrain"](x_all), y_all).mean()
        if "oracle" in self.modules:
            losses["oracle"] = mse(self.modules["oracle"](sine_tasks.with_task_inputs(x_all, tasks)), y_all).mean()
        metrics = {f"loss/{k}": v.item() for k, v in losses.items()}
        if all(np.isfinite(list(metrics.values()))):  # else the loop stops the run before any step touches θ
            self.step_optimizers(losses)
        return metrics

    # ---- evaluation -------------------------------------------------------------------------
    def _eval_batch(self, n_tasks: int, seed: int, stream: int):
        rng = np.random.default_rng([seed, stream])
        tasks = sine_tasks.sample_tasks(self.cfg.task, n_tasks, rng)
        k = self.cfg.sine_eval.k_shot or self.cfg.task.k_shot
        batch = sine_tasks.make_batch(self.cfg.task, tasks, k, self.cfg.sine_eval.query_points, rng)
        return tasks, batch

    def _curve(self, name: str, batch, steps: int, lr: float) -> np.ndarray:
        m = self.modules[name]
        only = self.cfg.inner.only if name == "maml" else None
        return adaptation_curve(m, params_of(m), batch, mse, mse, steps=steps, lr=lr, only=only).T.numpy()

    def pretrain_lr(self, steps: int, seed: int) -> float:
        """Fine-tuning step size for the pretrain baseline: the grid value with the lowest mean
        MSE over steps 1..K on validation tasks (a stream disjoint from the test tasks)."""
        _, val = self._eval_batch(self.cfg.sine_eval.validation_tasks, seed, stream=2)
        scores = {lr: self._curve("pretrain", val, max(steps, 1), lr)[:, 1:].mean() for lr in self.cfg.sine_eval.pretrain_lrs}
        finite = {lr: s for lr, s in scores.items() if np.isfinite(s)}
        return min(finite, key=finite.get) if finite else min(self.cfg.sine_eval.pretrain_lrs)

    def evaluate(self, n_tasks: int, steps: int, seed: int) -> EvalResult:
        tasks, batch = self._eval_batch(n_tasks, seed, stream=1)
        curves = {"maml": self._curve("maml", batch, steps, self.cfg.inner.lr)}
        lrs = {"maml": self.cfg.inner.lr}
        if "pretrain" in self.modules:
            lrs["pretrain"] = self.pretrain_lr(steps, seed)
            curves["pretrain"] = self._curve("pretrain", batch, steps, lrs["pretrain"])
        if "oracle" in self.modules:
            with torch.no_grad():
                pred = self.modules["oracle"](sine_tasks.with_task_inputs(batch.x_query, tasks))
                flat = mse(pred, batch.y_query).numpy()
            curves["oracle"] = np.repeat(flat[:, None], steps + 1, axis=1)
        result = EvalResult("mse", False, curves)
        result.figures["sine_fits.png"] = lambda path: self._panels(path, tasks[0], batch.task(0), steps, lrs)
        result.step_sizes = lrs
        return result

    def _panels(self, path, task, batch, steps, lrs):
        from ..adaptation import trajectory
        from ..plotting import sine_panels

        x_grid = np.linspace(*self.cfg.task.x_range, 200)
        xg = torch.as_tensor(x_grid, dtype=torch.float32)[:, None]
        shown = sorted({0, 1, steps})
        fits = {}
        for name in ("maml", "pretrain"):
            if name not in self.modules:
                continue
            m = self.modules[name]
            p0 = {k: v.detach() for k, v in params_of(m).items()}
            loss = lambda p: mse(forward(m, p, batch.x_support[0])[None], batch.y_support[0][None]).sum()
            phis = trajectory(loss, p0, steps, lr=lrs[name], only=self.cfg.inner.only if name == "maml" else None)
            with torch.no_grad():
                fits[name] = {s: forward(m, phis[s], xg)[:, 0].numpy() for s in shown}
        y_true = sine_tasks.targets(task[None], x_grid[None, :, None])[0, :, 0]
        sine_panels(path, x_grid, y_true, batch.x_support[0, :, 0].numpy(), batch.y_support[0, :, 0].numpy(), fits)
