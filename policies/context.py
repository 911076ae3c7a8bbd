"""Context-conditioned learners for CAVIA (Zintgraf et al. 2019, "Fast Context Adaptation via
Meta-Learning"): a stock model θ plus a per-task context vector φ that enters it as an input.

The context is not a parameter of these modules (it is no part of θ): it travels in the params
dict under :data:`CONTEXT` with a leading task axis [T, context_size], next to θ's stacked
tensors, so ``forward_tasks(params, x)`` has the engine's usual signature and
:func:`metarl.adaptation.adapt` can adapt it alone (``only=[CONTEXT]``). Both wrappers hold the
unmodified model under ``net`` and reuse its own ``forward_tasks``; nothing is copied.

- :class:`InputContext` (sine, sec. 5.1): φ concatenated to an MLP's input. ``[x, φ] W₀ᵀ + b₀`` is
  computed as ``x Wₓᵀ + (b₀ + W_φ φ)``: the context's columns of the first layer (``context_weight``)
  shift that layer's bias per task, which is the concatenation exactly, at no cost per point.
- :class:`FiLMContext` (image classification, sec. 5.2): per conditioned conv block, a linear layer
  maps φ to FiLM parameters (γ, β) (Perez et al. 2018) that scale and shift the block's batch-norm
  output before its ReLU. The paper (and its code, ``classification/models.py``) conditions the
  third of four blocks (``blocks=(2,)``) with 100 context parameters on MiniImageNet.
- :class:`ContextGaussianPolicy` (meta-RL, sec. 5.3): the Gaussian MLP policy with an
  :class:`InputContext` mean network, adapted by REINFORCE steps on the context alone.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .gaussian import GaussianMLPPolicy

CONTEXT = "context"


def _sub(params: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _context(params: Mapping[str, Tensor], size: int, n_tasks: int) -> Tensor:
    ctx = params.get(CONTEXT)
    if ctx is None or ctx.shape != (n_tasks, size):
        got = None if ctx is None else tuple(ctx.shape)
        raise KeyError(f"forward_tasks: params['{CONTEXT}'] must be the per-task context [{n_tasks}, {size}], got {got}: "
                       f"add torch.zeros({n_tasks}, {size}) (CAVIA resets it to zero for every task)")
    return ctx


class InputContext(nn.Module):
    """An MLP whose input is [x, φ] (CAVIA's regression model, Zintgraf et al. 2019 sec. 5.1).

    Parameters θ: ``net.*`` (the wrapped :class:`policies.mlp.MLP`, built for the raw input width)
    and ``context_weight`` [hidden₀, context_size], the first layer's columns for φ, initialised as
    ``nn.Linear(in + context_size, hidden₀)`` would initialise them.
    """

    def __init__(self, net: nn.Module, context_size: int):
        super().__init__()
        if context_size < 1:
            raise ValueError(f"context_size must be >= 1, got {context_size}")
        first = getattr(net, "layers", [None])[0]
        if not isinstance(first, nn.Linear):
            raise TypeError(f"InputContext wraps an MLP (policies/mlp.py) whose first layer is layers.0; got {type(net).__name__}")
        self.net, self.context_size = net, context_size
        self.context_weight = nn.Parameter(torch.empty(first.out_features, context_size))
        bound = 1.0 / math.sqrt(first.in_features + context_size)
        nn.init.uniform_(self.context_weight, -bound, bound)

    def forward_tasks(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """x [T, N, in] → [T, N, out], task t with context ``params['context'][t]``."""
        ctx = _context(params, self.context_size, x.shape[0])
        p = _sub(params, "net.")
        shift = torch.bmm(params["context_weight"], ctx.unsqueeze(-1)).squeeze(-1)  # W_φ φ per task: [T, hidden₀]
        p["layers.0.bias"] = p["layers.0.bias"] + shift
        return self.net.forward_tasks(p, x)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """One task: x [N, in] with context [context_size] (zeros if omitted)."""
        ctx = torch.zeros(self.context_size, dtype=x.dtype) if context is None else context
        params = {k: v.unsqueeze(0) for k, v in self.named_parameters()}
        return self.forward_tasks({**params, CONTEXT: ctx[None]}, x[None])[0]


class FiLMContext(nn.Module):
    """A Conv4 whose chosen blocks are FiLM-conditioned on φ (CAVIA, Zintgraf et al. 2019 sec. 5.2).

    Parameters θ: ``net.*`` (the wrapped :class:`policies.conv4.Conv4`) and ``film.{i}.weight`` /
    ``film.{i}.bias`` for each conditioned block i: (γ, β) = film_i(φ), each of width ``hidden``.
    Initialised as the reference code (``classification/models.py``): Kaiming-uniform weights
    (linear gain) and ``nn.Linear``'s own bias, U(±1/√context_size), so at φ = 0 γ and β are small
    (±0.1 for 100 context parameters), not the identity γ = 1, β = 0.

    Why the bias's scale matters although it does not change the functions reachable: for blocks
    0-2 the next block's batch norm removes any common positive scale of the FiLMed output (the
    logits are invariant to (γ, β) → c·(γ, β), c > 0; tests/test_cavia.py), so what counts is the
    context's share W φ relative to the bias b. The identity start b = 1 (an earlier choice here;
    |b| averages 0.05 under the reference init) made that share ~20x smaller: at initialisation
    the context gradient was ~15x smaller (Omniglot 20-way: |∇_φ L| 0.11 instead of 1.64) and the
    first step of size α = 1 lowered the support loss by 0.01 instead of 0.17. At 20-way 1-shot the
    context then stayed inert and the outer loop only flattened the logits to chance; with the
    reference start CAVIA learns (experiments/RESULTS.md, session 11).
    """

    def __init__(self, net: nn.Module, context_size: int, blocks: Sequence[int] = (2,)):
        super().__init__()
        n_blocks = len(getattr(net, "blocks", []))
        if not n_blocks or not hasattr(net, "hidden"):
            raise TypeError(f"FiLMContext wraps a Conv4 (policies/conv4.py); got {type(net).__name__}")
        if context_size < 1 or not blocks or any(not 0 <= b < n_blocks for b in blocks) or len(set(blocks)) != len(blocks):
            raise ValueError(f"FiLMContext: context_size >= 1 and distinct blocks in 0..{n_blocks - 1} (got {context_size}, {list(blocks)})")
        self.net, self.context_size, self.blocks = net, context_size, tuple(sorted(blocks))
        h = net.hidden
        self.film = nn.ModuleDict({str(b): nn.Linear(context_size, 2 * h) for b in self.blocks})
        for layer in self.film.values():  # the reference code's "kaiming" choice; the bias keeps nn.Linear's init
            nn.init.kaiming_uniform_(layer.weight, nonlinearity="linear")

    def film_params(self, params: Mapping[str, Tensor], n_tasks: int) -> dict[int, tuple[Tensor, Tensor]]:
        """{block: (γ, β)}, each [T, hidden], from the per-task context."""
        ctx = _context(params, self.context_size, n_tasks).unsqueeze(-1)
        out = {}
        for b in self.blocks:
            gb = torch.baddbmm(params[f"film.{b}.bias"].unsqueeze(-1), params[f"film.{b}.weight"], ctx).squeeze(-1)
            out[b] = tuple(gb.chunk(2, dim=-1))
        return out

    def forward_tasks(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Logits [T, N, n_way] for x [T, N, C, H, W], task t conditioned on ``params['context'][t]``."""
        return self.net.forward_tasks(_sub(params, "net."), x, film=self.film_params(params, x.shape[0]))

    def features_tasks(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return self.net.features_tasks(_sub(params, "net."), x, film=self.film_params(params, x.shape[0]))

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """One task: images [N, C, H, W] with context [context_size] (zeros if omitted)."""
        ctx = torch.zeros(self.context_size, dtype=x.dtype) if context is None else context
        params = {k: v.unsqueeze(0) for k, v in self.named_parameters()}
        return self.forward_tasks({**params, CONTEXT: ctx[None]}, x[None])[0]


class ContextGaussianPolicy(GaussianMLPPolicy):
    """CAVIA's meta-RL policy (Zintgraf et al. 2019 sec. 5.3; the reference code's
    ``CaviaMLPPolicy``): the Gaussian MLP policy whose mean network takes [s, φ], the state and
    the task's context, through :class:`InputContext`. θ is the mean network with the context's
    input columns and ``log_std``; the context itself adapts per task.

    The context every task starts from, φ₀ = 0 (sec. 3.1), is registered as the fixed parameter
    ``mean.context`` (``requires_grad=False``: no part of θ, :func:`metarl.functional.params_of`
    leaves it out, no optimizer moves it), so per-task contexts [T, context_size] travel in the
    params dict under that name through the collector like any stacked parameter. Two attributes
    tell the shared meta-RL data path (:mod:`metarl.algorithms.meta_rl`) what to do with it:
    :meth:`task_start` (the entries added to θ at the start of every task) and
    :attr:`adapt_only` (the inner REINFORCE step adapts these alone).
    """

    def __init__(self, obs_dim: int, act_dim: int, context_size: int, hidden: Sequence[int] = (100, 100),
                 activation: str = "relu", init_std: float = 1.0, min_std: float = 1e-6, init: str = "torch"):
        super().__init__(obs_dim, act_dim, hidden, activation, init_std, min_std, init)
        self.mean = InputContext(self.mean, context_size)
        if init == "xavier":  # the context's input columns as the rest of the first layer
            nn.init.xavier_uniform_(self.mean.context_weight)
        self.mean.context = nn.Parameter(torch.zeros(context_size), requires_grad=False)
        self.adapt_only = ("mean." + CONTEXT,)

    def task_start(self) -> dict[str, Tensor]:
        """{"mean.context": φ₀ = 0}, a fresh leaf that requires grad (the inner step differentiates
        with respect to it; stacked per task with θ)."""
        return {self.adapt_only[0]: torch.zeros_like(self.mean.context).requires_grad_(True)}
