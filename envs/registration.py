"""Gymnasium registration of the metarl task envs and :func:`make_task_env`.

Importing :mod:`metarl.envs` registers every id in :data:`TASK_ENV_IDS`, so
``gymnasium.make("metarl/HalfCheetahVel-v0")`` works.  Entry points are
strings, so MuJoCo is only imported when a MuJoCo env is actually built.
``max_episode_steps`` mirrors each env's default ``horizon`` (the envs also
truncate internally, so ``env.unwrapped.horizon`` is the episode length even
without Gymnasium's ``TimeLimit``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from typing import Any

import gymnasium as gym

__all__ = ["TASK_ENV_IDS", "register_task_envs", "make_task_env", "check_env_kwargs", "missing_extra"]

_NAMESPACE = "metarl"

#: id -> (entry point, max_episode_steps)
_SPECS: dict[str, tuple[str, int]] = {
    "metarl/Navigation2D-v0": ("metarl.envs.navigation:Navigation2DEnv", 100),
    "metarl/HalfCheetahVel-v0": ("metarl.envs.half_cheetah:HalfCheetahVelEnv", 200),
    "metarl/HalfCheetahDir-v0": ("metarl.envs.half_cheetah:HalfCheetahDirEnv", 200),
    "metarl/AntVel-v0": ("metarl.envs.ant:AntVelEnv", 200),
    "metarl/AntDir-v0": ("metarl.envs.ant:AntDirEnv", 200),
    "metarl/AntGoal-v0": ("metarl.envs.ant:AntGoalEnv", 200),
}

#: Envs of an optional extra: id -> (entry point, max_episode_steps, module, extra). Registered only
#: when the module can be found; otherwise asking for one names the ``pip install``.
_EXTRA_SPECS: dict[str, tuple[str, int, str, str]] = {
    "metarl/MetaWorldML1-v0": ("metarl.envs.metaworld:MetaWorldML1Env", 500, "metaworld", "metaworld"),
    "metarl/MetaWorldML10-v0": ("metarl.envs.metaworld:MetaWorldML10Env", 500, "metaworld", "metaworld"),
    "metarl/MetaWorldML45-v0": ("metarl.envs.metaworld:MetaWorldML45Env", 500, "metaworld", "metaworld"),
}


def _extra_installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None  # finds it without importing it
    except (ImportError, ValueError):
        return False


for _id, (_entry, _steps, _module, _extra) in _EXTRA_SPECS.items():
    if _extra_installed(_module):
        _SPECS[_id] = (_entry, _steps)

TASK_ENV_IDS: tuple[str, ...] = tuple(_SPECS)


def missing_extra(env_id: str) -> str | None:
    """One line naming the ``pip install`` if ``env_id`` is an env of an extra that is not
    installed (e.g. ``metarl/MetaWorldML1-v0`` without metaworld), else None."""
    bare = env_id if env_id.startswith(_NAMESPACE + "/") else f"{_NAMESPACE}/{env_id}"
    if bare in _EXTRA_SPECS and bare not in _SPECS:
        module, extra = _EXTRA_SPECS[bare][2:]
        return f"{bare} needs the {module} package: pip install -e '.[{extra}]' (or pip install 'torch-metarl[{extra}]')"
    return None


def register_task_envs() -> None:
    """Register the metarl task envs with Gymnasium (idempotent, no override warnings)."""
    for env_id, (entry_point, max_steps) in _SPECS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point, max_episode_steps=max_steps)


def _known_task_ids() -> list[str]:
    return sorted(k for k in gym.registry if k.startswith(_NAMESPACE + "/"))


def _add_working_directory() -> None:
    """Put the directory the user runs from on ``sys.path``, as ``python -m`` does and the
    ``metarl`` console script does not, so ``env.id: "mymodule:user/MyEnv-v0"`` finds
    ``./mymodule.py``. Appended, so a local folder never shadows an installed package. Worker
    processes inherit ``sys.path`` (fork copies it; spawn passes it to the child)."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or ".") == cwd for p in sys.path):
        sys.path.append(cwd)


