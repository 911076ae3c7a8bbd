"""``check_task_env``: a fast sanity check of the TaskEnv contract.

Gymnasium's ``check_env`` validates the Gymnasium API; this validates what the
meta-learning code relies on in addition, and fails with a readable one-line
error naming the fix.  Run it once on any custom env (e.g. a
:class:`~metarl.envs.wrapper.TaskWrapper`) before training.
"""

from __future__ import annotations

import json
from typing import Any

import gymnasium as gym
import numpy as np

from .base import TaskEnv

__all__ = ["TaskEnvError", "find_task_env", "check_task_env", "episode_length"]


class TaskEnvError(ValueError):
    """Raised by :func:`check_task_env`; the message is a single line ending with the fix."""


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def find_task_env(env: Any) -> TaskEnv | None:
    """Return the first :class:`TaskEnv` in ``env``'s wrapper chain (outermost first), else ``None``.

    ``gymnasium.make`` wraps the env (``TimeLimit``, ``OrderEnforcing``...) and
    Gymnasium 1.x wrappers no longer forward attributes, so the task methods of
    a made env live on ``env.unwrapped``; a :class:`TaskWrapper` may sit
    anywhere in the chain.
    """
    seen: set[int] = set()
    current = env
    while current is not None and id(current) not in seen:
        if isinstance(current, TaskEnv):
            return current
        seen.add(id(current))
        current = getattr(current, "env", None)
    unwrapped = getattr(env, "unwrapped", None)
    return unwrapped if isinstance(unwrapped, TaskEnv) else None


def episode_length(env: Any) -> int | None:
    """The episode cap ``env`` declares, or None: a ``TimeLimit`` in its wrapper chain (what
    ``gymnasium.register(..., max_episode_steps=N)`` adds), or an attribute of the raw env that
    libraries use for it, ``horizon`` (metarl's envs, rllab) or ``max_path_length`` (Meta-World,
    garage); the smallest if several are set. The collector needs one to size its buffers."""
    candidates, seen, node = [], set(), env
    while node is not None and id(node) not in seen and not candidates:  # the outermost TimeLimit
        seen.add(id(node))
        if getattr(node, "_max_episode_steps", None) is not None:
            candidates.append(node._max_episode_steps)
        node = getattr(node, "env", None)
    unwrapped = getattr(env, "unwrapped", env)
    candidates += [getattr(unwrapped, name, None) for name in ("horizon", "max_path_length")]
    ints = [int(c) for c in candidates if isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c > 0]
    return min(ints) if ints else None


def _task_json(task: Any) -> str:
    return json.dumps(task, sort_keys=True)


def check_task_env(env: gym.Env, n: int = 4, seed: int = 0) -> None:
    """Validate the task interface of ``env``; raise :class:`TaskEnvError` on the first problem.

    Checks that: ``env`` (or a layer of it) is a :class:`TaskEnv`;
    ``sample_tasks(n, rng)`` returns a list of ``n`` JSON-serialisable dicts and
    is reproducible from ``rng``; ``set_task``/``get_task`` round-trip;
    ``task_vector`` is a finite 1-D float vector of constant length
    (``task_dim`` if declared); the spaces are flat Boxes and the env declares an episode
    length (what the collector needs); ``reset`` right after ``set_task`` and one ``step`` return observations
    of the declared shape with finite values, and a finite scalar reward; and the same task and
    reset seed give the same start and first step after another episode (envs are reused).
    The env's current task (if any) is restored afterwards; the env is left
    mid-episode, so ``reset`` it before use.
    """
    task_env = find_task_env(env)
    if task_env is None:
        raise TaskEnvError(
            f"{type(env).__name__} is not a TaskEnv; wrap it: TaskWrapper(env, sample_tasks_fn, set_task_fn)"
        )
    name = type(task_env).__name__
    try:
        original = task_env.get_task()
    except Exception:  # noqa: BLE001 - e.g. a TaskWrapper with no task yet
        original = None
    _check(env, task_env, name, n, seed)
    if original is not None:
        task_env.set_task(original)


