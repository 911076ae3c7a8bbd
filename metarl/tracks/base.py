"""What every track's config and object share.

A track is the glue of one benchmark: it builds the models, owns the update rule
(``train_step``) and knows how to evaluate (``evaluate``); :mod:`metarl.training` runs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from torch import nn


@dataclass
class EvalConfig:
    """Evaluation (config section ``eval``; ``metarl evaluate`` flags override it)."""
    tasks: int = 600
    """Fresh evaluation tasks, the same for every method."""
    steps: Optional[int] = None
    """Inner steps on the curve's x axis; null uses inner.eval_steps."""
    seed: int = 1_000_003
    """Seed of the evaluation tasks (a stream separate from training's)."""


@dataclass
class RunConfig:
    track: str = ""
    seed: int = 0
    """Seeds torch, NumPy's task sampler and Python's random."""
    iterations: int = 1000
    """Meta-training iterations (outer updates)."""
    checkpoint_every: int = 500
    snapshot_every: int = 0
    """Also keep the state every N iterations as RUN_DIR/snapshots/iteration_N.pt (0 = never), to
    evaluate earlier iterations: ``metarl evaluate RUN_DIR --iteration N``."""
    log_every: int = 50
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self):
        from ..config import ConfigError
        if self.iterations < 0 or self.checkpoint_every < 1 or self.log_every < 1 or self.snapshot_every < 0:
            raise ConfigError("iterations must be >= 0, checkpoint_every and log_every >= 1, snapshot_every >= 0")
        from ..config import in_range
        in_range("seed", self.seed, 0), in_range("iterations", self.iterations, 0, 1_000_000_000)  # NumPy seeds are >= 0


class Track:
    """Base: subclasses fill ``self.modules`` / ``self.optimizers`` and implement the two methods."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict = {}
        self.run_dir = None

    def state_dict(self) -> dict:
        return {"modules": {k: m.state_dict() for k, m in self.modules.items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()}}

    def load_state_dict(self, state: dict) -> None:
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])

    def train_step(self, iteration: int, rng: np.random.Generator) -> dict[str, float]:
        raise NotImplementedError

    def step_optimizers(self, losses: dict) -> None:
        """One optimizer step per method. "maml" already holds its gradient (``meta_backward``
        accumulated it into ``.grad``; its loss here is a detached value); every other loss is
        backpropagated first."""
        for k, loss in losses.items():
            if k != "maml":
                self.optimizers[k].zero_grad(set_to_none=True)
                loss.backward()
            self.optimizers[k].step()

    def after_training(self) -> list[str]:
        """Work that follows meta-training (e.g. PPO baselines in meta-RL); returns what it did."""
        return []

    def close(self) -> None:
        """Release workers or files (called when training or evaluation ends)."""

    def evaluate(self, n_tasks: int, steps: int, seed: int):
        raise NotImplementedError
