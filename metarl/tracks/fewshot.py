"""N-way K-shot classification (Omniglot, MiniImageNet, CIFAR-FS): the problem and its baseline.

Finn et al. 2017 sec. 5.2: a Conv4 learner, cross-entropy on episodes (the horizon-1 "task data");
the method (``algorithm:``, default MAML) does the learning. The baseline:
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

from .. import evaluation
from ..algorithms.base import Problem
from ..algorithms.maml import InnerConfig
from ..config import ConfigError, resumable
from ..functional import params_of
from ..objectives import accuracy, cross_entropy
from ..registry import register_track
from ..tasks.batch import TaskBatch
from .base import EvalConfig, RunConfig
from .sine import OuterConfig
from .supervised import SupervisedTrack

HEAD = ("head.weight", "head.bias")


@dataclass
class DataConfig:
    dataset: Literal["omniglot", "mini_imagenet", "cifar_fs"] = "omniglot"
    """Which loader (metarl/tasks/): Omniglot is shipped; MiniImageNet and CIFAR-FS are users' copies."""
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
    """Classes of the evaluation episodes."""


@dataclass
class EpisodeConfig:
    n_way: int = 5
    """Classes per episode (N)."""
    k_shot: int = 1
    """Support images per class (K)."""
    q_query: Optional[int] = None
    """Query images per class (null = k_shot, as in the MAML code; 15 is the other convention)."""


@dataclass
class ConvConfig:
    hidden: int = 64
    """Filters per block (Omniglot 64; the paper's MiniImageNet model uses 32 with max-pooling)."""
    pooling: Literal["stride", "max"] = "stride"
    """Downsampling: stride-2 convolutions (Omniglot, Finn et al.) or 2x2 max-pooling (MiniImageNet)."""


@dataclass
class PretrainConfig:
    when: Literal["after", "in_loop"] = "after"
    """When the pretrain baseline trains. "after": on demand, ``updates`` Adam steps by
    ``metarl baselines RUN_DIR`` or at the end of ``metarl train`` (into RUN_DIR/baselines/pretrain.pt),
    so meta-training pays nothing for it; "in_loop": one update per meta-iteration inside the
    training loop (how runs before this option were made: half again the cost of a MAML iteration
    on Omniglot 5-way 1-shot)."""
    updates: int = 2000
    """Adam updates of the pretrain classifier when ``when`` is "after"."""
    batch_size: int = 256
    """Labelled images per pretrain update."""


@dataclass
class FewShotEvalExtras:
    pretrain_lrs: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    """Grid for the pretrain baseline's head fine-tuning step size, chosen on validation episodes."""
    validation_episodes: int = 100
    """Episodes of ``data.val_split`` on which that step size is chosen."""
    chunk: int = 50
    """Episodes adapted together during evaluation (bounds memory)."""


@dataclass
class FewShotEvalConfig(EvalConfig):
    tasks: int = 600


