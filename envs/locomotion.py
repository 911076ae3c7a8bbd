"""Shared machinery for the MuJoCo locomotion task envs (HalfCheetah*, Ant*).

Design: one code path for one step and for a batch of steps
-------------------------------------------------------------
Each locomotion task env defines three *pure, vectorised* functions of the
simulator state:

``batch_observation(qpos [B, nq], qvel [B, nv]) -> obs [B, obs_dim]``
``batch_reward(qpos_before [B, nq], qpos_after [B, nq], action [B, nu],
task_vectors [B, task_dim], dt) -> (reward [B], terms {name: [B]})``
``batch_terminated(qpos [B, nq], qvel [B, nv]) -> bool [B]``

and the env's own :meth:`LocomotionTaskEnv.step` is *implemented with them*
(with B = 1), so a batched sampler that advances many MuJoCo states at once
(e.g. with ``mujoco.rollout``) and then calls these functions gets results
identical, bit for bit, to stepping the Gymnasium envs one by one.  Every
quantity they need is in ``qpos``/``qvel``: no contact forces, no body
positions from ``data.xpos`` (which MuJoCo computes at the *start* of
``mj_step`` and therefore lags ``qpos`` by one physics substep).

How one ``step(action)`` maps onto raw MuJoCo (to reproduce it elsewhere)
----------------------------------------------------------------------------
1. ``qpos_before = data.qpos.copy()``
2. ``data.ctrl[:] = action``; ``mj_step(model, data, nstep=frame_skip)``
   (MuJoCo clamps ``ctrl`` to the actuators' ``ctrlrange`` [-1, 1] internally;
   the reward uses the action exactly as passed to ``step``),
3. ``obs = batch_observation(data.qpos, data.qvel)``, reward and
   termination from the functions above with ``dt = model.opt.timestep *
   frame_skip``, task vector ``env.task_vector(env.get_task())``.

Both models use ``frame_skip = 5`` and ``timestep = 0.01`` so ``dt = 0.05`` s.

Reset (Gymnasium's ``reset_noise_scale = 0.1`` convention, unchanged):
``mj_resetData`` (zeroes ``qacc_warmstart``), then
``qpos = init_qpos + rng.uniform(-0.1, 0.1, nq)`` followed by
``qvel = init_qvel + 0.1 * rng.standard_normal(nv)`` -- in that order, with
``rng = env.np_random`` -- then ``mj_forward``.  :meth:`initial_state` returns
exactly these arrays for any generator, so a sampler can reproduce a reset
from the env's ``np_random``.

Recipe verified by ``tests/test_envs.py`` (bit-identical to ``env.step`` on MuJoCo >= 4; on 3.x,
e.g. the metaworld extra's 3.3.0, the ants' contacts differ in the last bits, ~1e-13)::

    qpos, qvel = env.initial_state(rng)            # or read env.data after env.reset()
    data = mujoco.MjData(model); mujoco.mj_resetData(model, data)
    data.qpos[:], data.qvel[:] = qpos, qvel; mujoco.mj_forward(model, data)
    spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
    s0 = np.empty(mujoco.mj_stateSize(model, spec)); mujoco.mj_getState(model, data, s0, spec)
    ctrl = np.repeat(actions, frame_skip, axis=0)  # [T * frame_skip, nu], one action per env step
    state, _ = rollout.rollout(model, data, s0[None], ctrl[None])  # from mujoco import rollout
    qpos_t = state[0, frame_skip - 1 :: frame_skip, 1 : 1 + nq]   # after each env step
    qvel_t = state[0, frame_skip - 1 :: frame_skip, 1 + nq : 1 + nq + nv]

(state layout for ``mjSTATE_FULLPHYSICS``: ``time, qpos, qvel, act, ...``).
``qpos``/``qvel`` alone are not MuJoCo's full state: to resume mid-episode
rather than from a reset, also carry ``qacc_warmstart`` (``initial_warmstart``
of ``rollout``), which a reset zeroes.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, ClassVar, Mapping

import mujoco
import numpy as np
from gymnasium.utils import EzPickle

from .base import TaskEnv, as_batch, check_num_tasks, check_rng, hybridmethod, parse_task

__all__ = ["LocomotionTaskEnv", "quiet_mujoco_deprecations"]

#: Gymnasium base-env options that the task envs define themselves: observation
#: options would desynchronise ``observation_space`` from ``batch_observation``,
#: and reward options would be silently ignored by ``batch_reward``.
_FORBIDDEN_KWARGS = (
    "exclude_current_positions_from_observation",
    "include_cfrc_ext_in_observation",
    "xml_file",
    "forward_reward_weight",
    "ctrl_cost_weight",
    "contact_cost_weight",
    "healthy_reward",
    "healthy_z_range",
    "main_body",
    "contact_force_range",
)


@contextlib.contextmanager
def quiet_mujoco_deprecations():
    """Swallow MuJoCo's ``settotalmass`` deprecation while compiling a stock model.

    Gymnasium's ``half_cheetah.xml`` uses the ``settotalmass`` compiler
    attribute, which recent MuJoCo releases report through their default warning
    handler: a line on stdout *and* a ``MUJOCO_LOG.TXT`` file written into the
    current directory (i.e. into the user's repository).  During model
    compilation only, we install a handler that drops that one message and
    forwards any other MuJoCo warning as a Python ``RuntimeWarning``; the
    previous handler is restored afterwards.
    """
    previous = mujoco.get_mju_user_warning()

    def handler(message: str) -> None:
        if "settotalmass" in message:
            return
        warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)

    mujoco.set_mju_user_warning(handler)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


class LocomotionTaskEnv(TaskEnv):
    """Mixin placed *before* a Gymnasium MuJoCo env class in the bases.

    Subclasses define the class constants below, the task schema
    (``task_spec``, ``example_task``, ``default_task``), ``_sample(n, rng)``
    and the three ``batch_*`` functions.  Constructor arguments common to all
    locomotion envs:

    * ``task`` -- initial task (defaults to ``default_task``);
    * ``horizon`` -- episode length; ``step`` returns ``truncated=True`` at
      that step (the registered ``max_episode_steps`` mirrors the default);
    * any other keyword (``render_mode``, ``frame_skip``,
      ``reset_noise_scale``, ``width``...) goes to the Gymnasium base env.
    """

    #: default episode length (pytorch-maml-rl registers 200 for all MuJoCo tasks)
    default_horizon: ClassVar[int] = 200
    #: number of leading qpos entries dropped from the observation
    obs_skip_qpos: ClassVar[int] = 0
    #: task schema: key -> 0 (scalar) or k (list of k floats)
    task_spec: ClassVar[dict[str, int]] = {}
    example_task: ClassVar[str] = ""
    default_task: ClassVar[dict[str, Any]] = {}

    def _init_locomotion(self, base_cls, task, horizon, base_kwargs: dict[str, Any], **fixed) -> None:
        bad = [k for k in _FORBIDDEN_KWARGS if k in base_kwargs]
        if bad:
            raise ValueError(
                f"{type(self).__name__} defines {bad[0]} itself (observation/reward are pure functions of "
                f"qpos/qvel); remove that argument or subclass and override the class constant"
            )
        with quiet_mujoco_deprecations():
            base_cls.__init__(self, **fixed, **base_kwargs)
        self.horizon = self._check_horizon(horizon)
        self._elapsed_steps = 0
        self._task: dict[str, Any] = {}
        self.set_task(self.default_task if task is None else task)

    def _check_horizon(self, horizon: Any) -> int:
        if horizon is None:
            return int(self.default_horizon)
        if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
            raise ValueError(f"{type(self).__name__}: horizon must be a positive int, got {horizon!r}")
        return int(horizon)

    def _set_ezpickle(self, **kwargs) -> None:
        # Gymnasium's base __init__ registered *its* positional arguments for
        # pickling; re-register ours so copy/pickle rebuild this class correctly.
        EzPickle.__init__(self, **kwargs)

    # ------------------------------------------- pure vectorised observation
    @hybridmethod
    def batch_observation(self, qpos, qvel) -> np.ndarray:
        """``concat(qpos[:, obs_skip_qpos:], qvel)`` float64 ``[B, obs_dim]`` (Gymnasium's layout:
        HalfCheetah skips x (17 dims), AntVel/Dir skip x, y (27), AntGoal keeps them (29))."""
        qpos = as_batch(qpos, "qpos", self.nq, "batch_observation")
        qvel = as_batch(qvel, "qvel", self.nv, "batch_observation")
        return np.concatenate([qpos[:, self.obs_skip_qpos:], qvel], axis=1)

    # ------------------------------------------------------------------ tasks
    @hybridmethod
    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[dict]:
        owner = self.__name__ if isinstance(self, type) else type(self).__name__
        n = check_num_tasks(n, owner)
        if rng is None and not isinstance(self, type):
            rng = self.np_random
        rng = check_rng(rng, owner)
        return self._sample(n, rng)

    def set_task(self, task: Mapping[str, Any]) -> None:
        self._task = parse_task(task, type(self).__name__, self.task_spec, self.example_task)
        self._task_vec = self.task_vector(self._task)

    def get_task(self) -> dict:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._task.items()}

    @hybridmethod
    def task_vector(self, task: Mapping[str, Any]) -> np.ndarray:
        owner = self.__name__ if isinstance(self, type) else type(self).__name__
        parsed = parse_task(task, owner, self.task_spec, self.example_task)
        parts = [np.atleast_1d(np.asarray(parsed[k], dtype=np.float64)) for k in self.task_spec]
        return np.concatenate(parts)

    # -------------------------------------------------------------- simulation
    def initial_state(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The ``(qpos, qvel)`` a reset draws from ``rng`` (Gymnasium's v5 reset noise).

        ``qpos = init_qpos + U(-s, s)^nq`` then ``qvel = init_qvel + s * N(0, 1)^nv``
        with ``s = reset_noise_scale`` (0.1 by default), drawn in that order.
        ``env.reset(seed=k)`` equals ``initial_state(gymnasium.utils.seeding.np_random(k)[0])``.
        """
        s = self._reset_noise_scale
        qpos = self.init_qpos + rng.uniform(low=-s, high=s, size=self.model.nq)
        qvel = self.init_qvel + s * rng.standard_normal(self.model.nv)
        return qpos, qvel

    def reset_model(self) -> np.ndarray:
        qpos, qvel = self.initial_state(self.np_random)
        self.set_state(qpos, qvel)
        return self._get_obs()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset the simulator; ``options={"task": {...}}`` also installs a task first."""
        if options and "task" in options:
            self.set_task(options["task"])
        obs, info = super().reset(seed=seed, options=options)
        self._elapsed_steps = 0
        return obs, info

    def _get_obs(self) -> np.ndarray:
        return self.batch_observation(self.data.qpos[None], self.data.qvel[None])[0]

    def _get_reset_info(self) -> dict[str, Any]:
        info = {"x_position": float(self.data.qpos[0]), "task": self.get_task()}
        if self.obs_skip_qpos != 1:  # planar xy bodies (Ant): report y as well
            info["y_position"] = float(self.data.qpos[1])
        return info

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        qpos_before = self.data.qpos.copy()
        self.do_simulation(action, self.frame_skip)
        qpos = self.data.qpos.copy()
        qvel = self.data.qvel.copy()

        obs = self.batch_observation(qpos[None], qvel[None])[0]
        reward, terms = self.batch_reward(
            qpos_before[None], qpos[None], action[None], self._task_vec[None], self.dt
        )
        terminated = bool(self.batch_terminated(qpos[None], qvel[None])[0])
        self._elapsed_steps += 1
        truncated = self._elapsed_steps >= self.horizon

        info: dict[str, Any] = {name: float(value[0]) for name, value in terms.items()}
        info["x_position"] = float(qpos[0])
        if self.obs_skip_qpos != 1:
            info["y_position"] = float(qpos[1])
        info["task"] = self.get_task()
        if self.render_mode == "human":
            self.render()
        return obs, float(reward[0]), terminated, truncated, info


class VelocityTasks:
    """Mixin for target-velocity task distributions: task ``{"velocity": v}``, v ~ U[velocity_range]."""

    task_dim: ClassVar[int] = 1
    task_spec: ClassVar[dict[str, int]] = {"velocity": 0}
    #: pytorch-maml-rl's default before any task is set
    default_task: ClassVar[dict[str, Any]] = {"velocity": 0.0}
    velocity_range: ClassVar[tuple[float, float]] = (0.0, 2.0)

    @hybridmethod
    def _sample(self, n: int, rng: np.random.Generator) -> list[dict]:
        low, high = self.velocity_range
        return [{"velocity": float(v)} for v in rng.uniform(low, high, size=n)]


class DirectionTasks:
    """Mixin for forward/backward task distributions: task ``{"direction": +-1.0}``, each with probability 1/2."""

    task_dim: ClassVar[int] = 1
    task_spec: ClassVar[dict[str, int]] = {"direction": 0}
    example_task: ClassVar[str] = "{'direction': -1.0}"
    default_task: ClassVar[dict[str, Any]] = {"direction": 1.0}

    @hybridmethod
    def _sample(self, n: int, rng: np.random.Generator) -> list[dict]:
        return [{"direction": float(d)} for d in rng.choice(np.array([-1.0, 1.0]), size=n)]
