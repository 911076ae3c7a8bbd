"""MANN-style recurrent black box: an LSTM over (embedding, previous label) pairs (Santoro, Bartunov,
Botvinick, Wierstra & Lillicrap 2016, "Meta-Learning with Memory-Augmented Neural Networks", ICML).

What is implemented: the paper's *LSTM baseline* learner under its task protocol (sec. 3, fig. 1a),
not the external memory with least-recently-used access (LRUA, sec. 3.2); ``mann`` is the simplest
member of the family, the one the paper compares its memory against. At time t the controller
reads the input x_t together with the label of the *previous* example, y_{t−1} (one-hot; zeros at
t = 0), and predicts y_t; the label of x_t arrives only with the next input, so the network must
bind labels to examples in its state. Differences, for our episode shape: x_t is the image's
embedding (``policies/embedding.py``, learned end to end) instead of raw pixels, and after the
N·K support examples every query is one further step from the state reached after the support
set (its input: the query's embedding and the last support label), so queries never see each
other and the support sequence is run once per episode.

Training: Adam on the mean query cross-entropy plus ``mann.support_loss`` × the cross-entropy of
the predictions at the support positions (the paper's loss is over every time step, sec. 3; at a
class's first appearance that prediction can only be a guess). The adaptation curve's x axis is
support examples per class seen (``blackbox.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarl.policies.embedding import ImageEmbedding

from ..config import in_range
from ..registry import algorithm
from .blackbox import BlackBox, validate_common


class LSTMLearner(nn.Module):
    """Embedding → LSTM over (x_t, y_{t−1}) → linear to N logits."""

    def __init__(self, n_way: int, embedding: nn.Module, hidden: int):
        super().__init__()
        self.n_way = n_way
        self.embed = embedding
        self.lstm = nn.LSTM(embedding.out_dim + n_way, hidden, batch_first=True)
        self.out = nn.Linear(hidden, n_way)

    def forward(self, x_support: Tensor, y_support: Tensor, x_query: Tensor):
        t, s, q = x_support.shape[0], x_support.shape[1], x_query.shape[1]
        emb = self.embed(torch.cat([x_support, x_query], dim=1))
        es, eq = emb[:, :s], emb[:, s:]
        onehot = F.one_hot(y_support, self.n_way).to(emb.dtype)
        previous = torch.cat([onehot.new_zeros(t, 1, self.n_way), onehot], dim=1)  # y_{t-1}; the last is for the queries
        support_logits, state = None, None
        if s > 0:
            h, state = self.lstm(torch.cat([es, previous[:, :s]], dim=-1))
            support_logits = self.out(h)
        query_in = torch.cat([eq, previous[:, s:].expand(t, q, self.n_way)], dim=-1).reshape(t * q, 1, -1)
        if state is not None:  # every query continues its episode's state after the support set
            state = tuple(z.repeat_interleave(q, dim=1) for z in state)
        h, _ = self.lstm(query_in, state)
        return self.out(h[:, 0]).reshape(t, q, self.n_way), support_logits


@dataclass
class MANNConfig:
    """The recurrent black box's settings (config section ``mann``)."""
    lr: float = 0.001
    """Adam step size of the whole learner (embedding included)."""
    embedding: int = 64
    """Image embedding size (the LSTM's input is this plus N label units)."""
    hidden: int = 64
    """Filters of the embedding's four conv blocks."""
    lstm: int = 200
    """LSTM units (Santoro et al.'s LSTM controller: 200)."""
    support_loss: float = 1.0
    """Weight of the cross-entropy of the predictions at the support positions (Santoro et al.
    train on every time step); 0: the query loss alone."""
    shuffle_support: bool = True
    """Show each training episode's support examples in a fresh random order (evaluation: shot-major)."""

    def validate(self):
        validate_common("mann", self.lr, self.embedding, self.hidden)
        in_range("mann.lstm", self.lstm, 1, 100_000), in_range("mann.support_loss", self.support_loss, 0)


@algorithm("mann")
class MANN(BlackBox):
    """LSTM black box under Santoro et al.'s protocol: see the module docstring."""
    Config = MANNConfig
    defaults = {"fewshot": {"baselines": [], "eval": {"steps": 20}}}
    """As SNAIL's: no pretrain baseline by default; evaluation reveals the whole support set."""

    def build(self, in_channels: int, image_size: int) -> nn.Module:
        c = self.own
        return LSTMLearner(self.n_way, ImageEmbedding(in_channels, image_size, hidden=c.hidden, out_dim=c.embedding), c.lstm)
