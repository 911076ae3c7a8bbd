"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

For each task τ_i: start from θ, take k steps of an ordinary optimizer (Adam with β1 = 0, or plain
SGD) on minibatches of the task's data, ending at φ_i = U^k_τi(θ); then move θ towards them:

    θ ← θ + ε · (1/n) Σ_i (φ_i − θ)                                  (sec. 3, Algorithm 2, batched)
    θ ← θ + ε · (φ − θ), one task at a time                             (Algorithm 1, serial)

with the outer step size ε annealed linearly from ``meta_step`` to ``meta_step_final`` over
training (the paper's code: 1.0 → 0 on Omniglot, 0.1 → 0 on sine). No gradient flows through the
inner loop: (θ − φ_i) is itself the "Reptile gradient", which sec. 5 shows contains the MAML
gradient's leading terms when k ≥ 2. The inner steps use *all* of a training task's data
(support and query together: Reptile has no support/query split in training; the paper's
Omniglot code samples ``--train-shots 10`` images per class, so the reptile_omniglot_*.yaml
configs set ``episode.q_query`` to 10 − k_shot).

Evaluation (``predict``) is the same inner optimizer on the support set alone, from a fresh
optimizer state, recording the query predictions after 0..K optimizer steps (the x axis of the
adaptation curve counts optimizer steps; the paper tests after 50). Few-shot evaluation is
*transductive*, as in the paper's table (its ``--transductive`` flag): metarl's Conv4 always
normalises with the statistics of the batch it is given, so the query set is scored as one batch
with its own batch-norm statistics (see ``policies/conv4.py``).

Training metrics (``loss/reptile``, ``accuracy/reptile``) are the adapted weights' scores on the
training episodes' query sets, which the inner loop trained on: a progress signal, optimistic by
construction; the held-out numbers are ``metarl evaluate``'s.

Two deliberate differences from the paper's TensorFlow code, both stated so they can be judged:
- Adam's moments start fresh for every task (here a task's φ_i is a function of θ and the task
  alone, as Algorithms 1-2 write it, so the batched meta-batch is order-free and evaluation does
  not depend on training history). The reference code keeps one Adam state in the TF graph that
  carries over across tasks and meta-iterations (only the trainable variables are reset);
  with β1 = 0 that makes its steps g/RMS(g over recent tasks) instead of a fresh per-task
  normalisation.
- Adam follows ``torch.optim.Adam`` (ε added to the bias-corrected √v̂); TF adds ε to √v before
  the bias correction. Equal up to ε-order terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Optional

import torch
from torch import Tensor

from ..adaptation import inner_step
from ..config import ConfigError, in_range, resumable
from ..functional import Params, forward_tasks, params_of, stack
from ..registry import algorithm
from ..tasks.batch import TaskBatch
from .base import Method, Problem, finite


