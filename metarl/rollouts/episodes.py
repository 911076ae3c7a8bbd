"""A meta-batch of episodes as padded tensors with a leading task axis.

MAML-RL (Finn et al. 2017, sec. 5.3) adapts every task of a meta-batch with one batched
REINFORCE step and evaluates the adapted policies with one batched TRPO surrogate. Both are
vectorised over tasks (:mod:`metarl.objectives`, :mod:`metarl.advantages`), so the data they eat
is laid out the same way: ``[T, Tmax, B, ...]`` = task, time, episode. Episodes that end early
(termination) are padded after their last step; ``mask`` marks the valid steps, which always
form a prefix of the time axis. Padded entries are zero.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["Episodes", "join_tasks"]

# per-step fields [T, Tmax, B, ...] and per-episode fields [T, B, ...]
_STEP_FIELDS = ("obs", "actions", "rewards", "mask", "terminated", "log_probs")
_EPISODE_FIELDS = ("returns", "lengths", "last_obs")


@dataclass
class Episodes:
    """Episodes of ``T`` tasks × ``B`` episodes each, padded to ``Tmax`` steps.

    Attributes (T tasks, Tmax steps, B episodes per task):
        obs: ``[T, Tmax, B, obs_dim]``, the observation the action was taken in (s_t).
        actions: ``[T, Tmax, B, act_dim]``, the action *as sampled* from the policy, before any
            clipping to the env's action space: its log-probability is what the policy gradient
            differentiates, and a clipped action would have a different (often -inf) density.
        rewards: ``[T, Tmax, B]``, r_t returned by the env for (s_t, a_t).
        mask: ``[T, Tmax, B]`` float, 1 on every step the episode was running, including its last
            (terminal or truncated) step, 0 on padding.
        terminated: ``[T, Tmax, B]`` bool, True only on a step where the env signalled a true
            termination (the MDP ended). False on a time-limit truncation, so that advantage
            estimators that bootstrap can tell "no future" from "future cut off".
        log_probs: ``[T, Tmax, B]``, log π_behaviour(a_t | s_t) at collection time, detached
            (the importance-sampling denominator of TRPO/PPO surrogates).
        returns: ``[T, B]``, undiscounted sum of rewards per episode (summed in float64).
        lengths: ``[T, B]`` int64, number of valid steps per episode.
        last_obs: ``[T, B, obs_dim]``, the observation after each episode's last step (s_{len}),
            needed to bootstrap a truncated episode with a value function.
        infos: optional per-step extras reported by the env, each ``[T, Tmax, B]`` or
            ``[T, Tmax, B, k]`` (e.g. ``forward_velocity`` for velocity plots, ``position`` for
            navigation trajectory plots); NaN where the env did not report the key, 0 on padding.
        tasks: the T task dicts, in order.
        seed: the seed the collection was derived from (None if unknown), so a batch can be
            re-collected exactly.
        env_id: which env produced the data (for messages and logs).
    """

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor
    terminated: Tensor
    log_probs: Tensor
    returns: Tensor
    lengths: Tensor
    last_obs: Optional[Tensor] = None
    infos: dict[str, Tensor] = field(default_factory=dict)
    tasks: list[dict] = field(default_factory=list)
    seed: Optional[int] = None
    env_id: Optional[str] = None

    def __post_init__(self) -> None:
        if self.obs.dim() != 4:
            raise ValueError(f"Episodes.obs must be [T, Tmax, B, obs_dim], got shape {tuple(self.obs.shape)}: "
                             f"add the task axis (obs[None]) for a single task")
        lead = tuple(self.obs.shape[:3])
        for name in _STEP_FIELDS[1:]:
            shape = tuple(getattr(self, name).shape)
            if shape[:3] != lead:
                raise ValueError(f"Episodes.{name} has shape {shape}, expected leading [T, Tmax, B] = {lead}: "
                                 f"pad every per-step field to the same length")
        for name in ("returns", "lengths"):
            shape = tuple(getattr(self, name).shape)
            if shape != (lead[0], lead[2]):
                raise ValueError(f"Episodes.{name} has shape {shape}, expected [T, B] = {(lead[0], lead[2])}")
        for name, value in self.infos.items():
            if tuple(value.shape[:3]) != lead:
                raise ValueError(f"Episodes.infos[{name!r}] has shape {tuple(value.shape)}, expected leading [T, Tmax, B] = {lead}")
        if self.tasks and len(self.tasks) != lead[0]:
            raise ValueError(f"Episodes has {lead[0]} tasks of data but {len(self.tasks)} task dicts: pass one dict per task")

    # ------------------------------------------------------------------ sizes
    @property
    def n_tasks(self) -> int:
        """T, the number of tasks (leading axis)."""
        return int(self.obs.shape[0])

    @property
    def episodes_per_task(self) -> int:
        """B, the number of episodes collected per task."""
        return int(self.obs.shape[2])

    @property
    def max_length(self) -> int:
        """Tmax, the padded time-axis length (the longest episode)."""
        return int(self.obs.shape[1])

    @property
    def episode_counts(self) -> Tensor:
        """[T] int64, episodes per task that hold at least one step. Equal to B unless tasks
        have different episode counts (:meth:`Collector.collect_timesteps`), which pads the
        shorter tasks with empty episodes."""
        return (self.lengths > 0).sum(-1)

    def mean_returns(self) -> Tensor:
        """[T], the average undiscounted return over each task's (non-empty) episodes."""
        return self.returns.sum(-1) / self.episode_counts.clamp(min=1).to(self.returns.dtype)

    def any_step(self, key: str) -> Tensor:
        """[T, B] bool: was ``infos[key]`` non-zero at any valid step of each episode (Meta-World's
        success: the flag set at any step of the episode, as its ``evaluation.py`` counts it)."""
        if key not in self.infos:
            raise KeyError(f"no info {key!r} recorded; recorded: {sorted(self.infos)}")
        x = self.infos[key]
        hit = (x != 0) & ~torch.isnan(x) & (self.mask > 0)
        return hit.any(dim=1)

    def any_step_rate(self, key: str) -> Tensor:
        """[T], the fraction of each task's (non-empty) episodes for which :meth:`any_step` holds."""
        return self.any_step(key).to(self.returns.dtype).sum(-1) / self.episode_counts.clamp(min=1).to(self.returns.dtype)

    @property
    def n_steps(self) -> int:
        """Total number of valid env steps in the batch (what a sampler's throughput counts)."""
        return int(self.lengths.sum())

    # -------------------------------------------------------------- selection
    def task(self, i: int) -> "Episodes":
        """The episodes of task ``i`` as an :class:`Episodes` with ``n_tasks == 1``.

        The task axis is kept (size 1) so every consumer of :class:`Episodes`, including the
        vectorised losses, works on a single task unchanged; ``ep.task(i).rewards[0]`` is the
        plain ``[Tmax, B]`` view. Tensors are views, not copies."""
        if not -self.n_tasks <= i < self.n_tasks:
            raise IndexError(f"task index {i} out of range for {self.n_tasks} tasks")
        i = i % self.n_tasks
        sl = slice(i, i + 1)
        kwargs: dict[str, Any] = {name: getattr(self, name)[sl] for name in _STEP_FIELDS + ("returns", "lengths")}
        kwargs["last_obs"] = None if self.last_obs is None else self.last_obs[sl]
        kwargs["infos"] = {k: v[sl] for k, v in self.infos.items()}
        kwargs["tasks"] = [self.tasks[i]] if self.tasks else []
        return replace(self, **kwargs)

    def select(self, episodes: Tensor) -> "Episodes":
        """The episodes at indices ``episodes`` (1-D int tensor) of every task, in that order."""
        fields_, infos = _split_infos({name: x.index_select(axis, episodes) for name, (x, axis) in _by_axis(self).items()})
        return replace(self, **fields_, infos=infos)

    def to(self, *args, **kwargs) -> "Episodes":
        """Move / cast every tensor (``Tensor.to`` semantics); integer and bool fields keep their
        dtype when a floating dtype is given, so ``lengths`` and ``terminated`` stay usable."""
        def move(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None:
                return None
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            dtype_free = [a for a in args if not isinstance(a, torch.dtype)]
            kw = {k: v for k, v in kwargs.items() if k != "dtype"}
            return t.to(*dtype_free, **kw)

        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = move(value)
        out["infos"] = {k: move(v) for k, v in self.infos.items()}
        return replace(self, **out)

    def __repr__(self) -> str:  # the default dataclass repr would print every tensor
        return (f"Episodes(env={self.env_id!r}, tasks={self.n_tasks}, episodes_per_task={self.episodes_per_task}, "
                f"max_length={self.max_length}, steps={self.n_steps}, obs_dim={self.obs.shape[-1]}, "
                f"act_dim={self.actions.shape[-1]}, infos={sorted(self.infos)})")


def _pad_to(x: Tensor, dim: int, size: int) -> Tensor:
    """Zero-pad ``x`` along ``dim`` to ``size`` (False for bool tensors)."""
    if x.shape[dim] >= size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim)