def _check(env: gym.Env, task_env: TaskEnv, name: str, n: int, seed: int) -> None:
    # --- sampling ----------------------------------------------------------
    try:
        tasks = task_env.sample_tasks(n, np.random.default_rng(seed))
    except Exception as err:  # noqa: BLE001 - re-raised as a readable one-liner
        raise TaskEnvError(f"{name}.sample_tasks({n}, rng) raised {_one_line(err)}") from err
    if not isinstance(tasks, list):
        raise TaskEnvError(
            f"{name}.sample_tasks must return a list, got {type(tasks).__name__}; return list(tasks)"
        )
    if len(tasks) != n:
        raise TaskEnvError(f"{name}.sample_tasks({n}, rng) returned {len(tasks)} tasks; return exactly n tasks")
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise TaskEnvError(
                f"{name}.sample_tasks returned a {type(task).__name__} at index {i}; tasks must be dicts"
            )
        try:
            _task_json(task)
        except (TypeError, ValueError) as err:
            raise TaskEnvError(
                f"{name} task {i} is not JSON-serialisable ({_one_line(err)}); use python floats/lists, "
                f"e.g. float(x) or arr.tolist()"
            ) from err
    again = task_env.sample_tasks(n, np.random.default_rng(seed))
    if [_task_json(t) for t in again] != [_task_json(t) for t in tasks]:
        raise TaskEnvError(
            f"{name}.sample_tasks is not reproducible from its rng argument; draw all randomness from rng"
        )

    # --- set/get round trip and task vectors ---------------------------------
    dims = set()
    for i, task in enumerate(tasks):
        try:
            task_env.set_task(task)
            got = task_env.get_task()
        except Exception as err:  # noqa: BLE001
            raise TaskEnvError(f"{name}.set_task/get_task failed on task {i} with {_one_line(err)}") from err
        if not isinstance(got, dict) or _task_json(got) != _task_json(task):
            raise TaskEnvError(
                f"{name}.get_task() returned {got!r} after set_task({task!r}); "
                f"get_task must return the task just set"
            )
        try:
            vec = np.asarray(task_env.task_vector(task), dtype=np.float64)
        except Exception as err:  # noqa: BLE001
            raise TaskEnvError(f"{name}.task_vector failed on task {i} with {_one_line(err)}") from err
        if vec.ndim != 1 or not np.all(np.isfinite(vec)):
            raise TaskEnvError(
                f"{name}.task_vector must return a finite 1-D array, got shape {vec.shape} values {vec.tolist()}"
            )
        dims.add(vec.shape[0])
    declared = getattr(task_env, "task_dim", None)
    if len(dims) > 1:
        raise TaskEnvError(f"{name}.task_vector lengths differ across tasks {sorted(dims)}; use a fixed layout")
    if declared is not None and dims and dims != {declared}:
        raise TaskEnvError(f"{name}.task_vector has length {dims.pop()} but task_dim={declared}; make them agree")

    # --- what the collector needs ---------------------------------------------
    # (it builds a fresh env, sets a sampled task, resets, and sizes its buffers by the episode cap)
    if not isinstance(env.action_space, gym.spaces.Box) or len(env.action_space.shape) != 1:
        raise TaskEnvError(f"{name} has action space {env.action_space}; metarl's policies need a flat Box "
                           f"(continuous) action space")
    if not isinstance(env.observation_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
        raise TaskEnvError(f"{name} has observation space {env.observation_space}; metarl needs a flat Box: wrap "
                           f"the env with gymnasium.wrappers.FlattenObservation")
    if episode_length(env) is None:
        raise TaskEnvError(f"{name} declares no episode length (no TimeLimit, horizon or max_path_length): "
                           f"gymnasium.register(..., max_episode_steps=N) or wrap it in gymnasium.wrappers.TimeLimit")

    # --- one reset and one step ---------------------------------------------
    space = env.observation_space
    obs, _ = env.reset(seed=seed)
    _check_obs(obs, space, name, "reset")
    env.action_space.seed(seed)
    obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
    _check_obs(obs, space, name, "step")
    if not np.isscalar(reward) or not np.isfinite(float(reward)):
        raise TaskEnvError(f"{name}.step returned reward {reward!r}; return a finite python float")
    if not isinstance(terminated, (bool, np.bool_)) or not isinstance(truncated, (bool, np.bool_)):
        raise TaskEnvError(f"{name}.step must return bool terminated/truncated, got {terminated!r}/{truncated!r}")
    _check_reset_determines_episode(env, task_env, name, tasks, seed)


def _first_step(env: gym.Env, task_env: TaskEnv, task: dict, seed: int, action: np.ndarray) -> tuple:
    task_env.set_task(task)
    obs, _ = env.reset(seed=seed)
    nxt, reward, *_ = env.step(action)
    return np.asarray(obs, dtype=np.float64), np.asarray(nxt, dtype=np.float64), float(reward)


def _check_reset_determines_episode(env: gym.Env, task_env: TaskEnv, name: str, tasks: list, seed: int) -> None:
    """The collector reuses one env for many episodes (across collections, and in waves with
    ``sampler.max_envs``) and relies on Gymnasium's contract that ``reset(seed=s)``, after
    ``set_task``, fixes the episode: the same (task, seed) and action must give the same start
    and first step after the env ran another task's episode in between."""
    action = np.asarray(env.action_space.sample())
    before = _first_step(env, task_env, tasks[0], seed, action)
    task_env.set_task(tasks[-1])
    env.reset(seed=seed + 1)
    for _ in range(3):
        *_, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            break
    after = _first_step(env, task_env, tasks[0], seed, action)
    for what, a, b in zip(("start observation", "first-step observation", "first-step reward"), before, after):
        if not np.array_equal(a, b):
            raise TaskEnvError(
                f"{name}: the same task and reset(seed={seed}) gave a different {what} after another episode ran; "
                f"the collector reuses envs, so set_task and reset(seed=...) must fix the episode's state "
                f"(draw randomness from self.np_random after super().reset(seed=seed), reset every counter)"
            )


def _check_obs(obs: Any, space: gym.Space, name: str, where: str) -> None:
    if isinstance(space, gym.spaces.Box):
        arr = np.asarray(obs)
        if arr.shape != space.shape:
            raise TaskEnvError(
                f"{name}.{where} returned an observation of shape {arr.shape}, "
                f"observation_space says {space.shape}; make them agree"
            )
        if not np.all(np.isfinite(arr)):
            raise TaskEnvError(f"{name}.{where} returned a non-finite observation {arr.tolist()}")
    elif not space.contains(obs):
        raise TaskEnvError(f"{name}.{where} returned an observation outside observation_space {space}")
