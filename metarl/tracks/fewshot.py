"""N-way K-shot classification (Omniglot, MiniImageNet, CIFAR-FS) with MAML and a pretrain baseline.

Finn et al. 2017 sec. 5.2: Conv4, inner SGD on the support set's cross-entropy, Adam on the query
loss after adaptation. The same engine as the sine track: episodes are the horizon-1 "task data".
- **maml** (or first-order with ``inner.first_order``);
- **pretrain**: one Conv4 classifier over all meta-train classes, trained in the same loop on
  batches of labelled images; at evaluation its head is replaced by a zero-initialised N-way head
  and only the head is fine-tuned on the support set, with its step size picked on validation
  episodes from ``fewshot_eval.pretrain_lrs``.
Batch norm always normalises with the current batch's statistics (support batch during the inner
steps, query batch when scoring), as in the MAML paper's code; see ``policies/conv4.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch

from ..algorithms.maml import InnerConfig, adaptation_curve, meta_backward
from ..config import ConfigError, register_track
from ..evaluation import EvalResult
from ..functional import params_of
from ..objectives import accuracy, cross_entropy
from ..tasks.batch import TaskBatch
from .base import EvalConfig, RunConfig, Track
from .sine import OuterConfig

HEAD = ("head.weight", "head.bias")


@dataclass
class DataConfig:
    dataset: Literal["omniglot", "mini_imagenet", "cifar_fs"] = "omniglot"
    dir: Optional[str] = None
    """Data folder (also --data-dir or $METARL_DATA); default: the shared Omniglot copy."""
    protocol: Literal["vinyals", "lake"] = "vinyals"
    """Omniglot split: Vinyals et al. 2016 (1,200 train / 423 test characters, rotations as classes)
    or Lake et al. 2015 (background / evaluation alphabets)."""
    train_split: str = "trainval"
    """Meta-training classes (MAML used all 1,200 Vinyals train+val characters)."""
    val_split: str = "val"
    """Classes for picking the pretrain baseline's fine-tuning step size."""
    test_split: str = "test"


@dataclass
class EpisodeConfig:
    n_way: int = 5
    k_shot: int = 1
    q_query: Optional[int] = None
    """Query images per class (null = k_shot, as in the MAML code; 15 is the other convention)."""


@dataclass
class ConvConfig:
    hidden: int = 64
    """Filters per block (Omniglot 64; the paper's MiniImageNet model uses 32 with max-pooling)."""
    pooling: Literal["stride", "max"] = "stride"


@dataclass
class PretrainConfig:
    batch_size: int = 256
    """Labelled images per pretrain update (one update per meta-iteration)."""


@dataclass
class FewShotEvalExtras:
    pretrain_lrs: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    validation_episodes: int = 100
    chunk: int = 50
    """Episodes adapted together during evaluation (bounds memory)."""


@dataclass
class FewShotEvalConfig(EvalConfig):
    tasks: int = 600


@register_track("fewshot")
@dataclass
class FewShotConfig(RunConfig):
    track: str = "fewshot"
    iterations: int = 60_000
    checkpoint_every: int = 1000
    log_every: int = 100
    meta_batch: int = 32
    data: DataConfig = field(default_factory=DataConfig)
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    model: ConvConfig = field(default_factory=ConvConfig)
    inner: InnerConfig = field(default_factory=lambda: InnerConfig(lr=0.4, steps=1, eval_steps=3, task_workers=0))
    outer: OuterConfig = field(default_factory=OuterConfig)
    baselines: list[Literal["pretrain"]] = field(default_factory=lambda: ["pretrain"])
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    fewshot_eval: FewShotEvalExtras = field(default_factory=FewShotEvalExtras)
    eval: FewShotEvalConfig = field(default_factory=FewShotEvalConfig)

    def validate(self):
        super().validate()
        if self.episode.n_way < 2 or self.episode.k_shot < 1 or (self.episode.q_query is not None and self.episode.q_query < 1):
            raise ConfigError("episode: n_way must be >= 2, k_shot and q_query >= 1")


def load_pools(cfg: DataConfig):
    """(train, val, test) class pools of the configured dataset."""
    if cfg.dataset == "omniglot":
        from ..tasks.omniglot import load_omniglot, omniglot_split

        arrays = load_omniglot(cfg.dir)
        return tuple(omniglot_split(arrays, s, cfg.protocol) for s in (cfg.train_split, cfg.val_split, cfg.test_split))
    from ..tasks import image_datasets

    loader = {"mini_imagenet": image_datasets.load_mini_imagenet, "cifar_fs": image_datasets.load_cifar_fs}[cfg.dataset]
    split = lambda s: {"trainval": "train"}.get(s, s)
    return tuple(loader(split(s), cfg.dir) for s in (cfg.train_split, cfg.val_split, cfg.test_split))


