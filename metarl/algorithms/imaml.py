"""iMAML: meta-learning with implicit gradients (Rajeswaran, Finn, Kakade & Levine 2019, NeurIPS).

A task's adapted parameters are the solution of a proximal problem around θ (sec. 3, eq. 3):

    φ*(θ) = argmin_φ  L_support(φ) + λ/2 ‖φ − θ‖²

Its stationarity condition ∇L(φ*) + λ(φ* − θ) = 0 gives, by the implicit function theorem,
dφ*/dθ = (I + H/λ)⁻¹ with H = ∇²L_support(φ*) (Lemma 1, eq. 6), so the meta-gradient of the
query loss is

    ∇_θ L_query(φ*(θ)) = (I + H/λ)⁻¹ ∇_φ L_query(φ*)                                  (eq. 7)

which depends only on φ*, not on how it was found. Hence (Algorithm 1 and 2):
1. φ ≈ φ* by ``imaml.steps`` gradient steps of size ``imaml.lr`` on the proximal objective
   (:func:`proximal_solve`, via :func:`metarl.adaptation.inner_step`), stopping a task early once
   its proximal-gradient norm is below ``imaml.tol``; run under ``no_grad`` on detached tensors,
   so no graph is kept: memory does not grow with the number of inner steps;
2. g = ∇_φ L_query(φ);
3. the meta-gradient ≈ (I + H/λ)⁻¹ g by ``imaml.cg_steps`` conjugate-gradient steps on
   Hessian-vector products of the support loss at φ (:func:`implicit_gradient`; the paper's
   Hessian-free variant, 5 CG steps). The whole meta-batch runs at once: θ is stacked per task, the
   support losses are summed, so one double-backward pass gives every task's H_t v_t, and each
   task's CG keeps its own step sizes (:func:`metarl.optim.conjugate_gradient_batched`).
Adam then steps θ on the mean over tasks.

Differences from the authors' code (github.com/aravindr93/imaml_dev), stated rather than
copied: their inner loop takes 16 plain SGD steps on the support loss followed by one pull-back
step on the proximal term, where this file descends the proximal objective itself (the paper's
definition); their CG operator is ((1 + δ)I + H/(λ + 10)) with δ = ``cg_damping`` = 1, here
((1 + δ)I + H/λ) with δ = 0 by default (the paper's eq. 7); and at test time their script fine-tunes
with λ = 0, which ``imaml.eval_lam: 0`` reproduces (default: the training λ, the paper's Alg⋆).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor

from ..adaptation import inner_step
from ..config import in_range, resumable
from ..functional import Params, detached, forward_tasks, params_of, stack
from ..optim import conjugate_gradient_batched, flat, hvp_fn, unflat
from ..registry import algorithm
from ..tasks.batch import TaskBatch
from .base import Method, Problem, finite
from .maml import query_metrics

LossFn = Callable[[Params], Tensor]


@dataclass
class IMAMLConfig:
    """iMAML's own settings (config section ``imaml``)."""
    lam: float = 2.0
    """Proximal regularisation strength λ (the paper's Omniglot runs: 2.0)."""
    lr: float = 0.1
    """Step size of the inner gradient descent on the proximal objective (the authors' Omniglot: 0.1)."""
    steps: int = 16
    """Inner gradient steps (at most; the authors' Omniglot: 16)."""
    tol: float = 0.0
    """Stop a task's inner loop once its proximal-gradient norm ‖∇L + λ(φ − θ)‖ is at most tol (0: never)."""
    cg_steps: int = 5
    """Conjugate-gradient steps for (I + H/λ)⁻¹ g (the paper: 5; 0 = first-order, the meta-gradient is g)."""
    cg_damping: float = 0.0
    """δ in ((1 + δ)I + H/λ): extra damping when H is far from positive definite (the paper: 0)."""
    safeguard: bool = True
    """Reject a step that raises a task's proximal objective and halve that task's step size (monotone descent; off: plain fixed-step GD)."""
    eval_lam: Optional[float] = resumable(None, why="evaluation only")
    """λ of the evaluation curve's inner steps (null: lam; 0: plain fine-tuning, as the authors' test script)."""

    def validate(self):
        in_range("imaml.lam", self.lam, 0, open_low=True), in_range("imaml.lr", self.lr, 0, open_low=True)
        in_range("imaml.steps", self.steps, 0, 10_000), in_range("imaml.cg_steps", self.cg_steps, 0, 10_000)
        in_range("imaml.tol", self.tol, 0), in_range("imaml.cg_damping", self.cg_damping, 0)
        in_range("imaml.eval_lam", self.eval_lam, 0)


# ------------------------------------------------------------------------ per-task row vectors

def rows(params: Mapping[str, Tensor]) -> Tensor:
    """Task-stacked params (each [T, ...]) as one matrix [T, n]: row t is task t's flat vector."""
    t = next(iter(params.values())).shape[0]
    return torch.cat([v.reshape(t, -1) for v in params.values()], 1)