def import_env_module(env_id: str) -> str:
    """Gymnasium's ``"module:Env-id"`` convention: import ``module`` (which registers the id) and
    return the bare id, so a user's env registered in their own module works in config files and
    in collector worker processes alike."""
    if ":" not in env_id:
        return env_id
    module, _, bare = env_id.partition(":")
    _add_working_directory()
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"cannot import {module!r} for env {env_id!r} ({e}): check the module path and PYTHONPATH") from None
    return bare


#: Keyword arguments ``gymnasium.make`` itself takes (not passed to the env's constructor).
_MAKE_KWARGS = tuple(p for p in inspect.signature(gym.make).parameters if p not in ("id", "kwargs"))


def check_env_kwargs(env_id: str, kwargs: Any) -> None:
    """Check ``kwargs`` against the constructor of registered ``env_id`` before anything is built:
    a misspelt name (``goal_raduis``) would otherwise surface as a ``TypeError`` traceback from
    ``gymnasium.make`` in the middle of building the trainer. Raises ValueError naming the closest
    valid names. An entry point that takes ``**kwargs`` (e.g. a factory passing them on to
    ``gym.make``) accepts anything; what it rejects still fails when the env is built."""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"must be a mapping of argument names to values, got {kwargs!r}")
    spec = gym.spec(env_id)
    creator = spec.entry_point
    try:
        if isinstance(creator, str):
            creator = gym.envs.registration.load_env_creator(creator)
        params = inspect.signature(creator).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return  # no readable signature: gymnasium.make reports it
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    valid += list(_MAKE_KWARGS)
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
            raise ValueError(f"{env_id} takes no argument {key!r}: {hint}valid: {', '.join(sorted(valid))}")


def make_task_env(env_id: str, **kwargs: Any) -> gym.Env:
    """``gymnasium.make`` for metarl task envs, with a helpful error for unknown ids.

    ``env_id`` may omit the ``metarl/`` namespace (``"AntGoal-v0"``).  Keyword
    arguments go to ``gymnasium.make`` (env constructor arguments such as
    ``task=``, ``horizon=``, ``normalize_actions=``, or make options such as
    ``max_episode_steps=``).  The task interface lives on ``env.unwrapped``.

    Raises:
        ValueError: one line naming the closest known ids, if ``env_id`` is
            unknown, or pointing to :class:`TaskWrapper` if it is a plain env.
    """
    register_task_envs()
    if not isinstance(env_id, str):
        raise ValueError(f"env_id must be a string such as 'metarl/AntVel-v0', got {env_id!r}")
    env_id = import_env_module(env_id)
    known = _known_task_ids()
    if env_id not in gym.registry and f"{_NAMESPACE}/{env_id}" in gym.registry:
        env_id = f"{_NAMESPACE}/{env_id}"
    if env_id not in gym.registry:
        if missing_extra(env_id):
            raise ValueError(missing_extra(env_id))
        short = {k.split("/", 1)[1]: k for k in known}
        close = difflib.get_close_matches(env_id, known, n=3, cutoff=0.4)
        close += [short[s] for s in difflib.get_close_matches(env_id, list(short), n=3, cutoff=0.4)]
        close = list(dict.fromkeys(close))[:3]
        hint = f"did you mean {', '.join(close)}?" if close else f"known ids: {', '.join(known)}"
        raise ValueError(f"unknown task env id {env_id!r}; {hint}")
    env = gym.make(env_id, **kwargs)
    from .checker import find_task_env

    if find_task_env(env) is None:
        env.close()
        raise ValueError(
            f"{env_id!r} is not a task env; build it with gym.make and wrap it: "
            f"TaskWrapper(env, sample_tasks_fn, set_task_fn)"
        )
    return env
