"""Fast path: step many copies of a built-in MuJoCo task env at once, in C, on a thread pool.

The generic path steps one Gymnasium env per episode in Python (``env.step`` per env per step);
for MuJoCo locomotion that is dominated by Python overhead around a ~40 µs ``mj_step``. The
built-in MuJoCo task envs (:mod:`metarl.envs.locomotion`) instead declare pure, vectorised
``batch_observation`` / ``batch_reward`` / ``batch_terminated`` functions of ``qpos``/``qvel``
and implement their own ``step`` with them, so the physics can be advanced elsewhere and the
rest recomputed for all episodes in one numpy call.

Why ``mujoco.batch.Batch`` and not ``mujoco.rollout``
----------------------------------------------------
``mujoco.rollout`` takes and returns ``mjSTATE_FULLPHYSICS`` states, which do not contain
``qacc_warmstart`` (the constraint solver's starting point); each call starts from a zero
warm-start unless one is passed in, and the call never returns the warm-start it ends with.
A Gymnasium env keeps its warm-start from one ``step`` to the next, so with one ``rollout`` call
per env step (the only option for a closed-loop policy) the solver starts from a different point,
converges to a value differing in the last bits, and HalfCheetah's contact dynamics amplify that:
measured here, 2e-12 after 5 steps, 3e-10 after 20 and O(1) after 100 steps. ``mujoco.batch.Batch``
(MuJoCo >= 4.0) stores each simulation as its full ``mjSTATE_INTEGRATION`` row (warm-start
included) and its results are bit-identical to stepping one ``MjData`` per simulation at any
thread count, so this path reproduces ``env.step`` *exactly*. Without ``mujoco.batch`` (MuJoCo
3.x, e.g. the 3.3.0 the ``metaworld`` extra pins) the fast path declares itself unsupported, says
so once per process (:func:`say_generic_path_once`) and the collector uses the (exact) generic path.

Guarantees (checked by ``tests/test_rollouts.py`` and by :func:`self_check` at collector start)
-----------------------------------------------------------------------------------------------
* Reset: each episode's start state is the env's own ``reset(seed=s)`` state, copied from a real
  env with ``mj_getState(..., mjSTATE_INTEGRATION)`` -- same noise scale, same draws, bit for bit,
  for the same per-episode seed ``s`` (the collector derives the same seeds for both paths).
* Step: given the same actions (as passed to ``env.step``), observations, rewards, termination
  flags and the numeric ``info`` entries are bit-identical to ``env.step``; truncation happens at
  the env's ``horizon`` (or the ``TimeLimit``, whichever is shorter), as in ``step``.
* Hence, for the same seed, a collection on the fast path equals one on the generic path exactly.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence

import mujoco as _mujoco
import numpy as np

__all__ = ["fast_path_unsupported", "MujocoBatchStepper", "self_check", "say_generic_path_once"]


def _load_batch():
    """``mujoco.batch`` if the installed MuJoCo has it (>= 4.0), else None. The version is checked
    first: MuJoCo's package extends its ``__path__`` over every ``site-packages`` it is found in,
    so a 3.x install layered over a 4.x one (a venv on top of another, as ``.venv-mw``) would
    otherwise import 4.x's ``batch.py`` against 3.x's compiled enums and fail on import."""
    try:
        major = int(str(_mujoco.__version__).split(".")[0])
    except ValueError:  # pragma: no cover - an unparsable version: let the import decide
        major = 4
    if major < 4:
        return None
    try:
        from mujoco import batch
    except (ImportError, AttributeError):  # pragma: no cover - depends on the installed MuJoCo
        return None
    return batch


_mj_batch = _load_batch()
_said_generic = False


def say_generic_path_once(env_name: str) -> None:
    """The one notice (a RuntimeWarning, once per process) that an env which declares the fast path
    runs on the generic one because this MuJoCo has no ``mujoco.batch`` (e.g. the 3.3.0 that the
    ``metaworld`` extra pins). The results are the same (the generic path is the exact reference);
    only collection is slower."""
    global _said_generic
    if not _said_generic:
        _said_generic = True
        warnings.warn(f"{env_name}: MuJoCo {_mujoco.__version__} has no mujoco.batch (needs >= 4.0): the MuJoCo fast "
                      f"path is off and every env steps on the generic path (same results, slower)", RuntimeWarning,
                      stacklevel=3)

# Wrappers gymnasium.make adds that change neither observations, rewards nor dynamics.
_BENIGN_WRAPPERS = ("TimeLimit", "OrderEnforcing", "PassiveEnvChecker")
_REQUIRED = ("batch_observation", "batch_reward", "batch_terminated", "task_vector", "set_task")


def _wrapper_chain(env) -> list:
    chain = [env]
    while hasattr(chain[-1], "env") and chain[-1] is not getattr(chain[-1], "unwrapped", chain[-1]):
        chain.append(chain[-1].env)
    return chain


def time_limit(env) -> Optional[int]:
    """``max_episode_steps`` of a ``TimeLimit`` wrapper in ``env``'s chain, if any."""
    for w in _wrapper_chain(env):
        steps = getattr(w, "_max_episode_steps", None)
        if steps is not None:
            return int(steps)
    return None


