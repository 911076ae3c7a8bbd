"""What every track's config and object share.

A track is one problem: its task distribution, its models, its loss and metric, its baselines.
The method that learns on it (``algorithm:``) is built by the track from the registry and owns
the outer update; :mod:`metarl.training` runs ``train_step`` and checkpoints ``state_dict``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from torch import nn

from ..checkpoint import CheckpointError
from ..config import resumable


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
    """The problem: sine, fewshot or rl."""
    algorithm: str = "maml"
    """The method (metarl/algorithms/<name>.py): maml, fomaml, ...; `metarl train --help` lists them."""
    seed: int = 0
    """Seeds torch, NumPy's task sampler and Python's random."""
    iterations: int = resumable(1000, why="length of the run")
    """Meta-training iterations (outer updates)."""
    checkpoint_every: int = resumable(500, why="bookkeeping")
    """Save RUN_DIR/checkpoint.pt every N iterations (and at the end and on SIGINT/SIGTERM)."""
    snapshot_every: int = resumable(0, why="bookkeeping")
    """Also keep the state every N iterations as RUN_DIR/snapshots/iteration_N.pt (0 = never), to
    evaluate earlier iterations: ``metarl evaluate RUN_DIR --iteration N``."""
    log_every: int = resumable(50, why="bookkeeping")
    """Write metrics.csv / TensorBoard every N iterations."""
    eval: EvalConfig = resumable(why="evaluation only", default_factory=EvalConfig)
    """Evaluation: test tasks, curve length, seed (``metarl evaluate`` flags override it)."""
    torch_threads: int = resumable(0, why="speed only")
    """torch intra-op threads while training and evaluating (0: torch's default, one per core).
    Each track's default is what measured fastest for its whole ``metarl train`` iteration
    (benchmarks/sine_speed.py --cli): sine 1, few-shot and meta-RL 0."""

    def validate(self):
        from ..config import ConfigError
        if self.torch_threads < 0:
            raise ConfigError(f"torch_threads must be >= 0 (0 = torch's default), got {self.torch_threads}")
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
        method = getattr(self, "method", None)
        return {"modules": {k: m.state_dict() for k, m in self.modules.items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "method": method.extra_state() if method is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        for k, m in self.modules.items():
            _load_module(k, m, state["modules"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        method = getattr(self, "method", None)
        if method is not None:
            method.load_extra_state(state.get("method", {}))

    def train_step(self, iteration: int, rng: np.random.Generator) -> dict[str, float]:
        raise NotImplementedError

    def step_baselines(self, losses: dict) -> None:
        """One optimizer step per baseline loss (the method steps itself in its ``train_step``)."""
        for k, loss in losses.items():
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


def _load_module(name: str, module: nn.Module, saved: dict) -> None:
    """``module.load_state_dict(saved)``, or a one-line :class:`CheckpointError` when the saved tensors
    do not fit the model the current code builds from the run's config (a checkpoint written by a
    version with another architecture, e.g. a MANN run from before ``mann.centre_embedding``). The
    checkpoint is left as it is."""
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    resized = sorted(k for k in own.keys() & saved.keys() if own[k].shape != saved[k].shape)
    if missing or unexpected or resized:
        said = "; ".join(f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                         for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", resized)) if keys)
        raise CheckpointError(f"the checkpoint's '{name}' does not fit the model this metarl builds from the run's config "
                              f"({said}): it was written by a version with another architecture; evaluate it with that "
                              f"version or train it again")
    module.load_state_dict(saved)
