"""Alpha MAML (Behl, Baydin & Torr 2019, "Alpha MAML: Adaptive Model-Agnostic Meta-Learning").

MAML whose two scalar step sizes, the inner α and the outer (meta) β, are adapted online by
hypergradient descent (Baydin et al. 2018, "Online Learning Rate Adaptation with Hypergradient
Descent", HD): each step size moves against the derivative of the loss *after* the update it
took with respect to that step size, which is a dot product of gradients that are computed anyway.

Inner α (SGD-HD on MAML's inner SGD step). With φ_i = θ − α ∇_θ L_support,i(θ) (one step) the
meta-objective's derivative is

    ∂/∂α  mean_i L_query,i(φ_i) = − mean_i ∇_φ L_query,i(φ_i) · ∇_θ L_support,i(θ),

the "consecutive gradients" (support gradient at θ, query gradient at φ) of one task, averaged
over the meta-batch, and α_t = α_{t−1} − η_α ∂L/∂α (``alpha_maml.inner_hyper_lr``). It is taken
by autograd in the same backward pass as θ's meta-gradient (α enters the engine as a 0-dim tensor,
:func:`metarl.algorithms.maml.meta_backward` ``extra=``), so it is exact for any number of inner
steps too. α is updated once per meta-iteration with the meta-batch's mean hypergradient (the
batched form of the per-task update); the new α is used from the next iteration on.

Outer β (``alpha_maml.outer_rule``):
- ``adam_hd`` (default): Adam-HD, Baydin et al. 2018 sec. 3 / Algorithm 3: with u_{t−1} the
  previous Adam direction m̂_{t−1} / (√v̂_{t−1} + ε), β_t = β_{t−1} + η_β g_t · u_{t−1}, then an
  Adam step of size β_t. MAML's outer optimizer is Adam (Finn et al.'s code, and this engine's),
  so ``adam_hd`` with ``outer_hyper_lr: 0`` is exactly MAML (tests/test_alpha_maml.py checks it).
- ``sgd_hd``: SGD-HD, β_t = β_{t−1} + η_β g_t · g_{t−1}, then θ_t = θ_{t−1} − β_t g_t.
Note for the merger: which of the two Alpha MAML's experiments used could not be checked against
the paper's text from this workspace (only its abstract was reachable); the default follows MAML's
Adam. g_t is θ's meta-gradient (all tensors concatenated), as HD treats the parameters as one vector.

Initial values: ``inner.lr`` (α_0) and ``outer.lr`` (β_0), so ``--set algorithm=alpha_maml`` on
any MAML config starts from that config's step sizes. α and β (and SGD-HD's previous gradient) are
method state (:meth:`extra_state`), restored bitwise on ``--resume``; every iteration logs the
values it used as ``step/inner_lr`` and ``step/outer_lr``, and ``hypergrad/inner``, ``hypergrad/outer``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..config import ConfigError
from ..functional import params_of
from ..registry import algorithm
from ..tasks.batch import TaskBatch
from .base import Problem, finite
from .maml import MAML, adapted_predictions, meta_backward, query_metrics


@dataclass
class AlphaMAMLConfig:
    """Alpha MAML's own settings (config section ``alpha_maml``)."""
    inner_hyper_lr: float = 1e-4
    """η_α: hypergradient step size of the inner step size α (0 keeps α = inner.lr)."""
    outer_hyper_lr: float = 1e-7
    """η_β: hypergradient step size of the outer step size β (0 keeps β = outer.lr; Baydin et al.
    2018 used 1e-7 for Adam-HD, 1e-3 for SGD-HD)."""
    outer_rule: Literal["adam_hd", "sgd_hd"] = "adam_hd"
    """Outer optimizer whose step size β is adapted: Adam-HD (MAML's Adam) or SGD-HD."""

    def validate(self):
        if not (math.isfinite(self.inner_hyper_lr) and self.inner_hyper_lr >= 0
                and math.isfinite(self.outer_hyper_lr) and self.outer_hyper_lr >= 0):
            raise ConfigError(f"alpha_maml: inner_hyper_lr and outer_hyper_lr must be finite and >= 0 (e.g. 1e-4, 1e-7), "
                              f"got {self.inner_hyper_lr}, {self.outer_hyper_lr}")