def fast_path_unsupported(env) -> Optional[str]:
    """Why ``env`` cannot take the fast path (a short reason), or None if it can.

    An env *declares* support by being a ``gymnasium`` ``MujocoEnv`` that defines the pure
    ``batch_observation``/``batch_reward``/``batch_terminated`` functions (the contract of
    :mod:`metarl.envs.locomotion`). Any wrapper other than those ``gymnasium.make`` adds could
    change observations or rewards behind those functions' back, so it disables the fast path."""
    for w in _wrapper_chain(env)[:-1]:
        if type(w).__name__ not in _BENIGN_WRAPPERS:
            return f"wrapper {type(w).__name__} may change observations or rewards"
    base = env.unwrapped
    try:
        from gymnasium.envs.mujoco.mujoco_env import MujocoEnv
    except ImportError:  # pragma: no cover
        return "gymnasium's MuJoCo envs are not importable"
    if not isinstance(base, MujocoEnv):
        return f"{type(base).__name__} is not a gymnasium MujocoEnv"
    missing = [name for name in _REQUIRED if not callable(getattr(base, name, None))]
    if missing:
        return f"{type(base).__name__} does not define {', '.join(missing)}"
    if getattr(base, "render_mode", None) is not None:
        return "rendering is on (render_mode is not None)"
    if not isinstance(getattr(base, "horizon", None), (int, np.integer)):
        return f"{type(base).__name__} has no integer horizon"
    if _mj_batch is None:  # checked last: the env qualifies, only this MuJoCo lacks the batch stepper
        say_generic_path_once(getattr(env.spec, "id", None) or type(base).__name__)
        return f"mujoco.batch is not available in MuJoCo {_mujoco.__version__} (needs >= 4.0)"
    return None


