"""MetaOptNet (Lee, Maji, Ravichandran & Soatto 2019, "Meta-Learning with Differentiable Convex
Optimization", CVPR): a linear multi-class SVM fitted to each episode's support embeddings by a
quadratic program, differentiated through its optimality conditions (sec. 3.3).

``metaoptnet.head: svm`` (the paper's final model) is the Crammer–Singer multi-class SVM, solved
in its dual, n·K variables for n support images and K classes (sec. 3.3):

    minimise_α  ½ Σ_k ‖Σ_n α_n^k f_θ(x_n)‖² − Σ_n α_n^{y_n}
    subject to  α_n^{y_n} ≤ C,  α_n^k ≤ 0 (k ≠ y_n),  Σ_k α_n^k = 0  for every n,

i.e. Q = (XXᵀ) ⊗ I_K, p = −vec(Y), G = I, h = C·vec(Y), A = I_n ⊗ 1_Kᵀ. The classifier is
w_k = Σ_n α_n^k f_θ(x_n), so a query's logits are Σ_n α_n^k ⟨f_θ(x_n), f_θ(x_q)⟩, times a learned
scale (sec. 3.4: the SVM's margins are not calibrated for the softmax). The QP is solved for every
task of the meta-batch at once by :func:`metarl.qp.solve_crammer_singer` (batched primal-dual
interior point, gradients from the KKT conditions, as OptNet/qpth), which uses the structure of Q:
per Newton step K Cholesky factorisations of n×n blocks and one n×n Schur complement, so memory
grows as meta_batch·K·n² (~0.2 GB for 8 20-way 15-shot episodes, where the dense (nK)² form
needed more than the machine's 24 GB); its module docstring has the figures and says why not
qpth. Before the first solve of each episode shape, :func:`check_svm_fits` compares that estimate
with MemAvailable and stops with a one-line error naming the setting to lower.
``head: ridge`` is MetaOptNet's ridge-regression base learner: R2-D2's closed-form solve
(:func:`metarl.algorithms.r2d2.ridge_logits`) with a fixed λ and the learned scale.

Settings from the paper and its code (kjunelee/MetaOptNet): C = 0.1; 3 interior-point iterations
per QP in meta-training (an approximate solution, which the paper found enough, and cheaper) and
more at test time; learned logit scale starting at 1; label smoothing 0.1 on the training loss;
15-shot training episodes for the 1- and 5-shot miniImageNet models (``train_shot``). Their
optimiser is SGD with Nesterov momentum and a step schedule on a ResNet-12; here the toolkit's
Adam (``outer.lr``) on Conv4, as the paper's Conv4 ablation (their Table 1 "4-layer conv").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from ..config import ConfigError, resumable
from ..qp import crammer_singer_bytes, solve_crammer_singer
from ..registry import algorithm
from .protonet import EmbeddingHead, EpisodeOverrides, one_hot
from .r2d2 import ridge_logits


def svm_problem(zs: Tensor, ys: Tensor, n_way: int, C: float):
    """The Crammer–Singer dual of a meta-batch as the (M, P, H) of :func:`metarl.qp.solve_crammer_singer`:
    M = ZZᵀ [t, n, n] (Q = M ⊗ I_K; float64), P = −Y and H = C·Y [t, n, K]."""
    Y = one_hot(ys, n_way, zs.dtype)
    z = zs.double()  # M in float64: float32 rounding leaves ZZᵀ indefinite by ~1e-7·‖M‖ when n > d
    return z @ z.transpose(1, 2), -Y, C * Y


def svm_logits(zs: Tensor, ys: Tensor, zq: Tensor, n_way: int, C: float, iterations: int) -> Tensor:
    """Query scores Σ_n α_n^k ⟨x_n, x_q⟩ of the Crammer–Singer SVM fitted to the support set."""
    alpha = solve_crammer_singer(*svm_problem(zs, ys, n_way, C), iterations).to(zs.dtype)
    return (zq @ zs.transpose(1, 2)) @ alpha


def available_memory() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_svm_fits(tasks: int, n: int, n_way: int, training: bool) -> None:
    """A one-line ConfigError, before the episodes are embedded, when the SVM solve of ``tasks``
    episodes of ``n`` support images (:func:`metarl.qp.crammer_singer_bytes`) would need more memory
    than is available: the kernel would otherwise kill the run mid-iteration; this way the
    checkpoints already saved stay as they are."""
    need, have = crammer_singer_bytes(tasks, n, n_way), available_memory()
    if have is not None and need > have:
        fix = ("metaoptnet.train_shot, metaoptnet.train_way or meta_batch" if training
               else "fewshot_eval.chunk (episodes solved together) or the episode's n_way / k_shot")
        raise ConfigError(f"metaoptnet: the SVM dual of {tasks} episodes x {n} support images x {n_way} classes needs "
                          f"~{need / 2**30:.1f} GB, {have / 2**30:.1f} GB is available: lower {fix}")


class Scale(nn.Module):
    """The learned logit scale (sec. 3.4)."""

    def __init__(self, value: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))


@dataclass
class MetaOptNetConfig(EpisodeOverrides):
    """MetaOptNet (config section ``metaoptnet``)."""
    head: Literal["svm", "ridge"] = "svm"
    """Base learner: the Crammer–Singer SVM (the paper's MetaOptNet-SVM) or ridge regression."""
    C: float = 0.1
    """The SVM's regularisation: the box α_n^{y_n} ≤ C (the paper: 0.1)."""
    train_iterations: int = 3
    """Interior-point iterations per QP in meta-training (the paper's code: 3)."""
    eval_iterations: int = resumable(15, why="evaluation only")
    """Interior-point iterations per QP at evaluation (stops early once converged)."""
    ridge_lambda: float = 50.0
    """λ of the ridge head (fixed; MetaOptNet's code: 50)."""
    scale_init: float = 1.0
    """Initial learned logit scale."""
    label_smoothing: float = 0.1
    """ε of the smoothed training targets: 1 − ε on the label, ε/(K − 1) elsewhere (the paper's code: 0.1)."""

    def validate(self):
        super().validate()
        if not self.C > 0 or self.train_iterations < 1 or self.eval_iterations < 1 or not self.ridge_lambda > 0 \
                or not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"metaoptnet: need C > 0, train/eval_iterations >= 1, ridge_lambda > 0, 0 <= label_smoothing < 1 "
                              f"(got C={self.C}, {self.train_iterations}/{self.eval_iterations}, {self.ridge_lambda}, {self.label_smoothing})")


