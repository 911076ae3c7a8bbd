"""Your own task distribution in metarl: Pendulum with a random gravity per task.

Any Gymnasium env becomes a task env with ``TaskWrapper`` plus two functions; registering a
factory under an id lets ``metarl train`` (and its worker processes) build it. Point a config at
it with ``env.id: "examples.pendulum_gravity:user/PendulumGravity-v0"`` — the part before the
colon is the module to import (Gymnasium's ``module:id`` convention), see
``experiments/pendulum_gravity.yaml``.
"""
import gymnasium as gym

from metarl.envs import TaskWrapper


def sample_gravity(n, rng):
    """n tasks drawn with the caller's NumPy Generator; tasks are plain JSON-able dicts."""
    return [{"g": float(g)} for g in rng.uniform(5.0, 15.0, size=n)]


def set_gravity(env, task):
    env.unwrapped.g = task["g"]


def make_pendulum_gravity(**kwargs):
    return TaskWrapper(gym.make("Pendulum-v1", **kwargs), sample_gravity, set_gravity)


if "user/PendulumGravity-v0" not in gym.registry:
    gym.register("user/PendulumGravity-v0", entry_point=make_pendulum_gravity)
