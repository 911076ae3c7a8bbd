"""MAML++ (Antoniou, Edwards & Storkey 2019, "How to train your MAML", ICLR; sec. 4): MAML with
five fixes for its instability and cost, each a switch in the ``maml_pp:`` config section and on
by default, as in the paper.

``K = maml_pp.steps`` inner steps; the paper counts time in *epochs* of ``epoch_length``
iterations (paper: 500), so epoch e = iteration // epoch_length, and every schedule below is a
function of e alone (constant within an epoch, as in the authors' code). None depends on
``iterations``, so a run stopped and resumed, or extended, follows the same schedule.

1. **Multi-step loss (MSL, sec. 4 "Gradient instability → multi-step loss optimisation")**: the
   outer loss is Σ_k w_k(e) · L_query(φ_k), the query loss after every inner step k = 1..K,
   instead of the last one only. :func:`msl_weights`: uniform (1/K each) at e = 0; each non-final
   weight falls by 1/(K·E) per epoch (E = ``msl_epochs``) down to a floor of ``msl_floor``/K, the
   final one rises by the same total, so they always sum to one; from epoch E on only the last
   step counts (w = [0, ..., 0, 1]), as in the authors' code.
2. **Derivative-order annealing (DA, sec. 4 "Second order derivative cost")**: first-order
   meta-gradients (the inner gradients treated as constants, FOMAML) for the first
   ``first_order_epochs`` epochs (paper: 50 of 150), second order afterwards. (The authors' code
   switches after epoch N, i.e. N + 1 first-order epochs; here exactly N.)
3. **Per-step batch-norm weights and biases (BNWB, sec. 4 "Shared (across step) batch
   normalization bias")**: every batch-norm layer owns K scales and shifts (``maml_pp.bn``, each
   [K, C], initialised at the model's own, 1 and 0), meta-learned by the outer loop and not
   adapted by the inner one (the authors' code: ``enable_inner_loop_optimizable_bn_params:
   false``). Step k (1-indexed) uses set k both in its support forward (the gradient that makes
   φ_k from φ_{k-1}) and in scoring φ_k on the query set; the 0-step prediction (θ itself) uses
   set 1, the one its first support forward uses; steps beyond K (longer evaluation curves) reuse
   set K. Swapped in through the params dict: Conv4 is unchanged.
4. **Per-step batch-norm running statistics (BNRS)**: the authors' code keeps running mean and
   variance per step, but calls ``F.batch_norm(..., training=True)`` in every forward, training
   *and* evaluation, so the normalisation always uses the current batch's statistics and the
   running averages are never read (they are backed up and restored around each evaluation
   batch, and affect no output). With per-step batch statistics, BNRS is exactly what metarl's
   transductive Conv4 computes (see policies/conv4.py: support and query sets normalised with
   their own statistics at every step), so there is no switch: it is always on, in the only form
   that changes outputs in the reference code. Inductive normalisation with stored per-step
   statistics (what sec. 4's text suggests) is not implemented.
5. **Learned per-layer per-step step sizes (LSLR, sec. 4 "Fixed inner loop learning rate")**: one
   step size per parameter tensor and per step (``maml_pp.lslr``, each [K], initialised at
   ``maml_pp.lr``), learned by the outer loop (Meta-SGD-like, but per layer rather than per
   element). Off: the fixed step size ``maml_pp.lr``.
6. **Cosine annealing of the outer step size (CA, sec. 4 "Fixed outer loop learning rate")**:
   Adam's step size at epoch e is η_min + (η − η_min)(1 + cos(π e / ``epochs``)) / 2 (η =
   ``outer.lr``, paper 0.001; η_min = ``min_lr``, paper 1e-5), as ``torch.optim.lr_scheduler.
   CosineAnnealingLR`` with T_max = ``epochs`` (paper: 150) stepped per epoch, and η_min after
   ``epochs``. Off: η throughout.

θ, the per-step BN parameters and the step sizes are one Adam optimizer (as in the authors' code).
The inner loop adapts every parameter of the model except batch norm's; it always runs the batched
engine (:func:`metarl.functional.forward_tasks`) through :func:`metarl.adaptation.inner_step`, and
the outer gradient goes through :func:`metarl.algorithms.maml.meta_backward` (task workers
included) with the multi-step objective. Only ``inner.eval_steps`` and ``inner.task_workers`` are
read from the ``inner:`` section (the step count and size are ``maml_pp.steps`` / ``maml_pp.lr``,
so ``--set algorithm=maml_pp`` on a MAML config runs MAML++'s five steps).

Paper (Omniglot accuracy %, 5w1s / 5w5s / 20w1s / 20w5s): 99.47 / 99.93 / 97.65 / 99.33.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from ..adaptation import inner_step
from ..config import ConfigError, in_range
from ..functional import forward_tasks, params_of, stack
from ..optim import clamp_grads
from ..registry import algorithm
from ..tasks.batch import TaskBatch
from .base import Problem, finite
from .maml import MAML, meta_backward, query_metrics


@dataclass
class MAMLPPConfig:
    """MAML++'s own settings (config section ``maml_pp``); every fix defaults on, as in the paper."""
    steps: int = 5
    """Inner steps K in meta-training (paper: 5); BNWB and LSLR keep one set per step."""
    lr: float = 0.1
    """Inner step size: LSLR's initial value, or the fixed size with lslr off (authors' Omniglot: 0.1)."""
    epoch_length: int = 500
    """Iterations per epoch, the unit of every schedule (paper: 500)."""
    epochs: int = 150
    """Epochs over which the outer step size is cosine-annealed (paper: 150 epochs = 75,000 iterations)."""
    msl: bool = True
    """Multi-step loss: the outer loss weighs the query loss after every inner step (sec. 4)."""
    msl_epochs: int = 10
    """Epochs over which the MSL weights anneal towards the last step; last step only afterwards (authors' Omniglot: 10)."""
    msl_floor: float = 0.03
    """Floor of each non-final MSL weight, in units of 1/K (authors' code: 0.03)."""
    derivative_annealing: bool = True
    """DA: first-order meta-gradients for the first ``first_order_epochs`` epochs, second order afterwards."""
    first_order_epochs: int = 50
    """DA's first-order phase in epochs (paper: 50 of 150)."""
    second_order: bool = True
    """Second-order meta-gradients (after DA's phase); false: first order throughout."""
    bnwb: bool = True
    """Per-step batch-norm scales and shifts (one set per inner step); no effect on models without batch norm."""
    lslr: bool = True
    """Learned per-layer per-step inner step sizes, initialised at ``lr``."""
    cosine: bool = True
    """Cosine-anneal the outer step size from outer.lr to ``min_lr`` over ``epochs``."""
    min_lr: float = 1e-5
    """Outer step size at the end of the cosine schedule (paper: 1e-5)."""
    grad_clip: Optional[float] = None
    """Clamp each meta-gradient element to ±grad_clip before the Adam step (the authors' code does for ImageNet; null: off)."""

    def validate(self):
        in_range("maml_pp.steps", self.steps, 1, 10_000), in_range("maml_pp.lr", self.lr, 0, open_low=True)
        if self.epoch_length < 1 or self.epochs < 1 or self.msl_epochs < 0 or self.first_order_epochs < 0:
            raise ConfigError("maml_pp: epoch_length and epochs must be >= 1, msl_epochs and first_order_epochs >= 0: "
                              "e.g. --set maml_pp.epoch_length=500")
        if not 0 <= self.msl_floor <= 1:
            raise ConfigError(f"maml_pp.msl_floor must be in [0, 1] (units of 1/K), got {self.msl_floor}: the paper's code uses 0.03")
        in_range("maml_pp.grad_clip", self.grad_clip, 0, open_low=True)
        if self.min_lr < 0:
            raise ConfigError(f"maml_pp.min_lr must be >= 0, got {self.min_lr}: the paper uses 1e-5")


