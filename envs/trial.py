"""RL²'s trial as one Gymnasium episode (Duan et al. 2016, sec. 2.2 and Figure 1).

A *trial* is K consecutive episodes of one task (an MDP drawn from the task distribution). The
recurrent policy's hidden state must carry across those K episodes and be reset only between
trials; an off-the-shelf recurrent PPO (sb3-contrib's ``RecurrentPPO``) resets its state at every
Gymnasium episode start, so :class:`TrialEnv` makes one trial one Gymnasium episode:

- ``reset`` draws a task from the wrapped :class:`~metarl.envs.TaskEnv`'s own distribution
  (``sample_tasks(1, rng)`` with the wrapper's own generator, seeded by ``reset(seed=...)``), or installs
  ``options={"task": ...}`` (fixed evaluation tasks), and starts the first inner episode;
- when an inner episode ends (terminated or truncated), the next one starts at once from the
  wrapped env's ``reset`` (same task); after the K-th the trial ``terminated`` (the trial's
  return is the sum over its episodes: nothing is bootstrapped past it);
- the observation is ``[obs, previous action, previous reward, done]`` (sec. 2.2: the policy
  sees (s_{t+1}, a_t, r_t, d_t)); ``done`` is 1 on the first observation of every inner episode
  after the first (the previous step ended an episode), zeros of action and reward at the trial's
  start.

``info`` carries ``episode_index`` (which inner episode the step belonged to, 0-based),
``inner_done``, ``task`` (at reset) and, on the trial's last step, ``trial_episode_returns``, from which :mod:`metarl.algorithms.rl2` builds the per-episode
adaptation curve.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .checker import find_task_env

__all__ = ["TrialEnv"]


class TrialEnv(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """K episodes of one task as one episode (see the module docstring).

    Args:
        env: a task-distribution env (its TaskEnv is found down the wrapper chain) with a Box
            observation and a Box action space.
        episodes_per_trial: K, the inner episodes per trial (>= 1).
    """

    def __init__(self, env: gym.Env, episodes_per_trial: int):
        gym.utils.RecordConstructorArgs.__init__(self, episodes_per_trial=episodes_per_trial)  # env.spec can rebuild it
        gym.Wrapper.__init__(self, env)
        if isinstance(episodes_per_trial, bool) or not isinstance(episodes_per_trial, (int, np.integer)) or episodes_per_trial < 1:
            raise ValueError(f"TrialEnv: episodes_per_trial must be an int >= 1, got {episodes_per_trial!r}")
        task_env = find_task_env(env)
        if task_env is None:
            raise TypeError(f"TrialEnv wraps a TaskEnv (sample_tasks/set_task); {type(env.unwrapped).__name__} is not one: "
                            f"wrap it in metarl.envs.TaskWrapper first")
        obs_space, act_space = env.observation_space, env.action_space
        if not isinstance(obs_space, spaces.Box) or not isinstance(act_space, spaces.Box):
            raise TypeError(f"TrialEnv needs Box observation and action spaces, got {obs_space} and {act_space}")
        self.task_env, self.episodes_per_trial = task_env, int(episodes_per_trial)
        self._obs_dim, self._act_dim = int(np.prod(obs_space.shape)), int(np.prod(act_space.shape))
        low = np.concatenate([obs_space.low.reshape(-1), act_space.low.reshape(-1), [-np.inf, 0.0]]).astype(np.float32)
        high = np.concatenate([obs_space.high.reshape(-1), act_space.high.reshape(-1), [np.inf, 1.0]]).astype(np.float32)
        self.observation_space = spaces.Box(low=low, high=high, dtype=np.float32)
        self._episode = 0
        self._rng: Optional[np.random.Generator] = None

    def _augment(self, obs, action, reward: float, done: bool) -> np.ndarray:
        return np.concatenate([np.asarray(obs, dtype=np.float32).reshape(-1), np.asarray(action, dtype=np.float32).reshape(-1),
                               np.float32([reward, float(done)])])

    def reset(self, *, seed: Optional[int] = None, options: Optional[Mapping[str, Any]] = None):
        """A new trial: a task from ``options["task"]`` or drawn from the distribution."""
        if seed is not None or self._rng is None:
            self._rng = np.random.default_rng(seed)  # draws the trials' tasks
        task = dict(options["task"]) if options and "task" in options else self.task_env.sample_tasks(1, self._rng)[0]
        self.task_env.set_task(task)
        inner_seed = None if seed is None else int(self._rng.integers(2**31 - 1))
        obs, info = self.env.reset(seed=inner_seed)
        self._episode, self._returns = 0, [0.0]
        return self._augment(obs, np.zeros(self._act_dim), 0.0, False), {**info, "task": task, "episode_index": 0}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        inner_done = bool(terminated or truncated)
        info = {**info, "episode_index": self._episode, "inner_done": inner_done}
        self._returns[-1] += float(reward)
        trial_over = False
        if inner_done:
            self._episode += 1
            trial_over = self._episode >= self.episodes_per_trial
            if trial_over:
                info["trial_episode_returns"] = list(self._returns)
            else:
                self._returns.append(0.0)
                obs, _ = self.env.reset()  # the next episode of the same task; its state carries over in the policy
        shown = np.clip(np.asarray(action, dtype=np.float32).reshape(-1), self.action_space.low.reshape(-1),
                        self.action_space.high.reshape(-1))  # what the env applied (SB3 clips too)
        return self._augment(obs, shown, float(reward), inner_done), float(reward), trial_over, False, info