class MujocoBatchStepper:
    """N simulations of ``env``'s model stepped together; computes what ``env.step`` returns.

    ``env`` (built with ``gymnasium.make``) is used as a template: its model is copied into the
    batch, its ``reset`` produces the start states, its ``batch_*`` functions (bound to the
    instance, so constructor options are honoured) compute observations, rewards and termination.
    ``nthread`` threads step the simulations; results do not depend on it.
    """

    def __init__(self, env, nthread: int = 1, env_name: Optional[str] = None):
        reason = fast_path_unsupported(env)
        if reason is not None:
            raise ValueError(f"{env_name or type(env.unwrapped).__name__} cannot use the MuJoCo fast path: {reason}; "
                             f"use the generic path (Collector(..., fast_path=False))")
        import mujoco

        self._mujoco = mujoco
        self.env = env
        self.base = env.unwrapped
        self.env_name = env_name or type(self.base).__name__
        self.nthread = max(1, int(nthread))
        limit = time_limit(env)
        self.horizon = int(self.base.horizon) if limit is None else min(int(self.base.horizon), limit)
        self.frame_skip = int(self.base.frame_skip)
        self.dt = float(self.base.dt)
        self._spec = mujoco.mjtState.mjSTATE_INTEGRATION
        self._nstate = mujoco.mj_stateSize(self.base.model, self._spec)
        self._batch = None
        self._nsim = 0

    # -------------------------------------------------------------- helpers
    def _ensure_batch(self, n: int) -> None:
        if self._batch is not None and self._nsim == n:
            return
        b = _mj_batch.Batch(self.base.model, nsim=n, nthread=self.nthread)
        if b.nstate != self._nstate:
            raise RuntimeError(f"{self.env_name}: mujoco.batch rows hold {b.nstate} numbers, mjSTATE_INTEGRATION has "
                               f"{self._nstate}; use the generic path (Collector(..., fast_path=False))")
        self._batch, self._nsim = b, n
        self._qpos, self._qvel, self._ctrl = b.bind("qpos"), b.bind("qvel"), b.bind("ctrl")

    @property
    def info_keys(self) -> tuple[str, ...]:
        """Numeric ``info`` keys this stepper reproduces (those of ``LocomotionTaskEnv.step``)."""
        q = np.zeros((1, self.base.model.nq))
        v = np.zeros((1, self.base.model.nv))
        a = np.zeros((1, self.base.model.nu))
        tv = np.asarray(self.base.task_vector(self.base.get_task()), dtype=np.float64)[None]
        _, terms = self.base.batch_reward(q, q, a, tv, self.dt)
        return tuple(terms) + self._position_keys()

    def _position_keys(self) -> tuple[str, ...]:
        # LocomotionTaskEnv.step reports x (and y for planar-xy bodies such as Ant) positions.
        return ("x_position",) if getattr(self.base, "obs_skip_qpos", 1) == 1 else ("x_position", "y_position")

    # ------------------------------------------------------------ interface
    def reset(self, tasks: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> np.ndarray:
        """Start one episode per (task, seed): returns the first observations ``[N, obs_dim]``.

        Each start state is what ``env.reset(seed=seed)`` produces for that task, copied with
        ``mj_getState(mjSTATE_INTEGRATION)`` (positions, velocities, warm-start, controls...)."""
        n = len(tasks)
        if len(seeds) != n:
            raise ValueError(f"reset needs one seed per task slot, got {len(seeds)} seeds for {n} slots")
        self._ensure_batch(n)
        state = self._batch.state
        task_vectors = []
        mj, base = self._mujoco, self.base
        for k, (task, seed) in enumerate(zip(tasks, seeds)):
            base.set_task(task)
            base.reset(seed=int(seed))
            mj.mj_getState(base.model, base.data, state[k], self._spec)
            task_vectors.append(np.asarray(base.task_vector(task), dtype=np.float64))
        self._task_vectors = np.stack(task_vectors) if n else np.zeros((0, 0))
        self._steps = np.zeros(n, dtype=np.int64)
        return base.batch_observation(self._qpos, self._qvel)

    def step(self, actions: np.ndarray, active: np.ndarray):
        """Advance the ``active`` simulations by one env step (``frame_skip`` physics steps).

        ``actions [N, nu]`` are the actions as ``env.step`` would receive them (already clipped
        to the action space by the collector). Returns ``(obs [N, d], reward [N], terminated [N],
        truncated [N], infos {key: [N]})``; rows of inactive simulations are NaN / False."""
        ids = np.flatnonzero(active)
        n = self._nsim
        act = np.asarray(actions, dtype=np.float64)
        base = self.base
        qpos_before = self._qpos[ids].copy()
        self._ctrl[ids] = act[ids]
        try:
            self._batch.step(ids, nstep=self.frame_skip)
        except Exception as exc:  # mujoco.batch.SimulationError: MuJoCo raised in some simulations
            raise RuntimeError(f"{self.env_name}: MuJoCo failed while stepping: {exc}".replace("\n", " ")) from None
        qpos, qvel = self._qpos[ids], self._qvel[ids]
        obs_a = base.batch_observation(qpos, qvel)
        reward_a, terms = base.batch_reward(qpos_before, qpos, act[ids], self._task_vectors[ids], self.dt)
        term_a = np.asarray(base.batch_terminated(qpos, qvel), dtype=bool)
        self._steps[ids] += 1

        obs = np.full((n, obs_a.shape[1]), np.nan)
        obs[ids] = obs_a
        reward = np.full(n, np.nan)
        reward[ids] = reward_a
        terminated = np.zeros(n, dtype=bool)
        terminated[ids] = term_a
        truncated = np.zeros(n, dtype=bool)
        truncated[ids] = self._steps[ids] >= self.horizon
        infos: dict[str, np.ndarray] = {}
        values = dict(terms)
        values["x_position"] = qpos[:, 0]
        if "y_position" in self._position_keys():
            values["y_position"] = qpos[:, 1]
        for key, value in values.items():
            full = np.full(n, np.nan)
            full[ids] = value
            infos[key] = full
        return obs, reward, terminated, truncated, infos

    def close(self) -> None:
        """Release the batch (its thread pool and rows)."""
        self._batch = None
        self._nsim = 0


def self_check(env, task: Mapping[str, Any], seed: int = 0, n_steps: int = 5) -> Optional[str]:
    """Step ``env`` and a one-simulation :class:`MujocoBatchStepper` side by side with the same
    random actions; return a description of the first difference, or None if they agree exactly.

    The collector runs this once when it picks the fast path, so an env whose ``step`` and
    ``batch_*`` functions drift apart falls back to the generic path instead of silently
    producing different data. It resets ``env`` (the collector's private probe env)."""
    rng = np.random.default_rng(seed)
    space = env.action_space
    actions = [np.clip(rng.uniform(-1.5, 1.5, size=space.shape), space.low, space.high).astype(space.dtype)
               for _ in range(n_steps)]
    env.unwrapped.set_task(task)
    obs0, _ = env.reset(seed=seed)
    ref = []
    for a in actions:
        ref.append(env.step(a))
    stepper = MujocoBatchStepper(env, nthread=1)
    fast0 = stepper.reset([task], [seed])
    if not np.array_equal(np.asarray(obs0, dtype=np.float64), fast0[0]):
        return "reset observations differ"
    active = np.ones(1, dtype=bool)
    for t, (a, (o, r, te, tr, info)) in enumerate(zip(actions, ref)):
        fo, fr, fte, ftr, finfo = stepper.step(a[None], active)
        if not np.array_equal(np.asarray(o, dtype=np.float64), fo[0]):
            return f"observations differ at step {t}"
        if float(r) != float(fr[0]):
            return f"rewards differ at step {t}"
        if bool(te) != bool(fte[0]):
            return f"terminated differs at step {t}"
        for key, value in finfo.items():
            if key in info and float(info[key]) != float(value[0]):
                return f"info[{key!r}] differs at step {t}"
        if te or tr:
            break
    stepper.close()
    return None