def _flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@algorithm("alpha_maml")
class AlphaMAML(MAML):
    """MAML with α and β adapted by hypergradient descent (Behl et al. 2019, Algorithm 2)."""
    Config = AlphaMAMLConfig

    def __init__(self, problem: Problem, cfg):
        super().__init__(problem, cfg)
        self.inner_lr = float(cfg.inner.lr)
        self.outer_lr = float(cfg.outer.lr)
        if self.own.outer_rule == "sgd_hd":  # replace MAML's Adam
            self.optimizers[self.name] = torch.optim.SGD(self.model.parameters(), lr=self.outer_lr)
        self.prev_grad: Tensor | None = None  # SGD-HD: g_{t−1}

    # ---- the two hypergradients -----------------------------------------------------------
    def inner_hypergradient(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Zero the optimizer, accumulate θ's meta-gradient into ``.grad`` with α = ``inner_lr``
        and return (query predictions, ∂ mean query loss / ∂α)."""
        self.optimizers[self.name].zero_grad(set_to_none=True)
        alpha = torch.tensor(self.inner_lr, requires_grad=True)
        kw = self.inner_kwargs()
        kw["lr"] = alpha
        preds = meta_backward(self.model, params_of(self.model), batch, self.problem.loss, extra=[alpha], **kw)
        h = alpha.grad if alpha.grad is not None else torch.zeros(())
        return preds, h.detach()

    def outer_hypergradient(self, grads: Tensor) -> float:
        """∂L(θ_{t−1})/∂β of the previous outer update, from this iteration's gradient g_t:
        −g_t · g_{t−1} (SGD-HD) or −g_t · u_{t−1} (Adam-HD); 0 on the first iteration."""
        opt = self.optimizers[self.name]
        params = [p for g in opt.param_groups for p in g["params"]]
        if self.own.outer_rule == "sgd_hd":
            return 0.0 if self.prev_grad is None else -torch.dot(grads, self.prev_grad).item()
        group = opt.param_groups[0]
        (b1, b2), eps = group["betas"], group["eps"]
        state = [opt.state.get(p, {}) for p in params]
        if not state or any("step" not in s for s in state):
            return 0.0
        step = float(state[0]["step"])
        m = _flat([s["exp_avg"] for s in state]) / (1 - b1 ** step)
        v = _flat([s["exp_avg_sq"] for s in state]) / (1 - b2 ** step)
        u = m / (v.sqrt() + eps)
        return torch.dot(grads, u).neg().item()

    def train_step(self, batch: TaskBatch, iteration: int) -> dict[str, float]:
        opt = self.optimizers[self.name]
        used_inner = self.inner_lr
        preds, h_inner = self.inner_hypergradient(batch)
        params = [p for g in opt.param_groups for p in g["params"]]
        grads = _flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in params]).detach()
        h_outer = self.outer_hypergradient(grads)
        new_outer = self.outer_lr - self.own.outer_hyper_lr * h_outer
        new_inner = used_inner - self.own.inner_hyper_lr * h_inner.item()
        metrics = query_metrics(self.name, self.problem, preds, batch)
        metrics.update({"step/inner_lr": used_inner, "step/outer_lr": new_outer,
                        "hypergrad/inner": h_inner.item(), "hypergrad/outer": h_outer})
        if finite(metrics) and math.isfinite(new_inner):
            self.outer_lr = new_outer
            for g in opt.param_groups:
                g["lr"] = new_outer
            opt.step()
            self.inner_lr = new_inner
            if self.own.outer_rule == "sgd_hd":
                self.prev_grad = grads.clone()
        return metrics

    # ---- evaluation and state ---------------------------------------------------------------
    def predict(self, batch: TaskBatch, steps: int) -> list[Tensor]:
        """Query predictions after 0..steps inner steps of the current (adapted) α."""
        return adapted_predictions(self.model, params_of(self.model), batch, self.problem.loss, steps=steps,
                                   lr=self.inner_lr, only=self.cfg.inner.only)

    def not_shardable(self):
        return ("its step sizes move by hypergradients read from the rank's own gradient and support loss "
                "before the outer step")

    def step_sizes(self) -> dict:
        return {"inner_lr": self.inner_lr, "outer_lr": self.outer_lr, "initial_inner_lr": self.cfg.inner.lr,
                "initial_outer_lr": self.cfg.outer.lr, "rule": f"hypergradient descent (inner sgd_hd, outer {self.own.outer_rule})"}

    def extra_state(self) -> dict:
        out = {"inner_lr": self.inner_lr, "outer_lr": self.outer_lr}
        if self.prev_grad is not None:
            out["prev_grad"] = self.prev_grad
        return out

    def load_extra_state(self, state: dict) -> None:
        self.inner_lr = float(state["inner_lr"])
        self.outer_lr = float(state["outer_lr"])
        self.prev_grad = state.get("prev_grad")
