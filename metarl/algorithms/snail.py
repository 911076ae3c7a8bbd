"""SNAIL, "A Simple Neural Attentive Meta-Learner" (Mishra, Rohaninejad, Chen & Abbeel 2018, ICLR).

A black-box learner (``blackbox.py``): the episode is one sequence, the N·K labelled support
examples, each its image embedding concatenated with its one-hot label, then the unlabelled query
(its embedding and a zero label); the network reads the sequence causally and its output at the
last position is the query's logits (sec. 3, sec. 4.1 "few-shot image classification").

Architecture (sec. 3.1 and appendix, Omniglot), alternating the paper's two causal blocks:

- **dense block** (``DenseBlock(R, D)``): a causal 1-D convolution of kernel 2 and dilation R, gated
  ``tanh(x_f) ⊙ sigmoid(x_g)`` (D filters), concatenated to its input;
- **TC block** (``TCBlock(T, D)``): dense blocks with dilations 2, 4, ..., 2^⌈log2 T⌉, where T = N·K + 1
  is the sequence length, so every position sees the whole past;
- **attention block** (``AttentionBlock(K, V)``): single-head causal soft attention with key size K
  and value size V, ``softmax(mask(Q Kᵀ / √K)) V``, concatenated to its input (future positions
  masked to −∞);

and, for Omniglot: AttentionBlock(64, 32), TCBlock(T, 128), AttentionBlock(256, 128),
TCBlock(T, 128), AttentionBlock(512, 256), then a 1×1 convolution (per-position linear layer) to
N logits. ``snail.key_sizes`` / ``value_sizes`` / ``tc_filters`` set it (one TC block between
consecutive attention blocks). The embedding is the paper's Omniglot one (``policies/embedding.py``:
four conv blocks and a linear layer to 64), batch norm with running statistics at evaluation, so
nothing but the sequence reaches a prediction (why: that module's docstring).

Queries: each query of an episode is its own sequence, the episode's support prefix followed by
that query alone (as in the paper, one unlabelled example per sequence), so queries never see
each other. Every layer is causal, so the prefix's activations are the same in all of an
episode's Q sequences: ``SNAILNet.forward`` runs the S support positions through the stack once
and each query only as the last position (each block's ``extend``: a dense block of dilation d
reads the query's own input and the prefix's at S − d, an attention block attends to the prefix's
keys and values and the query's own). That is the per-query computation reordered, not an
approximation (same outputs and gradients up to float rounding; ``tests/test_snail.py`` checks it
against the Q full sequences), at the cost of S + Q positions per episode instead of Q·(S + 1).

Training: Adam on the mean query cross-entropy, support order shuffled per episode. Paper
accuracies (Omniglot, 5-way 1/5-shot, 20-way 1/5-shot): 99.07 / 99.78 / 97.64 / 99.36 %.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarl.policies.embedding import ImageEmbedding

from ..config import ConfigError
from ..registry import algorithm
from .blackbox import BlackBox, validate_common


def gated(z: Tensor, dim: int) -> Tensor:
    """The gated activation ``tanh(z_f) ⊙ sigmoid(z_g)`` of z's two halves along ``dim``."""
    zf, zg = z.chunk(2, dim=dim)
    return torch.tanh(zf) * torch.sigmoid(zg)