def _by_axis(ep: Episodes) -> dict[str, tuple[Tensor, int]]:
    """Every tensor of ``ep`` with its episode axis: 2 for per-step fields and infos ([T, Tmax, B,
    ...]), 1 for per-episode fields ([T, B, ...]); infos keyed ``infos.<name>``."""
    out = {name: (getattr(ep, name), 2) for name in _STEP_FIELDS}
    out.update({name: (getattr(ep, name), 1) for name in _EPISODE_FIELDS if getattr(ep, name) is not None})
    out.update({f"infos.{k}": (v, 2) for k, v in ep.infos.items()})
    return out


def _split_infos(parts: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The inverse of :func:`_by_axis`'s naming: (Episodes fields, infos) from one flat dict."""
    infos = {name[len("infos."):]: x for name, x in parts.items() if name.startswith("infos.")}
    return {name: x for name, x in parts.items() if not name.startswith("infos.")}, infos


def join_tasks(per_task: list[list[Episodes]], timesteps: Optional[int] = None, **meta: Any) -> Episodes:
    """One batch from per-task lists of single-task batches (``n_tasks == 1`` each, e.g.
    ``batch.task(j)`` of several collections), the lists joined along the episode axis.

    With ``timesteps``, each task keeps its first episodes up to and including the one that
    brings its step count to ``timesteps`` (rllab's ``batch_size``: whole episodes, at least that
    many steps), and drops the rest. Tasks then hold different numbers of episodes: the shorter
    ones are padded with empty episodes (length 0, mask 0, return 0), which the losses, the
    baseline, :meth:`Episodes.mean_returns` and ``step_weights(..., "episode")`` leave out.
    ``meta`` sets ``tasks``, ``seed`` and ``env_id`` of the result."""
    if not per_task or any(not pieces for pieces in per_task):
        raise ValueError("join_tasks needs at least one batch for every task")
    if any(p.n_tasks != 1 for pieces in per_task for p in pieces):
        raise ValueError("join_tasks takes single-task batches: pass batch.task(j)")
    t_max = max(p.max_length for pieces in per_task for p in pieces)
    joined = []
    for pieces in per_task:
        fields = [_by_axis(p) for p in pieces]
        parts = {name: torch.cat([_pad_to(f[name][0], 1, t_max) if axis == 2 else f[name][0] for f in fields], axis)
                 for name, (_, axis) in fields[0].items()}
        if timesteps is not None:
            lengths = parts["lengths"][0]
            keep = int(((lengths.cumsum(0) - lengths) < timesteps).sum())  # episodes that start under budget
            parts = {name: x.narrow(fields[0][name][1], 0, keep) for name, x in parts.items()}
        joined.append(parts)
    axes = {name: axis for name, (_, axis) in _by_axis(per_task[0][0]).items()}
    b_max = max(int(parts["lengths"].shape[1]) for parts in joined)
    out = {name: torch.cat([_pad_to(parts[name], axis, b_max) for parts in joined], 0) for name, axis in axes.items()}
    fields_, infos = _split_infos(out)
    return Episodes(**fields_, infos=infos, **meta)
