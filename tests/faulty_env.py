"""Envs that misbehave on purpose, for tests/test_faults.py (imported in the trainer's worker
processes through Gymnasium's ``module:id`` form: ``tests.faulty_env:faulty/NanPendulum-v0``).

Both are Pendulum-v1 with a gravity task; from the third step on, one returns a NaN observation
and the other an observation of the wrong shape."""
import gymnasium as gym
import numpy as np

from metarl.envs import TaskWrapper


class _Break(gym.Wrapper):
    def __init__(self, env, how):
        super().__init__(env)
        self.how, self.t = how, 0

    def reset(self, **kw):
        self.t = 0
        return self.env.reset(**kw)

    def step(self, action):
        obs, r, te, tr, info = self.env.step(action)
        self.t += 1
        if self.t >= 3:
            obs = np.full_like(obs, np.nan) if self.how == "nan" else np.zeros(obs.shape[0] + 1)
        return obs, r, te, tr, info


def _sample(n, rng):
    return [{"g": float(g)} for g in rng.uniform(5.0, 15.0, size=n)]


def _set(env, task):
    env.unwrapped.g = task["g"]


def make(how, **kwargs):
    return TaskWrapper(_Break(gym.make("Pendulum-v1", **kwargs), how), _sample, _set)


for _how, _id in (("nan", "faulty/NanPendulum-v0"), ("shape", "faulty/ShapePendulum-v0")):
    if _id not in gym.registry:
        gym.register(_id, entry_point=make, kwargs={"how": _how})
