"""MANN-style recurrent black box: an LSTM over (embedding, previous label) pairs (Santoro, Bartunov,
Botvinick, Wierstra & Lillicrap 2016, "Meta-Learning with Memory-Augmented Neural Networks", ICML).

Two learners under the paper's task protocol (sec. 3, fig. 1a), chosen by ``mann.memory``:

- ``lrua`` (default): the memory-augmented network itself, an LSTM controller with an external
  memory written and read by least-recently-used access (sec. 3.2, :func:`lrua_step`): content
  reads by cosine similarity of the memory as earlier steps left it (not this step's own write),
  writes to the previously read slot or the least-used one (a learned gate), usage decaying by γ,
  the least-used slot cleared before each write; N·K + 1 slots by default (``mann.slots``), and
  the embedding centred by a batch norm (``mann.centre_embedding``) so that keys differ in
  direction, which is all cosine addressing sees;
- ``none``: the paper's *LSTM baseline*, the controller alone (the state must hold everything).
  It learns, on a longer plateau than the memory: on Omniglot 5w1s at the default sizes it leaves
  chance between iterations 300 and 400, where the memory is already at 76 %
  (experiments/RESULTS.md, session 11).

At time t the controller
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
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarl.policies.embedding import ImageEmbedding

from ..config import ConfigError, in_range
from ..registry import algorithm
from .blackbox import BlackBox, validate_common


def label_inputs(y_support: Tensor, n_way: int, delay: bool, dtype) -> Tensor:
    """The label channel of the input sequence, [T, S + 1, N]: row t < S goes with support example
    t, row S with every query. ``delay`` (Santoro et al.): row t holds y_{t−1} (zeros at t = 0), so
    the queries receive the last support label; otherwise row t holds y_t with its own image and
    the queries zeros (SNAIL's protocol, Mishra et al. 2018 sec. 3)."""
    onehot = F.one_hot(y_support, n_way).to(dtype)
    zero = onehot.new_zeros(onehot.shape[0], 1, n_way)
    return torch.cat([zero, onehot] if delay else [onehot, zero], dim=1)


class LSTMLearner(nn.Module):
    """Embedding → LSTM over (x_t, y_{t−1}) → linear to N logits."""

    def __init__(self, n_way: int, embedding: nn.Module, hidden: int, label_delay: bool = False):
        super().__init__()
        self.n_way, self.label_delay = n_way, label_delay
        self.embed = embedding
        self.lstm = nn.LSTM(embedding.out_dim + n_way, hidden, batch_first=True)
        self.out = nn.Linear(hidden, n_way)

    def forward(self, x_support: Tensor, y_support: Tensor, x_query: Tensor):
        t, s, q = x_support.shape[0], x_support.shape[1], x_query.shape[1]
        emb = self.embed(torch.cat([x_support, x_query], dim=1))
        es, eq = emb[:, :s], emb[:, s:]
        previous = label_inputs(y_support, self.n_way, self.label_delay, emb.dtype)
        support_logits, state = None, None
        if s > 0:
            h, state = self.lstm(torch.cat([es, previous[:, :s]], dim=-1))
            support_logits = self.out(h)
        query_in = torch.cat([eq, previous[:, s:].expand(t, q, self.n_way)], dim=-1).reshape(t * q, 1, -1)
        if state is not None:  # every query continues its episode's state after the support set
            state = tuple(z.repeat_interleave(q, dim=1) for z in state)
        h, _ = self.lstm(query_in, state)
        return self.out(h[:, 0]).reshape(t, q, self.n_way), support_logits


def lrua_step(memory: Tensor, read_prev: Tensor, usage_prev: Tensor, least_prev: Tensor, key: Tensor, gate: Tensor,
              gamma: float, strength: Tensor | float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One least-recently-used-access step (Santoro et al. 2016, sec. 3.2, eqs. 4-8), batched over
    tasks: memory [T, slots, width]; previous read / usage / least-used weights [T, slots]; the
    controller's key [T, width], write-gate logit [T, 1] and key strength β [T, 1] (or 1). Returns
    (memory after the write, read weights, usage, least-used weights, read vector).

    w^r = softmax_i β cos(k_t, M_{t−1}(i)),  r_t = Σ_i w^r(i) M_{t−1}(i)   (read before this write; Santoro et al.: β = 1)
    w^w = σ(α) w^r_{t−1} + (1 − σ(α)) w^lu_{t−1}   (write to the slot just read, or to the least used)
    M_t = M_{t−1} ⊙ (1 − w^lu_{t−1}) + w^w ⊗ k_t  (the least-used slot is cleared first)
    w^u = γ w^u_{t−1} + w^r + w^w,  w^lu = one-hot of the least-used slot (one read head; ties go
    to the first slot, so an empty memory fills slot by slot).

    Why the read addresses M_{t−1}: the key k_t is also the vector written (as in the paper,
    whose write adds w^w_t(i) k_t), so reading M_t would find cos(k_t, M_t(write slot)) ≈ 1 and
    hand back what this step just stored, carrying nothing from earlier steps; the learner then
    stayed at chance. The paper's notation does not settle the order within a step (sec. 3.1 has a
    key either stored in a row or used to retrieve one; both the read and the write name M_t).
    snowkylin/ntm's ``mann_cell.py`` computes the read weights from the previous memory
    (``read_head_addressing(k, prev_M)``); tristandeleu/ntm-one-shot addresses M_t but writes a
    separate add vector a_t, which also avoids the self-match. Here the read sees everything
    stored up to step t − 1 and this step's write is visible from step t + 1 on (a query, one step
    after the support set, reads all N·K support writes)."""
    cos = torch.einsum("tw,tsw->ts", key, memory) / (key.norm(dim=-1, keepdim=True) * memory.norm(dim=-1) + 1e-8)
    read = torch.softmax(strength * cos, dim=-1)
    r = torch.einsum("ts,tsw->tw", read, memory)
    sigma = torch.sigmoid(gate)
    write = sigma * read_prev + (1 - sigma) * least_prev
    memory = memory * (1 - least_prev).unsqueeze(-1) + write.unsqueeze(-1) * key.unsqueeze(1)
    usage = gamma * usage_prev + read + write
    least = F.one_hot(usage.argmin(-1), usage.shape[-1]).to(usage.dtype)
    return memory, read, usage, least, r


class MemoryLearner(nn.Module):
    """Embedding → LSTM controller over (x_t, y_{t−1}, r_{t−1}) with an LRUA memory → linear on
    [h_t, r_t] to N logits (Santoro et al. 2016, fig. 2 and sec. 3.2). The key is tanh(W_k h_t), the
    write gate α = W_α h_t; every query continues the episode's state after the support set.

    One addition to the paper's read: a key strength β = 1 + softplus(W_β h_t), the sharpening of
    the Neural Turing Machine's content addressing (Graves et al. 2014, eq. 5) that Santoro et al.
    leave out. With β = 1 a softmax over cosines in [−1, 1] is nearly uniform (across 128 slots
    e^{±1} barely matters), so a read returns the mean of the memory; ``mann.key_strength: false``
    restores β = 1.

    The key tanh(W_k h_t) is both the read key and the vector written (as in the paper); that is
    why the read must address the memory before this step's write (:func:`lrua_step`). The embedding should be centred (``ImageEmbedding(centre=True)``): at
    initialisation on Omniglot the mean pairwise cosine of 160 characters' keys is 0.91 with the
    raw embedding and 0.45 with the centred one, and cosine addressing can only pick a slot by
    direction."""

    def __init__(self, n_way: int, embedding: nn.Module, hidden: int, slots: int, width: int, gamma: float,
                 label_delay: bool = False, key_strength: bool = True):
        super().__init__()
        self.n_way, self.slots, self.width, self.gamma, self.label_delay = n_way, slots, width, gamma, label_delay
        self.embed = embedding
        self.cell = nn.LSTMCell(embedding.out_dim + n_way + width, hidden)
        self.key = nn.Linear(hidden, width)
        self.gate = nn.Linear(hidden, 1)
        self.strength = nn.Linear(hidden, 1) if key_strength else None
        self.out = nn.Linear(hidden + width, n_way)

    def initial(self, t: int, like: Tensor):
        z = like.new_zeros
        memory = like.new_full((t, self.slots, self.width), 1e-6)  # near-empty: cosine similarity stays defined
        least = F.one_hot(torch.zeros(t, dtype=torch.long, device=like.device), self.slots).to(like.dtype)
        return (z(t, self.cell.hidden_size), z(t, self.cell.hidden_size)), memory, z(t, self.slots), z(t, self.slots), least, z(t, self.width)

    def step(self, x: Tensor, state):
        (h, c), memory, read_w, usage, least, r = state
        h, c = self.cell(torch.cat([x, r], dim=-1), (h, c))
        beta = 1.0 if self.strength is None else 1 + F.softplus(self.strength(h))
        memory, read_w, usage, least, r = lrua_step(memory, read_w, usage, least, torch.tanh(self.key(h)), self.gate(h),
                                                    self.gamma, beta)
        return self.out(torch.cat([h, r], dim=-1)), ((h, c), memory, read_w, usage, least, r)

    def forward(self, x_support: Tensor, y_support: Tensor, x_query: Tensor):
        t, s, q = x_support.shape[0], x_support.shape[1], x_query.shape[1]
        emb = self.embed(torch.cat([x_support, x_query], dim=1))
        es, eq = emb[:, :s], emb[:, s:]
        previous = label_inputs(y_support, self.n_way, self.label_delay, emb.dtype)
        state, support_logits = self.initial(t, emb), []
        for i in range(s):
            logits, state = self.step(torch.cat([es[:, i], previous[:, i]], dim=-1), state)
            support_logits.append(logits)
        state = _nested(lambda z: z.repeat_interleave(q, dim=0), state)  # one copy of the episode's state per query
        query_in = torch.cat([eq, previous[:, s:].expand(t, q, self.n_way)], dim=-1).reshape(t * q, -1)
        logits, _ = self.step(query_in, state)
        return logits.reshape(t, q, self.n_way), (torch.stack(support_logits, 1) if s else None)


def _nested(fn, tree):
    return tuple(_nested(fn, z) for z in tree) if isinstance(tree, tuple) else fn(tree)


@dataclass
class MANNConfig:
    """The recurrent black box's settings (config section ``mann``)."""
    memory: Literal["lrua", "none"] = "lrua"
    """The learner: "lrua", the memory-augmented network (sec. 3.2); "none", the paper's LSTM baseline."""
    lr: float = 0.001
    """Adam step size of the whole learner (embedding included)."""
    embedding: int = 64
    """Image embedding size (the LSTM's input is this plus N label units)."""
    hidden: int = 64
    """Filters of the embedding's four conv blocks."""
    lstm: int = 200
    """LSTM (controller) units (Santoro et al.'s controller: 200)."""
    slots: Optional[int] = None
    """Memory slots; null: N·K + 1, one per support example and one spare, resolved from the
    episode at build time (a slot per example is all an episode can fill; with 128, Santoro et al.'s
    size for their 50-step episodes, 5w1s learned far slower: 33% vs 76% after 300 iterations,
    experiments/RESULTS.md session 10)."""
    width: int = 40
    """Width of a memory slot, the key size (Santoro et al.: 40)."""
    centre_embedding: bool = True
    """Centre and normalise the embedding over the meta-batch (``ImageEmbedding(centre=True)``):
    the controller's keys are compared by cosine, which cannot tell apart keys that all share one
    offset; see ``policies/embedding.py``."""
    gamma: float = 0.95
    """Usage decay γ of the least-recently-used access."""
    support_loss: float = 0.0
    """Weight of the cross-entropy of the predictions at the support positions (Santoro et al.
    train on every time step); 0: the query loss alone. Needs ``label_delay`` (otherwise each
    support prediction sees its own label and the loss teaches copying)."""
    key_strength: bool = True
    """A learned sharpening β of the content read (the NTM's; Santoro et al. use β = 1): see MemoryLearner."""
    label_delay: bool = False
    """Santoro et al.'s offset: x_t arrives with y_{t−1}; false: each support image with its own label, queries with none (SNAIL's)."""
    shuffle_support: bool = True
    """Show each training episode's support examples in a fresh random order (evaluation: shot-major)."""

    def validate(self):
        validate_common("mann", self.lr, self.embedding, self.hidden)
        in_range("mann.lstm", self.lstm, 1, 100_000), in_range("mann.support_loss", self.support_loss, 0)
        in_range("mann.slots", self.slots, 1, 100_000), in_range("mann.width", self.width, 1, 100_000)
        in_range("mann.gamma", self.gamma, 0, 1)
        if self.support_loss > 0 and not self.label_delay:
            raise ConfigError("mann.support_loss > 0 needs mann.label_delay=true (without the delay a support "
                              "prediction sees its own label); set mann.support_loss=0 or mann.label_delay=true")


@algorithm("mann")
class MANN(BlackBox):
    """Santoro et al.'s memory-augmented network (or its LSTM baseline): see the module docstring."""
    Config = MANNConfig
    defaults = {"fewshot": {"baselines": [], "eval": {"steps": 20}}}
    """As SNAIL's: no pretrain baseline by default; evaluation reveals the whole support set."""

    def build(self, in_channels: int, image_size: int) -> nn.Module:
        c, ep = self.own, self.cfg.episode
        embedding = ImageEmbedding(in_channels, image_size, hidden=c.hidden, out_dim=c.embedding, centre=c.centre_embedding)
        if c.memory == "none":
            return LSTMLearner(self.n_way, embedding, c.lstm, c.label_delay)
        slots = ep.n_way * ep.k_shot + 1 if c.slots is None else c.slots
        return MemoryLearner(self.n_way, embedding, c.lstm, slots, c.width, c.gamma, c.label_delay, c.key_strength)
