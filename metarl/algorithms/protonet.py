"""Prototypical networks (Snell, Swersky & Zemel 2017), and the skeleton every head on the Conv4
embedding shares (R2-D2, MetaOptNet subclass :class:`EmbeddingHead`).

A task is solved without inner gradient steps: the embedding f_θ (the Conv4 trunk,
``features_tasks``) maps support and query images to vectors, a head fits the support vectors in
closed form and scores the queries, and θ (with the head's own meta-parameters) is meta-learned
end to end through that fit by minimising the query cross-entropy (Snell et al. Algorithm 1).
For prototypical networks the fit is a class mean (sec. 2.2, eq. 1)

    c_k = 1/|S_k| Σ_{(x, y) ∈ S, y = k} f_θ(x)

and the logits are negative squared Euclidean distances, p(y = k | x) ∝ exp(−‖f_θ(x) − c_k‖²)
(eq. 2; sec. 2.7 on why the squared Euclidean distance, a Bregman divergence, is the right one).

Shared conventions (all three heads):
- one ``features_tasks`` call per meta-batch on support ∪ query of each task, so batch norm uses
  that task's statistics over both sets (as Snell et al.'s code encodes support and query in one
  batch; the Conv4 batch norm is always transductive, see ``policies/conv4.py``);
- every task of the meta-batch is fitted at once (batched matmuls and solves, no task loop);
- the training episode may differ from the test episode: ``<method>.train_way`` /
  ``train_shot`` / ``train_query`` (null: the track's ``episode``). Snell et al. trained Omniglot
  with 60 ways and 5 queries per class and tested with 5 or 20 (sec. 3.1); MetaOptNet trains with
  15 shots. The few-shot track builds its training sampler from :meth:`EpisodeHead.train_episode`;
- the adaptation curve is flat (``curve_axis``): nothing is iterated at test time.
Few-shot classification only: on the sine track ``__init__`` raises a ConfigError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..functional import stack
from ..registry import algorithm
from ..tasks.batch import TaskBatch
from .base import Method, Problem, finite
from .maml import query_metrics


@dataclass
class EpisodeOverrides:
    """Training episodes that differ from the track's (test) episode."""
    train_way: Optional[int] = None
    """Classes per training episode (null: episode.n_way). Snell et al.: 60 for Omniglot."""
    train_shot: Optional[int] = None
    """Support images per class in training (null: episode.k_shot). MetaOptNet: 15."""
    train_query: Optional[int] = None
    """Query images per class in training (null: episode.q_query). Snell et al.: 5 (Omniglot)."""

    def validate(self):
        for key in ("train_way", "train_shot", "train_query"):
            v = getattr(self, key)
            if v is not None and v < (2 if key == "train_way" else 1):
                raise ConfigError(f"{key} must be null or >= {2 if key == 'train_way' else 1}, got {v}")


