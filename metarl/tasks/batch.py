"""A meta-batch of supervised tasks: support and query sets with a leading task axis.

The supervised tracks are the horizon-1 case of meta-RL: one "episode" of support data to adapt
on, one of query data to score φ on (Finn et al. 2017, Algorithm 2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np
import torch
from torch import Tensor


@dataclass
class TaskBatch:
    x_support: Tensor  # [T, Ns, ...]
    y_support: Tensor  # [T, Ns, ...]
    x_query: Tensor    # [T, Nq, ...]
    y_query: Tensor    # [T, Nq, ...]
    info: Optional[Any] = None
    """Per-task facts with a leading task axis (sine: [T, 2] amplitude and phase, for the oracle;
    episodes: [T, N] pool classes), or None."""

    def __post_init__(self):
        t = self.x_support.shape[0]
        for name in ("y_support", "x_query", "y_query"):
            v = getattr(self, name)
            if v.shape[0] != t:
                raise ValueError(f"TaskBatch.{name} has {v.shape[0]} tasks but x_support has {t}: every tensor needs the same leading task axis")
        if self.x_support.shape[1] != self.y_support.shape[1] or self.x_query.shape[1] != self.y_query.shape[1]:
            raise ValueError("TaskBatch: inputs and targets disagree on the number of examples per task")

    def __iter__(self):
        """The four tensors in order, so ``xs, ys, xq, yq = batch`` unpacks a batch."""
        return iter((self.x_support, self.y_support, self.x_query, self.y_query))

    @property
    def n_tasks(self) -> int:
        return self.x_support.shape[0]

    def task(self, i: int) -> "TaskBatch":
        return self.tasks(i, i + 1)

    def tasks(self, start: int, stop: int) -> "TaskBatch":
        """Tasks start..stop-1 (views, no copy)."""
        info = None if self.info is None else self.info[start:stop]
        return TaskBatch(*(t[start:stop] for t in (self.x_support, self.y_support, self.x_query, self.y_query)), info=info)

    def to(self, dtype: torch.dtype) -> "TaskBatch":
        conv = lambda t: t.to(dtype) if t.is_floating_point() else t
        return TaskBatch(conv(self.x_support), conv(self.y_support), conv(self.x_query), conv(self.y_query), info=self.info)


class TaskDistribution(Protocol):
    """Every supervised task distribution (sine, Omniglot, MiniImageNet, CIFAR-FS): a meta-batch of
    ``n`` tasks drawn with ``rng`` (a NumPy generator, so checkpoints capture it)."""

    def sample(self, n: int, rng: np.random.Generator) -> TaskBatch: ...
