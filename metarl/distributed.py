"""Meta-batch sharding across processes with ``torch.distributed``: the one home of ranks.

``torchrun --nproc-per-node N -m metarl train CONFIG`` starts N copies of ``metarl train``; each
finds its rank in the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and joins one process group (:func:`init_from_env`). One meta-iteration then runs
as the single-process one does, split by tasks:

- every rank samples the whole meta-batch with the same NumPy generator (same seed, same draws),
  so the ranks' generators never drift apart and a checkpoint of rank 0's holds everyone's
  state; each rank keeps a contiguous share of the tasks (:meth:`World.shard`);
- each rank adapts its share and back-propagates its local outer objective, a mean over its
  n_r tasks; the outer quantities are then summed across ranks with weights n_r / N
  (:meth:`World.task_mean`), which is the mean over the N tasks of the meta-batch, and every
  rank applies the same outer step to the same parameters.

DDP is not used: it reduces gradients inside ``backward`` hooks and does not carry gradients of
gradients (pytorch #47562, #63929), and MAML's meta-gradient differentiates through the inner
step. The ``.grad`` tensors are reduced after the local meta-backward instead, as the
distributed MAML code of the field does.

Where each method's reduction happens:

- supervised methods (:func:`sharded_train_step`, called by the supervised tracks' training
  step): the method's own ``train_step`` runs on the rank's share with its optimizers' ``step``
  held back; the ``.grad`` of every parameter those optimizers own and the metrics are reduced
  in one ``all_reduce``, and the held-back steps run if the meta-batch's metrics are finite
  (else no rank steps and every rank stops the run). Any method whose outer update is "an
  optimizer step on the mean over tasks of a per-task gradient" is covered without a line of
  its own; a method whose update is something else says so in ``Method.not_shardable``
  (Reptile's interpolation, Alpha MAML's hypergradients, clipping a local gradient, batch-norm
  running statistics) and is refused under torchrun with one line;
- MAML-TRPO (:func:`metarl.algorithms.maml_trpo.meta_update`): the surrogate and its gradient,
  every Fisher-vector product inside conjugate gradient and the line search's loss and KL are
  reduced (:func:`metarl.optim.trpo_step`'s ``reduce``), so every rank computes the same step;
  the collector draws each rank's episodes as the single-process collection would.

With one process (no torchrun, or ``--nproc-per-node 1``) nothing here runs: :func:`world` is
rank 0 of 1 and every caller takes its single-process path unchanged, bit for bit.

A rank that dies or stops answering makes the others fail in their next collective, at the
latest after ``METARL_DIST_TIMEOUT`` seconds (default 600), with one line
(:class:`DistributedError`) instead of a hang.
"""
from __future__ import annotations

import datetime
import functools
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

TIMEOUT_ENV = "METARL_DIST_TIMEOUT"
BACKEND_ENV = "METARL_DIST_BACKEND"
DEFAULT_TIMEOUT = 600.0


class DistributedError(RuntimeError):
    """A collective that failed: another rank died, stopped or timed out (one line, CLI error)."""