class EmbeddingHead(Method):
    """A fixed head on the meta-learned embedding: subclasses give :meth:`logits` (and, if they
    have meta-parameters of their own, :meth:`build_head`). Adam (``outer.lr``) updates the trunk
    and the head's parameters together on the mean query loss."""
    curve_axis = "closed-form head (no inner steps)"

    def __init__(self, problem: Problem, cfg):
        super().__init__(problem, cfg)
        if problem.n_way is None:
            raise ConfigError(f"algorithm '{self.name}' is a few-shot classification method: use a track: fewshot config, "
                              f"e.g. experiments/{self.name}_omniglot_5w1s.yaml")
        self.model = problem.make_model()
        if not hasattr(self.model, "features_tasks"):
            raise ConfigError(f"algorithm '{self.name}' needs a model with features_tasks (Conv4); {type(self.model).__name__} has none")
        self.modules[self.name] = self.model
        # the output layer is never used: the head replaces it, so it is left out of the optimizer
        trunk = [p for n, p in self.model.named_parameters() if n not in problem.head]
        head = self.build_head()
        if head is not None:
            self.modules[f"{self.name}.head"] = head
            trunk += list(head.parameters())
        self.head = head
        self.optimizers[self.name] = torch.optim.Adam(trunk, lr=cfg.outer.lr)

    def build_head(self) -> Optional[nn.Module]:
        """The head's own meta-parameters (a module), or None."""
        return None

    def train_episode(self) -> dict:
        """EpisodeSampler settings for meta-training episodes (the keys this method overrides)."""
        own = self.own
        keys = {"n_way": own.train_way, "k_shot": own.train_shot, "q_query": own.train_query}
        return {k: v for k, v in keys.items() if v is not None}

    def logits(self, zs: Tensor, ys: Tensor, zq: Tensor, n_way: int, training: bool) -> Tensor:
        """Query logits [T, Nq, n_way] from support features zs [T, Ns, D], labels ys [T, Ns] and
        query features zq [T, Nq, D]."""
        raise NotImplementedError

    def train_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Per-task training loss [T] (the track's cross-entropy; MetaOptNet smooths the labels)."""
        return self.problem.loss(logits, y)

    def query_logits(self, batch: TaskBatch, training: bool) -> Tensor:
        ns = batch.x_support.shape[1]
        z = _features(self.model, torch.cat([batch.x_support, batch.x_query], 1))
        n_way = int(batch.y_support.max()) + 1
        return self.logits(z[:, :ns], batch.y_support, z[:, ns:], n_way, training)

    def train_step(self, batch: TaskBatch, iteration: int) -> dict[str, float]:
        opt = self.optimizers[self.name]
        opt.zero_grad(set_to_none=True)
        logits = self.query_logits(batch, training=True)
        self.train_loss(logits, batch.y_query).mean().backward()
        metrics = query_metrics(self.name, self.problem, logits.detach(), batch)
        if finite(metrics):
            opt.step()
        return metrics

    def predict(self, batch: TaskBatch, steps: int) -> list[Tensor]:
        with torch.no_grad():
            logits = self.query_logits(batch, training=False)
        return [logits] * (steps + 1)


def _features(model: nn.Module, x: Tensor) -> Tensor:
    """Embeddings [T, N, D] of a meta-batch through the model's own trunk weights (one call)."""
    trunk = {n: p for n, p in model.named_parameters() if not n.startswith("head.")}
    return model.features_tasks(stack(trunk, x.shape[0]), x)


def one_hot(y: Tensor, n_way: int, dtype: torch.dtype) -> Tensor:
    return F.one_hot(y, n_way).to(dtype)


def prototypes(zs: Tensor, ys: Tensor, n_way: int) -> Tensor:
    """Class means of the support embeddings, [T, n_way, D] (Snell et al. eq. 1)."""
    Y = one_hot(ys, n_way, zs.dtype)                                   # [T, Ns, K]
    return (Y.transpose(1, 2) @ zs) / Y.sum(1).unsqueeze(-1)


def prototype_logits(zs: Tensor, ys: Tensor, zq: Tensor, n_way: int) -> Tensor:
    """−‖zq − c_k‖² for every query and class, [T, Nq, n_way] (Snell et al. eq. 2)."""
    c = prototypes(zs, ys, n_way)
    d2 = (zq * zq).sum(-1, keepdim=True) - 2 * zq @ c.transpose(1, 2) + (c * c).sum(-1).unsqueeze(1)
    return -d2


@dataclass
class ProtoNetConfig(EpisodeOverrides):
    """Prototypical networks (config section ``protonet``)."""


@algorithm("protonet")
class ProtoNet(EmbeddingHead):
    """Prototypical networks (Snell et al. 2017): logits = −squared distance to class means."""
    Config = ProtoNetConfig

    def logits(self, zs, ys, zq, n_way, training):
        return prototype_logits(zs, ys, zq, n_way)