def to_batch(ep) -> TaskBatch:
    t = lambda a: torch.as_tensor(a)
    return TaskBatch(t(ep.x_support), t(ep.y_support), t(ep.x_query), t(ep.y_query))


class FewShotTrack(Track):
    def __init__(self, cfg: FewShotConfig):
        super().__init__(cfg)
        from metarl.policies.conv4 import Conv4
        from ..tasks.episodes import EpisodeSampler

        self.train_pool, self.val_pool, self.test_pool = load_pools(cfg.data)
        c, h, _ = self.train_pool.image_shape
        ep = cfg.episode
        mk = lambda n_out: Conv4(in_channels=c, n_way=n_out, hidden=cfg.model.hidden, image_size=h, pooling=cfg.model.pooling)
        self.model = mk(ep.n_way)
        self.modules["maml"] = self.model
        if "pretrain" in cfg.baselines:
            self.modules["pretrain"] = mk(self.train_pool.n_classes)
        self.optimizers = {k: torch.optim.Adam(m.parameters(), lr=cfg.outer.lr) for k, m in self.modules.items()}
        self.sampler = lambda pool: EpisodeSampler(pool, ep.n_way, ep.k_shot, ep.q_query)

    def train_step(self, iteration: int, rng: np.random.Generator) -> dict[str, float]:
        cfg = self.cfg
        batch = to_batch(self.sampler(self.train_pool).sample(cfg.meta_batch, rng))
        # MAML's gradient is accumulated now (by task workers, inner.task_workers) and applied
        # only after the finiteness check below, like the baseline's
        self.optimizers["maml"].zero_grad(set_to_none=True)
        logits = meta_backward(self.model, params_of(self.model), batch, cross_entropy, **cfg.inner.training_kwargs())
        losses = {"maml": cross_entropy(logits, batch.y_query).mean()}
        metrics = {"accuracy/maml": accuracy(logits, batch.y_query).mean().item()}
        if "pretrain" in self.modules:
            pool = self.train_pool
            classes = rng.integers(pool.n_classes, size=cfg.pretrain.batch_size)
            samples = (rng.random(cfg.pretrain.batch_size) * pool.counts[classes]).astype(np.int64)[:, None]
            x = torch.as_tensor(pool.gather(classes, samples)[:, 0], dtype=torch.float32) / 255.0
            out = self.modules["pretrain"](x)
            y = torch.as_tensor(classes)
            losses["pretrain"] = torch.nn.functional.cross_entropy(out, y)
            metrics["accuracy/pretrain"] = (out.argmax(-1) == y).float().mean().item()
        metrics.update({f"loss/{k}": v.item() for k, v in losses.items()})
        if all(np.isfinite(list(metrics.values()))):
            self.step_optimizers(losses)
        return metrics

    # ---- evaluation -------------------------------------------------------------------------
    def _pretrain_start(self):
        """Pretrained backbone + a zero N-way head, run through the N-way architecture."""
        p = {k: v.detach() for k, v in params_of(self.modules["pretrain"]).items()}
        for name in HEAD:
            p[name] = torch.zeros_like(params_of(self.model)[name])
        return p

    def _curves(self, pool, n: int, steps: int, seed: int, start, lr, only) -> np.ndarray:
        chunks = []
        for ep in self.sampler(pool).fixed_episodes(n, seed, batch_size=self.cfg.fewshot_eval.chunk):
            batch = to_batch(ep)
            chunks.append(adaptation_curve(self.model, start, batch, cross_entropy, accuracy, steps=steps, lr=lr, only=only))
        return torch.cat(chunks, dim=1).T.numpy()

    def pretrain_lr(self, steps: int, seed: int) -> float:
        n = self.cfg.fewshot_eval.validation_episodes
        scores = {lr: self._curves(self.val_pool, n, max(steps, 1), seed + 1, self._pretrain_start(), lr, HEAD)[:, -1].mean()
                  for lr in self.cfg.fewshot_eval.pretrain_lrs}
        return max(scores, key=scores.get)

    def evaluate(self, n_tasks: int, steps: int, seed: int) -> EvalResult:
        i = self.cfg.inner
        curves = {"maml": self._curves(self.test_pool, n_tasks, steps, seed, params_of(self.model), i.lr, i.only)}
        if "pretrain" in self.modules:
            lr = self.pretrain_lr(steps, seed)
            curves["pretrain"] = self._curves(self.test_pool, n_tasks, steps, seed, self._pretrain_start(), lr, HEAD)
        return EvalResult("accuracy", True, curves)