class DenseBlock(nn.Module):
    """Causal dilated convolution, gated, concatenated (Mishra et al. sec. 3.1, "DenseBlock(R, D)"):
    x [B, L, C] → [B, L, C + D]; output at t sees inputs t − dilation and t only."""

    def __init__(self, in_channels: int, dilation: int, filters: int):
        super().__init__()
        self.dilation = dilation
        self.conv = nn.Conv1d(in_channels, 2 * filters, kernel_size=2, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:
        h = F.pad(x.transpose(1, 2), (self.dilation, 0))  # zeros on the left: causal
        return torch.cat([x, gated(self.conv(h), dim=1).transpose(1, 2)], dim=-1)

    def extend(self, prefix: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
        """(prefix [T, S, C], queries [T, Q, C]) → the same with C + D channels, each query as
        position S of its own sequence prefix ‖ query: it reads its own input and the prefix's at
        S − dilation (the causal zero padding when S < dilation), which all of a task's queries share."""
        t, s, c = prefix.shape
        w = self.conv.weight  # [2D, C, 2]: tap 0 reads t − dilation, tap 1 reads t
        z = F.linear(queries, w[:, :, 1], self.conv.bias)
        if s >= self.dilation:
            z = z + F.linear(prefix[:, s - self.dilation], w[:, :, 0]).unsqueeze(1)
        prefix_out = self(prefix) if s else prefix.new_zeros(t, 0, c + w.shape[0] // 2)  # conv1d refuses length 0
        return prefix_out, torch.cat([queries, gated(z, dim=-1)], dim=-1)


class TCBlock(nn.Module):
    """Dense blocks with dilations 2, 4, ..., 2^⌈log2 T⌉ ("TCBlock(T, D)"): [B, L, C] → [B, L, C + n·D]."""

    def __init__(self, in_channels: int, seq_len: int, filters: int):
        super().__init__()
        n = max(1, math.ceil(math.log2(max(seq_len, 2))))
        self.blocks = nn.ModuleList(DenseBlock(in_channels + i * filters, 2 ** (i + 1), filters) for i in range(n))
        self.out_channels = in_channels + n * filters

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def extend(self, prefix: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
        """``DenseBlock.extend`` through every dense block."""
        for block in self.blocks:
            prefix, queries = block.extend(prefix, queries)
        return prefix, queries


class AttentionBlock(nn.Module):
    """Causal single-head soft attention ("AttentionBlock(K, V)"): [B, L, C] → [B, L, C + V]."""

    def __init__(self, in_channels: int, key_size: int, value_size: int):
        super().__init__()
        self.query = nn.Linear(in_channels, key_size)
        self.key = nn.Linear(in_channels, key_size)
        self.value = nn.Linear(in_channels, value_size)
        self.scale = 1.0 / math.sqrt(key_size)

    def causal_read(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Queries, keys, values of the same L positions [B, L, ·] → [B, L, V]: position t reads
        ``softmax(q_t kᵀ / √K)`` over positions ≤ t."""
        L = q.shape[1]
        future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
        logits = (q @ k.transpose(1, 2) * self.scale).masked_fill(future, float("-inf"))
        return torch.softmax(logits, dim=-1) @ v

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.causal_read(self.query(x), self.key(x), self.value(x))], dim=-1)

    def extend(self, prefix: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
        """(prefix [T, S, C], queries [T, Q, C]) → the same with C + V channels, each query as
        position S of its own sequence prefix ‖ query: it attends to the S prefix positions and to
        itself, never to another query."""
        k, v = self.key(prefix), self.value(prefix)
        prefix_out = torch.cat([prefix, self.causal_read(self.query(prefix), k, v)], dim=-1)
        q = self.query(queries)
        own = (q * self.key(queries)).sum(-1, keepdim=True)  # [T, Q, 1]: the query's key is its own
        w = torch.softmax(torch.cat([q @ k.transpose(1, 2), own], dim=-1) * self.scale, dim=-1)  # [T, Q, S + 1]
        read = w[..., :-1] @ v + w[..., -1:] * self.value(queries)
        return prefix_out, torch.cat([queries, read], dim=-1)


class SNAILNet(nn.Module):
    """Embedding + the causal stack + per-position output layer (see the module docstring)."""

    def __init__(self, n_way: int, seq_len: int, embedding: nn.Module, key_sizes, value_sizes, tc_filters: int):
        super().__init__()
        self.n_way = n_way
        self.embed = embedding
        c = embedding.out_dim + n_way
        layers = []
        for i, (k, v) in enumerate(zip(key_sizes, value_sizes)):
            if i > 0:
                layers.append(TCBlock(c, seq_len, tc_filters))
                c = layers[-1].out_channels
            layers.append(AttentionBlock(c, k, v))
            c += v
        self.layers = nn.ModuleList(layers)
        self.out = nn.Linear(c, n_way)  # the paper's final 1x1 convolution

    def sequence(self, tokens: Tensor) -> Tensor:
        """Logits at every position of token sequences [B, L, E + N] → [B, L, N]."""
        h = tokens
        for layer in self.layers:
            h = layer(h)
        return self.out(h)

    def tokens(self, x_support: Tensor, y_support: Tensor, x_query: Tensor) -> tuple[Tensor, Tensor]:
        """Support tokens [T, S, E + N] (embedding ‖ one-hot label) and query tokens [T, Q, E + N]
        (embedding ‖ zeros)."""
        t, s, q = x_support.shape[0], x_support.shape[1], x_query.shape[1]
        emb = self.embed(torch.cat([x_support, x_query], dim=1))  # every image on its own
        es, eq = emb[:, :s], emb[:, s:]
        support = torch.cat([es, F.one_hot(y_support, self.n_way).to(es.dtype)], dim=-1)
        return support, torch.cat([eq, eq.new_zeros(t, q, self.n_way)], dim=-1)

    def forward(self, x_support: Tensor, y_support: Tensor, x_query: Tensor):
        """Query logits [T, Q, N], each query's as the last position of its own sequence support ‖
        query, from one pass of the shared support prefix (``extend``; the module docstring)."""
        support, queries = self.tokens(x_support, y_support, x_query)
        for layer in self.layers:
            support, queries = layer.extend(support, queries)
        return self.out(queries), None


@dataclass
class SNAILConfig:
    """SNAIL's settings (config section ``snail``); Mishra et al. 2018, appendix (Omniglot)."""
    lr: float = 0.001
    """Adam step size of the whole network (embedding included)."""
    embedding: int = 64
    """Image embedding size (the paper: 64 for Omniglot)."""
    hidden: int = 64
    """Filters of the embedding's four conv blocks (the paper: 64)."""
    key_sizes: list[int] = field(default_factory=lambda: [64, 256, 512])
    """Key size of each attention block (the paper's Omniglot stack: 64, 256, 512)."""
    value_sizes: list[int] = field(default_factory=lambda: [32, 128, 256])
    """Value size of each attention block (32, 128, 256); a TC block sits between consecutive ones."""
    tc_filters: int = 128
    """Filters D of every dense block in the TC blocks (the paper: 128)."""
    shuffle_support: bool = True
    """Show each training episode's support examples in a fresh random order (evaluation: shot-major)."""

    def validate(self):
        validate_common("snail", self.lr, self.embedding, self.hidden)
        if not self.key_sizes or len(self.key_sizes) != len(self.value_sizes) or min(self.key_sizes + self.value_sizes) < 1 \
                or self.tc_filters < 1:
            raise ConfigError(f"snail: key_sizes and value_sizes need the same length >= 1 and sizes >= 1, tc_filters >= 1 "
                              f"(got {self.key_sizes}, {self.value_sizes}, {self.tc_filters}); e.g. snail.key_sizes=[64,256,512]")


@algorithm("snail")
class SNAIL(BlackBox):
    """SNAIL (Mishra et al. 2018): see the module docstring."""
    Config = SNAILConfig
    defaults = {"fewshot": {"baselines": [], "eval": {"steps": 20}}}
    """No pretrain baseline by default (its curve counts fine-tuning steps, not support examples);
    evaluation reveals up to 20 shots per class (capped at the episode's K: the whole support set)."""

    def build(self, in_channels: int, image_size: int) -> nn.Module:
        c, ep = self.own, self.cfg.episode
        emb = ImageEmbedding(in_channels, image_size, hidden=c.hidden, out_dim=c.embedding)
        return SNAILNet(self.n_way, ep.n_way * ep.k_shot + 1, emb, c.key_sizes, c.value_sizes, c.tc_filters)
