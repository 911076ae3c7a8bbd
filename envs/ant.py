"""Ant target-velocity, direction and goal tasks (Finn et al. 2017 sec. 5.3; Rothfuss et al. 2019, ProMP).

All three run Gymnasium's ``Ant-v5`` model unchanged (``ant.xml``, RK4,
``frame_skip=5``, ``timestep=0.01`` so ``dt=0.05`` s, reset noise 0.1).

Observation -- computable from ``qpos``/``qvel`` alone
    Ant-v5's default observation appends the 78 clipped external contact
    forces (``include_cfrc_ext_in_observation=True``).  Those are not part of
    the simulator state a batched sampler gets back from ``mujoco.rollout``,
    so these envs use ``include_cfrc_ext_in_observation=False``:
    ``AntVel``/``AntDir`` observe ``concat(qpos[2:], qvel)`` (27 dims, torso x/y
    excluded as in Gymnasium); ``AntGoal`` observes ``concat(qpos, qvel)``
    (29 dims) because a goal-reaching policy must know where it is (ProMP's
    AntRandGoal also observes the full ``qpos``).

Reward -- the MAML / pytorch-maml-rl ant family, minus contact cost
    Velocities come from the torso's free-joint position,
    ``(qpos_after[:2] - qpos_before[:2]) / dt``; for a free joint this is the
    torso's world position (what ``get_body_com("torso")`` returns after
    ``mj_forward``).  Ant-v5 itself differences ``data.xpos``, which lags
    ``qpos`` by one physics substep after ``mj_step``; ``qpos`` is exact and
    available to a batched sampler.  With ``ctrl_cost = 0.005 * sum(a**2)``
    (pytorch-maml-rl's ``0.5 * 1e-2``; actions already span [-1, 1]):

    * :class:`AntVelEnv`: ``velocity ~ U[0, 3]``,
      ``reward = -|v_x - velocity| + 1.0 - ctrl_cost + 0.05``;
    * :class:`AntDirEnv`: ``direction = +-1`` along x with probability 1/2
      (MAML's forward/backward ant),
      ``reward = direction * v_x - ctrl_cost + 0.05``;
    * :class:`AntGoalEnv`: goal uniform in the disk of radius 3 (ProMP's
      sampler), ``reward = -||xy - goal||_1 - ctrl_cost``.  The L1 distance is
      what both cbfinn/maml_rl (``AntEnvRandGoal``) and ProMP (``AntRandGoalEnv``)
      use; ``goal_norm="l2"`` switches to the Euclidean distance.

    The references also subtract ``0.5e-3 * sum(clip(cfrc_ext, -1, 1)**2)``.
    It is dropped here: it is not a function of ``qpos``/``qvel``, and under
    mujoco-py with MuJoCo >= 2.0 (which the PyTorch reproductions ran on)
    ``cfrc_ext`` was never computed and stayed zero, so the term was zero in
    practice anyway.

Termination
    ``AntVel``/``AntDir`` terminate when the state is non-finite or the torso
    height ``qpos[2]`` leaves [0.2, 1.0] (Gymnasium's and pytorch-maml-rl's
    healthy check) and add the constant survive bonus 0.05 every step.
    ``AntGoal`` does *not* terminate by default (ProMP): its reward is always
    negative, so early termination would teach the ant to flip over to end the
    episode (cbfinn/maml_rl instead adds +4.0 "to make it happy, not
    suicidal"); no survive bonus either, as a constant would only shift returns.
    ``terminate_when_unhealthy`` overrides either default.

Episodes last 200 steps (pytorch-maml-rl's ``max_episode_steps``).  ``info``
carries ``forward_velocity`` (v_x), ``y_velocity``, ``reward_forward`` (the task
term: velocity/direction/goal reward), ``ctrl_cost``, ``reward_survive``,
``x_position``, ``y_position``, ``task`` and, for AntGoal, ``goal_distance``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from gymnasium.envs.mujoco.ant_v5 import AntEnv

from .base import as_batch, hybridmethod, rowwise_abs_sum, rowwise_sum_of_squares
from .locomotion import DirectionTasks, LocomotionTaskEnv, VelocityTasks

__all__ = ["AntVelEnv", "AntDirEnv", "AntGoalEnv"]


class _AntTaskEnv(LocomotionTaskEnv, AntEnv):
    obs_skip_qpos: ClassVar[int] = 2
    #: ``ctrl_cost = ctrl_cost_weight * sum(a**2)`` (pytorch-maml-rl: 0.5 * 1e-2)
    ctrl_cost_weight: ClassVar[float] = 0.005
    #: constant bonus added every step (pytorch-maml-rl / MAML: 0.05)
    survive_reward: ClassVar[float] = 0.05
    #: constant added to the task term (AntVel: +1.0 as in pytorch-maml-rl)
    forward_reward_offset: ClassVar[float] = 0.0
    healthy_z_range: ClassVar[tuple[float, float]] = (0.2, 1.0)
    terminate_when_unhealthy: bool = True
    nq: ClassVar[int] = 15
    nv: ClassVar[int] = 14
    nu: ClassVar[int] = 8

    def __init__(
        self,
        task: dict | None = None,
        horizon: int | None = None,
        terminate_when_unhealthy: bool | None = None,
        **kwargs: Any,
    ):
        if terminate_when_unhealthy is not None:
            self.terminate_when_unhealthy = bool(terminate_when_unhealthy)
        self._init_locomotion(
            AntEnv,
            task,
            horizon,
            kwargs,
            exclude_current_positions_from_observation=self.obs_skip_qpos == 2,
            include_cfrc_ext_in_observation=False,
        )
        self._set_ezpickle(
            task=task, horizon=horizon, terminate_when_unhealthy=terminate_when_unhealthy, **kwargs
        )

    # ---- pure vectorised functions (see metarl.envs.locomotion) -----------
    @hybridmethod
    def batch_terminated(self, qpos, qvel) -> np.ndarray:
        """``bool [B]``: unhealthy (non-finite state or torso z outside [0.2, 1.0]) and termination on."""
        qpos = as_batch(qpos, "qpos", self.nq, "batch_terminated")
        qvel = as_batch(qvel, "qvel", self.nv, "batch_terminated")
        if not self.terminate_when_unhealthy:
            return np.zeros(qpos.shape[0], dtype=bool)
        low, high = self.healthy_z_range
        finite = np.isfinite(qpos).all(axis=1) & np.isfinite(qvel).all(axis=1)
        z = qpos[:, 2]
        healthy = finite & (z >= low) & (z <= high)
        return ~healthy

    @hybridmethod
    def batch_reward(self, qpos_before, qpos_after, action, task_vectors, dt: float):
        """Reward for B transitions.

        Args: ``qpos_before [B, 15]`` (before the env step), ``qpos_after [B, 15]``
        (after ``frame_skip`` physics steps), ``action [B, 8]`` as passed to
        ``step``, ``task_vectors [B, task_dim]`` (``task_vector(task)`` per row),
        ``dt`` = ``model.opt.timestep * frame_skip`` (0.05).
        Returns ``(reward [B], terms)`` with terms ``forward_velocity``,
        ``y_velocity``, ``reward_forward``, ``ctrl_cost``, ``reward_survive``
        (+ ``goal_distance`` for AntGoal), each ``[B]``;
        ``reward = reward_forward - ctrl_cost + reward_survive``.
        """
        owner = "batch_reward"
        qpos_before = as_batch(qpos_before, "qpos_before", self.nq, owner)
        qpos_after = as_batch(qpos_after, "qpos_after", self.nq, owner)
        action = as_batch(action, "action", self.nu, owner)
        task_vectors = as_batch(task_vectors, "task_vectors", self.task_dim, owner)
        x_velocity = (qpos_after[:, 0] - qpos_before[:, 0]) / dt
        y_velocity = (qpos_after[:, 1] - qpos_before[:, 1]) / dt
        terms = {"forward_velocity": x_velocity, "y_velocity": y_velocity}
        reward_forward = self._task_reward(x_velocity, qpos_after, task_vectors, terms)
        ctrl_cost = self.ctrl_cost_weight * rowwise_sum_of_squares(action)
        reward_survive = np.full(qpos_after.shape[0], float(self.survive_reward))
        reward = reward_forward - ctrl_cost + reward_survive
        terms.update(reward_forward=reward_forward, ctrl_cost=ctrl_cost, reward_survive=reward_survive)
        return reward, terms


class AntVelEnv(VelocityTasks, _AntTaskEnv):
    """Walk along +x at a target speed ``velocity ~ U[0, 3]`` (Finn et al. 2017, sec. 5.3).

    ``reward = -|v_x - velocity| + 1.0 - 0.005 * sum(a**2) + 0.05``; terminates when unhealthy.
    Task ``{"velocity": v}``; ``task_vector = [v]``.
    """

    example_task: ClassVar[str] = "{'velocity': 1.5}"
    velocity_range: ClassVar[tuple[float, float]] = (0.0, 3.0)
    forward_reward_offset: ClassVar[float] = 1.0

    @hybridmethod
    def _task_reward(self, x_velocity, qpos_after, task_vectors, terms):
        return -np.abs(x_velocity - task_vectors[:, 0]) + self.forward_reward_offset


class AntDirEnv(DirectionTasks, _AntTaskEnv):
    """Walk forward (+1) or backward (-1) along x, each with probability 1/2 (MAML's ant-dir).

    ``reward = direction * v_x - 0.005 * sum(a**2) + 0.05``; terminates when unhealthy.
    Task ``{"direction": +-1.0}``; ``task_vector = [direction]``.
    """

    @hybridmethod
    def _task_reward(self, x_velocity, qpos_after, task_vectors, terms):
        return task_vectors[:, 0] * x_velocity + self.forward_reward_offset


class AntGoalEnv(_AntTaskEnv):
    """Walk to a goal drawn uniformly from the disk of radius 3 (ProMP's AntRandGoal).

    ``reward = -||xy - goal||_1 - 0.005 * sum(a**2)`` (``goal_norm="l2"`` for Euclidean),
    where ``xy = qpos_after[:2]`` is the torso position after the step.  No
    early termination and no survive bonus by default (see the module docstring).
    Task ``{"goal": [gx, gy]}``; ``task_vector = [gx, gy]``.
    """

    obs_skip_qpos: ClassVar[int] = 0
    survive_reward: ClassVar[float] = 0.0
    terminate_when_unhealthy: bool = False
    goal_norm: str = "l1"
    goal_radius: ClassVar[float] = 3.0
    task_dim: ClassVar[int] = 2
    task_spec: ClassVar[dict[str, int]] = {"goal": 2}
    example_task: ClassVar[str] = "{'goal': [1.0, -2.0]}"
    default_task: ClassVar[dict[str, Any]] = {"goal": [0.0, 0.0]}

    def __init__(
        self,
        task: dict | None = None,
        horizon: int | None = None,
        terminate_when_unhealthy: bool | None = None,
        goal_norm: str = "l1",
        **kwargs: Any,
    ):
        if goal_norm not in ("l1", "l2"):
            raise ValueError(f"AntGoalEnv: goal_norm must be 'l1' or 'l2', got {goal_norm!r}")
        self.goal_norm = goal_norm
        super().__init__(task=task, horizon=horizon, terminate_when_unhealthy=terminate_when_unhealthy, **kwargs)
        self._set_ezpickle(
            task=task, horizon=horizon, terminate_when_unhealthy=terminate_when_unhealthy,
            goal_norm=goal_norm, **kwargs,
        )

    @hybridmethod
    def _sample(self, n: int, rng: np.random.Generator) -> list[dict]:
        # area-uniform in the disk: radius = R * sqrt(U), angle = 2*pi*U (as in ProMP)
        angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
        radius = self.goal_radius * np.sqrt(rng.uniform(0.0, 1.0, size=n))
        return [
            {"goal": [float(r * np.cos(a)), float(r * np.sin(a))]} for r, a in zip(radius, angle)
        ]

    @hybridmethod
    def _task_reward(self, x_velocity, qpos_after, task_vectors, terms):
        delta = qpos_after[:, :2] - task_vectors[:, :2]
        if self.goal_norm == "l1":
            distance = rowwise_abs_sum(delta)
        else:
            distance = np.sqrt(rowwise_sum_of_squares(delta))
        terms["goal_distance"] = distance
        return -distance + self.forward_reward_offset
