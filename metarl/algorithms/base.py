"""What a method is, in one page: the seam between problems (tracks) and methods (algorithms).

A **track** supplies the problem: a task distribution, the learner's architecture, a loss and a
metric (:class:`Problem` for supervised tracks). A **method** (one file in ``metarl/algorithms/``,
registered with :func:`metarl.registry.algorithm`) supplies the learning, and says exactly four
things:

1. what it owns: ``modules`` (θ and its meta-parameters beyond θ: learned step sizes, context
   vectors, an LSTM, a head's regulariser) and ``optimizers``;
2. how it adapts to one task's support data: :meth:`Method.predict` gives the query predictions
   after 0..K units of adaptation (gradient steps for MAML and its family; whatever the method
   varies otherwise, named by ``curve_axis``), used for the adaptation curve;
3. its outer objective and update: :meth:`Method.train_step` on one meta-batch;
4. its state for checkpoints: the track saves ``modules`` and ``optimizers`` (keys start with
   the method's name, so a checkpoint reads ``maml``, ``meta_sgd.lrs``, ...), and
   :meth:`Method.extra_state` carries anything else (counters, annealed values).

Everything else (sampling, logging, checkpoints, evaluation on fixed tasks, plots) is shared, so
a method file reads top to bottom as its paper's algorithm box. ``Method`` is the one base class:
no hooks beyond these.

Meta-RL methods (``kinds=("rl",)``) follow the same four points with RL data: they are built as
``cls(track, cfg)`` by :class:`metarl.tracks.rl.RLTrack`, own ``policy`` (θ), and their
``train_step(tasks, seed)`` collects and updates (see ``maml_trpo.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..tasks.batch import TaskBatch

PerTaskLoss = Callable[[Tensor, Tensor], Tensor]  # (pred [T, N, ...], target [T, N, ...]) -> [T]


@dataclass
class Problem:
    """What a supervised track hands a method."""
    track: str
    make_model: Callable[[], nn.Module]
    """A fresh learner (θ's architecture) with a native or vmapped ``forward_tasks``."""
    loss: PerTaskLoss
    """The training loss per task (MSE for sine, cross-entropy for few-shot)."""
    metric: PerTaskLoss
    """The reported metric per task (MSE, accuracy)."""
    metric_name: str
    higher_is_better: bool
    head: tuple[str, ...]
    """Parameter names of the output layer (ANIL adapts only these; closed-form heads replace them)."""
    n_way: Optional[int] = None
    """Classes per task (classification) or None (regression)."""


class Method:
    """The four things a method says (see the module docstring); subclasses fill them in."""
    name: ClassVar[str] = ""
    Config: ClassVar[Optional[type]] = None
    """The method's own config section, named after it (``reptile: {...}``); None if it has none."""
    defaults: ClassVar[dict[str, dict]] = {}
    """Per track: config values for the keys a YAML file leaves out (e.g. Reptile's inner steps)."""
    curve_axis: ClassVar[str] = "inner steps"
    """What the adaptation curve's x axis counts for this method."""

    def __init__(self, problem: Problem, cfg):
        self.problem, self.cfg = problem, cfg
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    @property
    def own(self):
        """The method's config section (``cfg.<name>``)."""
        return getattr(self.cfg, self.name)

    def train_step(self, batch: TaskBatch, iteration: int) -> dict[str, float]:
        """One outer update on a meta-batch; returns metrics (``loss/<name>`` at least). It must not
        touch the meta-parameters when a metric is non-finite (the training loop then stops the
        run with the last checkpoint intact): use :func:`finite`."""
        raise NotImplementedError

    def predict(self, batch: TaskBatch, steps: int) -> list[Tensor]:
        """Query predictions [T, Nq, ...] after 0..steps units of adaptation on each task's support
        set, without an outer graph (evaluation)."""
        raise NotImplementedError

    def step_sizes(self) -> dict:
        """The inner step sizes the method uses at evaluation, for adaptation.json (JSON-able)."""
        return {}

    def extra_state(self) -> dict:
        """State beyond modules and optimizers (tensors, numbers), for checkpoints."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def not_shardable(self) -> Optional[str]:
        """Why this method cannot split a meta-batch across torchrun ranks, or None if it can.

        Under torchrun (:mod:`metarl.distributed`) ``train_step`` runs on each rank's share of the
        tasks with the optimizers' steps held back, the ``.grad`` of the optimizers' parameters
        are averaged over the whole meta-batch, then the steps run. That is the single-process
        update whenever the update is "optimizer steps on the mean over tasks of per-task
        gradients"; a method whose update reads or changes anything else from its local share
        (an interpolation of weights, a gradient clipped or read before the step, running
        statistics, torch random numbers drawn per task) returns the reason here."""
        return None


def finite(metrics: dict[str, float]) -> bool:
    """True when every metric is finite: only then may a method apply its outer step."""
    return all(np.isfinite(list(metrics.values())))
