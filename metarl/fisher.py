"""Exact Fisher-vector products of MAML-TRPO's trust region, in closed form.

For a GaussianMLPPolicy with a relu/tanh MLP mean and a scalar inner step size, the TRPO step's
surrogate gradient and Fisher-vector products at θ_old are computed by hand instead of double
backpropagation through the KL closure (same values to rounding, ~3x cheaper; tested in float64
against :func:`metarl.optim.hvp_fn` in tests/test_maml_trpo.py). Used by
:func:`metarl.algorithms.trpo.trpo_outer_step` when ``outer.fisher`` is "closed_form".
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .functional import Params, stack
from .objectives import step_weights
from .optim import unflat
from metarl.policies.gaussian import GaussianMLPPolicy, log_prob
from metarl.policies.mlp import MLP


# --------------------------------------------------------------- exact Fisher-vector products
#
# At θ_old the KL's own gradient in the fast weights vanishes (the KL is minimal, zero, where
# φ(θ) = φ_old), so its Hessian through the inner step has no second-order term in φ(θ):
#     F_θ = Jᵀ F_φ J,   J = ∂φ/∂θ = Π_k (I − α ∇²L_in,k)   (one factor per inner step),
# and for a diagonal Gaussian KL(π_old ‖ π) the Hessian in the distribution's parameters at
# π = π_old is the Fisher information: Σ⁻¹ for the mean, 2 per log-std entry, no cross term. So
#     F_φ = Σ_steps w · J_μᵀ Σ⁻¹ J_μ  (+ 2 Σ w per log-std entry),
# with w the steps' weights in the mean KL (see objectives.masked_mean). The products J v, Jᵀ u
# need Hessian-vector products of the REINFORCE inner loss, done below by hand (forward-over-
# reverse through the MLP with everything that does not depend on the vector computed once),
# F_φ needs one Jacobian-vector and one vector-Jacobian product of the policy on the valid data.
# The result is the same matrix-vector product as double backpropagation through the KL closure
# (tests/test_maml_trpo.py checks it against metarl.optim.hvp_fn in float64) at ~1/3 of the cost
# (HalfCheetahVel, 40 tasks × 4000 steps: ~16 [T, 4000, 100]-sized matmuls and a few in-place
# element-wise passes per product, vs ~24 matmuls and many fresh element-wise intermediates).
# The surrogate's gradient Jᵀ ∇_φ L comes from the same pieces. Supported: GaussianMLPPolicy with
# a relu/tanh MLP mean and a scalar inner step size; anything else takes the autograd path.


def fast_fisher_supported(policy, lr) -> bool:
    return (type(policy) is GaussianMLPPolicy and type(policy.mean) is MLP
            and policy.mean.activation in ("relu", "tanh") and isinstance(lr, (int, float)))


class _Tangent(NamedTuple):
    """What the tangent of a backward pass needs besides the tangent of the output gradient."""
    deltas: list   # the primal gradients with respect to each layer's output z
    hdots: list    # tangents of each layer's input (None for the observation)
    zdots: list    # tangents of the hidden pre-activations (tanh only)
    gh_d2: list    # tanh: (∂/∂h) ⊙ act''(z) per hidden layer
    tangent: list  # tangents of [W | b] per layer


class _LinearizedMLP:
    """``GaussianMLPPolicy.forward_tasks`` at fixed per-task params on one batch, kept for
    Jacobian products: each layer's input with a ones column (so a layer's [W | b] is one
    matrix [T, out, in+1]), the activation derivatives, and work buffers reused across calls."""

    def __init__(self, policy, params: Params, obs: Tensor):
        self.n = n = len(policy.mean.layers)
        self.tanh = policy.mean.activation == "tanh"
        h = obs.reshape(obs.shape[0], -1, obs.shape[-1])
        self.weights = [params[f"mean.layers.{i}.weight"] for i in range(n)]
        self.inputs, self.d1, self.d2 = [], [], []  # layer inputs [T, N, in+1]; act'(z), act''(z) per hidden layer
        for i, layer in enumerate(_layers(params, n)):
            x = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], -1)
            self.inputs.append(x)
            z = torch.bmm(x, layer.transpose(1, 2))
            if i < n - 1:
                if self.tanh:
                    h = torch.tanh(z)
                    self.d1.append(1.0 - h * h)
                    self.d2.append(-2.0 * h * self.d1[-1])
                else:
                    h = torch.relu(z)
                    self.d1.append((z > 0).to(z.dtype))
        self.mean = z
        raw = params["log_std"]
        self.log_std = raw.clamp(min=policy.min_log_std)
        self.clamp_grad = (raw >= policy.min_log_std).to(raw.dtype)  # clamp's derivative, [T, A]
        self.inv_var = torch.exp(-2.0 * self.log_std).unsqueeze(1)   # [T, 1, A]
        self._buffers: dict = {}

    def _buffer(self, key, shape) -> Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape:
            buf = self._buffers[key] = self.mean.new_empty(shape)
        return buf

    def jvp(self, tangent: list[Tensor]):
        """Tangents of the layers (``tangent``: [T, out, in+1] per layer) → (hidden pre-activation
        tangents ż (tanh only), hidden output tangents ḣ (None for the observation), mean
        tangent μ̇). The results live in work buffers: use them before the next call."""
        hdot, hdots, zdots = None, [None], []
        for i in range(self.n):
            x = self.inputs[i]
            zd = torch.bmm(x, tangent[i].transpose(1, 2), out=self._buffer(("z", i), (*x.shape[:2], tangent[i].shape[1])))
            if hdot is not None:
                zd.baddbmm_(hdot, self.weights[i].transpose(1, 2))
            if i < self.n - 1:
                if self.tanh:
                    zdots.append(zd)
                    hdot = torch.mul(zd, self.d1[i], out=self._buffer(("h", i), zd.shape))
                else:
                    hdot = zd.mul_(self.d1[i])
                hdots.append(hdot)
        return zdots, hdots, zd

    def backward(self, delta: Tensor, second: Optional[_Tangent] = None,
                 keep: Optional[tuple[list, list]] = None) -> list[Tensor]:
        """Per-layer gradients [T, out, in+1] of Σ delta·μ (``delta`` [T, N, A]).

        With ``second`` this is the tangent of a backward pass instead (forward-over-reverse):
        ``delta`` is the tangent of the gradient with respect to the mean, and the terms from the
        tangents of the weights and activations are added. ``keep`` = (deltas, gh_d2), two lists
        of length n, receives each layer's gradient with respect to its output z and, for tanh,
        (∂/∂h) ⊙ act''(z) of the layer below (fresh tensors, not buffers): what a later
        ``second`` needs."""
        grads = [None] * self.n
        for i in reversed(range(self.n)):
            if keep is not None:
                keep[0][i] = delta
            g = torch.bmm(delta.transpose(1, 2), self.inputs[i])
            if second is not None and second.hdots[i] is not None:
                g[..., :-1].baddbmm_(second.deltas[i].transpose(1, 2), second.hdots[i])
            grads[i] = g
            if i > 0:
                out = None if keep is not None else self._buffer(("g", i), (*delta.shape[:2], self.weights[i].shape[2]))
                gh = torch.bmm(delta, self.weights[i], out=out)
                if second is not None:
                    gh.baddbmm_(second.deltas[i], second.tangent[i][..., :-1])
                if keep is not None and self.tanh:
                    keep[1][i - 1] = gh * self.d2[i - 1]
                delta = gh.mul_(self.d1[i - 1])
                if second is not None and self.tanh:
                    delta.addcmul_(second.gh_d2[i - 1], second.zdots[i - 1])
        return grads


def _layers(params: Params, n: int) -> list[Tensor]:
    """[W | b] per layer, [T, out, in+1]."""
    return [torch.cat([params[f"mean.layers.{i}.weight"], params[f"mean.layers.{i}.bias"].unsqueeze(-1)], -1)
            for i in range(n)]


def _unlayer(grads: list[Tensor], log_std: Tensor) -> Params:
    out = {}
    for i, g in enumerate(grads):
        out[f"mean.layers.{i}.weight"], out[f"mean.layers.{i}.bias"] = g[..., :-1], g[..., -1]
    out["log_std"] = log_std
    return out


class _InnerCurvature:
    """The summed REINFORCE inner loss on one batch around fixed per-task params: its gradient
    (``grad``) and Hessian-vector products (:meth:`hvp`)."""

    def __init__(self, policy, params: Params, episodes, adv: Tensor, reduction: str):
        self.net = net = _LinearizedMLP(policy, params, episodes.obs)
        T, A = episodes.actions.shape[0], episodes.actions.shape[-1]
        c = (adv.detach() * step_weights(episodes.mask, reduction)).reshape(T, -1, 1)  # loss = −Σ c · log π
        self.r = episodes.actions.reshape(T, -1, A) - net.mean
        self.c_iv = c * net.inv_var
        self.deltas, self.gh_d2 = [None] * net.n, [None] * net.n
        grads = net.backward(-self.c_iv * self.r, keep=(self.deltas, self.gh_d2))
        g_log_std = (c * (1.0 - self.r * self.r * net.inv_var)).sum(1) * net.clamp_grad
        self.grad = _unlayer(grads, g_log_std)

    def hvp(self, v: Params) -> Params:
        net = self.net
        tangent = _layers(v, net.n)
        zdots, hdots, mudot = net.jvp(tangent)
        sdot = (v["log_std"] * net.clamp_grad).unsqueeze(1)
        ddot = self.c_iv * (mudot + 2.0 * self.r * sdot)
        g_log_std = 2.0 * (self.c_iv * self.r * (mudot + self.r * sdot)).sum(1) * net.clamp_grad
        grads = net.backward(ddot, second=_Tangent(self.deltas, hdots, zdots, self.gh_d2, tangent))
        return _unlayer(grads, g_log_std)


class MAMLLinearization:
    """The outer objective linearised at θ_old: the inner steps' curvature on the train batches
    and the adapted policy φ_old = φ(θ_old); gives the surrogate's value and exact gradient, and
    the exact Fisher-vector products of the mean KL (see the section comment)."""

    def __init__(self, policy, theta: Params, train, lr: float, first_order: bool, n_tasks: int,
                 reduction: str = "episode"):
        self.policy, self.names, self.reduction = policy, list(theta), reduction
        self.like = {k: t.detach() for k, t in theta.items()}
        self.n_tasks = n_tasks
        params = stack(self.like, self.n_tasks)
        self.lr, self.first_order, self.inner = float(lr), first_order, []
        for eps, adv in train:
            curv = _InnerCurvature(policy, params, eps, adv, reduction)
            self.inner.append(curv)
            params = {k: params[k] - self.lr * curv.grad[k] for k in params}
        self.phi = params
        self._valid: dict = {}

    def _net(self, episodes) -> _LinearizedMLP:
        key = id(episodes.obs)
        if key not in self._valid:
            self._valid[key] = (episodes.obs, _LinearizedMLP(self.policy, self.phi, episodes.obs))
        return self._valid[key][1]

    def keep_only(self, episodes) -> None:
        """Free the linearisations on batches other than ``episodes``."""
        self._valid = {k: v for k, v in self._valid.items() if v[0] is episodes.obs}

    def _transpose_jacobian(self, u: Params) -> Tensor:
        """Jᵀ u for per-task cotangents u in φ, summed over tasks: a flat vector in θ."""
        u = self._through_inner(u, reversed(self.inner))
        return torch.cat([u[k].sum(0).reshape(-1) for k in self.names])

    def _through_inner(self, v: Params, order) -> Params:
        if not self.first_order:
            for curv in order:
                hv = curv.hvp(v)
                v = {k: v[k] - self.lr * hv[k] for k in self.names}
        return v

    def surrogate_and_grad(self, valid, adv: Tensor) -> tuple[Tensor, Tensor]:
        """(surrogate loss at θ_old, its gradient in θ as a flat vector): the mean over tasks
        of −Σ w·A·ρ with ρ = π_φ/π_behaviour, and Jᵀ ∇_φ of it."""
        net = self._net(valid)
        T, A = self.n_tasks, valid.actions.shape[-1]
        actions = valid.actions.reshape(T, -1, A)
        logp = log_prob(net.mean, net.log_std.unsqueeze(1), actions)
        wa = ((step_weights(valid.mask, self.reduction) * adv.detach()).reshape(T, -1) / T) * torch.exp(logp - valid.log_probs.reshape(T, -1))
        loss = -wa.sum()
        r = actions - net.mean
        wa = wa.unsqueeze(-1)
        g_mean = -wa * r * net.inv_var                                               # ∂loss/∂μ
        g_log_std = -(wa * (r * r * net.inv_var - 1.0)).sum(1) * net.clamp_grad      # ∂loss/∂log σ
        return loss, self._transpose_jacobian(_unlayer(net.backward(g_mean), g_log_std))

    def fisher(self, valid):
        """v ↦ F_θ v (flat) for the mean over tasks of KL(π_φ_old ‖ π_φ(θ)) on ``valid``."""
        net = self._net(valid)
        w = (step_weights(valid.mask, self.reduction) / self.n_tasks).reshape(self.n_tasks, -1, 1)
        w_iv, w_log_std = w * net.inv_var, 2.0 * w.sum(1) * net.clamp_grad

        def product(vec: Tensor) -> Tensor:
            v = unflat(vec.detach(), self.like)
            v = {k: t.expand(self.n_tasks, *t.shape) for k, t in v.items()}
            v = self._through_inner(v, self.inner)                                  # J v
            _, _, mudot = net.jvp(_layers(v, net.n))
            u = _unlayer(net.backward(w_iv * mudot), w_log_std * v["log_std"])      # F_φ J v
            return self._transpose_jacobian(u)                                      # Jᵀ F_φ J v
        return product
