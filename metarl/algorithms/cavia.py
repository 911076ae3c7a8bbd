"""CAVIA: fast context adaptation (Zintgraf, Shiarlis, Kurin, Hofmann & Whiteson 2019, ICML).

The parameters split in two (sec. 3, Algorithm 1): shared parameters θ, learned in the outer loop
only, and a low-dimensional context vector φ, the one thing a task adapts. For every task φ starts
at zero (φ₀ = 0, sec. 3.1) and takes ``cavia.steps`` gradient steps on the support loss,

    φ_i ← φ_i − α ∇_φ L_support(f_{φ_i, θ})                                  (eq. 3)

then θ takes an Adam step on the mean query loss at the adapted contexts,

    θ ← θ − β ∇_θ (1/T) Σ_i L_query(f_{φ_i(θ), θ})                            (eq. 4)

differentiated through the context steps (second order; ``first_order`` drops those terms). The
context enters the model as an input: concatenated to the MLP's input for sine (sec. 5.1), and
through FiLM layers on the conv blocks for image classification (sec. 5.2); see
``policies/context.py``. Only φ adapts, so ``Problem.head`` and the ``inner:`` section are not
used: CAVIA's own knobs live in its ``cavia:`` section (its inner step size 1.0 is far from
MAML's 0.01 / 0.4, which ``inner.lr`` keeps for the other methods).

The engine is MAML's: :func:`metarl.algorithms.maml.meta_backward` and ``adapted_predictions``
with ``only=["context"]`` and a zero context in the params dict; θ's tensors pass through
:func:`metarl.adaptation.adapt` untouched.

Meta-RL (sec. 5.3; ``algorithm: cavia`` on the RL track, :class:`CAVIATRPO` below): MAML-TRPO's
data path with a policy that takes the context as an input (:class:`policies.context.
ContextGaussianPolicy`, the reference code's ``CaviaMLPPolicy``). Per task the context starts at
zero and takes the inner REINFORCE step(s) alone (``inner.lr``, ``inner.steps``: the RL track's
inner loop, whose step sizes, evaluation settings and step-size search are the other RL methods'),
then TRPO updates θ on the post-update episodes, differentiating through the context steps. The
shared path (:mod:`metarl.algorithms.meta_rl`) reads from the policy what to add to θ
(``task_start``: the zero context) and what to adapt (``adapt_only``). MAML-TRPO's closed-form
Fisher products are written for the plain MLP policy (``metarl.fisher.fast_fisher_supported`` is
false here), so TRPO takes the generic double-backpropagation closures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..config import ConfigError, in_range
from ..functional import Params, params_of
from ..optim import clamp_grads
from ..registry import algorithm
from ..tasks.batch import TaskBatch
from .base import Method, Problem, finite
from .maml import adapted_predictions, meta_backward, query_metrics
from .maml_trpo import MAMLTRPO
from metarl.policies.context import CONTEXT, ContextGaussianPolicy, FiLMContext, InputContext

ONLY = (CONTEXT,)


@dataclass
class CAVIAConfig:
    """CAVIA's own settings (config section ``cavia``)."""
    context_size: int = 5
    """Context parameters φ per task (sine: 5 in the paper's code, Table 1 also tries 2 and 50;
    MiniImageNet: 100)."""
    lr: float = 1.0
    """Inner step size α on the context (the paper: 1.0 for regression and classification)."""
    steps: int = 1
    """Context gradient steps per task during meta-training (sine: 1; classification: 2)."""
    first_order: bool = False
    """Treat the context gradients as constants in the meta-gradient (the paper's first-order variant)."""
    film_blocks: list[int] = field(default_factory=lambda: [2])
    """Conv4 blocks (0-based) whose batch-norm output is FiLM-conditioned on φ (the paper: the third)."""
    grad_clip: Optional[float] = None
    """Clamp each meta-gradient element to ±grad_clip before the Adam step (the reference code: 10; null: off)."""
    task_workers: int = 1
    """Threads sharing the meta-batch (as ``inner.task_workers``: 0 = one per torch thread; speed only)."""

    def validate(self):
        in_range("cavia.context_size", self.context_size, 1, 100_000), in_range("cavia.lr", self.lr, 0, open_low=True)
        in_range("cavia.steps", self.steps, 0, 10_000), in_range("cavia.task_workers", self.task_workers, 0, 1_024)
        in_range("cavia.grad_clip", self.grad_clip, 0, open_low=True)
        if not self.film_blocks or any(not 0 <= b < 4 for b in self.film_blocks):
            raise ConfigError(f"cavia.film_blocks must list Conv4 blocks in 0..3, e.g. [2], got {self.film_blocks}")