def unrows(mat: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Inverse of :func:`rows`: [T, n] back to tensors shaped like ``like``."""
    out, i = {}, 0
    for k, v in like.items():
        n = v[0].numel()
        out[k] = mat[:, i:i + n].reshape(v.shape)
        i += n
    return out


# ----------------------------------------------------------------------------- the two solves

def proximal_objective(support_loss: LossFn, anchor: Mapping[str, Tensor], lam: float, *, per_task: bool = False) -> LossFn:
    """φ ↦ L_support(φ) + λ/2 ‖φ − θ‖², each task with its own anchor row. ``support_loss`` returns
    the per-task losses [T]; the objective is their sum, or (``per_task``) the vector [T] itself."""
    def f(p: Params) -> Tensor:
        reg = sum(((p[k] - a) ** 2).flatten(1).sum(1) for k, a in anchor.items())
        values = support_loss(p) + 0.5 * lam * reg
        return values if per_task else values.sum()
    return f


def proximal_steps(support_loss: LossFn, theta: Mapping[str, Tensor], lam: float, *, lr: float, steps: int,
                   tol: float = 0.0, safeguard: bool = True) -> Iterator[tuple[Params, Tensor]]:
    """Gradient descent from θ on each task's proximal problem (eq. 3), yielding (φ, steps taken
    per task [T]) after every step, without an outer graph (detached, under ``no_grad``: memory does
    not grow with ``steps``).

    ``theta``: task-stacked parameters [T, ...]; ``support_loss(p)``: the per-task losses [T].
    iMAML needs φ close to the minimiser, not a particular path to it (eq. 7 depends on φ* only),
    so the solver may control its step: with ``safeguard`` a step that raises a task's proximal
    objective (or makes it non-finite) is rejected for that task and its step size halved, which
    makes the descent monotone per task. Without it a fixed step larger than 2/curvature diverges,
    and a meta-trained θ sits exactly where the support loss is steep (sine: NaN after ~800
    iterations; RESULTS.md). A task stops once the gradient of its proximal objective, read off its
    last accepted step as ‖Δφ‖/step, is at most ``tol``; the others go on."""
    anchor = detached(theta)
    objective = proximal_objective(support_loss, anchor, lam)
    values = proximal_objective(support_loss, anchor, lam, per_task=True)
    phi = dict(anchor)
    n = next(iter(phi.values())).shape[0]
    taken = torch.zeros(n, dtype=torch.long)
    active = torch.ones(n, dtype=torch.bool)
    rate = torch.full((n,), float(lr), dtype=next(iter(phi.values())).dtype)
    per_row = lambda x, v: x.view(n, *[1] * (v.dim() - 1))
    with torch.no_grad():
        f = values(phi) if safeguard else None
        for _ in range(steps):
            if not bool(active.any()):
                break
            used = rate * active.to(rate.dtype)
            new = inner_step(objective, phi, {k: per_row(used, v) for k, v in phi.items()})
            taken += active
            accepted = active.clone()
            if safeguard:
                f_new = values(new)
                # a task whose objective is already non-finite (bad data) is not "protected": its NaN
                # must reach the outer loss, where the training loop stops the run
                accepted &= (torch.isfinite(f_new) & (f_new <= f)) | ~torch.isfinite(f)
                rate = torch.where(active & ~accepted, rate / 2, rate)
                new = {k: torch.where(per_row(accepted, v), v, phi[k]) for k, v in new.items()}
                f = torch.where(accepted, f_new, f)
            if tol > 0:
                moved = rows({k: new[k] - phi[k] for k in phi}).norm(dim=1) / torch.where(accepted, used, torch.ones_like(used))
                active &= ~accepted | (moved > tol)
            phi = new
            yield phi, taken.clone()


def proximal_solve(support_loss: LossFn, theta: Mapping[str, Tensor], lam: float, *, lr: float, steps: int,
                   tol: float = 0.0, safeguard: bool = True) -> tuple[Params, Tensor]:
    """Approximately solve each task's proximal problem (eq. 3): the last of :func:`proximal_steps`.
    Returns (φ, inner steps taken per task [T])."""
    out = (detached(theta), torch.zeros(next(iter(theta.values())).shape[0], dtype=torch.long))
    for out in proximal_steps(support_loss, theta, lam, lr=lr, steps=steps, tol=tol, safeguard=safeguard):
        pass
    return out


def implicit_gradient(support_loss: LossFn, phi: Mapping[str, Tensor], query_grads: Mapping[str, Tensor], lam: float, *,
                      cg_steps: int = 5, damping: float = 0.0) -> Params:
    """Per task, x_t ≈ ((1 + damping) I + H_t/λ)⁻¹ g_t (eq. 7), with H_t the Hessian of task t's
    support loss at φ_t, by ``cg_steps`` CG steps on Hessian-vector products (never forming H).

    ``phi`` and ``query_grads`` are task-stacked [T, ...]; ``support_loss`` gives the per-task
    losses, summed here, so the Hessian of the sum is block diagonal over tasks and one double-backward pass
    (:func:`metarl.optim.hvp_fn`) gives every H_t v_t. Returns x, stacked like ``phi``."""
    if cg_steps == 0:
        return {k: g.detach() for k, g in query_grads.items()}
    leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    hvp = hvp_fn(lambda p: support_loss(p).sum(), leaves)

    def operator(v: Tensor) -> Tensor:
        hv = rows(unflat(hvp(flat(unrows(v, leaves))), leaves))
        return (1.0 + damping) * v + hv / lam

    g = rows({k: query_grads[k] for k in leaves}).detach()
    # no residual stop: cg_steps is the budget (an absolute rᵀr threshold would cut small gradients short)
    return unrows(conjugate_gradient_batched(operator, g, iters=cg_steps, residual_tol=0.0), leaves)


@algorithm("imaml")
class IMAML(Method):
    """θ: the model's initial weights, the anchor of every task's proximal problem. No meta-parameter
    beyond θ (λ is a fixed hyper-parameter, as in the paper's experiments)."""
    Config = IMAMLConfig
    defaults = {
        # no sine experiment in the paper: λ, α, steps chosen so 16 steps solve the proximal
        # problem well on the 1-40-40-1 MLP (experiments/imaml_sine.yaml says why)
        "sine": {"imaml": {"lam": 10.0, "lr": 0.01, "steps": 16, "cg_steps": 5}},
        # the authors' Omniglot command (imaml_dev/examples/README.md): λ 2, α 0.1, 16 steps, 5 CG steps
        "fewshot": {"imaml": {"lam": 2.0, "lr": 0.1, "steps": 16, "cg_steps": 5}, "eval": {"steps": 16}},
    }

    def __init__(self, problem: Problem, cfg):
        super().__init__(problem, cfg)
        self.model = problem.make_model()
        self.modules[self.name] = self.model
        self.optimizers[self.name] = torch.optim.Adam(self.model.parameters(), lr=cfg.outer.lr)

    def support_loss(self, batch: TaskBatch) -> LossFn:
        """p ↦ the per-task support losses [T]."""
        return lambda p: self.problem.loss(forward_tasks(self.model, p, batch.x_support), batch.y_support)

    def adapt(self, batch: TaskBatch) -> tuple[Params, Tensor]:
        """(φ ≈ φ*(θ) per task, detached and stacked; inner steps taken per task)."""
        o = self.own
        theta = stack(detached(params_of(self.model)), batch.n_tasks)
        return proximal_solve(self.support_loss(batch), theta, o.lam, lr=o.lr, steps=o.steps, tol=o.tol, safeguard=o.safeguard)

    def meta_gradient(self, batch: TaskBatch) -> tuple[Params, Tensor, Tensor]:
        """(∇θ of the mean query loss by eq. 7, per parameter; query predictions; steps taken)."""
        o = self.own
        phi, taken = self.adapt(batch)
        leaves = {k: v.requires_grad_(True) for k, v in phi.items()}
        preds = forward_tasks(self.model, leaves, batch.x_query)
        grads = torch.autograd.grad(self.problem.loss(preds, batch.y_query).sum(), list(leaves.values()), allow_unused=True)
        g = {k: torch.zeros_like(v) if gi is None else gi for (k, v), gi in zip(leaves.items(), grads)}
        x = implicit_gradient(self.support_loss(batch), phi, g, o.lam, cg_steps=o.cg_steps, damping=o.cg_damping)
        return {k: v.mean(0) for k, v in x.items()}, preds.detach(), taken

    def train_step(self, batch: TaskBatch, iteration: int) -> dict[str, float]:
        opt = self.optimizers[self.name]
        opt.zero_grad(set_to_none=True)
        grads, preds, taken = self.meta_gradient(batch)
        metrics = query_metrics(self.name, self.problem, preds, batch)
        metrics[f"inner_steps/{self.name}"] = taken.double().mean().item()
        metrics[f"grad_norm/{self.name}"] = torch.cat([g.reshape(-1) for g in grads.values()]).norm().item()  # a NaN stops the run
        if finite(metrics):
            for name, p in self.model.named_parameters():
                p.grad = grads[name].to(p.dtype)
            opt.step()
        return metrics

    def predict(self, batch: TaskBatch, steps: int) -> list[Tensor]:
        o = self.own
        lam = o.lam if o.eval_lam is None else o.eval_lam
        theta = stack(detached(params_of(self.model)), batch.n_tasks)
        phis = [theta] + [phi for phi, _ in proximal_steps(self.support_loss(batch), theta, lam, lr=o.lr, steps=steps,
                                                          safeguard=o.safeguard)]
        with torch.no_grad():
            return [forward_tasks(self.model, phi, batch.x_query) for phi in phis]

    def step_sizes(self) -> dict:
        o = self.own
        return {"inner_lr": o.lr, "lam": o.lam, "eval_lam": o.lam if o.eval_lam is None else o.eval_lam}
