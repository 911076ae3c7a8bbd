"""Sine-wave regression tasks (Finn et al. 2017 sec. 5.1).

A task is y = A sin(x − φ) with amplitude A ~ U[0.1, 5.0] and phase φ ~ U[0, π]; inputs
x ~ U[−5, 5]. Sampling takes a NumPy ``Generator`` so a checkpoint can capture and restore it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .batch import TaskBatch


@dataclass
class SineTaskConfig:
    """The task distribution (config section ``task``)."""
    amplitude: list[float] = field(default_factory=lambda: [0.1, 5.0])
    """[low, high] of the uniform amplitude A."""
    phase: list[float] = field(default_factory=lambda: [0.0, math.pi])
    """[low, high] of the uniform phase φ."""
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])
    """[low, high] of the uniform inputs x."""
    k_shot: int = 10
    """K support points per task (the paper reports K = 5, 10, 20)."""
    k_query: int = 10
    """Query points per task during meta-training."""

    def validate(self):
        from ..config import ConfigError
        for name in ("amplitude", "phase", "x_range"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise ConfigError(f"task.{name} must be [low, high] with low <= high, got {lo_hi}")
        if self.k_shot < 1 or self.k_query < 1:
            raise ConfigError(f"task.k_shot and task.k_query must be >= 1 (got {self.k_shot}, {self.k_query})")


def sample_tasks(cfg: SineTaskConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, 2] array of (amplitude, phase)."""
    amp = rng.uniform(*cfg.amplitude, size=n)
    phase = rng.uniform(*cfg.phase, size=n)
    return np.stack([amp, phase], axis=1)


def targets(tasks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y for inputs x [T, N, 1] under tasks [T, 2]."""
    return tasks[:, None, 0:1] * np.sin(x - tasks[:, None, 1:2])


def sample_inputs(cfg: SineTaskConfig, n_tasks: int, n_points: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(*cfg.x_range, size=(n_tasks, n_points, 1))


def make_batch(cfg: SineTaskConfig, tasks: np.ndarray, n_support: int, n_query: int,
               rng: np.random.Generator, dtype=torch.float32) -> TaskBatch:
    xs = sample_inputs(cfg, len(tasks), n_support, rng)
    xq = sample_inputs(cfg, len(tasks), n_query, rng)
    t = lambda a: torch.as_tensor(a, dtype=dtype)
    return TaskBatch(t(xs), t(targets(tasks, xs)), t(xq), t(targets(tasks, xq)))


def with_task_inputs(x: torch.Tensor, tasks: np.ndarray) -> torch.Tensor:
    """Append (amplitude, phase) to every input: the oracle's view of a task."""
    tv = torch.as_tensor(tasks, dtype=x.dtype)[:, None, :].expand(x.shape[0], x.shape[1], 2)
    return torch.cat([x, tv], dim=-1)


class SineTasks:
    """The sine task distribution as a :class:`~metarl.tasks.batch.TaskDistribution`: ``sample``
    draws tasks, then their support and query inputs, from one generator (in that order, so a
    seed fixes both). ``info`` carries each task's (amplitude, phase) for the oracle baseline."""

    def __init__(self, cfg: SineTaskConfig, k_shot: int | None = None, k_query: int | None = None):
        self.cfg = cfg
        self.k_shot = cfg.k_shot if k_shot is None else k_shot
        self.k_query = cfg.k_query if k_query is None else k_query

    def sample(self, n: int, rng: np.random.Generator) -> TaskBatch:
        tasks = sample_tasks(self.cfg, n, rng)
        batch = make_batch(self.cfg, tasks, self.k_shot, self.k_query, rng)
        batch.info = tasks
        return batch
