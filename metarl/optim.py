"""Trust-region machinery for MAML-TRPO's outer loop (Finn et al. 2017, sec. 5.3).

TRPO (Schulman et al. 2015) maximises the surrogate L(θ) subject to a mean-KL bound δ. One step
(Schulman et al. 2015, appendix C):
1. g = ∇_θ loss (loss = −L, minimised here);
2. s ≈ −F⁻¹ g by conjugate gradient, where F is the Hessian of the mean KL at θ_old (the Fisher
   information matrix), accessed only through Fisher-vector products F v computed by double
   backpropagation (:func:`hvp_fn`), never formed;
3. scale s to the trust-region boundary of the quadratic KL model, ½ βs·F·βs = δ, i.e.
   β = sqrt(2δ / sᵀFs);
4. backtracking line search on the exact loss and KL (:func:`line_search`).

For MAML the "parameters" are the meta-parameters θ and both closures recompute the fast weights
φ(θ) = adapt(θ) inside, so the gradient, the Fisher-vector products (third-order terms through
the inner step) and the line search all see the post-adaptation policy. Nothing here knows about
policies or adaptation: it works on any dict or list of tensors and two scalar closures.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import Tensor

ParamSet = Union[Mapping[str, Tensor], Sequence[Tensor]]


# ----------------------------------------------------------------------------------- flat vectors

def _tensors(params: ParamSet) -> list[Tensor]:
    if isinstance(params, Mapping):
        return list(params.values())
    if isinstance(params, Tensor):
        raise TypeError("expected a dict or list of tensors, got a single tensor: wrap it in a list")
    return list(params)


def _rebuild(like: ParamSet, tensors: Sequence[Tensor]) -> ParamSet:
    if isinstance(like, Mapping):
        return dict(zip(like.keys(), tensors))
    return type(like)(tensors) if isinstance(like, tuple) else list(tensors)


def flat(tensors: ParamSet) -> Tensor:
    """Concatenate a dict (in key order) or list of tensors into one 1-D vector."""
    ts = _tensors(tensors)
    if not ts:
        raise ValueError("flat: no tensors given: pass the parameters to optimise")
    return torch.cat([t.reshape(-1) for t in ts])


def unflat(vec: Tensor, like: ParamSet) -> ParamSet:
    """Split a 1-D vector into tensors shaped like ``like`` (same container type and keys)."""
    ts = _tensors(like)
    total = sum(t.numel() for t in ts)
    if vec.dim() != 1 or vec.numel() != total:
        raise ValueError(f"unflat: vector of shape {tuple(vec.shape)} does not hold {total} parameters: flatten with flat(params)")
    out, i = [], 0
    for t in ts:
        out.append(vec[i:i + t.numel()].view_as(t))
        i += t.numel()
    return _rebuild(like, out)


def _as_flat(v: Union[Tensor, ParamSet], like: ParamSet) -> Tensor:
    return v if isinstance(v, Tensor) else flat(v)


def _grads_or_zeros(grads: Sequence[Tensor | None], wrt: Sequence[Tensor]) -> list[Tensor]:
    # a parameter the function does not use has gradient zero (autograd returns None)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


def _scalar(value: Tensor, what: str) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(f"{what} must return a scalar tensor: reduce the per-task values with .mean()")
    return value.reshape(())


# ------------------------------------------------------------------------------------ CG and HVP

def clamp_grads(parameters, clip) -> None:
    """Clamp every ``.grad`` element to ±clip in place (no-op for ``clip`` None): the elementwise
    meta-gradient clipping of the CAVIA and MAML++ reference code, which keeps one exploding inner
    trajectory from writing an overflowing second moment into Adam."""
    if clip is None:
        return
    for p in parameters:
        if p.grad is not None:
            p.grad.clamp_(-clip, clip)


def conjugate_gradient(Avp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10,
                       residual_tol: float = 1e-10) -> Tensor:
    """Approximately solve A x = b for symmetric positive-definite A given only v ↦ A v.

    Plain CG from x₀ = 0 (Schulman et al. 2015, appendix C: 10 iterations suffice for TRPO).
    Stops early when the squared residual rᵀr drops below ``residual_tol``, or if the curvature
    pᵀAp along a search direction is not positive (A not PD there: the current iterate is
    returned; raise the damping if that happens)."""
    return _conjugate_gradient(Avp, b, iters, residual_tol)[0]


def _conjugate_gradient(Avp: Callable[[Tensor], Tensor], b: Tensor, iters: int, residual_tol: float) -> tuple[Tensor, Tensor]:
    """:func:`conjugate_gradient` returning (x, r), with r = b − A x kept by the recurrence."""
    if b.dim() != 1:
        raise ValueError(f"conjugate_gradient: b must be a flat vector, got shape {tuple(b.shape)}: use flat(...)")
    b = b.detach()
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr < residual_tol:
            break
        Ap = Avp(p).detach()
        pAp = p @ Ap
        if not (pAp > 0 and torch.isfinite(pAp)):
            break
        alpha = rr / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, r


def conjugate_gradient_batched(Avp: Callable[[Tensor], Tensor], B: Tensor, iters: int = 10,
                               residual_tol: float = 1e-10) -> Tensor:
    """Solve T independent SPD systems A_t x_t = b_t at once: ``B`` is [T, n] (one right-hand side
    per row) and ``Avp`` maps [T, n] → [T, n] row by row (a block-diagonal operator: e.g. the
    Hessian-vector products of a sum of per-task losses on task-stacked parameters, one backward
    pass for all T). Every row runs its own :func:`conjugate_gradient` (its own step sizes and
    stopping: a row stops when its rᵀr < ``residual_tol`` or its curvature pᵀAp is not positive),
    so row t's answer equals ``conjugate_gradient(A_t, b_t)`` (tests/test_imaml.py checks it).
    Used for iMAML's implicit meta-gradient (Rajeswaran et al. 2019, sec. 3.1)."""
    if B.dim() != 2:
        raise ValueError(f"conjugate_gradient_batched: B must be [T, n], got shape {tuple(B.shape)}")
    B = B.detach()
    X = torch.zeros_like(B)
    R = B.clone()
    P = B.clone()
    rr = (R * R).sum(1)
    active = rr >= residual_tol
    for _ in range(iters):
        if not bool(active.any()):
            break
        AP = Avp(P).detach()
        pAp = (P * AP).sum(1)
        active = active & (pAp > 0) & torch.isfinite(pAp)
        alpha = torch.where(active, rr / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rr))
        X = X + alpha[:, None] * P
        R = R - alpha[:, None] * AP
        rr_new = (R * R).sum(1)
        beta = torch.where(active, rr_new / torch.where(active, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        P = torch.where(active[:, None], R + beta[:, None] * P, P)
        rr = torch.where(active, rr_new, rr)
        active = active & (rr >= residual_tol)
    return X


def hvp_fn(kl_fn: Callable[[ParamSet], Tensor], params: ParamSet, damping: float = 0.0) -> Callable[[Tensor], Tensor]:
    """Return v ↦ (∇²kl(params) + damping·I) v on flat vectors, by double backpropagation.

    With ``kl_fn`` the mean KL between the old policy and the policy at ``params`` (evaluated at
    the old parameters), ∇²kl is the Fisher information matrix and this is TRPO's Fisher-vector
    product (Schulman et al. 2015, appendix C.1). ∇kl is built once with ``create_graph=True``;
    each call differentiates the scalar ∇kl·v, so a call costs about one extra backward pass.
    ``damping`` (Tikhonov) keeps the system positive definite when F is singular or CG would
    take huge steps in flat directions. ``params`` must be tensors that require grad (the
    closure receives exactly this dict/list, in this container type).
    """
    tensors = _tensors(params)
    if not all(t.requires_grad for t in tensors):
        raise ValueError("hvp_fn: every parameter must require grad: pass {k: v.detach().requires_grad_() for k, v in params.items()}")
    with torch.enable_grad():
        kl = _scalar(kl_fn(params), "kl_fn")
        grads = torch.autograd.grad(kl, tensors, create_graph=True, allow_unused=True)
    flat_grad = flat(_grads_or_zeros(grads, tensors))

    def product(v: Tensor) -> Tensor:
        v = _as_flat(v, params).detach()
        if v.shape != flat_grad.shape:
            raise ValueError(f"hvp: vector of shape {tuple(v.shape)} does not match {flat_grad.numel()} parameters: use flat(...)")
        if not flat_grad.requires_grad:  # kl is at most linear in params: zero Hessian
            return damping * v
        with torch.enable_grad():
            hv = torch.autograd.grad(flat_grad @ v, tensors, retain_graph=True, allow_unused=True)
        return flat(_grads_or_zeros(hv, tensors)).detach() + damping * v

    return product


def hessian_vector_product(f: Callable[[ParamSet], Tensor], params: ParamSet, v: Union[Tensor, ParamSet],
                           damping: float = 0.0) -> Tensor:
    """One-shot (∇²f(params) + damping·I) v as a flat vector; see :func:`hvp_fn` to reuse the graph."""
    return hvp_fn(f, params, damping)(v)


# ---------------------------------------------------------------------------------- line search

def line_search(params: ParamSet, full_step: Union[Tensor, ParamSet],
                loss_and_kl_fn: Callable[[ParamSet], tuple[Tensor, Tensor]], max_kl: float,
                expected_improvement: float, ratio: float = 0.8, max_steps: int = 15, *,
                old_loss: float | None = None, accept_ratio: float = 0.0) -> tuple[ParamSet, dict]:
    """Backtracking line search along ``full_step`` (Schulman et al. 2015, appendix C).

    Tries params + ratioᵏ · full_step for k = 0 … max_steps−1 and accepts the first candidate
    whose loss improved (improvement = old_loss − loss > 0, and > accept_ratio × the expected
    linear improvement scaled by ratioᵏ; rllab uses accept_ratio 0.1, pytorch-maml-rl 0) and
    whose mean KL to the old policy is ≤ max_kl (both finite). The quadratic KL model used to
    size the step can be wrong, so the exact KL is checked here. If no candidate qualifies the
    OLD parameters are returned (as copies) with ``accepted=False``: a rejected TRPO update is a
    no-op, never a step that violates the trust region.

    ``loss_and_kl_fn(p) -> (loss, kl)`` is called under ``torch.no_grad()``. ``old_loss`` is the
    loss at ``params`` (computed if not given). Returns (new_params detached, same container as
    ``params``; info dict of floats: accepted, step_fraction, kl, improvement,
    expected_improvement, loss_before, loss_after, backtracks).
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"line search ratio must be in (0, 1), got {ratio}")
    if max_steps < 1:
        raise ValueError(f"line search needs max_steps >= 1, got {max_steps}")
    base = flat([t.detach() for t in _tensors(params)])
    step = _as_flat(full_step, params).detach().to(base.dtype)
    if step.shape != base.shape:
        raise ValueError(f"full_step has {step.numel()} entries, params {base.numel()}: flatten with flat(...)")
    with torch.no_grad():
        if old_loss is None:
            old_loss = float(_scalar(loss_and_kl_fn(params)[0], "loss_and_kl_fn's loss"))
        info = {"accepted": False, "step_fraction": 0.0, "kl": 0.0, "improvement": 0.0,
                "expected_improvement": float(expected_improvement), "loss_before": float(old_loss),
                "loss_after": float(old_loss), "backtracks": max_steps}
        for k in range(max_steps):
            frac = ratio ** k
            candidate = unflat(base + frac * step, params)
            loss, kl = loss_and_kl_fn(candidate)
            loss = float(_scalar(loss, "loss_and_kl_fn's loss"))
            kl = float(_scalar(kl, "loss_and_kl_fn's kl"))
            improvement = old_loss - loss
            if (math.isfinite(loss) and math.isfinite(kl) and kl <= max_kl and improvement > 0
                    and improvement > accept_ratio * frac * expected_improvement):
                info.update(accepted=True, step_fraction=frac, kl=kl, improvement=improvement,
                            loss_after=loss, backtracks=k)
                return unflat(base + frac * step, params), info
    return unflat(base.clone(), params), info


# ------------------------------------------------------------------------------------- TRPO step

def trpo_step(params: ParamSet, surrogate_fn: Callable[[ParamSet], Tensor], kl_fn: Callable[[ParamSet], Tensor],
              max_kl: float = 0.01, cg_iters: int = 10, damping: float = 1e-5, ls_ratio: float = 0.8,
              ls_steps: int = 15, *, loss_and_kl_fn: Callable[[ParamSet], tuple[Tensor, Tensor]] | None = None,
              fvp_fn: Callable[[ParamSet], Callable[[Tensor], Tensor]] | None = None,
              loss_and_grad_fn: Callable[[ParamSet], tuple[Tensor, Tensor]] | None = None,
              reduce: Callable[[Tensor], Tensor] | None = None) -> dict:
    """One TRPO update of ``params`` (a dict or list of tensors, updated IN PLACE).

    ``surrogate_fn(p)`` is the scalar loss to minimise (−L, e.g. the mean over tasks of
    :func:`metarl.objectives.surrogate_loss` of the adapted policy) and ``kl_fn(p)`` the scalar
    mean KL(π_old ‖ π_p) (zero at the current params). Both are called with a dict/list of fresh
    leaf copies of ``params`` and must rebuild everything that depends on them, in MAML the fast
    weights φ = adapt(p, ...), so that gradients and Fisher-vector products differentiate
    through the inner step. The step follows Schulman et al. (2015, appendix C):
    s = CG(F, −g), full step = sqrt(2·max_kl / sᵀFs)·s, then :func:`line_search`. Damping is
    added to F both in CG and in sᵀFs.

    Optional shortcuts, for callers that can compute the same quantities more cheaply:
    ``loss_and_kl_fn(p) -> (loss, kl)`` replaces the line search's separate calls of
    ``surrogate_fn`` and ``kl_fn`` (in MAML one adaptation and one forward pass instead of two);
    ``fvp_fn(p)`` returns v ↦ F v at ``p`` (flat, without damping), e.g. a closed form of the
    Fisher-vector product, instead of ``hvp_fn(kl_fn, p)``; ``loss_and_grad_fn(p) -> (loss,
    flat gradient)`` replaces autograd on ``surrogate_fn`` at ``p``. They must compute the same
    values as the closures (up to rounding): they change the cost, not the step. (``fvp_fn`` is
    called after ``loss_and_grad_fn``, at the same ``p``, so the two may share work; with
    ``fvp_fn``, sᵀFs is read off CG's final residual instead of costing one more product.)

    ``reduce`` (meta-batch sharding, :mod:`metarl.distributed`): each process's closures cover
    its share of the tasks, and ``reduce(t)`` combines a local tensor into the whole batch's
    (an all_reduce). It is applied to the loss and gradient, to every Fisher-vector product and
    to each line-search trial's loss and KL, so every process computes the same step, the step
    of one process holding all the tasks; damping is added after it.

    Returns diagnostics (floats): accepted, step_fraction, kl, improvement, expected_improvement,
    loss_before, loss_after, backtracks, grad_norm, step_norm (of the accepted step, 0 if none).
    A zero gradient returns accepted=False without touching params.
    """
    if max_kl <= 0:
        raise ValueError(f"max_kl must be > 0, got {max_kl}")
    targets = _tensors(params)
    leaves = [t.detach().clone().requires_grad_(True) for t in targets]
    leaf_params = _rebuild(params, leaves)

    if loss_and_grad_fn is None:
        with torch.enable_grad():
            loss = _scalar(surrogate_fn(leaf_params), "surrogate_fn")
            if reduce is None and not torch.isfinite(loss):  # with reduce: checked on the whole batch's loss below
                raise FloatingPointError(f"surrogate loss is {loss.item()}: check advantages and log-probabilities for NaN/inf")
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        g = flat(_grads_or_zeros(grads, leaves)).detach()
        del grads
    else:
        loss, g = loss_and_grad_fn(leaf_params)
        loss = _scalar(loss, "loss_and_grad_fn's loss")
        if reduce is None and not torch.isfinite(loss):
            raise FloatingPointError(f"surrogate loss is {loss.item()}: check advantages and log-probabilities for NaN/inf")
        g = _as_flat(g, leaf_params).detach()
        if g.shape != (sum(t.numel() for t in leaves),):
            raise ValueError(f"loss_and_grad_fn returned a gradient of shape {tuple(g.shape)}: return flat(grads) over all parameters")
    if reduce is not None:
        both = reduce(torch.cat([loss.detach().reshape(1).to(g.dtype), g]))
        loss, g = both[0], both[1:]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"surrogate loss is {loss.item()}: check advantages and log-probabilities for NaN/inf")
    old_loss = float(loss.detach())
    del loss
    grad_norm = float(g.norm())
    if grad_norm == 0.0:
        return {"accepted": False, "step_fraction": 0.0, "kl": 0.0, "improvement": 0.0, "expected_improvement": 0.0,
                "loss_before": old_loss, "loss_after": old_loss, "backtracks": 0, "grad_norm": 0.0, "step_norm": 0.0}

    product = None if fvp_fn is None else fvp_fn(leaf_params)
    if product is None and reduce is None:
        Fvp = hvp_fn(kl_fn, leaf_params, damping)
    else:
        if product is None:
            product = hvp_fn(kl_fn, leaf_params)
        if reduce is not None:
            product = (lambda v, local=product: reduce(local(v).detach()))

        def Fvp(v: Tensor) -> Tensor:
            return product(v).detach() + damping * v
    s, r = _conjugate_gradient(Fvp, -g, cg_iters, 1e-10)
    if fvp_fn is None:
        sFs = float(s @ Fvp(s))
    else:  # sᵀ(F + damping)s = sᵀ(−g − r), CG's residual r = −g − (F + damping)s: equal to rounding, one product less
        sFs = float(s @ (-g - r))
    del Fvp, product  # frees the double-backprop graph (or the closed form's caches) before the line search
    if not (math.isfinite(sFs) and sFs > 0):
        raise FloatingPointError(f"sᵀFs = {sFs} is not positive: increase damping (now {damping})")
    full_step = math.sqrt(2.0 * max_kl / sFs) * s
    expected = float(-(g @ full_step))

    def loss_and_kl(p):
        return surrogate_fn(p), kl_fn(p)

    trial = loss_and_kl_fn or loss_and_kl
    if reduce is not None:
        def trial(p, local=trial):  # every process tries the same candidates and takes the same decision
            both = reduce(torch.stack([_scalar(t, "loss_and_kl_fn") for t in local(p)]))
            return both[0], both[1]

    new_params, info = line_search(leaf_params, full_step, trial, max_kl, expected, ratio=ls_ratio,
                                   max_steps=ls_steps, old_loss=old_loss)
    with torch.no_grad():
        for t, new in zip(targets, _tensors(new_params)):
            t.copy_(new)
    info.update(grad_norm=grad_norm, step_norm=info["step_fraction"] * float(full_step.norm()))
    return info
