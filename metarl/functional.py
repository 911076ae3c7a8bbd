"""Functional parameters: a model is a stock ``nn.Module``; its weights travel as a dict.

MAML's fast weights φ are a function of the meta-parameters θ (Finn et al. 2017, eq. 1), so the
forward pass must accept weights that are not the module's own attributes. Every track goes
through :func:`forward` (one task) or :func:`forward_tasks` (a meta-batch of tasks, each with its
own weights); nothing copies modules or patches attributes.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

Params = dict[str, Tensor]


def params_of(module: nn.Module) -> Params:
    """The module's trainable parameters θ as a name → tensor dict (the tensors themselves, so an
    optimizer over ``module.parameters()`` and gradients through the dict stay connected)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def detached(params: Mapping[str, Tensor]) -> Params:
    """A copy of ``params`` cut from the graph (evaluation, first-order bookkeeping)."""
    return {name: p.detach() for name, p in params.items()}


def forward(module: nn.Module, params: Mapping[str, Tensor], *args, **kwargs) -> Tensor:
    """Run ``module`` with ``params`` in place of its own parameters (buffers stay its own)."""
    return functional_call(module, dict(params), args, kwargs, strict=False)


def stack(params: Mapping[str, Tensor], n_tasks: int) -> Params:
    """Give every task its own view of θ: each tensor gains a leading task axis of size n_tasks.

    It is an ``expand`` (no copy); the gradient of a sum of per-task losses with respect to the
    stacked tensor is, row by row, each task's own gradient, which is what lets one backward pass
    adapt a whole meta-batch."""
    return {name: p.unsqueeze(0).expand(n_tasks, *p.shape) for name, p in params.items()}


def forward_tasks(module: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Per-task forward: ``params`` carry a leading task axis [T, ...], ``x`` is [T, N, ...].

    A model may implement ``forward_tasks(params, x)`` natively (batched matmuls for MLPs,
    grouped convolutions for conv nets), which is faster than ``vmap`` on the CPU. Otherwise it
    falls back to ``vmap`` over ``functional_call`` for the forward pass only; gradients are
    taken outside by autograd. That split matters: ``vmap`` over ``torch.func.grad`` through
    ``batch_norm`` gives a wrong second-order meta-gradient on torch 2.13, while a vmapped
    forward differentiated by autograd is exact (tests/test_conv_meta_gradient.py checks both).
    """
    native = getattr(module, "forward_tasks", None)
    if native is not None:
        return native(params, x)
    return vmap(lambda p, xi: forward(module, p, xi))(dict(params), x)