@algorithm("cavia")
class CAVIA(Method):
    """θ: the context-conditioned model (``policies/context.py``) around the track's learner; the
    context φ is no part of θ and starts at zero for every task."""
    Config = CAVIAConfig
    defaults = {
        # the paper's sine settings (its code's defaults): 5 context inputs, α = 1, one step, 25 tasks
        "sine": {"cavia": {"context_size": 5, "lr": 1.0, "steps": 1}},
        # the paper's MiniImageNet settings (sec. 5.2; it has no Omniglot run): 100 context
        # parameters, FiLM on the third block, α = 1, two steps in training and at test
        # (the curve's length: eval.steps, read by `metarl evaluate` before inner.eval_steps)
        "fewshot": {"cavia": {"context_size": 100, "lr": 1.0, "steps": 2, "film_blocks": [2], "grad_clip": 10.0,
                              "task_workers": 0}, "eval": {"steps": 2}},
    }

    def __init__(self, problem: Problem, cfg):
        super().__init__(problem, cfg)
        o = self.own
        net = problem.make_model()
        if hasattr(net, "features_tasks") and hasattr(net, "blocks"):
            self.model = FiLMContext(net, o.context_size, o.film_blocks)
        else:
            self.model = InputContext(net, o.context_size)
        self.modules[self.name] = self.model
        self.optimizers[self.name] = torch.optim.Adam(self.model.parameters(), lr=cfg.outer.lr)

    def params(self) -> Params:
        """θ (the module's tensors) plus the zero context every task starts from (φ₀ = 0, sec. 3.1).
        ``adapt`` differentiates the inner loss with respect to it, so it is a fresh leaf that
        requires grad; it is stacked to [T, context_size] with θ."""
        p = params_of(self.model)
        p[CONTEXT] = torch.zeros(self.own.context_size, dtype=next(iter(p.values())).dtype, requires_grad=True)
        return p

    def train_step(self, batch: TaskBatch, iteration: int) -> dict[str, float]:
        o, opt = self.own, self.optimizers[self.name]
        opt.zero_grad(set_to_none=True)
        preds = meta_backward(self.model, self.params(), batch, self.problem.loss, steps=o.steps, lr=o.lr,
                              first_order=o.first_order, only=ONLY, batched=True, workers=o.task_workers)
        metrics = query_metrics(self.name, self.problem, preds, batch)
        if finite(metrics):
            clamp_grads(self.model.parameters(), o.grad_clip)
            opt.step()
        return metrics

    def predict(self, batch: TaskBatch, steps: int) -> list[Tensor]:
        return adapted_predictions(self.model, self.params(), batch, self.problem.loss, steps=steps, lr=self.own.lr, only=ONLY)

    def not_shardable(self):
        if self.own.grad_clip is not None:
            return ("cavia.grad_clip clamps each rank's share of the meta-gradient before the step; "
                    "--set cavia.grad_clip=null to shard it")
        return None

    def step_sizes(self) -> dict:
        return {"context_lr": self.own.lr, "context_size": self.own.context_size}


# ------------------------------------------------------------------------------- meta-RL

@dataclass
class CAVIARLConfig:
    """CAVIA's own setting on the RL track (section ``cavia``); its inner step is ``inner.lr`` /
    ``inner.steps`` as for every RL method."""
    context_size: int = 5
    """Context inputs φ of the policy (the paper: 5 on 2D navigation, 50 on the MuJoCo tasks)."""

    def validate(self):
        from ..config import in_range
        in_range("cavia.context_size", self.context_size, 1, 100_000)


@algorithm("cavia", kinds=("rl",))
class CAVIATRPO(MAMLTRPO):
    """CAVIA for meta-RL (Zintgraf et al. 2019 sec. 5.3): MAML-TRPO whose inner REINFORCE step
    adapts only the policy's context inputs, zero at the start of every task."""
    Config = CAVIARLConfig
    defaults = {
        # the reference code's 2D-navigation settings (lmzintgraf/cavia rl/arguments.py and README):
        # inner (context) lr 1.0, one step, 20 episodes per task, 20 tasks, 2 x 100 relu, γ 0.95, GAE λ 1
        "rl": {"cavia": {"context_size": 5}, "inner": {"lr": 1.0, "steps": 1}, "advantages": {"gamma": 0.95}},
    }

    def new_policy(self) -> ContextGaussianPolicy:
        """A fresh context policy (θ of this method, and the ``random`` baseline)."""
        c, t = self.cfg.policy, self.problem
        return ContextGaussianPolicy(t.obs_dim, t.act_dim, self.own.context_size, c.hidden, c.activation, c.init_std,
                                     init=c.init)

    def step_sizes(self) -> dict:
        return {"context_size": self.own.context_size}
