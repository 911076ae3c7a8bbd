"""TRPO as the outer rule of MAML-RL (Schulman et al. 2015; Finn et al. 2017 sec. 5.3).

The outer objective is the surrogate of the adapted policies on their post-update episodes,
constrained by the mean KL between the adapted policies at θ_old and at θ
(:func:`metarl.algorithms.meta_rl.outer_objective`); the step is conjugate gradient on
Fisher-vector products, then a backtracking line search (:func:`metarl.optim.trpo_step`). The
Fisher products are exact double backpropagation through the KL ("autograd") or the same values
in closed form (:mod:`metarl.fisher`, "closed_form").
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal


import torch
from torch import Tensor

from ..config import resumable
from ..functional import Params
from ..optim import hvp_fn, trpo_step
from .meta_rl import RLInnerConfig, outer_objective
from ..fisher import MAMLLinearization, fast_fisher_supported


@dataclass
class RLOuterConfig:
    optimizer: Literal["trpo", "vpg", "ppo"] = "trpo"
    """Outer rule: TRPO (the paper), vanilla policy gradient with Adam (``lr``), or PPO: ``epochs``
    Adam passes (``lr``) over the clipped surrogate (``clip``) per meta-batch (metarl/algorithms/ppo.py)."""
    max_kl: float = 0.01
    """TRPO's trust region: the largest mean KL between the adapted policies before and after the step."""
    cg_iters: int = 10
    """Conjugate-gradient iterations for the natural-gradient direction."""
    cg_damping: float = 1e-5
    """Damping added to the Fisher-vector products (F + damping·I)."""
    ls_ratio: float = 0.8
    """Backtracking factor of the line search."""
    ls_steps: int = 15
    """Line-search trials before the step is rejected."""
    lr: float = 1e-3
    """Adam step size when optimizer is vpg or ppo (ProMP's learning_rate: 1e-3)."""
    clip: float = 0.3
    """PPO's clip range ε of the likelihood ratio (ProMP's clip_eps: 0.3 in its released configs)."""
    epochs: int = 5
    """PPO: passes over the meta-batch per iteration without re-sampling (ProMP's num_promp_steps: 5)."""
    minibatches: int = 1
    """PPO: each pass splits the meta-batch's tasks into this many minibatches, one Adam step each
    (1 = one step per pass on all tasks, as ProMP's released code does)."""
    fisher: Literal["autograd", "closed_form"] = "closed_form"
    """TRPO's gradient and Fisher-vector products: "autograd" differentiates the closures (double
    backpropagation through the KL); "closed_form" computes the same values for a GaussianMLPPolicy
    with a relu/tanh MLP mean from F_θ = Jᵀ F_φ J (~3x cheaper per product and per TRPO step on
    HalfCheetahVel; other policies fall back to autograd). Equal to rounding (tested in float64),
    but 10 float32 CG iterations on a small ill-conditioned problem (e.g. 2D navigation) amplify
    rounding differences to ~1% of the step, so the two paths' training runs are not bit-identical
    ("autograd" reproduces runs made before closed_form existed bit for bit)."""
    threads: int = resumable(0, why="speed only")
    """torch intra-op threads for the TRPO step only, restored afterwards (sampling keeps its own
    setting); 0 = leave the process's setting unchanged. The collector is idle during the step, so
    2 can pay off on a dedicated machine; on a loaded one OpenMP threads wait on each other (2
    threads measured 1.6-2.4x slower than 1 on the shared 2-core dev box)."""
    fvp_subsample: float = 1.0
    """Fraction of each task's post-update episodes used for the Fisher-vector products (rllab's
    subsample_factor); 1.0 = all (exact TRPO). Below 1 the curvature is estimated on a random
    subset of episodes, the same in every task (the gradient and the line search still use all):
    cheaper CG, slightly different step direction. With fisher "closed_form" only the post-update part
    of each product (about a quarter) shrinks, the inner-step part does not."""

    def validate(self):
        """TRPO's trust region and line search (Schulman et al. 2015, appendix C) only make sense
        for a positive KL bound, a backtracking ratio in (0, 1) and at least one step; a subsample
        of 0 episodes has no curvature. Caught here, they would fail later in CG or the search."""
        from ..config import in_range
        in_range("outer.max_kl", self.max_kl, 0, open_low=True)
        in_range("outer.cg_iters", self.cg_iters, 1, 10_000)
        in_range("outer.cg_damping", self.cg_damping, 0)
        in_range("outer.ls_ratio", self.ls_ratio, 0, 1, open_low=True, open_high=True)
        in_range("outer.ls_steps", self.ls_steps, 1, 1_000)
        in_range("outer.lr", self.lr, 0, open_low=True)
        in_range("outer.clip", self.clip, 0, 1, open_low=True, open_high=True)
        in_range("outer.epochs", self.epochs, 1, 10_000)
        in_range("outer.minibatches", self.minibatches, 1, 100_000)
        in_range("outer.threads", self.threads, 0, 1_024)
        in_range("outer.fvp_subsample", self.fvp_subsample, 0, 1, open_low=True)


