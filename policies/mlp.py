"""Multi-layer perceptron with a native per-task forward.

``forward_tasks`` runs a whole meta-batch with one batched matmul per layer (``torch.baddbmm``),
each task with its own weights; on the CPU this beats ``vmap`` over ``functional_call`` and is what
makes the engine's meta-iteration several times faster than a per-task loop (benchmarks/sine_speed.py).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


class MLP(nn.Module):
    """in → hidden... → out, with ReLU (MAML's sine model is 1-40-40-1 ReLU, Finn et al. 2017 sec. 5.1)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int] = (40, 40), activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}': choose one of {sorted(ACTIVATIONS)}")
        self.activation = activation
        sizes = [in_dim, *hidden, out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        act = ACTIVATIONS[self.activation]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = act(x)
        return x

    def forward_tasks(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """x [T, N, in] with params stacked [T, ...] → [T, N, out]. Extra middle axes of x
        (e.g. time and episode in RL) are flattened into N and restored."""
        return self._per_task(params, x, len(self.layers))

    def features_tasks(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """The last hidden layer's activations [T, N, feature_dim] (the body before the output
        layer, as Conv4's ``features_tasks``): ANIL adapts only the output layer on these.
        ``params`` need not hold the output layer's tensors."""
        return self._per_task(params, x, len(self.layers) - 1)

    @property
    def feature_dim(self) -> int:
        return self.layers[-1].in_features

    def _per_task(self, params: Mapping[str, Tensor], x: Tensor, n_layers: int) -> Tensor:
        """The first ``n_layers`` layers per task (an activation after each but the network's last)."""
        act = ACTIVATIONS[self.activation]
        shape = x.shape
        h = x.reshape(shape[0], -1, shape[-1])
        for i in range(n_layers):
            w, b = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if i < len(self.layers) - 1:
                h = act(h)
        return h.reshape(*shape[:-1], h.shape[-1])
