"""The LSTM meta-learner (Ravi & Larochelle 2017, "Optimization as a Model for Few-Shot Learning").

Gradient descent θ_t = θ_{t−1} − α_t ∇_{θ_{t−1}} L_t looks like an LSTM cell update
c_t = f_t ⊙ c_{t−1} + i_t ⊙ c̃_t with f_t = 1, i_t = α_t and c̃_t = −∇_{θ_{t−1}} L_t (sec. 3.1, eq. 1).
The paper *learns* the gates, so the meta-learner learns the learner's update rule and its
initialisation together:

- the cell state **is** the learner's parameter vector: c_0 = θ_0, the learner's initial weights,
  meta-learned (sec. 3.1: "the initial value of the cell state c_0 ... learned"); here θ_0 is the
  learner module ``self.model`` (the Conv4 classifier for few-shot, the MLP for sine);
- i_t = σ(W_I · [∇_{θ_{t−1}} L_t, L_t, θ_{t−1}, i_{t−1}] + b_I)  (eq. 2, the learning rate);
  f_t = σ(W_F · [∇_{θ_{t−1}} L_t, L_t, θ_{t−1}, f_{t−1}] + b_F)  (eq. 3, the shrinkage);
- **coordinate-wise** with shared weights (sec. 3.2, "Parameter sharing & preprocessing"): every
  learner parameter is one element of a batch, with its own hidden and cell state. As in the
  paper's code the model is a two-layer LSTM: an ordinary LSTM (hidden size 20) reads each
  coordinate's preprocessed loss and gradient, and its output h_t stands for "[∇, L]" in eqs. 2/3;
  the second layer is the cell above, whose gates see [h_t, θ_{t−1}, gate_{t−1}];
- inputs are preprocessed as Andrychowicz et al. 2016 (appendix A), p = 10:
  x → (log|x| / p, sign x) if |x| ≥ e^{−p}, else (−1, e^p x); for the gradient and the loss
  (sec. 3.2); the update itself uses the raw gradient c̃_t = −∇ (eq. 1);
- initialisation (sec. 3.3 / the code): weights U(−0.01, 0.01), b_F ~ U(4, 5) so f ≈ 1, b_I ~ U(−5, −4)
  so i is small: the meta-learner starts as gradient descent with a small step size;
- the simplification of sec. 3.2 ("Gradient independence assumption", fig. 2's dashed lines): the
  loss L_t and gradient ∇_{θ_{t−1}} L_t fed to the meta-learner are treated as constants
  (detached), so no second derivatives of the learner are needed; the meta-gradient flows through
  the cell-state chain c_t = f_t ⊙ c_{t−1} − i_t ⊙ ∇_t and through the gates' θ_{t−1} inputs;
- training (Algorithm 1): per episode, T updates of the learner on its training (support) set,
  then the test (query) loss of θ_T is back-propagated to the meta-learner and θ_0; Adam with
  lr 0.001 and the meta-gradient clipped to global norm 0.25 (``maxGradNorm`` in the paper's code).

Batch norm (sec. 3.4). The paper's learner uses batch statistics for the training (support) set at
meta-train and meta-test time and for the test (query) set during meta-training; at meta-test it
scores the query set with running averages accumulated on that episode's support batches (reset
every episode). metarl's Conv4 always normalises with the current batch's statistics (see
``policies/conv4.py``), so support batches and meta-training match the paper exactly; the one
difference is the meta-test query set, normalised here with its own (75-image) batch statistics,
the transductive convention of MAML's code that every metarl method is scored with.

Episode settings (paper sec. 5 / its code ``config/lstm/train-imagenet-{1,5}shot.lua``): 1-shot:
12 updates on batches of 5 (the whole 5-way 1-shot support set), 5-shot: 8 updates on batches
of 25 (the whole 5-way 5-shot support set), 15 query examples per class, one episode per
meta-update, 75,000 (1-shot) / 50,000 (5-shot) episodes. Since every update uses the whole
support set, an "update" here is one pass over it and there is no separate batch-size knob.

Two documented departures from the paper's code, both inside a learned scale: (1) its learner
gradient is the mean-loss gradient divided once more by the batch size (``gradParameters:div``
after an averaging criterion); here it is the gradient of the mean loss, as eq. 1 reads; (2) its
gate feedback i_{t−1}, f_{t−1} is the gates' pre-activation; here it is the gate value, as eqs.
2/3 read (``meta_lstm.gate_feedback: logit`` restores the code's choice).

Batched over the meta-batch: the learner parameters of the T tasks are flattened to [T, P] and the
coordinate-wise LSTM runs on all T·P coordinates at once; the learner's per-task forward is
``forward_tasks`` on the unflattened [T, ...] parameters. The adaptation curve is the query
metric after 0..K meta-learner updates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..functional import Params, forward_tasks, params_of, stack
from ..registry import algorithm
from ..tasks.batch import TaskBatch
from .base import Method, Problem, finite
from .maml import query_metrics

P_PREPROCESS = 10.0


@dataclass
class MetaLSTMConfig:
    """The LSTM meta-learner (config section ``meta_lstm``)."""
    updates: int = 12
    """T: meta-learner updates of the learner per episode in meta-training (paper: 12 for 1-shot, 8 for 5-shot)."""
    hidden: int = 20
    """Hidden size of the first (ordinary) LSTM layer (paper: 20)."""
    clip_norm: float = 0.25
    """Global-norm clipping of the meta-gradient (paper's code: maxGradNorm 0.25); 0 disables it."""
    forget_bias_init: list[float] = field(default_factory=lambda: [4.0, 5.0])
    """b_F ~ U(lo, hi): high, so f ≈ 1 at the start (paper's code: U(4, 5))."""
    input_bias_init: list[float] = field(default_factory=lambda: [-5.0, -4.0])
    """b_I ~ U(lo, hi): low, so the learning rate i = σ(b_I) starts small (paper's code: U(-5, -4))."""
    weight_init: float = 0.01
    """Every other meta-learner weight ~ U(−w, w) (paper's code: 0.01)."""
    gate_feedback: Literal["value", "logit"] = "value"
    """i_{t−1}, f_{t−1} fed back to the gates as values (eqs. 2/3) or pre-activations (the paper's code)."""
    task_chunk: int = 1
    """Tasks unrolled and back-propagated together: memory, not results (the graph keeps ~0.7 kB per
    coordinate per update: 12 updates of a 112k-parameter Conv4-64 are ~1 GB per task)."""

    def validate(self):
        if self.updates < 1 or self.hidden < 1 or self.task_chunk < 1 or self.clip_norm < 0 or self.weight_init < 0:
            raise ConfigError(f"meta_lstm: updates, hidden and task_chunk must be >= 1, clip_norm and weight_init >= 0 "
                              f"(got updates={self.updates}, hidden={self.hidden}, task_chunk={self.task_chunk}, "
                              f"clip_norm={self.clip_norm}, weight_init={self.weight_init})")
        for key in ("forget_bias_init", "input_bias_init"):
            lo_hi = getattr(self, key)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise ConfigError(f"meta_lstm.{key} must be [low, high] with low <= high, e.g. [4, 5]; got {lo_hi}")


def preprocess(x: Tensor, p: float = P_PREPROCESS) -> Tensor:
    """Andrychowicz et al. 2016 (appendix A) as used by Ravi & Larochelle (sec. 3.2): [...] → [..., 2],
    (log|x| / p, sign x) if |x| ≥ e^{−p}, else (−1, e^p · x). Scale-free first feature, sign second."""
    big = x.abs() >= math.exp(-p)
    first = torch.where(big, x.abs().clamp_min(math.exp(-p)).log() / p, torch.full_like(x, -1.0))
    second = torch.where(big, torch.sign(x), x * math.exp(p))
    return torch.stack([first, second], dim=-1)


class MetaLearnerLSTM(nn.Module):
    """The coordinate-wise two-layer meta-learner: an ``nn.LSTMCell`` over each coordinate's
    [preprocessed loss (2), preprocessed gradient (2)] and the meta-learner cell whose cell state is
    the learner's parameters (eqs. 1-3). All tensors are [B, ...] with B = tasks × coordinates."""

    def __init__(self, cfg: MetaLSTMConfig):
        super().__init__()
        self.gate_feedback = cfg.gate_feedback
        self.lstm = nn.LSTMCell(4, cfg.hidden)
        self.WF = nn.Parameter(torch.empty(cfg.hidden + 2))  # weights on [h_t, θ_{t−1}, f_{t−1}]
        self.WI = nn.Parameter(torch.empty(cfg.hidden + 2))  # weights on [h_t, θ_{t−1}, i_{t−1}]
        self.bF = nn.Parameter(torch.empty(()))
        self.bI = nn.Parameter(torch.empty(()))
        w = cfg.weight_init
        for p in (*self.lstm.parameters(), self.WF, self.WI):
            nn.init.uniform_(p, -w, w)
        nn.init.uniform_(self.bF, *cfg.forget_bias_init)
        nn.init.uniform_(self.bI, *cfg.input_bias_init)

    def initial_state(self, c0: Tensor) -> dict[str, Tensor]:
        """State before the first update: zero first-layer state, zero gate feedback, c = θ_0."""
        zeros = c0.new_zeros(c0.shape[0], self.lstm.hidden_size)
        z = c0.new_zeros(c0.shape)
        return {"h": zeros, "cell": zeros, "f": z, "i": z, "c": c0}

    def forward(self, state: dict[str, Tensor], grad: Tensor, loss: Tensor) -> dict[str, Tensor]:
        """One update: ``grad`` [B] = ∇_{θ_{t−1}} L_t per coordinate, ``loss`` [B] = L_t of each
        coordinate's task (both constants: sec. 3.2's simplification). Returns the next state; its
        ``c`` is θ_t and ``f``/``i`` are the gates' feedback (values or logits)."""
        x = torch.cat([preprocess(loss), preprocess(grad)], dim=-1)  # [B, 4]: loss first, as the paper's code
        h, cell = self.lstm(x, (state["h"], state["cell"]))
        c_prev = state["c"]
        hw_f = h @ self.WF[:-2]
        hw_i = h @ self.WI[:-2]
        f_logit = hw_f + self.WF[-2] * c_prev + self.WF[-1] * state["f"] + self.bF   # eq. 3
        i_logit = hw_i + self.WI[-2] * c_prev + self.WI[-1] * state["i"] + self.bI   # eq. 2
        f, i = torch.sigmoid(f_logit), torch.sigmoid(i_logit)
        c = f * c_prev - i * grad                                                      # eq. 1, c̃ = −∇
        fb_f, fb_i = (f, i) if self.gate_feedback == "value" else (f_logit, i_logit)
        return {"h": h, "cell": cell, "f": fb_f, "i": fb_i, "c": c, "gate_f": f, "gate_i": i}


def flatten(params: Params, names: list[str]) -> Tensor:
    """Stacked per-task parameters {name: [T, ...]} → [T, P] (the order of ``names``)."""
    return torch.cat([params[n].reshape(params[n].shape[0], -1) for n in names], dim=1)


def unflatten(flat: Tensor, like: Params, names: list[str]) -> Params:
    """[T, P] → {name: [T, *shape]} with the shapes of ``like`` (one task's parameters)."""
    sizes = [like[n].numel() for n in names]
    return {n: piece.reshape(flat.shape[0], *like[n].shape) for n, piece in zip(names, torch.split(flat, sizes, dim=1))}


@algorithm("meta_lstm")
class MetaLSTM(Method):
    """Ravi & Larochelle 2017, Algorithm 1: the learner (``problem.make_model()``, θ_0 = its
    meta-learned weights = c_0) is trained on each episode's support set by ``meta_lstm.updates``
    steps of the learned LSTM update rule; Adam (``outer.lr``) on the query loss of θ_T updates the
    meta-learner and θ_0 together, the meta-gradient clipped to global norm ``meta_lstm.clip_norm``."""
    Config = MetaLSTMConfig
    curve_axis = "meta-learner (LSTM) updates"
    defaults = {
        # the paper's code: one episode per meta-update, 15 query examples per class, Adam 1e-3
        "fewshot": {"meta_batch": 1, "episode": {"q_query": 15}, "outer": {"lr": 0.001}, "eval": {"steps": 12},
                    "model": {"hidden": 32}},
        "sine": {"meta_lstm": {"updates": 10, "task_chunk": 25}, "eval": {"steps": 10}},
    }

    def __init__(self, problem: Problem, cfg):
        super().__init__(problem, cfg)
        self.model = problem.make_model()
        self.meta = MetaLearnerLSTM(self.own)
        self.names = list(params_of(self.model))
        self.modules[self.name] = self.model                 # θ_0 = c_0
        self.modules[f"{self.name}.lstm"] = self.meta         # the meta-learner's own weights
        self.optimizers[self.name] = torch.optim.Adam([*self.model.parameters(), *self.meta.parameters()], lr=cfg.outer.lr)

    # ---- the learner trained by the meta-learner (Algorithm 1, lines 5-11) ------------------
    def _learner_inputs(self, c: Tensor, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """(∇_{θ} L_t flattened [T, P], L_t [T]) of each task's support loss at θ = c, detached: the
        meta-learner's inputs, constants under the paper's simplification (sec. 3.2)."""
        like = params_of(self.model)
        with torch.enable_grad():
            leaf = c.detach().requires_grad_(True)
            losses = self.problem.loss(forward_tasks(self.model, unflatten(leaf, like, self.names), batch.x_support), batch.y_support)
            (grad,) = torch.autograd.grad(losses.sum(), leaf)
        return grad, losses.detach()

    def unroll(self, batch: TaskBatch, steps: int) -> Iterator[dict[str, Tensor]]:
        """The meta-learner's states after 0, 1, ..., steps updates on each task's support set
        (yielded one at a time, so evaluation keeps one state); ``state["c"]`` [T·P] is θ_t,
        differentiable in the meta-parameters when grad mode is on."""
        n, like = batch.n_tasks, params_of(self.model)
        c0 = flatten(stack(like, n), self.names)                          # [T, P], c_0 = θ_0 for every task
        state = self.meta.initial_state(c0.reshape(-1))                   # coordinates of all tasks: [T·P]
        yield state
        for _ in range(steps):
            grad, loss = self._learner_inputs(state["c"].reshape(n, -1), batch)
            loss = loss[:, None].expand_as(grad)                           # L_t for every coordinate of its task
            state = self.meta(state, grad.reshape(-1), loss.reshape(-1))
            yield state

    def _query(self, state: dict[str, Tensor], batch: TaskBatch) -> Tensor:
        theta = unflatten(state["c"].reshape(batch.n_tasks, -1), params_of(self.model), self.names)
        return forward_tasks(self.model, theta, batch.x_query)

    # ---- the seam --------------------------------------------------------------------------
    def train_step(self, batch: TaskBatch, iteration: int) -> dict[str, float]:
        opt = self.optimizers[self.name]
        opt.zero_grad(set_to_none=True)
        n, chunk = batch.n_tasks, self.own.task_chunk
        preds, gates_f, gates_i = [], [], []
        for start in range(0, n, chunk):   # the graph of each chunk is freed after its backward
            part = batch.tasks(start, min(n, start + chunk))
            *_, last = self.unroll(part, self.own.updates)
            out = self._query(last, part)
            (self.problem.loss(out, part.y_query).sum() / n).backward()
            preds.append(out.detach())
            gates_f.append(last["gate_f"].detach().mean() * part.n_tasks / n)
            gates_i.append(last["gate_i"].detach().mean() * part.n_tasks / n)
        metrics = query_metrics(self.name, self.problem, torch.cat(preds), batch)
        params = [p for group in opt.param_groups for p in group["params"]]
        if self.own.clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.own.clip_norm)
            metrics[f"grad_norm/{self.name}"] = float(norm)
        metrics[f"forget_gate/{self.name}"] = float(sum(gates_f))
        metrics[f"input_gate/{self.name}"] = float(sum(gates_i))
        if finite(metrics):
            opt.step()
        return metrics

    def predict(self, batch: TaskBatch, steps: int) -> list[Tensor]:
        chunks = []
        with torch.no_grad():  # meta_lstm.task_chunk tasks at a time: T·P LSTM states are large
            for start in range(0, batch.n_tasks, self.own.task_chunk):
                part = batch.tasks(start, min(batch.n_tasks, start + self.own.task_chunk))
                chunks.append([self._query(s, part) for s in self.unroll(part, steps)])
        return [torch.cat(per_step) for per_step in zip(*chunks)]

    def not_shardable(self):
        if self.own.clip_norm > 0:
            return ("meta_lstm.clip_norm clips the norm of each rank's share of the meta-gradient before the step; "
                    "--set meta_lstm.clip_norm=0 to shard it")
        return None

    def step_sizes(self) -> dict:
        """The gates' learned biases and their sigmoids (the input gate is the learning rate)."""
        bf, bi = self.meta.bF.item(), self.meta.bI.item()
        return {"updates": self.own.updates, "forget_bias": bf, "input_bias": bi,
                "sigmoid_forget_bias": 1 / (1 + math.exp(-bf)), "sigmoid_input_bias": 1 / (1 + math.exp(-bi))}