# ------------------------------------------------------------------------------- the outer step

def _subsample_episodes(episodes, adv: Tensor, fraction: float, generator: torch.Generator):
    """(episodes, advantages) restricted to the same random subset of episode slots (axis B) in
    every task, at least one; only the fields the outer objective reads are kept."""
    B = episodes.obs.shape[2]
    k = max(1, int(round(fraction * B)))
    if k >= B:
        return episodes, adv
    idx = torch.randperm(B, generator=generator)[:k].sort().values
    sub = SimpleNamespace(**{name: getattr(episodes, name)[:, :, idx] for name in ("obs", "actions", "mask", "log_probs")})
    return sub, adv[:, :, idx]



def trpo_outer_step(policy, theta: Params, train, valid, valid_adv: Tensor, phi_old: Params, inner: RLInnerConfig,
                    outer: RLOuterConfig, seed: int = 0, reduction: str = "episode", reduce=None) -> dict:
    """TRPO on θ (updated in place) for the outer objective of :func:`outer_objective`.

    ``reduce``: with the meta-batch sharded over torchrun ranks (:mod:`metarl.distributed`),
    combines each rank's share of the surrogate, its gradient, the Fisher-vector products and the
    line search's loss and KL (see :func:`metarl.optim.trpo_step`)."""
    surrogate, kl, loss_and_kl = outer_objective(policy, train, valid, valid_adv, phi_old, inner, reduction)
    if not 0.0 < outer.fvp_subsample <= 1.0:
        raise ValueError(f"outer.fvp_subsample must be in (0, 1], got {outer.fvp_subsample}")
    if outer.fisher not in ("autograd", "closed_form"):
        raise ValueError(f"unknown outer.fisher '{outer.fisher}': choose autograd or closed_form")
    fisher_valid, fisher_adv = _subsample_episodes(valid, valid_adv, outer.fvp_subsample, torch.Generator().manual_seed(seed))
    fvp_fn = loss_and_grad_fn = None
    if outer.fisher == "closed_form" and fast_fisher_supported(policy, inner.lr):
        cache: dict = {}

        def linearization(p: Params) -> MAMLLinearization:
            lin = cache.get("lin")
            if lin is None or any(not torch.equal(lin.like[k], p[k].detach()) for k in lin.like):
                lin = cache["lin"] = MAMLLinearization(policy, p, train, inner.lr, inner.first_order, valid.obs.shape[0], reduction)
            return lin

        def loss_and_grad_fn(p: Params):
            return linearization(p).surrogate_and_grad(valid, valid_adv)

        def fvp_fn(p: Params):
            lin = linearization(p)
            cache.clear()  # the product alone keeps it alive, and trpo_step drops that before the line search
            lin.keep_only(fisher_valid)
            return lin.fisher(fisher_valid)
    elif fisher_valid is not valid:
        _, kl_sub, _ = outer_objective(policy, train, fisher_valid, fisher_adv, phi_old, inner, reduction)

        def fvp_fn(p: Params):
            return hvp_fn(kl_sub, p)
    return trpo_step(theta, surrogate, kl, max_kl=outer.max_kl, cg_iters=outer.cg_iters, damping=outer.cg_damping,
                     ls_ratio=outer.ls_ratio, ls_steps=outer.ls_steps, loss_and_kl_fn=loss_and_kl, fvp_fn=fvp_fn,
                     loss_and_grad_fn=loss_and_grad_fn, reduce=reduce)