@dataclass
class ReptileConfig:
    """Reptile's own settings (config section ``reptile``); the shared ``inner`` section is unused."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """Inner optimizer: Adam (the paper's few-shot runs, β1 = 0) or plain SGD (its sine demo)."""
    lr: float = 0.001
    """Inner step size (Omniglot 5-way: 0.001, 20-way: 0.0005; sine SGD: 0.02)."""
    beta1: float = 0.0
    """Adam's first-moment decay (the paper's code: 0; momentum across 5 steps mostly hurts)."""
    beta2: float = 0.999
    """Adam's second-moment decay."""
    eps: float = 1e-8
    """Adam's ε."""
    steps: int = 5
    """Inner optimizer steps per task during meta-training (Omniglot 5-way: 5, 20-way: 10)."""
    batch_size: Optional[int] = 10
    """Inner minibatch during meta-training, drawn without replacement, epoch after epoch, from
    the task's support+query data (null: the whole task every step)."""
    eval_batch_size: Optional[int] = resumable(5, why="evaluation only")
    """Minibatch of the support set at evaluation (5-way: 5, 20-way: 10; null: the whole set)."""
    meta_step: float = 1.0
    """Outer step size ε at the first iteration (the paper: 1.0 few-shot, 0.1 sine)."""
    meta_step_final: float = 0.0
    """ε at the end of annealing (linear; the paper: 0)."""
    anneal_over: Optional[int] = None
    """Iterations over which ε is annealed (null: the run's ``iterations``). Pin it when a run will
    be stopped early and extended with --resume, so the schedule does not depend on ``iterations``."""
    serial: bool = False
    """Algorithm 1: the meta-batch's tasks one after another, each followed by its own outer step
    θ ← θ + ε(φ − θ); false: Algorithm 2, one step towards the mean of the meta-batch's φ_i."""
    eval_seed: int = resumable(0, why="evaluation only")
    """Seed of the evaluation minibatch order (its own generator: evaluation never touches the
    training RNG streams)."""

    def validate(self):
        in_range("reptile.steps", self.steps, 0, 10_000)
        if self.lr <= 0 or not (0 <= self.beta1 < 1) or not (0 <= self.beta2 < 1) or self.eps < 0:
            raise ConfigError(f"reptile: need lr > 0, steps >= 0, 0 <= beta1, beta2 < 1, eps >= 0 "
                              f"(got lr={self.lr}, steps={self.steps}, beta1={self.beta1}, beta2={self.beta2}, eps={self.eps})")
        for key in ("batch_size", "eval_batch_size", "anneal_over"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"reptile.{key} must be >= 1 or null, got {v}")


# --------------------------------------------------------------------------- the inner optimizer

def minibatch_indices(n_tasks: int, n: int, batch_size: Optional[int], steps: int,
                      generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
    """[steps, T, B] example indices: each task's stream of random permutations of 0..n-1, cut into
    consecutive minibatches of B (so one epoch uses every example once, as the paper's
    ``_mini_batches`` without replacement). None when B is null or >= n (full batch every step)."""
    if batch_size is None or batch_size >= n or steps == 0:
        return None
    epochs = -(-steps * batch_size // n)
    perms = torch.rand(n_tasks, epochs, n, generator=generator).argsort(-1).reshape(n_tasks, -1)
    return perms[:, :steps * batch_size].reshape(n_tasks, steps, batch_size).transpose(0, 1)


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """Rows idx [T, B] of t [T, N, ...] per task."""
    return torch.gather(t, 1, idx.reshape(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:]))


def adam_step(params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: dict, *, lr: float,
              beta1: float, beta2: float, eps: float) -> tuple[Params, dict]:
    """One Adam step (Kingma & Ba 2015, Algorithm 1, with ``torch.optim.Adam``'s ε placement) on a
    dict of tensors, pure: returns (new params, new state). ``state``: {"t": int, "m": {}, "v": {}}."""
    t = state["t"] + 1
    m = {n: beta1 * state["m"].get(n, 0.0) + (1 - beta1) * g for n, g in grads.items()}
    v = {n: beta2 * state["v"].get(n, 0.0) + (1 - beta2) * g * g for n, g in grads.items()}
    c1, c2 = 1 - beta1 ** t, 1 - beta2 ** t
    new = dict(params)
    for n in grads:
        new[n] = params[n] - lr * (m[n] / c1) / ((v[n] / c2).sqrt() + eps)
    return new, {"t": t, "m": m, "v": v}


def _descend(model, phi: Params, x: Tensor, y: Tensor, loss, opt: ReptileConfig, state: dict) -> tuple[Params, dict]:
    """One inner optimizer step on every task of a stacked meta-batch (loss summed over tasks, so
    each task's gradient is its own). No graph is kept: Reptile never differentiates through it."""
    task_loss = lambda p: loss(forward_tasks(model, p, x), y).sum()
    if opt.optimizer == "sgd":
        return inner_step(task_loss, phi, opt.lr), state
    with torch.enable_grad():
        leaves = {n: p.detach().requires_grad_(True) for n, p in phi.items()}
        grads = torch.autograd.grad(task_loss(leaves), list(leaves.values()), allow_unused=True)
    grads = {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(leaves.items(), grads)}
    return adam_step({n: p.detach() for n, p in phi.items()}, grads, state, lr=opt.lr, beta1=opt.beta1,
                     beta2=opt.beta2, eps=opt.eps)


def inner_trajectory(model, params: Mapping[str, Tensor], x: Tensor, y: Tensor, loss, opt: ReptileConfig, *,
                     steps: int, batch_size: Optional[int], generator: Optional[torch.Generator] = None,
                     on_step=None) -> Params:
    """φ after ``steps`` inner optimizer steps from θ (``params``, stacked [T, ...]) on each task's
    data x [T, N, ...], y [T, N, ...], from a fresh optimizer state; ``on_step(k, φ_k)`` is called
    for k = 0..steps (evaluation records the query predictions there)."""
    phi = {n: p.detach() for n, p in params.items()}
    idx = minibatch_indices(x.shape[0], x.shape[1], batch_size, steps, generator)
    state = {"t": 0, "m": {}, "v": {}}
    if on_step is not None:
        on_step(0, phi)
    for k in range(steps):
        xb, yb = (x, y) if idx is None else (_take(x, idx[k]), _take(y, idx[k]))
        phi, state = _descend(model, phi, xb, yb, loss, opt, state)
        if on_step is not None:
            on_step(k + 1, phi)
    return phi


# --------------------------------------------------------------------------- the method

@algorithm("reptile")
class Reptile(Method):
    """Reptile (Nichol et al. 2018, Algorithms 1-2): θ moves towards each task's fine-tuned weights.

    Owns θ (``modules["reptile"]``) and no outer optimizer: the outer step is the interpolation
    θ ← θ + ε·mean_i(φ_i − θ), ε annealed linearly (:meth:`meta_step_size`)."""
    Config = ReptileConfig
    curve_axis = "inner optimizer steps"
    defaults = {
        # the paper's sine demo (sec. 4, fig. 1; openai's reptile-sinewaves-demo): SGD 0.02, one epoch
        # over the task's 50 points in minibatches of 10 (5 steps), ε 0.1 → 0, 32 SGD steps at test
        "sine": {"reptile": {"optimizer": "sgd", "lr": 0.02, "steps": 5, "batch_size": 10, "eval_batch_size": None,
                             "meta_step": 0.1, "meta_step_final": 0.0},
                 "eval": {"steps": 32}},
        # the paper's Omniglot 5-way settings (its README / Appendix A): Adam(β1=0) 0.001, 5 steps on
        # minibatches of 10, ε 1.0 → 0, 50 steps on minibatches of 5 at test
        "fewshot": {"reptile": {"optimizer": "adam", "lr": 0.001, "steps": 5, "batch_size": 10, "eval_batch_size": 5,
                                "meta_step": 1.0, "meta_step_final": 0.0},
                    "eval": {"steps": 50}},
    }

    def __init__(self, problem: Problem, cfg):
        super().__init__(problem, cfg)
        self.model = problem.make_model()
        self.modules[self.name] = self.model

    def meta_step_size(self, iteration: int) -> float:
        """ε at ``iteration`` (0-based): linear from meta_step to meta_step_final over
        ``anneal_over`` iterations (the paper's code: frac = i / meta_iters), then constant."""
        o = self.own
        horizon = o.anneal_over or max(1, self.cfg.iterations)
        frac = min(1.0, iteration / horizon)
        return (1 - frac) * o.meta_step + frac * o.meta_step_final

    def _adapt(self, theta: Params, x: Tensor, y: Tensor) -> Params:
        o = self.own
        return inner_trajectory(self.model, stack(theta, x.shape[0]), x, y, self.problem.loss, o,
                                steps=o.steps, batch_size=o.batch_size)

    def train_step(self, batch: TaskBatch, iteration: int) -> dict[str, float]:
        eps = self.meta_step_size(iteration)
        x = torch.cat([batch.x_support, batch.x_query], 1)  # Reptile trains on all of a task's data
        y = torch.cat([batch.y_support, batch.y_query], 1)
        theta = {n: p.detach() for n, p in params_of(self.model).items()}
        if self.own.serial:  # Algorithm 1: every task moves θ before the next one adapts
            new, phis = dict(theta), []
            for i in range(batch.n_tasks):
                phi = self._adapt(new, x[i:i + 1], y[i:i + 1])
                new = {n: new[n] + eps * (phi[n][0] - new[n]) for n in new}
                phis.append(phi)
            phi = {n: torch.cat([p[n] for p in phis]) for n in theta}
        else:  # Algorithm 2: one step towards the mean of the meta-batch's adapted weights
            phi = self._adapt(theta, x, y)
            new = {n: theta[n] + eps * (phi[n].mean(0) - theta[n]) for n in theta}
        with torch.no_grad():
            preds = forward_tasks(self.model, phi, batch.x_query)  # the adapted weights on the query set
        from .maml import query_metrics
        metrics = query_metrics(self.name, self.problem, preds, batch)
        metrics[f"meta_step/{self.name}"] = eps
        metrics[f"update_norm/{self.name}"] = math.sqrt(sum(float((new[n] - theta[n]).pow(2).sum()) for n in theta))
        if finite(metrics):
            with torch.no_grad():
                for n, p in params_of(self.model).items():
                    p.copy_(new[n])
        return metrics

    def predict(self, batch: TaskBatch, steps: int) -> list[Tensor]:
        """Query predictions after 0..steps inner optimizer steps on each task's support set (fresh
        optimizer state, minibatches of ``eval_batch_size``, order fixed by ``eval_seed``)."""
        o = self.own
        theta = stack({n: p.detach() for n, p in params_of(self.model).items()}, batch.n_tasks)
        gen = torch.Generator().manual_seed(o.eval_seed)
        out: list[Tensor] = []

        def record(k, phi):
            with torch.no_grad():
                out.append(forward_tasks(self.model, phi, batch.x_query))

        inner_trajectory(self.model, theta, batch.x_support, batch.y_support, self.problem.loss, o, steps=steps,
                         batch_size=o.eval_batch_size, generator=gen, on_step=record)
        return out

    def not_shardable(self):
        return ("its outer update is the interpolation θ + ε·mean(φ − θ), not an optimizer step on a gradient, and its "
                "minibatches draw torch random numbers for the whole meta-batch")

    def step_sizes(self) -> dict:
        o = self.own
        return {"inner_optimizer": o.optimizer, "inner_lr": o.lr, "eval_batch_size": o.eval_batch_size,
                **({"beta1": o.beta1, "beta2": o.beta2, "eps": o.eps} if o.optimizer == "adam" else {})}