@dataclass
class FewShotConfig(RunConfig):
    track: str = "fewshot"
    iterations: int = resumable(60_000, why="length of the run")
    checkpoint_every: int = resumable(1000, why="bookkeeping")
    log_every: int = resumable(100, why="bookkeeping")
    meta_batch: int = 32
    """Episodes per meta-update."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset, its folder, and the class splits."""
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    """N-way K-shot episode shape."""
    model: ConvConfig = field(default_factory=ConvConfig)
    """The Conv4 learner."""
    inner: InnerConfig = field(default_factory=lambda: InnerConfig(lr=0.4, steps=1, eval_steps=3, task_workers=0))
    """The inner loop of gradient-based methods (Omniglot 5-way: α 0.4, one step)."""
    outer: OuterConfig = field(default_factory=OuterConfig)
    """The outer optimiser (Adam)."""
    baselines: list[Literal["pretrain"]] = field(default_factory=lambda: ["pretrain"])
    """Baselines on the curve: pretrain (a classifier over the training classes, its head fine-tuned)."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """How the pretrain baseline trains."""
    fewshot_eval: FewShotEvalExtras = resumable(why="evaluation only", default_factory=FewShotEvalExtras)
    """Few-shot evaluation settings beyond ``eval``."""
    eval: FewShotEvalConfig = resumable(why="evaluation only", default_factory=FewShotEvalConfig)

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


class FewShotTrack(SupervisedTrack):
    def __init__(self, cfg: FewShotConfig):
        from metarl.policies.conv4 import Conv4
        from ..tasks.episodes import EpisodeSampler

        self.train_pool, self.val_pool, self.test_pool = load_pools(cfg.data)
        c, h, _ = self.train_pool.image_shape
        ep = cfg.episode
        mk = lambda n_out: Conv4(in_channels=c, n_way=n_out, hidden=cfg.model.hidden, image_size=h, pooling=cfg.model.pooling)
        super().__init__(cfg, Problem(track="fewshot", make_model=lambda: mk(ep.n_way), loss=cross_entropy, metric=accuracy,
                                      metric_name="accuracy", higher_is_better=True, head=HEAD, n_way=ep.n_way))
        self.sampler = lambda pool: EpisodeSampler(pool, ep.n_way, ep.k_shot, ep.q_query)
        # a method may train on other episodes than it is tested on (prototypical networks: 60-way)
        train = {"n_way": ep.n_way, "k_shot": ep.k_shot, "q_query": ep.q_query}
        train.update(getattr(self.method, "train_episode", dict)())
        try:
            self.train_tasks = EpisodeSampler(self.train_pool, **train)
        except ValueError as e:
            raise ConfigError(f"{cfg.algorithm} training episodes {train}: {e}") from None
        # the pretrain baseline's fine-tuning step size is chosen on the validation classes, so it
        # must not train on them: its classes are the meta-training classes minus those
        self.pretrain_pool = self.train_pool.without(self.val_pool.class_names)
        self._new_pretrain = lambda: mk(self.pretrain_pool.n_classes)
        if "pretrain" in cfg.baselines and cfg.pretrain.when == "in_loop":
            self.modules["pretrain"] = self._new_pretrain()
            self.optimizers["pretrain"] = torch.optim.Adam(self.modules["pretrain"].parameters(), lr=cfg.outer.lr)
        with torch.random.fork_rng():  # its weights are never used, so it must not shift the RNG stream
            self._learner = mk(ep.n_way)  # the N-way architecture the pretrain baseline is fine-tuned in

    def _pretrain_loss(self, model, rng: np.random.Generator):
        """Cross-entropy of ``model`` on a batch of labelled images of the pretrain classes."""
        pool, n = self.pretrain_pool, self.cfg.pretrain.batch_size
        classes = rng.integers(pool.n_classes, size=n)
        samples = (rng.random(n) * pool.counts[classes]).astype(np.int64)[:, None]
        x = torch.as_tensor(pool.gather(classes, samples)[:, 0], dtype=torch.float32) / 255.0
        out = model(x)
        y = torch.as_tensor(classes)
        return torch.nn.functional.cross_entropy(out, y), (out.argmax(-1) == y).float().mean().item()

    def baseline_losses(self, batch: TaskBatch, rng: np.random.Generator):
        if "pretrain" not in self.modules:
            return {}, {}
        loss, acc = self._pretrain_loss(self.modules["pretrain"], rng)
        return {"pretrain": loss}, {"accuracy/pretrain": acc}

    # ---- the pretrain baseline on demand ----------------------------------------------------
    def baseline_path(self, kind: str = "pretrain"):
        from pathlib import Path
        return Path(self.run_dir) / "baselines" / f"{kind}.pt"

    def train_baselines(self, methods=None, updates=None, overwrite=False) -> list[str]:
        """Train the pretrain baseline (``pretrain.updates`` Adam steps, its own seed stream) into
        RUN_DIR/baselines/pretrain.pt, unless it is trained in the loop or already there."""
        cfg = self.cfg
        wanted = [m for m in (methods if methods is not None else cfg.baselines) if m == "pretrain"]
        if not wanted or cfg.pretrain.when == "in_loop" or (self.baseline_path().exists() and not overwrite):
            return []
        rng = np.random.default_rng([cfg.seed, 7])
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            model = self._new_pretrain()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.outer.lr)
        for _ in range(updates or cfg.pretrain.updates):
            loss, _ = self._pretrain_loss(model, rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        path = self.baseline_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        return ["pretrain"]

    def after_training(self) -> list[str]:
        return self.train_baselines() if self.run_dir is not None else []

    def _pretrain_model(self):
        """The trained pretrain classifier (in the loop or from RUN_DIR/baselines), or None."""
        if "pretrain" in self.modules:
            return self.modules["pretrain"]
        if "pretrain" in self.cfg.baselines and self.run_dir is not None and self.baseline_path().exists():
            model = self._new_pretrain()
            model.load_state_dict(torch.load(self.baseline_path(), map_location="cpu", weights_only=True))
            return model
        return None

    # ---- evaluation -------------------------------------------------------------------------
    def eval_batches(self, n: int, seed: int, stream: int = 1, pool=None):
        """The ``n`` test episodes of ``seed`` (or of another pool), ``fewshot_eval.chunk`` at a time."""
        return self.sampler(pool or self.test_pool).fixed_episodes(n, seed, batch_size=self.cfg.fewshot_eval.chunk)

    def _pretrain_start(self, model):
        """Pretrained backbone + a zero N-way head, run through the N-way architecture."""
        p = {k: v.detach() for k, v in params_of(model).items()}
        for name in HEAD:
            p[name] = torch.zeros_like(params_of(self._learner)[name])
        return p

    def pretrain_lr(self, start, steps: int, seed: int) -> tuple[float, dict]:
        """The head's fine-tuning step size, chosen on validation-class episodes (classes the
        pretrain classifier never saw)."""
        ev = self.cfg.fewshot_eval
        n = ev.validation_episodes
        score = lambda lr: self.fine_tune_curve(self._learner, start, self.eval_batches(n, seed + 1, pool=self.val_pool),
                                                max(steps, 1), lr, HEAD)[:, -1].mean()
        lr, scores = evaluation.choose_step_size(score, ev.pretrain_lrs, higher_is_better=True)
        return lr, evaluation.step_size_record(lr, ev.pretrain_lrs, scores, n, "one size for all steps")

    def baseline_curves(self, n: int, steps: int, seed: int):
        model = self._pretrain_model()
        if model is None:
            return {}, {}
        start = self._pretrain_start(model)
        lr, record = self.pretrain_lr(start, steps, seed)
        curve = self.fine_tune_curve(self._learner, start, self.eval_batches(n, seed), steps, lr, HEAD)
        return {"pretrain": curve}, {"pretrain": record}


register_track("fewshot", kind="supervised", config=FewShotConfig, cls=FewShotTrack)