def msl_weights(epoch: int, steps: int, msl_epochs: int, floor: float = 0.03, enabled: bool = True) -> list[float]:
    """MSL's importance of the query loss after inner steps 1..K at ``epoch`` (sec. 4; the
    authors' ``get_per_step_loss_importance_vector``): non-final max(1/K − e/(K·E), floor/K),
    final min(1/K + e(K−1)/(K·E), 1 − (K−1)·floor/K); both bounds are reached at the same epoch,
    so the weights sum to one. From epoch E = ``msl_epochs`` on (or with MSL off): last step only."""
    k = steps
    if not enabled or epoch >= msl_epochs or k == 1:
        return [0.0] * (k - 1) + [1.0]
    decay = 1.0 / k / msl_epochs
    low = floor / k
    rest = [max(1.0 / k - epoch * decay, low) for _ in range(k - 1)]
    last = min(1.0 / k + epoch * (k - 1) * decay, 1.0 - (k - 1) * low)
    return rest + [last]


def cosine_lr(epoch: int, base: float, minimum: float, epochs: int) -> float:
    """CosineAnnealingLR's closed form at ``epoch`` (T_max = ``epochs``; sec. 4, Loshchilov & Hutter
    2017), held at ``minimum`` past ``epochs`` (the closed form would rise again: no restarts here)."""
    return minimum + (base - minimum) * (1 + math.cos(math.pi * min(epoch, epochs) / epochs)) / 2


