"""Turn any Gymnasium environment into a :class:`~metarl.envs.base.TaskEnv`.

You supply how tasks are drawn and how one is applied to the env; the wrapper
supplies the rest of the interface (``get_task``, ``task_vector``, the task in
``info``), so your env works with every metarl sampler and algorithm.
Example -- Pendulum with a random gravity per task:

```python
import gymnasium as gym
import numpy as np

from metarl.envs import TaskWrapper, check_task_env


def sample_gravity(n, rng):
    # n tasks, drawn with the caller's np.random.Generator; plain floats only
    return [{"g": float(g)} for g in rng.uniform(5.0, 15.0, size=n)]


def set_gravity(env, task):
    # env is the wrapped env; reach the raw Pendulum through .unwrapped
    env.unwrapped.g = task["g"]


env = TaskWrapper(gym.make("Pendulum-v1"), sample_gravity, set_gravity)
check_task_env(env)  # one-line error if the task interface is broken

tasks = env.sample_tasks(8, np.random.default_rng(0))
env.set_task(tasks[0])
obs, info = env.reset(seed=0)
obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
print(env.get_task(), env.task_vector(env.get_task()))  # {'g': ...} [...]
```

Tasks must be dicts of numbers or lists of numbers (JSON-serialisable).
Without ``task_vector_fn`` the oracle encoding concatenates the task's values
in sorted-key order (:func:`metarl.envs.base.flatten_task`).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import gymnasium as gym
import numpy as np

from .base import TaskEnv, check_num_tasks, check_rng, flatten_task, to_builtin

__all__ = ["TaskWrapper"]

SampleTasksFn = Callable[[int, np.random.Generator], list]
SetTaskFn = Callable[[gym.Env, dict], None]
TaskVectorFn = Callable[[dict], Any]


class TaskWrapper(gym.Wrapper, TaskEnv):
    """Wrap ``env`` as a task env.

    Args:
        env: any Gymnasium env (e.g. the result of ``gym.make``).
        sample_tasks_fn: ``(n, rng) -> list[dict]``; called by :meth:`sample_tasks`.
        set_task_fn: ``(env, task) -> None``; applies ``task`` to the wrapped ``env``.
        task_vector_fn: ``task -> 1-D array``; defaults to :func:`flatten_task`.
        task: optional initial task, applied immediately.
    """

    def __init__(
        self,
        env: gym.Env,
        sample_tasks_fn: SampleTasksFn,
        set_task_fn: SetTaskFn,
        task_vector_fn: TaskVectorFn | None = None,
        task: Mapping[str, Any] | None = None,
    ):
        for name, fn in (("sample_tasks_fn", sample_tasks_fn), ("set_task_fn", set_task_fn)):
            if not callable(fn):
                raise TypeError(f"TaskWrapper: {name} must be callable, got {type(fn).__name__}")
        if task_vector_fn is not None and not callable(task_vector_fn):
            raise TypeError(
                f"TaskWrapper: task_vector_fn must be callable or None, got {type(task_vector_fn).__name__}"
            )
        super().__init__(env)
        self._sample_tasks_fn = sample_tasks_fn
        self._set_task_fn = set_task_fn
        self._task_vector_fn = task_vector_fn or flatten_task
        self._task: dict | None = None
        self.task_dim: int | None = None
        if task is not None:
            self.set_task(task)

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[dict]:
        n = check_num_tasks(n, "TaskWrapper")
        rng = check_rng(self.np_random if rng is None else rng, "TaskWrapper")
        tasks = self._sample_tasks_fn(n, rng)
        if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, Mapping) for t in tasks):
            raise TypeError(
                f"TaskWrapper: sample_tasks_fn must return a list of dicts, got {type(tasks).__name__}; "
                f"e.g. return [{{'g': float(x)}} for x in rng.uniform(5, 15, size=n)]"
            )
        return [to_builtin(t) for t in tasks]

    def set_task(self, task: Mapping[str, Any]) -> None:
        if not isinstance(task, Mapping):
            raise ValueError(f"TaskWrapper: task must be a dict, got {type(task).__name__}")
        task = to_builtin(task)
        self._set_task_fn(self.env, copy.deepcopy(task))
        self._task = task
        self.task_dim = int(self.task_vector(task).shape[0])

    def get_task(self) -> dict:
        if self._task is None:
            raise RuntimeError(
                "TaskWrapper: no task set yet; call env.set_task(env.sample_tasks(1, rng)[0]) first"
            )
        return copy.deepcopy(self._task)

    def task_vector(self, task: Mapping[str, Any]) -> np.ndarray:
        vec = np.asarray(self._task_vector_fn(task), dtype=np.float64)
        if vec.ndim != 1:
            raise ValueError(f"TaskWrapper: task_vector_fn must return a 1-D array, got shape {vec.shape}")
        return vec

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset; ``options={"task": {...}}`` installs a task first (consumed, not forwarded)."""
        if options and "task" in options:
            self.set_task(options["task"])
            options = {k: v for k, v in options.items() if k != "task"} or None
        obs, info = self.env.reset(seed=seed, options=options)
        if self._task is not None:
            info = {**info, "task": self.get_task()}
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self._task is not None:
            info = {**info, "task": self.get_task()}
        return obs, reward, terminated, truncated, info
