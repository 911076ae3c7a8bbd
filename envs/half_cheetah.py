"""HalfCheetah target-velocity and direction tasks (Finn et al. 2017, sec. 5.3).

Both envs run Gymnasium's ``HalfCheetah-v5`` model unchanged (``half_cheetah.xml``,
``frame_skip=5``, ``timestep=0.01`` so ``dt=0.05`` s, reset noise 0.1) and keep
its observation: ``concat(qpos[1:], qvel)`` (17 dims; the root x position is
excluded so the policy cannot read off how far it has run).  Only the reward
changes, following the MAML paper and its common reproductions
(cbfinn/maml_rl, tristandeleu/pytorch-maml-rl, ProMP):

``forward_velocity = (qpos_after[0] - qpos_before[0]) / dt``
(root x displacement over one env step), control cost
``ctrl_cost = 0.05 * sum(action**2)`` (pytorch-maml-rl's ``0.5 * 1e-1``; Gymnasium's
own HalfCheetah uses 0.1),

* :class:`HalfCheetahVelEnv`: target ``velocity ~ U[0, 2]``,
  ``reward = -|forward_velocity - velocity| - ctrl_cost``;
* :class:`HalfCheetahDirEnv`: ``direction`` = +1 or -1 with probability 1/2,
  ``reward = direction * forward_velocity - ctrl_cost``.

Episodes are 200 steps long and never terminate early.  ``info`` carries
``forward_velocity``, ``reward_forward``, ``ctrl_cost``, ``x_position`` and
``task`` for plots (velocity traces) and tests.  See :mod:`metarl.envs.locomotion`
for the batched-sampler contract (``batch_observation``/``batch_reward``/
``batch_terminated``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

from .base import as_batch, hybridmethod, rowwise_sum_of_squares
from .locomotion import DirectionTasks, LocomotionTaskEnv, VelocityTasks

__all__ = ["HalfCheetahVelEnv", "HalfCheetahDirEnv"]

_NQ = 9
_NV = 9
_NU = 6


class _HalfCheetahTaskEnv(LocomotionTaskEnv, HalfCheetahEnv):
    obs_skip_qpos: ClassVar[int] = 1
    #: ``ctrl_cost = ctrl_cost_weight * sum(a**2)`` (pytorch-maml-rl: 0.5 * 1e-1)
    ctrl_cost_weight: ClassVar[float] = 0.05
    nq: ClassVar[int] = _NQ
    nv: ClassVar[int] = _NV
    nu: ClassVar[int] = _NU

    def __init__(self, task: dict | None = None, horizon: int | None = None, **kwargs: Any):
        self._init_locomotion(
            HalfCheetahEnv,
            task,
            horizon,
            kwargs,
            exclude_current_positions_from_observation=True,
        )
        self._set_ezpickle(task=task, horizon=horizon, **kwargs)

    # ---- pure vectorised functions (see metarl.envs.locomotion) -----------
    @hybridmethod
    def batch_terminated(self, qpos, qvel) -> np.ndarray:
        """HalfCheetah never terminates early: all-False ``bool [B]``."""
        qpos = as_batch(qpos, "qpos", self.nq, "batch_terminated")
        return np.zeros(qpos.shape[0], dtype=bool)

    @hybridmethod
    def batch_reward(self, qpos_before, qpos_after, action, task_vectors, dt: float):
        """Reward for B transitions.

        Args: ``qpos_before [B, 9]`` (before the env step), ``qpos_after [B, 9]``
        (after ``frame_skip`` physics steps), ``action [B, 6]`` as passed to
        ``step``, ``task_vectors [B, 1]`` (``task_vector(task)`` per row),
        ``dt`` = ``model.opt.timestep * frame_skip`` (0.05).
        Returns ``(reward [B], {"forward_velocity", "reward_forward", "ctrl_cost"} -> [B])``.
        """
        owner = "batch_reward"
        qpos_before = as_batch(qpos_before, "qpos_before", self.nq, owner)
        qpos_after = as_batch(qpos_after, "qpos_after", self.nq, owner)
        action = as_batch(action, "action", self.nu, owner)
        task_vectors = as_batch(task_vectors, "task_vectors", self.task_dim, owner)
        forward_velocity = (qpos_after[:, 0] - qpos_before[:, 0]) / dt
        ctrl_cost = self.ctrl_cost_weight * rowwise_sum_of_squares(action)
        reward_forward = self._forward_reward(forward_velocity, task_vectors)
        reward = reward_forward - ctrl_cost
        terms = {
            "forward_velocity": forward_velocity,
            "reward_forward": reward_forward,
            "ctrl_cost": ctrl_cost,
        }
        return reward, terms


class HalfCheetahVelEnv(VelocityTasks, _HalfCheetahTaskEnv):
    """Run at a target forward velocity: ``velocity ~ U[0, 2]`` (Finn et al. 2017, sec. 5.3).

    ``reward = -|forward_velocity - velocity| - 0.05 * sum(action**2)``.
    Task ``{"velocity": v}``; ``task_vector = [v]``.
    """

    example_task: ClassVar[str] = "{'velocity': 1.0}"
    velocity_range: ClassVar[tuple[float, float]] = (0.0, 2.0)

    @hybridmethod
    def _forward_reward(self, forward_velocity, task_vectors):
        return -np.abs(forward_velocity - task_vectors[:, 0])


class HalfCheetahDirEnv(DirectionTasks, _HalfCheetahTaskEnv):
    """Run forward (+1) or backward (-1), each with probability 1/2 (Finn et al. 2017, sec. 5.3).

    ``reward = direction * forward_velocity - 0.05 * sum(action**2)``.
    Task ``{"direction": +-1.0}``; ``task_vector = [direction]``.
    """

    @hybridmethod
    def _forward_reward(self, forward_velocity, task_vectors):
        return task_vectors[:, 0] * forward_velocity