def batch_norm_names(model: nn.Module) -> list[str]:
    """Names of the affine parameters of every batch-norm layer of ``model``."""
    out = []
    for prefix, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.affine:
            out += [f"{prefix}.weight", f"{prefix}.bias"]
    return out


class PerStep(nn.Module):
    """One tensor per named parameter and per inner step: ``values[name]`` is [K, *shape]
    (LSLR's step sizes: shape (); BNWB's scales and shifts: [C]). Module attribute names cannot
    hold dots, so ``a.b`` is stored as ``a-b``."""

    def __init__(self, initial: Mapping[str, Tensor], steps: int):
        super().__init__()
        self.names = list(initial)
        self.values = nn.ParameterDict({n.replace(".", "-"): nn.Parameter(v.detach().clone().unsqueeze(0).repeat(steps, *([1] * v.dim())))
                                        for n, v in initial.items()})
        self.steps = steps

    def at(self, step: int) -> dict[str, Tensor]:
        """The tensors of inner step ``step`` (0-indexed; steps past K reuse the last set)."""
        k = min(step, self.steps - 1)
        return {n: self.values[n.replace(".", "-")][k] for n in self.names}

    def leaves(self) -> dict[str, Tensor]:
        """name -> the [K, ...] parameter, keyed for ``meta_backward``'s params dict."""
        return {f"{n}@steps": self.values[n.replace(".", "-")] for n in self.names}


