"""Task-distribution environments for meta-RL (Gymnasium 1.x, official ``mujoco`` bindings).

Importing this package registers with Gymnasium:

=============================  ======================================  =======
id                             task                                    horizon
=============================  ======================================  =======
``metarl/Navigation2D-v0``     goal ~ U[-0.5, 0.5]^2                    100
``metarl/HalfCheetahVel-v0``   target velocity ~ U[0, 2]                200
``metarl/HalfCheetahDir-v0``   direction +-1                            200
``metarl/AntVel-v0``           target velocity ~ U[0, 3]                200
``metarl/AntDir-v0``           direction +-1 along x                    200
``metarl/AntGoal-v0``          goal uniform in the disk of radius 3     200
``metarl/MetaWorldML1-v0``     one Meta-World task (``env_name``),      500
                               50 train / 50 test goals
``metarl/MetaWorldML10-v0``    Meta-World ML10: 10 train, 5 test        500
                               classes
``metarl/MetaWorldML45-v0``    Meta-World ML45: 45 train, 5 test        500
                               classes
=============================  ======================================  =======

The Meta-World ids exist when the ``metaworld`` extra is installed (``pip install -e
'.[metaworld]'``; :mod:`metarl.envs.metaworld`); their ``sample_tasks`` takes ``split="train"``
or ``"test"`` (:func:`sample_split`).

Every env is a :class:`TaskEnv` (``sample_tasks(n, rng)``, ``set_task``,
``get_task``, ``task_vector``); after ``gymnasium.make`` reach it through
``env.unwrapped``.  Any other Gymnasium env becomes one with
:class:`TaskWrapper`.  The MuJoCo envs also expose pure vectorised
``batch_observation``/``batch_reward``/``batch_terminated`` for batched
samplers (:mod:`metarl.envs.locomotion`).  The MuJoCo env classes are
imported lazily (``from metarl.envs import AntGoalEnv`` works) so that
importing the package does not load MuJoCo.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import TaskEnv, flatten_task, hybridmethod, sample_split
from .checker import TaskEnvError, check_task_env, find_task_env
from .navigation import Navigation2DEnv
from .registration import TASK_ENV_IDS, make_task_env, register_task_envs
from .wrapper import TaskWrapper

__all__ = [
    "TaskEnv",
    "TaskWrapper",
    "TaskEnvError",
    "TASK_ENV_IDS",
    "make_task_env",
    "check_task_env",
    "find_task_env",
    "flatten_task",
    "hybridmethod",
    "sample_split",
    "register_task_envs",
    "Navigation2DEnv",
    "HalfCheetahVelEnv",
    "HalfCheetahDirEnv",
    "AntVelEnv",
    "AntDirEnv",
    "AntGoalEnv",
    "MetaWorldML1Env",
    "MetaWorldML10Env",
    "MetaWorldML45Env",
]

_LAZY = {
    "HalfCheetahVelEnv": "half_cheetah",
    "HalfCheetahDirEnv": "half_cheetah",
    "AntVelEnv": "ant",
    "AntDirEnv": "ant",
    "AntGoalEnv": "ant",
    "MetaWorldML1Env": "metaworld",
    "MetaWorldML10Env": "metaworld",
    "MetaWorldML45Env": "metaworld",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register_task_envs()
