"""What every black-box few-shot learner shares (SNAIL ``snail.py``, MANN ``mann.py``): y = f(D_train, x).

A black-box learner has no inner loop: it reads a task's labelled support examples as a sequence
and predicts the query's label from that sequence (Santoro et al. 2016 sec. 3; Mishra et al. 2018
sec. 3). All that differs between them is the sequence model; this module holds the rest:

- the sequence order. Training shows each episode's support examples in a fresh random order
  (``<name>.shuffle_support``; torch's RNG, so checkpoints capture it); evaluation shows them
  *shot-major* (shot 1 of every class, then shot 2, ...), so the first ``s·N`` elements hold
  exactly ``s`` examples of each class;
- the adaptation curve: ``predict(batch, steps)`` returns the query predictions with 0, 1, ...,
  min(steps, K) support examples per class visible (0: the query alone, a guess), i.e. the curve's
  x axis is "support examples per class seen", not gradient steps (``curve_axis``);
- the outer update: Adam on the query cross-entropy, end to end through the embedding;
- the embedding's batch norm (``policies/embedding.py``): batch statistics in ``train_step``,
  running statistics (``eval()``) in ``predict``, so evaluation predictions are exactly causal.

A subclass provides ``build(in_channels, image_size) -> nn.Module`` whose call
``model(x_support [T, S, C, H, W], y_support [T, S], x_query [T, Q, C, H, W])`` returns
``(query_logits [T, Q, N], support_logits [T, S, N] or None)``; support logits are predictions
made at the support positions (MANN trains on them, as in Santoro et al.'s protocol).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, in_range
from ..tasks.batch import TaskBatch
from .base import Method, Problem, finite
from .maml import query_metrics


def shot_major_order(y_support: Tensor, n_way: int) -> Tensor:
    """[T, S] indices putting each task's support set in shot-major order: the first occurrence of
    every label (by label), then the second, ... (works for any layout, not only class-major)."""
    onehot = F.one_hot(y_support, n_way)
    occurrence = (onehot.cumsum(1) * onehot).sum(-1) - 1  # 0 for a label's first example, 1 for its second, ...
    return torch.argsort(occurrence * n_way + y_support, dim=1, stable=True)


def take(x: Tensor, index: Tensor) -> Tensor:
    """x [T, S, ...] reordered/truncated along axis 1 by index [T, S']."""
    return torch.gather(x, 1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:]))


class BlackBox(Method):
    """The shared half of SNAIL and MANN (see the module docstring); not registered itself."""
    curve_axis = "support examples per class seen"

    def __init__(self, problem: Problem, cfg):
        super().__init__(problem, cfg)
        if problem.n_way is None:
            raise ConfigError(f"algorithm '{self.name}' is a few-shot classifier (labels as one-hot inputs): "
                              f"use track fewshot (e.g. experiments/{self.name}_omniglot_5w1s.yaml)")
        self.n_way = problem.n_way
        with torch.random.fork_rng():  # only to read the image shape; must not shift the RNG stream
            probe = problem.make_model()
        self.model = self.build(probe.in_channels, probe.image_size)
        self.modules[self.name] = self.model
        self.optimizers[self.name] = torch.optim.Adam(self.model.parameters(), lr=self.own.lr)

    def build(self, in_channels: int, image_size: int) -> nn.Module:
        raise NotImplementedError

    def not_shardable(self):
        return ("its embedding's batch norm keeps running statistics of each rank's own share, and the support "
                "shuffle draws torch random numbers per share")

    def train_step(self, batch: TaskBatch, iteration: int) -> dict[str, float]:
        xs, ys = batch.x_support, batch.y_support
        if self.own.shuffle_support:
            order = torch.argsort(torch.rand(ys.shape), dim=1)
            xs, ys = take(xs, order), take(ys, order)
        opt = self.optimizers[self.name]
        opt.zero_grad(set_to_none=True)
        self.model.train()  # the embedding's batch norm: batch statistics in training (Mishra et al.)
        logits, support_logits = self.model(xs, ys, batch.x_query)
        loss = self.problem.loss(logits, batch.y_query).mean()
        metrics = query_metrics(self.name, self.problem, logits.detach(), batch)
        total = loss
        weight = getattr(self.own, "support_loss", 0.0)
        if support_logits is not None and weight:
            support = self.problem.loss(support_logits, ys).mean()
            total = loss + weight * support
            metrics[f"loss/{self.name}.support"] = support.item()
        if finite(metrics):
            total.backward()
            opt.step()
        return metrics

    def predict(self, batch: TaskBatch, steps: int) -> list[Tensor]:
        """Query logits with 0..min(steps, K) support examples per class visible (shot-major
        prefixes of the support sequence): min(steps, K) + 1 tensors [T, Nq, N]."""
        k = batch.y_support.shape[1] // self.n_way
        order = shot_major_order(batch.y_support, self.n_way)
        out, was_training = [], self.model.training
        self.model.eval()  # running statistics: every image embedded on its own, so predictions are causal
        try:
            with torch.no_grad():
                for s in range(min(steps, k) + 1):
                    idx = order[:, :s * self.n_way]
                    out.append(self.model(take(batch.x_support, idx), take(batch.y_support, idx), batch.x_query)[0])
        finally:
            self.model.train(was_training)
        return out

def validate_common(section: str, lr: float, embedding: int, hidden: int) -> None:
    in_range(f"{section}.lr", lr, 0, open_low=True)
    in_range(f"{section}.embedding", embedding, 1, 100_000), in_range(f"{section}.hidden", hidden, 1, 100_000)