@algorithm("metaoptnet")
class MetaOptNet(EmbeddingHead):
    """MetaOptNet (Lee et al. 2019): a differentiable SVM (or ridge) head on the Conv4 embedding."""
    Config = MetaOptNetConfig

    def __init__(self, problem, cfg):
        super().__init__(problem, cfg)
        self._fits = set()  # episode shapes check_svm_fits has passed

    def build_head(self):
        return Scale(self.own.scale_init)

    def logits(self, zs, ys, zq, n_way, training):
        c = self.own
        if c.head == "ridge":
            raw = ridge_logits(zs, ys, zq, n_way, c.ridge_lambda)
        else:
            raw = svm_logits(zs, ys, zq, n_way, c.C, c.train_iterations if training else c.eval_iterations)
        return self.head.scale * raw

    def query_logits(self, batch, training):
        if self.own.head == "svm":  # before the embedding too: its activations grow with the same settings
            key = (*batch.y_support.shape, int(batch.y_support.max()) + 1, training)
            if key not in self._fits:  # once per episode shape (memory one step frees may stay with the allocator)
                check_svm_fits(*key)
                self._fits.add(key)
        return super().query_logits(batch, training)

    def train_loss(self, logits: Tensor, y: Tensor) -> Tensor:
        eps, k = self.own.label_smoothing, logits.shape[-1]
        target = one_hot(y, k, logits.dtype) * (1 - eps - eps / (k - 1)) + eps / (k - 1)
        return -(target * logits.log_softmax(-1)).sum(-1).mean(-1)

    def step_sizes(self) -> dict:
        c = self.own
        out = {"head": c.head, "scale": self.head.scale.item()}
        out.update({"C": c.C, "train_iterations": c.train_iterations, "eval_iterations": c.eval_iterations}
                   if c.head == "svm" else {"lambda": c.ridge_lambda})
        return out
