"""The inner loop θ → φ: the one place where fast weights are computed (Finn et al. 2017, eq. 1).

``adapt`` takes gradient steps on a task's support loss. The same function serves:
- one task (params are θ itself) or a meta-batch (params stacked with a leading task axis and a
  loss that sums per-task losses; see :func:`metarl.functional.stack`);
- second order (default): ``create_graph=True``, so the outer loss differentiates through the
  inner gradients (the Hessian-vector products come from autograd);
- first order (FOMAML, Finn et al. 2017 sec. 5.2): the inner gradients are treated as constants;
- a scalar step size, one per parameter tensor, or learned per-element step sizes (Meta-SGD,
  Li et al. 2017) given as tensors that may themselves require grad;
- all parameters or a named subset (``only``: head-only adaptation as in ANIL, Raghu et al. 2020).

Supervised tracks hand it an MSE or cross-entropy loss on a support batch; meta-RL hands it a
REINFORCE loss on episodes. It never samples data itself.
"""
from __future__ import annotations

from typing import Callable, Collection, Mapping, Union

import torch
from torch import Tensor

from .functional import Params

LearningRate = Union[float, Tensor, Mapping[str, Union[float, Tensor]]]
LossFn = Callable[[Params], Tensor]


def _lr_for(lr: LearningRate, name: str) -> Union[float, Tensor]:
    if isinstance(lr, Mapping):
        if name not in lr:
            raise KeyError(f"no inner learning rate for parameter '{name}': give the lr dict an entry for every adapted parameter")
        return lr[name]
    return lr


def _selected(params: Mapping[str, Tensor], only: Collection[str] | Callable[[str], bool] | None) -> list[str]:
    if only is None:
        return list(params)
    if callable(only):
        names = [n for n in params if only(n)]
    else:
        unknown = sorted(set(only) - set(params))
        if unknown:
            raise KeyError(f"cannot adapt unknown parameters {unknown}; known: {sorted(params)}")
        names = [n for n in params if n in set(only)]
    if not names:
        raise ValueError("'only' selects no parameter to adapt: check the names against the model's named_parameters()")
    return names


def inner_step(loss_fn: LossFn, params: Mapping[str, Tensor], lr: LearningRate, *,
               first_order: bool = False, only=None) -> Params:
    """One gradient step φ = θ − α ∇_θ L_support(θ) on the selected parameters.

    When no parameter requires grad (evaluation), the step runs on fresh leaves and returns
    detached tensors, so a 10-step evaluation keeps no graph."""
    names = _selected(params, only)
    differentiable = any(params[n].requires_grad for n in params) and torch.is_grad_enabled()
    with torch.enable_grad():
        if differentiable:
            current = dict(params)
        else:
            current = dict(params)
            for n in names:
                current[n] = params[n].detach().clone().requires_grad_(True)
        loss = loss_fn(current)  # a non-finite loss propagates to the outer loss, where the loop stops the run
        grads = torch.autograd.grad(loss, [current[n] for n in names],
                                    create_graph=differentiable and not first_order, allow_unused=True)
    new = dict(current)
    for n, g in zip(names, grads):
        if g is None:  # the support loss does not depend on this tensor: its gradient is zero
            continue
        if first_order or not differentiable:
            g = g.detach()
        new[n] = current[n] - _lr_for(lr, n) * g
        if not differentiable:
            new[n] = new[n].detach()
    return new


def adapt(loss_fn: LossFn, params: Mapping[str, Tensor], *, steps: int = 1, lr: LearningRate = 0.01,
          first_order: bool = False, only=None) -> Params:
    """``steps`` inner gradient steps from ``params``; returns φ (differentiable in θ unless
    ``first_order``). ``loss_fn(params)`` must return a scalar; for a stacked meta-batch it must
    be the *sum* of per-task losses so each task's gradient is its own."""
    if steps < 0:
        raise ValueError(f"inner steps must be >= 0, got {steps}")
    phi = dict(params)
    for _ in range(steps):
        phi = inner_step(loss_fn, phi, lr, first_order=first_order, only=only)
    return phi


def trajectory(loss_fn: LossFn, params: Mapping[str, Tensor], steps: int, *, lr: LearningRate = 0.01,
               first_order: bool = False, only=None) -> list[Params]:
    """[φ0 = θ, φ1, ..., φK]: the weights after each inner step, for adaptation curves."""
    out = [dict(params)]
    for _ in range(steps):
        out.append(inner_step(loss_fn, out[-1], lr, first_order=first_order, only=only))
    return out