@algorithm("maml_pp")
class MAMLPlusPlus(MAML):
    """MAML++ (Antoniou et al. 2019): the module docstring lists its fixes and their switches."""
    Config = MAMLPPConfig
    # sine (not in the paper): MAML's α and elementwise clipping at 10, without which a 5-step
    # trajectory under learned step sizes explodes within a few hundred iterations (inf in Adam's
    # state at iteration 224). Clipping does not stop every explosion of the forward trajectory:
    # K=5 seed 0 still stops (non-finite guard) at iteration 1,537: by then LSLR has learned negative sizes (ascent
    # directions, which the paper allows) on some biases, and one rare task's trajectory runs away; seed 1 runs
    # through (RESULTS.md, session 9).
    defaults = {"sine": {"maml_pp": {"lr": 0.01, "grad_clip": 10.0}, "inner": {"eval_steps": 10}},
                "fewshot": {"maml_pp": {"lr": 0.1}, "inner": {"eval_steps": 5}}}

    def __init__(self, problem: Problem, cfg):
        super().__init__(problem, cfg)  # θ's model; MAML's optimizer is replaced below
        own = self.own
        theta = params_of(self.model)
        bn = [n for n in batch_norm_names(self.model) if n in theta]
        self.adapted = [n for n in theta if n not in bn]  # the inner loop never adapts batch norm (authors' code)
        self.bn = PerStep({n: theta[n] for n in bn}, own.steps) if own.bnwb and bn else None
        self.lslr = PerStep({n: torch.tensor(float(own.lr)) for n in self.adapted}, own.steps) if own.lslr else None
        groups = [p for n, p in theta.items() if self.bn is None or n not in bn]  # the model's own BN tensors are unused under BNWB
        if self.bn is not None:
            self.modules[f"{self.name}.bn"] = self.bn
            groups += list(self.bn.parameters())
        if self.lslr is not None:
            self.modules[f"{self.name}.lslr"] = self.lslr
            groups += list(self.lslr.parameters())
        self.optimizers[self.name] = torch.optim.Adam(groups, lr=cfg.outer.lr)

    # ---- schedules (functions of the iteration alone, so resume is exact) --------------------
    def epoch(self, iteration: int) -> int:
        return iteration // self.own.epoch_length

    def second_order_at(self, iteration: int) -> bool:
        own = self.own
        if not own.second_order:
            return False
        return not (own.derivative_annealing and self.epoch(iteration) < own.first_order_epochs)

    def weights_at(self, iteration: int) -> list[float]:
        own = self.own
        return msl_weights(self.epoch(iteration), own.steps, own.msl_epochs, own.msl_floor, own.msl)

    def outer_lr_at(self, iteration: int) -> float:
        own, base = self.own, self.cfg.outer.lr
        return cosine_lr(self.epoch(iteration), base, own.min_lr, own.epochs) if own.cosine else base

    # ---- the per-step pieces -----------------------------------------------------------------
    def _lr(self, step: int, detach: bool = False):
        if self.lslr is None:
            return self.own.lr
        lr = self.lslr.at(step)
        return {n: v.detach() for n, v in lr.items()} if detach else lr

    def _bn(self, step: int, n_tasks: int, detach: bool = False) -> dict[str, Tensor]:
        """Step ``step``'s batch-norm tensors, stacked per task (θ's own, shared, without BNWB)."""
        if self.bn is not None:
            p = self.bn.at(step)
        else:
            theta = params_of(self.model)
            p = {n: theta[n] for n in theta if n not in self.adapted}
        return stack({n: v.detach() if detach else v for n, v in p.items()}, n_tasks)

    def rollout(self, batch: TaskBatch, steps: int, *, first_order: bool = False, detach: bool = False,
                score=None) -> list[Tensor]:
        """Query predictions after 0..``steps`` inner steps (those in ``score``, default all), each
        with its own step's BN parameters and step sizes: a list of ``steps + 1`` [T, Nq, ...]
        tensors (None where not scored). Differentiable in every meta-parameter unless ``detach``."""
        model, loss, n = self.model, self.problem.loss, batch.n_tasks
        theta = params_of(self.model)
        phi = stack({k: (theta[k].detach() if detach else theta[k]) for k in self.adapted}, n)
        score = set(range(steps + 1)) if score is None else set(score)
        out: list = [None] * (steps + 1)
        if 0 in score:
            out[0] = forward_tasks(model, {**phi, **self._bn(0, n, detach)}, batch.x_query)
        for k in range(steps):
            bn = self._bn(k, n, detach)
            support = lambda p, bn=bn: loss(forward_tasks(model, {**p, **bn}, batch.x_support), batch.y_support).sum()
            phi = inner_step(support, phi, self._lr(k, detach), first_order=first_order)
            if k + 1 in score:
                out[k + 1] = forward_tasks(model, {**phi, **bn}, batch.x_query)
        return out

    def objective(self, iteration: int):
        """MSL's per-task outer loss Σ_k w_k L_query(φ_k) on a shard of tasks, for meta_backward."""
        weights = self.weights_at(iteration)
        first_order = not self.second_order_at(iteration)
        scored = [k + 1 for k, w in enumerate(weights) if w > 0]

        def run(part: TaskBatch):
            preds = self.rollout(part, self.own.steps, first_order=first_order, score=scored)
            total = sum(weights[k - 1] * self.problem.loss(preds[k], part.y_query) for k in scored)
            return preds[-1].detach(), total
        return run

    # ---- the method's face -------------------------------------------------------------------
    def train_step(self, batch: TaskBatch, iteration: int) -> dict[str, float]:
        opt = self.optimizers[self.name]
        lr = self.outer_lr_at(iteration)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        params = {f"p{i}": p for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
        preds = meta_backward(self.model, params, batch, self.problem.loss, workers=self.cfg.inner.task_workers,
                              objective=self.objective(iteration))
        metrics = query_metrics(self.name, self.problem, preds, batch)
        metrics[f"outer_lr/{self.name}"] = lr
        metrics[f"second_order/{self.name}"] = float(self.second_order_at(iteration))
        metrics[f"msl_last_weight/{self.name}"] = self.weights_at(iteration)[-1]
        if finite(metrics):
            clamp_grads((p for g in opt.param_groups for p in g["params"]), self.own.grad_clip)
            opt.step()
        return metrics

    def not_shardable(self):
        if self.own.grad_clip is not None:
            return ("maml_pp.grad_clip clamps each rank's share of the meta-gradient before the step; "
                    "--set maml_pp.grad_clip=null to shard it")
        return None

    def predict(self, batch: TaskBatch, steps: int) -> list[Tensor]:
        with torch.no_grad():
            return self.rollout(batch, steps, detach=True)

    def step_sizes(self) -> dict:
        if self.lslr is None:
            return {"inner_lr": self.own.lr}
        return {"lslr": {n: [round(v, 6) for v in self.lslr.values[n.replace(".", "-")].detach().tolist()] for n in self.lslr.names},
                "beyond_step_K": "steps past K reuse step K's sizes and batch-norm parameters"}
