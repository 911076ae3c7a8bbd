"""2D point navigation to a random goal (Finn et al. 2017, sec. 5.3).

A point agent starts at the origin; each step it moves by its (clipped) action
and receives ``reward = -||position - goal||_2`` measured *after* the move.
Goals are drawn from ``U[-0.5, 0.5]^2``; episodes last 100 steps.  This
follows the paper's code (cbfinn/maml_rl ``PointEnvRandGoal``) and
tristandeleu/pytorch-maml-rl ``Navigation2DEnv``.

Two conventions exist in the reference code, offered as constructor flags:

``normalize_actions=True`` (default; the paper's setting)
    The policy acts in ``[-1, 1]^2`` (``action_space = Box(-1, 1)``) and the
    env moves by ``clip(0.1 * action, -0.1, 0.1)``: the paper wraps the point
    env in rllab's ``normalize``, which rescales ``[-1, 1]`` to the env's
    ``[-0.1, 0.1]`` bounds.  ``normalize_actions=False`` is pytorch-maml-rl's
    raw env: ``action_space = Box(-0.1, 0.1)`` and the step is
    ``clip(action, -0.1, 0.1)``.
    Why it matters: a freshly initialised Gaussian policy has std ~ 1 in
    action units.  With normalised actions that noise moves the agent by
    ~0.1 per step; in the raw space the same noise is 10x larger than the
    0.1 bound, so almost every exploratory action is clipped to a corner
    (bang-bang motion) and the policy-gradient signal is very different.
    Equivalently: normalised actions make the initial exploration noise, in
    env units, 10x smaller.  Results from the two are not comparable.

``goal_radius=0.01`` (default; the paper's setting)
    ``terminated=True`` once *both* coordinates are within ``goal_radius`` of
    the goal (``|dx| < r and |dy| < r``: the paper's code tests each
    coordinate, i.e. an L-infinity box, not a Euclidean disk).  Ending the
    episode at the goal stops the accumulation of (small, negative)
    per-step rewards, so returns depend on how fast the goal is reached.
    ``goal_radius=None`` disables termination (episodes always last
    ``horizon`` steps).

Observation: the position, ``float32`` shape ``(2,)``.  Task:
``{"goal": [gx, gy]}``, ``task_vector = [gx, gy]``.  ``info`` has
``distance``, ``position``, ``applied_action`` (the clipped move) and ``task``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .base import TaskEnv, check_num_tasks, check_rng, hybridmethod, parse_task

__all__ = ["Navigation2DEnv"]


class Navigation2DEnv(gym.Env, TaskEnv):
    """2D navigation task distribution of Finn et al. (2017), sec. 5.3 (see the module docstring).

    Args:
        task: initial task ``{"goal": [gx, gy]}`` (default: goal at the origin,
            as in pytorch-maml-rl).
        horizon: episode length; ``step`` returns ``truncated=True`` at that step.
        normalize_actions: paper convention (policy acts in [-1, 1], scaled by 0.1).
        goal_radius: early-termination box half-width, ``None`` to disable.
        render_mode: unsupported, must be ``None``.
    """

    metadata = {"render_modes": []}
    task_dim: ClassVar[int] = 2
    task_spec: ClassVar[dict[str, int]] = {"goal": 2}
    example_task: ClassVar[str] = "{'goal': [0.2, -0.3]}"
    default_task: ClassVar[dict[str, Any]] = {"goal": [0.0, 0.0]}
    goal_range: ClassVar[tuple[float, float]] = (-0.5, 0.5)
    #: largest displacement per step (the env's action bound)
    max_step: ClassVar[float] = 0.1
    default_horizon: ClassVar[int] = 100

    def __init__(
        self,
        task: Mapping[str, Any] | None = None,
        horizon: int = 100,
        normalize_actions: bool = True,
        goal_radius: float | None = 0.01,
        render_mode: str | None = None,
    ):
        super().__init__()
        if render_mode is not None:
            raise ValueError(f"Navigation2DEnv has no renderer; use render_mode=None, got {render_mode!r}")
        if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
            raise ValueError(f"Navigation2DEnv: horizon must be a positive int, got {horizon!r}")
        if goal_radius is not None and not (float(goal_radius) >= 0.0):
            raise ValueError(f"Navigation2DEnv: goal_radius must be >= 0 or None, got {goal_radius!r}")
        self.render_mode = None
        self.horizon = int(horizon)
        self.normalize_actions = bool(normalize_actions)
        self.goal_radius = None if goal_radius is None else float(goal_radius)
        bound = 1.0 if self.normalize_actions else self.max_step
        self.action_space = spaces.Box(low=-bound, high=bound, shape=(2,), dtype=np.float32)
        self.observation_space = spaces.Box(low=-np.inf, high=np.inf, shape=(2,), dtype=np.float32)
        self._position = np.zeros(2, dtype=np.float64)
        self._elapsed_steps = 0
        self._task: dict[str, Any] = {}
        self.set_task(self.default_task if task is None else task)

    # ------------------------------------------------------------------ tasks
    @hybridmethod
    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[dict]:
        owner = "Navigation2DEnv"
        n = check_num_tasks(n, owner)
        if rng is None and not isinstance(self, type):
            rng = self.np_random
        rng = check_rng(rng, owner)
        low, high = self.goal_range
        goals = rng.uniform(low, high, size=(n, 2))
        return [{"goal": [float(g[0]), float(g[1])]} for g in goals]

    def set_task(self, task: Mapping[str, Any]) -> None:
        self._task = parse_task(task, "Navigation2DEnv", self.task_spec, self.example_task)
        self._goal = np.asarray(self._task["goal"], dtype=np.float64)

    def get_task(self) -> dict:
        return {"goal": list(self._task["goal"])}

    @hybridmethod
    def task_vector(self, task: Mapping[str, Any]) -> np.ndarray:
        parsed = parse_task(task, "Navigation2DEnv", self.task_spec, self.example_task)
        return np.asarray(parsed["goal"], dtype=np.float64)

    # ---------------------------------------------------------------- dynamics
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Back to the origin; ``options={"task": {...}}`` also installs a task first."""
        super().reset(seed=seed)
        if options and "task" in options:
            self.set_task(options["task"])
        self._position = np.zeros(2, dtype=np.float64)
        self._elapsed_steps = 0
        return self._position.astype(np.float32), {"task": self.get_task()}

    def applied_action(self, action) -> np.ndarray:
        """The displacement a given policy action produces (scaling and clipping)."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (2,):
            raise ValueError(f"Navigation2DEnv: action must have shape (2,), got {np.shape(action)}")
        if self.normalize_actions:
            a = self.max_step * a
        return np.clip(a, -self.max_step, self.max_step)

    def step(self, action):
        move = self.applied_action(action)
        self._position = self._position + move
        delta = self._position - self._goal
        distance = float(np.sqrt(delta[0] * delta[0] + delta[1] * delta[1]))
        reward = -distance
        terminated = bool(
            self.goal_radius is not None
            and abs(delta[0]) < self.goal_radius
            and abs(delta[1]) < self.goal_radius
        )
        self._elapsed_steps += 1
        truncated = self._elapsed_steps >= self.horizon
        info = {
            "distance": distance,
            "position": [float(self._position[0]), float(self._position[1])],
            "applied_action": [float(move[0]), float(move[1])],
            "task": self.get_task(),
        }
        return self._position.astype(np.float32), reward, terminated, truncated, info
