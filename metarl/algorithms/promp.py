"""ProMP: Proximal Meta-Policy Search (Rothfuss, Lee, Clavera, Asfour & Abbeel, ICLR 2019).

MAML-RL's meta-objective is the return after adaptation, E_{D~π_θ}[ J(φ(θ, D)) ]: θ both sets
the start of the inner step and samples the pre-update episodes D. MAML-TRPO holds D fixed, so
its meta-gradient omits the second influence (credit for pre-update exploration). ProMP keeps
MAML's data path and changes two things:

1. **LVC inner loss.** The inner step is taken on the low-variance curvature surrogate
   J^LVC(θ) = mean_t π_θ(a_t|s_t) / π_θo(a_t|s_t) · A_t (π_θo the sampling policy, a constant;
   :func:`metarl.algorithms.meta_rl.inner_loss` with ``estimator="lvc"``). At θ = θo its
   gradient is REINFORCE's, so φ is MAML's (sampling and evaluation use the shared REINFORCE
   step), but its Hessian has the extra Σ_t ∇log π ∇log πᵀ A_t, through which the meta-gradient
   receives the sampling term (exactly in expectation for one-step episodes, to first order in
   the step size; tests/test_promp.py checks this against the exact gradient).
2. **Proximal outer rule.** Instead of a TRPO step, ``outer.epochs`` Adam passes (``outer.lr``)
   over J^ProMP(θ) = J^CLIP(φ(θ)) − η · KL(π_θo ‖ π_θ): PPO's clipped likelihood ratio of the
   adapted policy on the post-update episodes, and a KL penalty that keeps the pre-update policy
   (whose change the clipped term cannot see) near the one that sampled D, on D. With several
   inner steps there is one penalty per step k, KL(π_{φ_k(θo)} ‖ π_{φ_k(θ)}) on step k's data,
   each with its own η_k (:mod:`metarl.algorithms.ppo`). After each iteration η_k is halved when
   its KL was below target/1.5 and doubled when above 1.5·target (:func:`adapt_kl_coeff`, PPO's
   adaptive KL rule, as the authors' code does); ``promp.adaptive_kl: false`` keeps it fixed.

Defaults are the authors' released configurations (jonasrothfuss/ProMP, run_scripts): clip 0.3,
5 ProMP steps, Adam 1e-3, inner step 0.1, target inner KL 0.01, initial η 5e-4. Those scripts set
``adaptive_inner_kl_penalty: False`` (η fixed at 5e-4); the paper describes the adaptive
coefficient, which is the default here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..registry import algorithm
from .maml_trpo import MAMLTRPO, meta_update


@dataclass
class ProMPConfig:
    """ProMP's KL penalty (config section ``promp``); the clipped outer rule's own keys are
    ``outer.clip``, ``outer.epochs``, ``outer.minibatches``, ``outer.lr``, shared with MAML-PPO."""
    target_kl: float = 0.01
    """Target of the inner KL(π_θo ‖ π_θ) on the pre-update episodes (ProMP's target_inner_step)."""
    init_kl_coeff: float = 5e-4
    """Initial penalty coefficient η of that KL, one per inner step (ProMP's init_inner_kl_penalty)."""
    adaptive_kl: bool = True
    """Halve η when the KL after the outer step is below target_kl/1.5, double it above 1.5·target_kl;
    false keeps η at init_kl_coeff (the authors' released scripts)."""

    def validate(self):
        """A KL target and a penalty coefficient are non-negative numbers; a zero target with the
        adaptive rule would double η forever."""
        from ..config import in_range
        in_range("promp.target_kl", self.target_kl, 0, open_low=True)
        in_range("promp.init_kl_coeff", self.init_kl_coeff, 0)


def adapt_kl_coeff(coeff: float, kl: float, target: float) -> float:
    """PPO's adaptive penalty rule (Schulman et al. 2017, sec. 4), as ProMP's code applies it: η/2 when
    KL < target/1.5, 2η when KL > 1.5·target, else unchanged."""
    if kl < target / 1.5:
        return coeff / 2.0
    if kl > target * 1.5:
        return coeff * 2.0
    return coeff


@algorithm("promp", kinds=("rl",))
class ProMP(MAMLTRPO):
    """ProMP on the RL track (``algorithm: promp``): MAML-TRPO's policy, data path and Adam, the
    LVC inner loss, the PPO outer rule with the pre-update KL penalty; η_k are its extra state."""
    Config = ProMPConfig
    defaults = {"rl": {"outer": {"optimizer": "ppo"}}}

    def __init__(self, track, cfg):
        if cfg.outer.optimizer != "ppo":
            raise ConfigError(f"algorithm 'promp' takes PPO outer steps, got outer.optimizer={cfg.outer.optimizer}: "
                              f"set outer.optimizer=ppo (experiments/promp_nav2d.yaml does)")
        super().__init__(track, cfg)
        self.kl_coeffs = torch.full((cfg.inner.steps,), float(self.own.init_kl_coeff), dtype=torch.float64)

    def train_step(self, tasks, seed: int) -> dict[str, float]:
        metrics = meta_update(self.policy, self.collector, tasks, self.cfg.inner, self.cfg.advantages, self.cfg.outer,
                              seed, optimizer=self.optimizers[self.name], estimator="lvc", kl_coeffs=self.kl_coeffs)
        kls = [metrics[f"ppo/inner_kl{k}"] for k in range(len(self.kl_coeffs))]
        for k, coeff in enumerate(self.kl_coeffs.tolist()):
            metrics[f"promp/kl_coeff{k}"] = coeff
            if self.own.adaptive_kl and all(map(math.isfinite, kls)):
                self.kl_coeffs[k] = adapt_kl_coeff(coeff, kls[k], self.own.target_kl)
        return metrics

    def extra_state(self) -> dict:
        return {"kl_coeffs": self.kl_coeffs.clone()}

    def load_extra_state(self, state: dict) -> None:
        if "kl_coeffs" in state:
            self.kl_coeffs = state["kl_coeffs"].clone()