@dataclass
class World:
    """This process's place among the ranks of one meta-training, and its communication tally."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    timeout: float = DEFAULT_TIMEOUT
    comm_seconds: float = 0.0
    """Seconds spent inside collectives since start (the benchmark's communication time)."""
    comm_bytes: int = 0
    """Bytes this rank contributed to all_reduce since start."""
    comm_calls: int = 0
    """Collectives since start (each pays the network latency once)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes logs, TensorBoard, metrics.csv and checkpoints."""
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of ``n`` tasks; shares differ by at most one."""
        return self.rank * n // self.size, (self.rank + 1) * n // self.size

    # ---- collectives ------------------------------------------------------------------------
    def all_reduce(self, t: Tensor, what: str = "all_reduce") -> Tensor:
        """The sum of ``t`` over ranks (a new tensor; ``t`` alone with one rank)."""
        if self.size == 1:
            return t
        import torch.distributed as dist

        out = t.detach().clone().contiguous()
        start = time.perf_counter()
        try:
            dist.all_reduce(out)
        except RuntimeError as e:  # DistBackendError too: a peer closed the connection or timed out
            raise self._error(what, e) from None
        self.comm_seconds += time.perf_counter() - start
        self.comm_bytes += out.numel() * out.element_size()
        self.comm_calls += 1
        return out

    def task_mean(self, n_local: int, n_total: int) -> Callable[[Tensor], Tensor]:
        """``t ↦`` the mean over all ``n_total`` tasks of a quantity that is, on each rank, the
        mean over its ``n_local`` tasks: Σ_r (n_r / N) t_r (``reduce`` of the outer step)."""
        weight = n_local / n_total

        def reduce(t: Tensor) -> Tensor:
            return self.all_reduce(t * weight, "all_reduce of the outer step")
        return reduce

    def agree(self, ok: bool, what: str) -> None:
        """Every rank says whether ``what`` went well; those that did raise if another did not
        (so a rank that fails at start-up does not leave the others waiting)."""
        if self.size == 1:
            return
        flag = self.all_reduce(torch.tensor([0.0 if ok else 1.0], dtype=torch.float64), what)
        if ok and flag.item() > 0:
            raise DistributedError(f"rank {self.rank}: {int(flag.item())} other rank(s) failed in {what}: see their error")

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on one (e.g. a stop signal seen by one rank)."""
        if self.size == 1:
            return flag
        return self.all_reduce(torch.tensor([float(flag)], dtype=torch.float64), "the stop check").item() > 0

    def _error(self, what: str, e: BaseException) -> DistributedError:
        cause = (str(e).strip().splitlines() or [type(e).__name__])[-1][:160]
        return DistributedError(f"rank {self.rank} of {self.size}: {what} failed ({cause}): another rank died or did not "
                                f"answer within {self.timeout:g} s ({TIMEOUT_ENV}); see its error, then --resume from "
                                f"the last checkpoint")


_WORLD = World()


def world() -> World:
    """The current world: rank 0 of 1 unless :func:`init_from_env` joined a process group."""
    return _WORLD


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        from .config import ConfigError
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: give the process-group timeout in seconds, e.g. {TIMEOUT_ENV}=300")
    return value


def init_from_env() -> World:
    """Join the process group torchrun describes in the environment (gloo on CPU: metarl trains on
    CPU; ``METARL_DIST_BACKEND=nccl`` for GPU tensors), with the ``METARL_DIST_TIMEOUT`` timeout.
    Without torchrun, or with one rank, this is rank 0 of 1 and no group is made."""
    global _WORLD
    if not launched_by_torchrun():
        return _WORLD
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        from .config import ConfigError
        raise ConfigError(f"RANK={os.environ['RANK']!r}, WORLD_SIZE={os.environ['WORLD_SIZE']!r}: not integers; "
                          f"launch with torchrun --nproc-per-node N -m metarl train ...") from None
    timeout = _timeout()
    if size > 1:
        import torch.distributed as dist

        backend = os.environ.get(BACKEND_ENV) or "gloo"
        try:
            dist.init_process_group(backend, rank=rank, world_size=size, timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:
            raise World(rank, size, local_rank, timeout)._error(f"joining the process group ({backend})", e) from None
    _WORLD = World(rank, size, local_rank, timeout)
    return _WORLD


def shutdown(wait: bool = False) -> None:
    """Leave the process group (end of ``metarl train``); a no-op with one rank. ``wait``: first
    wait for every rank (a run that ended well), so that no rank closes its connections while
    another still uses them."""
    global _WORLD
    if _WORLD.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            if wait:
                _WORLD.agree(True, "the end of the run")
            dist.destroy_process_group()
    _WORLD = World()


def check_supported(cfg, method) -> None:
    """Refuse, in one line, a run that cannot be sharded over this world's ranks."""
    w = world()
    if w.size == 1:
        return
    from .config import ConfigError

    if cfg.meta_batch < w.size:
        raise ConfigError(f"meta_batch {cfg.meta_batch} is smaller than the {w.size} ranks: every rank needs at least one "
                          f"task; launch fewer ranks (torchrun --nproc-per-node) or raise meta_batch")
    reason = method.not_shardable()
    if reason:
        raise ConfigError(f"algorithm '{method.name}' does not run under torchrun ({w.size} ranks): {reason}; "
                          f"run it in one process (metarl train ...)")


# --------------------------------------------------------------------- the supervised seam

def _optimizer_params(optimizers: Iterable[torch.optim.Optimizer]) -> list[Tensor]:
    seen, out = set(), []
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


@contextmanager
def _held_back_steps(optimizers: list[torch.optim.Optimizer]):
    """Within the block, ``opt.step()`` records the call instead of stepping (an instance
    attribute shadows the class's method for the block only); yields the list of recorded
    optimizers, in call order."""
    calls: list[torch.optim.Optimizer] = []

    def record(opt, closure=None):
        if closure is not None:
            raise DistributedError("an optimizer step with a closure cannot be held back for the all_reduce")
        calls.append(opt)
    for opt in optimizers:
        opt.step = functools.partial(record, opt)
    try:
        yield calls
    finally:
        for opt in optimizers:
            opt.__dict__.pop("step", None)


def sharded_train_step(method, batch, iteration: int) -> dict[str, float]:
    """``method.train_step`` on this rank's share of ``batch``, as one step on the whole batch.

    With one rank this is ``method.train_step(batch, iteration)``. Otherwise the method trains on
    its share with its optimizers' steps held back; then one ``all_reduce`` carries the metrics
    and the ``.grad`` of its optimizers' parameters, each weighted by share / meta-batch (the
    methods average over their local tasks), plus which gradients exist and how many steps each
    rank asked for. After it every rank holds the meta-batch's gradients and metrics; the held-back
    steps run when those metrics are finite (then every rank asked for the same steps)."""
    w = world()
    if w.size == 1:
        return method.train_step(batch, iteration)
    n = batch.n_tasks
    lo, hi = w.shard(n)
    optimizers = list(method.optimizers.values())
    with _held_back_steps(optimizers) as steps:
        local = method.train_step(batch.tasks(lo, hi), iteration)
    params = _optimizer_params(optimizers)
    keys = sorted(local)
    weighted = torch.cat([torch.tensor([float(local[k]) for k in keys], dtype=torch.float64)]
                         + [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(torch.float64)
                            for p in params])
    counts = torch.tensor([float(len(steps))] + [float(p.grad is not None) for p in params], dtype=torch.float64)
    total = w.all_reduce(torch.cat([weighted * ((hi - lo) / n), counts]), "all_reduce of the outer gradients")
    metrics = dict(zip(keys, total[:len(keys)].tolist()))
    offset = len(keys)
    for p in params:
        size = p.numel()
        p.grad = total[offset:offset + size].reshape(p.shape).to(p.dtype)
        offset += size
    n_steps, present = total[offset], total[offset + 1:]
    for p, count in zip(params, present.tolist()):
        if count == 0:
            p.grad = None  # no rank has a gradient for it: the optimizer must skip it, as alone
    from .algorithms.base import finite
    if finite(metrics):
        if n_steps.item() != len(steps) * w.size:
            raise DistributedError(f"rank {w.rank}: the ranks disagree on the outer step ({len(steps)} step(s) here, "
                                   f"{n_steps.item():g} in all): the method's update is not shardable")
        for opt in steps:
            opt.step()
    return metrics
