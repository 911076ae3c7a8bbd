"""Collect a meta-batch of episodes: T tasks × B episodes, all stepped in lock-step.

Design contract
---------------
``Collector(env_id, env_kwargs).collect(policy, params, tasks, episodes_per_task, seed=...)``
returns :class:`~metarl.rollouts.episodes.Episodes` with a leading task axis. ``params`` are the
policy's weights, either θ (stacked internally, every task acts with the same policy) or already
stacked per task (leading axis T = ``len(tasks)``, e.g. MAML's adapted φ_i). All T×B episodes
advance together; each time step makes ONE batched policy call over every task
(``policy.forward_tasks(params, obs [T, B, obs_dim])``), which is what makes collecting with T
different adapted policies as cheap as with one. The collector never computes gradients (the
call runs under ``torch.no_grad``) and never adapts: adaptation belongs to the algorithm.

Actions
-------
Actions are sampled with the policy's distribution (``policies.gaussian.sample`` unless the policy
defines ``sample(mean, log_std, generator)`` / ``log_prob(mean, log_std, actions)``) from a
``torch.Generator`` seeded from ``seed``. They are clipped to the action space only on their way
to the env; :attr:`Episodes.actions` holds the unclipped sample, whose log-probability
:attr:`Episodes.log_probs` is the quantity the policy gradient needs (a clipped action has no
density under the Gaussian). Envs that bound their own inputs (MuJoCo clamps ``ctrl``) see the
same clipped values on both paths.

Reproducibility
---------------
The same seed gives identical Episodes, whichever path and however many workers: episode b of
task i is reset with ``env.reset(seed=s_ib)``, ``s_ib`` derived from (seed, i, b) by
``numpy.random.SeedSequence``, and the action noise for all T×B episodes is drawn in one
``randn`` call per step on the main process, whether or not an episode is still running. A
share of the tasks (``shard``: a torchrun rank's, a Ray actor's) gets the same bits as well.

Two paths
---------
* Generic: one Gymnasium env per episode, any :class:`~metarl.envs.base.TaskEnv` (including a
  user's ``TaskWrapper``). With ``n_workers >= 1`` the envs live in worker processes (each owns a
  contiguous block of the T×B episodes and builds its own envs from the env id); the main process
  runs the policy and exchanges one message per worker per step over a pipe. ``n_workers=0`` steps
  the same code in-process: the reference path. ``max_envs=M`` bounds each worker to M envs:
  the slots then run in consecutive waves that reuse them (:func:`waves`), with the same
  Episodes. Every env output is validated (finite
  observation of the right shape, real scalar reward); bad output raises :class:`EnvOutputError`
  naming the env, the episode and the problem.
* Fast (:mod:`metarl.rollouts.mujoco_batch`): the built-in MuJoCo task envs are stepped all at
  once in C on ``max(1, n_workers)`` threads, with observations and rewards from the envs'
  vectorised ``batch_*`` functions; bit-identical to the generic path (checked at start-up).
"""
from __future__ import annotations

import functools
import multiprocessing as mp
import os
import secrets
import signal
import sys
import warnings
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from metarl.envs.checker import episode_length

from ..functional import forward_tasks
from . import mujoco_batch
from .episodes import Episodes, join_tasks

__all__ = ["Collector", "CollectorError", "EnvOutputError", "episode_seeds", "waves"]

EnvSpec = Union[str, Callable[[], Any]]


class EnvOutputError(ValueError):
    """An env returned something a policy cannot consume (NaN observation, wrong shape, a reward
    that is not a real scalar...). The message is one line naming the env, the episode and the fix."""


class CollectorError(RuntimeError):
    """A collector worker process died (killed, out of memory, crashed in C). One line; the
    collection is abandoned and the workers are stopped, so a run ends instead of hanging."""


# ============================================================================ env construction


def _make_env(env: EnvSpec, kwargs: Optional[Mapping[str, Any]]):
    """Build one env. Module-level so a worker started with ``spawn`` can unpickle it."""
    if isinstance(env, str):
        import gymnasium as gym

        from metarl.envs.registration import import_env_module  # importing metarl.envs registers its ids

        return gym.make(import_env_module(env), **dict(kwargs or {}))  # "module:id" imports module here too
    return env(**dict(kwargs or {}))


def _env_name(env: EnvSpec) -> str:
    if isinstance(env, str):
        return env
    return getattr(env, "__qualname__", None) or getattr(env, "__name__", None) or type(env).__name__


def _find_task_env(env):
    """The object in ``env``'s wrapper chain that implements ``set_task`` (a TaskEnv or TaskWrapper).

    ``gymnasium.make`` wraps the env, and Gymnasium 1.x wrappers do not forward attribute access,
    so the task interface is found by walking ``.env`` down to ``.unwrapped``."""
    node = env
    while True:
        if callable(getattr(type(node), "set_task", None)):
            return node
        nxt = getattr(node, "env", None)
        if nxt is None or nxt is node:
            return None
        node = nxt


def ensure_task(task_env) -> None:
    """Give ``task_env`` a task if it has none yet (the first of ``sample_tasks(1, rng(0))``), so
    that it can be reset: a private probe env is reset before the trainer sets any task."""
    try:
        current = task_env.get_task()
    except Exception:  # noqa: BLE001 - e.g. TaskWrapper's "no task set yet"
        current = None
    if current is None:
        task_env.set_task(task_env.sample_tasks(1, np.random.default_rng(0))[0])


def episode_seeds(seed: int, n_tasks: int, episodes_per_task: int, first_task: int = 0) -> np.ndarray:
    """Reset seed of episode b of task i, ``[T, B]`` int64, from ``SeedSequence(seed, spawn_key=(i, b))``,
    for tasks i = first_task .. first_task + n_tasks − 1.

    Depends only on (seed, i, b): changing the number of tasks does not change the start states
    of the others, and different (i, b) get statistically independent seeds."""
    out = np.empty((n_tasks, episodes_per_task), dtype=np.int64)
    for i in range(n_tasks):
        for b in range(episodes_per_task):
            words = np.random.SeedSequence(seed, spawn_key=(first_task + i, b)).generate_state(2, np.uint32)
            out[i, b] = (int(words[0]) << 31) ^ int(words[1])  # 63-bit, non-negative
    return out


def check_request(n_tasks: int, episodes_per_task: int, seed: Optional[int],
                  generator: Optional[torch.Generator] = None) -> int:
    """The seed of a :meth:`Collector.collect` call, after checking its sizes: ``seed`` itself, or
    one drawn from ``generator`` when given, else from the OS (stored in ``Episodes.seed``, so
    the batch can be re-collected)."""
    if n_tasks == 0:
        raise ValueError("collect needs at least one task: pass env.sample_tasks(T, rng)")
    n_eps = episodes_per_task
    if isinstance(n_eps, bool) or not isinstance(n_eps, (int, np.integer)) or n_eps < 1:
        raise ValueError(f"episodes_per_task must be a positive int, got {n_eps!r}")
    if seed is None:
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        else:
            seed = secrets.randbits(62)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _act(policy: nn.Module, stacked: Mapping[str, Tensor], sample: Callable, log_prob: Callable,
         generator: torch.Generator, x: Tensor) -> tuple[Tensor, Tensor]:
    """One time step's actions and their log-probabilities [T, B, ...] for observations x [T, B, obs_dim],
    one batched policy call over every task."""
    mean, log_std = forward_tasks(policy, stacked, x)
    actions = sample(mean, log_std, generator)
    return actions, log_prob(mean, log_std, actions)


def _pad_tasks(p: Tensor, first: int, total: int) -> Tensor:
    """``p`` [n, ...] as rows first.. of a [total, ...] tensor: θ expanded over the tasks stays
    expanded (as the whole batch holds it), per-task values are zero-padded."""
    if p.stride(0) == 0:
        return p[:1].expand(total, *p.shape[1:])
    out = p.new_zeros(total, *p.shape[1:])
    out[first:first + p.shape[0]] = p
    return out


def _shard_act(policy, stacked, sample, log_prob, generator, first: int, total: int) -> Callable:
    """:func:`_act` for tasks first.. of ``total``, computed as the whole batch computes them.

    The other tasks' observations and parameters are padded (zeros), the step runs on all
    ``total`` tasks, and this share's rows are kept. Drawing the noise for all ``total`` tasks
    keeps the random stream; running the policy at the whole batch's shape too keeps the bits:
    torch's element-wise kernels compute a tensor's last ``numel mod 32`` elements with scalar
    libm calls and the rest with SIMD ones, which differ in the last ulp for ``exp`` and ``tanh``,
    so a share's own smaller tensors moved its actions by 3e-8 here (HalfCheetahVel, torch 2.13).
    The cost: each share pays the whole batch's policy forward (cheap next to stepping its envs)."""
    padded = {name: _pad_tasks(p, first, total) for name, p in stacked.items()}

    def act(x: Tensor) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        whole = x.new_zeros(total, *x.shape[1:])
        whole[first:first + n] = x
        actions, logp = _act(policy, padded, sample, log_prob, generator, whole)
        return actions[first:first + n], logp[first:first + n]
    return act


def lockstep_selection(lengths: Tensor, timesteps: int) -> Optional[Tensor]:
    """Which episodes rllab's ``VectorizedSampler`` would keep, or None if ``lengths`` does not
    reach far enough to tell.

    ``lengths`` [R, S]: the lengths of S env slots' first R consecutive episodes. All slots step
    together; slot j's r-th episode ends at step ``lengths[:r+1, j].sum()``. After each step the
    sampler adds the lengths of the episodes that just ended to its count and stops once the count
    reaches ``timesteps``; episodes still running are discarded. Returns a bool [R, S] mask of the
    episodes ended by then. None if the R rounds end before the count is reached, or if some slot's
    known episodes end before the stopping step (its next episode might still end in time)."""
    ends = lengths.cumsum(0)
    order = torch.argsort(ends.flatten(), stable=True)
    counted = lengths.flatten()[order].cumsum(0)
    reached = torch.nonzero(counted >= timesteps)
    if reached.numel() == 0:
        return None
    stop = ends.flatten()[order][reached[0, 0]]  # the step at which the count first reaches the budget
    if bool((ends[-1] < stop).any()):
        return None
    return ends <= stop  # every episode ending at the stopping step counts, as in rllab's loop


def waves(n_slots: int, n_workers: int, max_envs: Optional[int]) -> list[tuple[int, int]]:
    """The waves of one collection: consecutive ranges ``[lo, hi)`` of the global episode slots.

    A wave's slots are stepped together and split in contiguous blocks over the workers (as one
    collection always was), so each of the ``max(1, n_workers)`` env groups is given at most
    ``max_envs`` slots and never builds more envs than that; the next wave reuses them. With
    ``max_envs=None`` there is one wave holding every slot: one env per episode, the original
    lay-out. Issue #15: 50 Meta-World envs took about 1.4 GB per worker, so a HalfCheetah-sized
    meta-batch of 800 slots would need most of a 24 GB machine."""
    per_wave = n_slots if max_envs is None else max(1, n_workers) * int(max_envs)
    return [(lo, min(lo + per_wave, n_slots)) for lo in range(0, n_slots, per_wave)]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ============================================================================ generic env group


class _EnvGroup:
    """A block of Gymnasium envs, one per episode slot of the current wave, stepped in a Python loop.

    Used in-process (``n_workers=0``) and inside each worker process; it imports no torch.
    Envs are built on demand and kept between collections (building a MuJoCo env costs ms), so
    the group holds as many envs as the largest block it was ever given: with
    ``Collector(max_envs=M)`` at most M (see :func:`waves`). Every reset sets the slot's task and
    calls ``reset(seed=...)``, so a reused env starts its episode as a fresh one would, provided
    the env honours Gymnasium's contract that the seed and task determine the start state
    (:func:`metarl.envs.check_task_env` checks it)."""

    def __init__(self, env_fn: Callable[[], Any], env_name: str, obs_shape: tuple, info_spec: Mapping[str, tuple]):
        self.env_fn = env_fn
        self.env_name = env_name
        self.obs_shape = tuple(obs_shape)
        self.info_spec = dict(info_spec)
        self.offset = 0  # global slot index of this group's first slot (set by reset)
        self.envs: list = []
        self.task_envs: list = []
        self.episodes_per_task = 1  # for messages: slot g is episode g % B of task g // B

    def _where(self, k: int) -> str:
        g, b = self.offset + k, self.episodes_per_task
        return f"{self.env_name} (task {g // b}, episode {g % b})"

    def _check_obs(self, obs, k: int, what: str) -> np.ndarray:
        try:
            arr = np.asarray(obs, dtype=np.float64)
        except (TypeError, ValueError):
            raise EnvOutputError(f"{self._where(k)}: {what} returned a non-numeric observation of type "
                                 f"{type(obs).__name__}; return a float array of shape {self.obs_shape}") from None
        if arr.shape != self.obs_shape:
            raise EnvOutputError(f"{self._where(k)}: {what} returned an observation of shape {arr.shape}, the "
                                 f"observation space says {self.obs_shape}; make them agree")
        if not np.isfinite(arr).all():
            raise EnvOutputError(f"{self._where(k)}: {what} returned an observation containing NaN/inf; fix the env "
                                 f"(or terminate the episode before its state blows up)")
        return arr

    def _check_reward(self, reward, k: int) -> float:
        arr = np.asarray(reward)
        if arr.shape != () or arr.dtype.kind not in "fiub":
            raise EnvOutputError(f"{self._where(k)}: step() returned reward {_one_line(repr(reward))[:60]} "
                                 f"(shape {arr.shape}, dtype {arr.dtype}); return a real scalar reward")
        value = float(arr)
        if not np.isfinite(value):
            raise EnvOutputError(f"{self._where(k)}: step() returned a non-finite reward ({value}); fix the env's reward")
        return value

    def _infos(self, info, out: Mapping[str, np.ndarray], k: int) -> None:
        if not isinstance(info, Mapping):
            return
        for key, shape in self.info_spec.items():
            if key in info:
                try:
                    out[key][k] = np.asarray(info[key], dtype=np.float64).reshape(shape)
                except (TypeError, ValueError):
                    pass  # infos are optional extras: unreadable entries stay NaN

    def reset(self, tasks: Sequence[Mapping[str, Any]], seeds: Sequence[int], episodes_per_task: int,
              offset: int = 0) -> np.ndarray:
        """Start one episode per slot (task, seed); ``offset`` is the global index of slot 0."""
        self.episodes_per_task = max(1, int(episodes_per_task))
        self.offset = int(offset)
        n = len(tasks)
        while len(self.envs) < n:
            env = self.env_fn()
            task_env = _find_task_env(env)
            if task_env is None:
                raise TypeError(f"{self.env_name} is not a task env (no set_task in its wrapper chain); wrap it with "
                                f"metarl.envs.TaskWrapper(env, sample_tasks_fn, set_task_fn)")
            self.envs.append(env)
            self.task_envs.append(task_env)
        obs = np.empty((n, *self.obs_shape))
        for k in range(n):
            self.task_envs[k].set_task(dict(tasks[k]))
            try:
                o, _ = self.envs[k].reset(seed=int(seeds[k]))
            except EnvOutputError:
                raise
            except Exception as exc:
                raise RuntimeError(f"{self._where(k)}: reset() raised {type(exc).__name__}: {_one_line(exc)}") from exc
            obs[k] = self._check_obs(o, k, "reset()")
        return obs

    def step(self, actions: np.ndarray, active: np.ndarray):
        n = len(actions)
        obs = np.full((n, *self.obs_shape), np.nan)
        reward = np.full(n, np.nan)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        infos = {key: np.full((n, *shape), np.nan) for key, shape in self.info_spec.items()}
        for k in np.flatnonzero(active):
            try:
                o, r, te, tr, info = self.envs[k].step(actions[k])
            except EnvOutputError:
                raise
            except Exception as exc:
                raise RuntimeError(f"{self._where(k)}: step() raised {type(exc).__name__}: {_one_line(exc)}") from exc
            obs[k] = self._check_obs(o, k, "step()")
            reward[k] = self._check_reward(r, k)
            terminated[k] = bool(te)
            truncated[k] = bool(tr)
            self._infos(info, infos, k)
        return obs, reward, terminated, truncated, infos

    def close(self) -> None:
        for env in self.envs:
            try:
                env.close()
            except Exception:
                pass
        self.envs, self.task_envs = [], []


# ============================================================================ worker processes


PARENT_CHECK_SECONDS = 0.5


def _worker_main(conn, env_fn, env_name, obs_shape, info_spec, inherited=()) -> None:
    """Worker loop: receive ``(command, args)``, run it on the env group, send ``(status, result)``.

    A worker must never outlive its parent (a SIGKILLed trainer used to leave its workers
    polling forever):
    * SIGINT is ignored so that Ctrl-C on a terminal reaches only the parent, which then shuts
      workers down in order; SIGTERM gets its default action back (a forked child inherits the
      trainer's SIGTERM handler, which only sets a flag, so ``kill`` did nothing);
    * ``inherited`` are pipe ends a forked child got by accident: the parent end of its own pipe
      and of every earlier worker's. Held open here, they keep those pipes from ever reporting
      EOF when the parent dies, so they are closed first;
    * while idle the loop checks every ``PARENT_CHECK_SECONDS`` that its parent is still the
      process that started it (an orphan is re-parented), and a closed pipe ends it too."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for c in inherited:
        try:
            c.close()
        except Exception:
            pass
    parent = os.getppid()
    group = _EnvGroup(env_fn, env_name, obs_shape, info_spec)
    try:
        while True:
            try:
                if not conn.poll(PARENT_CHECK_SECONDS):
                    if os.getppid() != parent:
                        break
                    continue
                cmd, args = conn.recv()
            except (EOFError, OSError):
                break
            if cmd == "close":
                break
            try:
                result = getattr(group, cmd)(*args)
                conn.send(("ok", result))
            except EnvOutputError as exc:
                conn.send(("output", _one_line(exc)))
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
                conn.send(("error", _one_line(exc) if isinstance(exc, RuntimeError) else
                           f"{env_name}: {type(exc).__name__}: {_one_line(exc)}"))
    finally:
        group.close()
        try:
            conn.close()
        except Exception:
            pass


def _shutdown(procs, conns) -> None:
    """Ask workers to exit, then make sure they did (terminate stragglers). Idempotent."""
    for conn in conns:
        try:
            conn.send(("close", ()))
        except Exception:
            pass
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=1)
    for conn in conns:
        try:
            conn.close()
        except Exception:
            pass


class _WorkerPool:
    """``n`` processes, each owning a contiguous block of the episode slots (pipes, lock-step).

    Workers are started on first use and live until :meth:`close`; each keeps the envs it built
    and is told at every reset which block of slots it owns, so meta-batches of different sizes
    (training vs evaluation) reuse the same processes and envs."""

    def __init__(self, n: int, env_fn, env_name: str, obs_shape, info_spec, start_method: str):
        self.n = n
        self.env_name = env_name
        self._init = (env_fn, env_name, tuple(obs_shape), dict(info_spec))
        self._ctx = mp.get_context(start_method)
        self.procs: list = []
        self.conns: list = []
        self.bounds: list[tuple[int, int]] = []
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.conns)

    def _start(self) -> None:
        if self.procs and all(p.is_alive() for p in self.procs):
            return
        self.close()
        forked = self._ctx.get_start_method() == "fork"
        for w in range(self.n):
            parent, child = self._ctx.Pipe()
            inherited = (*self.conns, parent) if forked else ()  # see _worker_main
            p = self._ctx.Process(target=_worker_main, args=(child, *self._init), kwargs={"inherited": inherited},
                                  daemon=True, name=f"metarl-collector-{w}")
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self._finalizer = weakref.finalize(self, _shutdown, self.procs, self.conns)

    def _call(self, cmd: str, per_worker_args: list) -> list:
        # Every worker gets a command and every reply is read before raising, so the pipes stay in
        # sync; if we are interrupted in between (Ctrl-C), the replies can no longer be matched to
        # requests, so the workers are stopped and the next collection starts fresh ones.
        # A dead worker shows up as BrokenPipeError on send or EOFError on recv: both become the
        # same one-line CollectorError (a dead worker's pipe reports EOF at once, never a hang).
        completed = False
        try:
            results, failure, sent = [], None, []
            for w, (conn, args) in enumerate(zip(self.conns, per_worker_args)):
                try:
                    conn.send((cmd, args))
                    sent.append(w)
                except OSError:
                    failure = failure or ("died", self._died(w))
            for w in sent:
                try:
                    status, payload = self.conns[w].recv()
                except (EOFError, OSError):
                    status, payload = "died", self._died(w)
                if status != "ok" and failure is None:
                    failure = (status, payload)
                results.append(payload)
            completed = failure is None or failure[0] != "died"
        finally:
            if not completed:
                self.close()
        if failure is not None:
            status, msg = failure
            raise {"output": EnvOutputError, "died": CollectorError}.get(status, RuntimeError)(msg)
        return results

    def _died(self, w: int) -> str:
        self.procs[w].join(timeout=1)
        code = self.procs[w].exitcode
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 and -code in signal.valid_signals()
               else f"exit code {code}")
        return f"{self.env_name}: collector worker {w} died ({how}); check memory and the env's constructor"

    def reset(self, tasks, seeds, episodes_per_task, offset: int = 0) -> np.ndarray:
        self._start()
        per = -(-len(tasks) // self.n)
        self.bounds = [(min(w * per, len(tasks)), min((w + 1) * per, len(tasks))) for w in range(self.n)]
        out = self._call("reset", [(tasks[lo:hi], seeds[lo:hi], episodes_per_task, offset + lo) for lo, hi in self.bounds])
        return np.concatenate(out, axis=0)

    def step(self, actions, active):
        out = self._call("step", [(actions[lo:hi], active[lo:hi]) for lo, hi in self.bounds])
        obs, rew, te, tr, infos = zip(*out)
        merged = {key: np.concatenate([d[key] for d in infos], axis=0) for key in infos[0]}
        return (np.concatenate(obs), np.concatenate(rew), np.concatenate(te), np.concatenate(tr), merged)

    def close(self) -> None:
        self._finalizer()
        self.procs.clear()
        self.conns.clear()
        self.bounds = []


class _InProcess:
    """``n_workers=0``: the same env group, called directly (the reference path)."""

    def __init__(self, env_fn, env_name, obs_shape, info_spec):
        self.group = _EnvGroup(env_fn, env_name, obs_shape, info_spec)

    def reset(self, tasks, seeds, episodes_per_task, offset: int = 0):
        return self.group.reset(tasks, seeds, episodes_per_task, offset)

    def step(self, actions, active):
        return self.group.step(actions, active)

    def close(self):
        self.group.close()


class _FastPath:
    def __init__(self, stepper: mujoco_batch.MujocoBatchStepper):
        self.stepper = stepper

    def reset(self, tasks, seeds, episodes_per_task, offset: int = 0):
        return self.stepper.reset(tasks, seeds)

    def step(self, actions, active):
        return self.stepper.step(actions, active)

    def close(self):
        self.stepper.close()


# ============================================================================ collector


def _numeric_info_spec(info: Any) -> dict[str, tuple]:
    """Keys of an ``info`` dict whose values are numbers or fixed-size numeric arrays, with shapes."""
    spec: dict[str, tuple] = {}
    if not isinstance(info, Mapping):
        return spec
    for key, value in info.items():
        if key == "task" or isinstance(value, (str, bytes, Mapping)):
            continue
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        if arr.ndim <= 1:
            spec[str(key)] = tuple(arr.shape)
    return spec


def _default_start_method() -> str:
    # fork: workers start in milliseconds and inherit the imports and any env factory (closures
    # included); they never touch torch, so the parent's torch threads are not an issue (the same
    # reasoning as torch's DataLoader). Elsewhere spawn, the only portable choice.
    return "fork" if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods() else "spawn"


class Collector:
    """Collects :class:`Episodes` for a list of tasks with per-task policy parameters.

    Args:
        env: a Gymnasium env id (``"metarl/HalfCheetahVel-v0"``; built with ``gymnasium.make``
            after ``metarl.envs`` registered its ids) or a zero-argument factory returning a task
            env (e.g. ``lambda: TaskWrapper(gym.make("Pendulum-v1"), sample, set_g)``; with the
            ``spawn`` start method it must be picklable, e.g. a module-level function).
        env_kwargs: keyword arguments for ``gymnasium.make`` / the factory (``horizon=50``...).
        n_workers: worker processes for the generic path (threads for the fast path); 0 runs
            everything in the calling process. Results do not depend on it.
        fast_path: None picks the MuJoCo fast path when the env supports it (and it reproduces
            ``env.step`` exactly on a short self-check), True requires it, False disables it.
        max_episode_steps: cap on episode length; default: the env's ``TimeLimit`` or ``horizon``.
            Episodes reaching the cap are truncated (``terminated`` stays False).
        info_keys: numeric ``info`` entries to record in :attr:`Episodes.infos`; None records every
            numeric entry the env reports on its first step, ``()`` none.
        start_method: ``multiprocessing`` start method for workers (default fork on Linux, else spawn).
        max_envs: generic path only: at most this many envs per worker (in-process: in all). A
            collection of more episode slots runs in waves (:func:`waves`) that reuse the envs,
            each episode reset with its own task and seed, so the Episodes are bit-identical to one
            env per slot (None, the default). Bounds the memory of Python-heavy envs (Meta-World);
            costs one policy call over the whole meta-batch per step of every wave. The MuJoCo fast
            path holds one small ``MjData`` per slot and ignores it.

    Use as a context manager, or call :meth:`close`, to stop the workers.

    Speed: on the fast path the simulators already occupy ``n_workers`` cores, so torch's own
    intra-op threads only contend with them; ``torch.set_num_threads(1)`` in the training process
    made HalfCheetahVel collection ~20% faster here (benchmarks/sampler_speed.py). The collector
    does not change that global setting itself.
    """

    def __init__(self, env: EnvSpec, env_kwargs: Optional[Mapping[str, Any]] = None, *, n_workers: int = 2,
                 fast_path: Optional[bool] = None, max_episode_steps: Optional[int] = None,
                 info_keys: Optional[Sequence[str]] = None, start_method: Optional[str] = None,
                 max_envs: Optional[int] = None):
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 0:
            raise ValueError(f"n_workers must be an int >= 0 (0 = in-process), got {n_workers!r}")
        if max_envs is not None and (isinstance(max_envs, bool) or not isinstance(max_envs, (int, np.integer))
                                     or max_envs < 1):
            raise ValueError(f"max_envs must be a positive int (envs per worker) or None (one env per episode), "
                             f"got {max_envs!r}")
        self.max_envs = None if max_envs is None else int(max_envs)
        if not isinstance(env, str) and not callable(env):
            raise TypeError(f"env must be a Gymnasium id or a factory returning a task env, got {type(env).__name__}")
        self.env_id = _env_name(env)
        self.n_workers = n_workers
        self.start_method = start_method or _default_start_method()
        self._env_fn = functools.partial(_make_env, env, dict(env_kwargs or {}))
        self._backend = None
        self._closed = False
        self.fast_path = False

        self._probe = probe = self._env_fn()
        try:
            self._setup(probe, fast_path, max_episode_steps, info_keys)
        except BaseException:
            self.close()
            raise

    def _setup(self, probe, fast_path, max_episode_steps, info_keys) -> None:
        """Spaces, episode cap, info keys and path, all learned from a private probe env."""
        task_env = _find_task_env(probe)
        if task_env is None:
            raise TypeError(f"{self.env_id} is not a task env (no set_task in its wrapper chain); wrap it with "
                            f"metarl.envs.TaskWrapper(env, sample_tasks_fn, set_task_fn)")
        self._spaces(probe)
        self.max_episode_steps = self._episode_cap(probe, max_episode_steps)

        # One probe step learns which numeric infos the env reports (and their shapes). Some envs
        # cannot reset before they have a task (Meta-World's assert), so the probe gets one first.
        ensure_task(task_env)
        probe.reset(seed=0)
        step_out = probe.step(self._clip(np.zeros((1, self.act_dim)))[0])
        spec = _numeric_info_spec(step_out[4] if len(step_out) == 5 else {})
        if info_keys is not None:
            unknown = [k for k in info_keys if k not in spec]
            if unknown:
                raise ValueError(f"{self.env_id} reports no numeric info {unknown}; choose from {sorted(spec)} or pass info_keys=None")
            spec = {k: spec[k] for k in info_keys}
        self.info_spec = spec
        self.fast_path = self._choose_path(probe, task_env, fast_path)

    # ----------------------------------------------------------- setup helpers
    def _spaces(self, env) -> None:
        from gymnasium import spaces

        if not isinstance(env.action_space, spaces.Box):
            raise TypeError(f"{self.env_id}: the collector needs a continuous (Box) action space, got "
                            f"{type(env.action_space).__name__}")
        obs_space = env.observation_space
        if not isinstance(obs_space, spaces.Box) or len(obs_space.shape) != 1:
            raise TypeError(f"{self.env_id}: the collector needs a flat Box observation space, got {obs_space}; wrap "
                            f"the env with gymnasium.wrappers.FlattenObservation")
        self.obs_shape = tuple(obs_space.shape)
        self.obs_dim = int(obs_space.shape[0])
        self.act_dim = int(np.prod(env.action_space.shape))
        if env.action_space.shape != (self.act_dim,):
            raise TypeError(f"{self.env_id}: the collector needs a flat action space, got shape {env.action_space.shape}")
        self._act_low = np.asarray(env.action_space.low, dtype=np.float64)
        self._act_high = np.asarray(env.action_space.high, dtype=np.float64)
        self._act_dtype = env.action_space.dtype

    def _episode_cap(self, env, requested: Optional[int]) -> int:
        if requested is not None:
            if isinstance(requested, bool) or not isinstance(requested, (int, np.integer)) or requested < 1:
                raise ValueError(f"max_episode_steps must be a positive int, got {requested!r}")
            return int(requested)
        cap = episode_length(env)
        if cap is None:
            raise ValueError(f"{self.env_id} has no TimeLimit, horizon or max_path_length: register it with "
                             f"gymnasium.register(..., max_episode_steps=N) or pass Collector(..., max_episode_steps=N)")
        return cap

    def _choose_path(self, probe, task_env, requested: Optional[bool]) -> bool:
        if requested is False:
            return False
        reason = mujoco_batch.fast_path_unsupported(probe)
        if reason is None:
            stepper = mujoco_batch.MujocoBatchStepper(probe, nthread=max(1, self.n_workers), env_name=self.env_id)
            missing = [k for k in self.info_spec if k not in stepper.info_keys]
            if missing:
                reason = f"it cannot reproduce info {missing}"
            else:
                reason = mujoco_batch.self_check(probe, task_env.get_task())
                if reason is not None:
                    reason = f"self-check failed ({reason})"
        if reason is None:
            self._stepper = stepper
            return True
        if requested:
            raise ValueError(f"{self.env_id} cannot use the MuJoCo fast path: {reason}; use Collector(..., fast_path=None)")
        if mujoco_batch.fast_path_unsupported(probe) is None:  # supported in principle but wrong: say so
            warnings.warn(f"{self.env_id}: MuJoCo fast path disabled, {reason}; using the generic path", RuntimeWarning,
                          stacklevel=3)
        return False

    def _clip(self, actions: np.ndarray) -> np.ndarray:
        return np.clip(actions, self._act_low, self._act_high).astype(self._act_dtype, copy=False)

    def _get_backend(self):
        if self._closed:
            raise RuntimeError("this Collector is closed; create a new one")
        if self._backend is None:
            if self.fast_path:
                self._backend = _FastPath(self._stepper)
            elif self.n_workers == 0:
                self._backend = _InProcess(self._env_fn, self.env_id, self.obs_shape, self.info_spec)
            else:
                self._backend = _WorkerPool(self.n_workers, self._env_fn, self.env_id, self.obs_shape, self.info_spec,
                                            self.start_method)
        return self._backend

    # ---------------------------------------------------------------- params
    @staticmethod
    def _stacked_params(policy: nn.Module, params: Optional[Mapping[str, Tensor]], n_tasks: int) -> dict[str, Tensor]:
        """Per-task params [T, ...], detached: θ-shaped entries are expanded, stacked ones checked."""
        own = {name: p for name, p in policy.named_parameters()}
        given = dict(params) if params is not None else {}
        unknown = [k for k in given if k not in own]
        if unknown:
            raise KeyError(f"params has names the policy does not: {unknown[:3]}; build params with metarl.functional.params_of(policy)")
        out = {}
        for name, ref in own.items():
            p = given.get(name, ref).detach()
            if tuple(p.shape) == tuple(ref.shape):
                p = p.unsqueeze(0).expand(n_tasks, *ref.shape)
            elif tuple(p.shape) != (n_tasks, *ref.shape):
                raise ValueError(f"params[{name!r}] has shape {tuple(p.shape)}; expected {tuple(ref.shape)} (θ) or "
                                 f"{(n_tasks, *ref.shape)} (stacked for the {n_tasks} tasks): stack with metarl.functional.stack")
            out[name] = p
        return out

    @staticmethod
    def _distribution_fns(policy):
        from metarl.policies import gaussian

        sample = getattr(policy, "sample", None)
        log_prob = getattr(policy, "log_prob", None)
        if not (callable(sample) and callable(log_prob)):
            sample, log_prob = gaussian.sample, gaussian.log_prob
        return sample, log_prob

    # --------------------------------------------------------------- collect
    def collect(self, policy: nn.Module, params: Optional[Mapping[str, Tensor]], tasks: Sequence[Mapping[str, Any]],
                episodes_per_task: int, seed: Optional[int] = None,
                generator: Optional[torch.Generator] = None, shard: Optional[tuple[int, int]] = None) -> Episodes:
        """Run ``episodes_per_task`` episodes for every task with its own parameters.

        Args:
            policy: the policy module (``policy.forward_tasks(params, obs [T, B, obs_dim])`` →
                ``(mean, log_std)``, as :class:`policies.gaussian.GaussianMLPPolicy`).
            params: θ (name → tensor, the policy's shapes), stacked per-task params (leading axis
                ``len(tasks)``), or None for the policy's own parameters. Names left out use the
                policy's own values. Detached: collection never builds a graph.
            tasks: T task dicts (``env.sample_tasks(T, rng)``).
            episodes_per_task: B.
            seed: makes the collection reproducible (env resets and action noise). If None, a seed is
                drawn from ``generator`` when given, else from the OS; it is stored in ``Episodes.seed``.
            generator: action-noise generator to use instead of one seeded from ``seed``.
            shard: (first, total): ``tasks`` are tasks first.. of a meta-batch of ``total``
                (one torchrun rank's or Ray actor's share, :mod:`metarl.distributed`,
                :mod:`metarl.rollouts.ray_collector`); their episodes are then bitwise those of
                one ``collect`` over the whole meta-batch: reset seeds of their global indices,
                and each step's policy call and action noise computed for all ``total`` tasks
                (the others padded) and sliced (:func:`_shard_act`).
        """
        tasks = [dict(t) for t in tasks]
        n_tasks, n_eps = len(tasks), episodes_per_task
        seed = check_request(n_tasks, n_eps, seed, generator)
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        stacked = self._stacked_params(policy, params, n_tasks)
        dtype = next(iter(stacked.values())).dtype
        sample, log_prob = self._distribution_fns(policy)
        first = 0
        act = functools.partial(_act, policy, stacked, sample, log_prob, generator)
        if shard is not None:
            first, total = shard
            if not 0 <= first <= total - n_tasks:
                raise ValueError(f"shard {shard}: {n_tasks} tasks from index {first} do not fit a meta-batch of {total}")
            act = _shard_act(policy, stacked, sample, log_prob, generator, first, total)

        n = n_tasks * n_eps
        slot_tasks = [tasks[k // n_eps] for k in range(n)]
        seeds = episode_seeds(seed, n_tasks, n_eps, first).reshape(-1)
        backend = self._get_backend()
        cap, d, a_dim = self.max_episode_steps, self.obs_dim, self.act_dim

        obs_buf = np.zeros((cap, n, d))
        rew_buf = np.zeros((cap, n))
        mask_buf = np.zeros((cap, n), dtype=bool)
        term_buf = np.zeros((cap, n), dtype=bool)
        info_buf = {k: np.zeros((cap, n, *shape)) for k, shape in self.info_spec.items()}
        act_buf = torch.zeros(cap, n, a_dim, dtype=dtype)
        logp_buf = torch.zeros(cap, n, dtype=dtype)
        last_obs = np.zeros((n, d))
        lengths = np.zeros(n, dtype=np.int64)

        # Waves (max_envs): each replays the action noise from the same generator state and calls
        # the policy on the whole [T, B] batch (other waves' rows zero), so step t of every
        # episode sees the draw and the policy output it gets with one env per slot. Not only the
        # wave's tasks: a smaller tensor can change the last bits (tried: the HalfCheetahVel check
        # then failed; vectorised kernels treat a tensor's tail elements differently). The
        # generator ends where one wave over all slots leaves it: after the longest wave.
        plan = [(0, n)] if self.fast_path else waves(n, self.n_workers, self.max_envs)
        start_state = generator.get_state() if len(plan) > 1 else None
        t_max, end_state = 0, None
        for lo, hi in plan:
            if start_state is not None:
                generator.set_state(start_state)
            s = slice(lo, hi)
            obs_now = np.zeros((n, d))
            obs_now[s] = backend.reset(slot_tasks[s], seeds[s], n_eps, lo)
            active = np.zeros(n, dtype=bool)
            active[s] = True

            t = 0
            with torch.no_grad():
                while active.any() and t < cap:
                    obs_buf[t, active] = obs_now[active]
                    actions, logp = act(torch.as_tensor(obs_now, dtype=dtype).reshape(n_tasks, n_eps, d))
                    actions = actions.reshape(n, a_dim)
                    keep = torch.from_numpy(active)
                    act_buf[t, s] = torch.where(keep[s, None], actions[s], torch.zeros((), dtype=dtype))
                    logp_buf[t, s] = torch.where(keep[s], logp.reshape(n)[s], torch.zeros((), dtype=dtype))

                    live = active[s]
                    env_actions = self._clip(actions[s].to(torch.float64).numpy())
                    nxt, reward, terminated, truncated, infos = backend.step(env_actions, live)

                    mask_buf[t, s] = live
                    rew_buf[t, s][live] = reward[live]
                    term_buf[t, s] = terminated & live
                    for k, buf in info_buf.items():
                        if k in infos:
                            buf[t, s][live] = infos[k][live]
                        else:
                            buf[t, s][live] = np.nan
                    lengths[s] += live
                    t += 1
                    done = live & (terminated | truncated | (t >= cap))
                    last_obs[s][done] = nxt[done]
                    obs_now[s][live] = nxt[live]
                    active[s] &= ~done
            if t >= t_max:
                t_max, end_state = t, (generator.get_state() if start_state is not None else None)
        if end_state is not None:
            generator.set_state(end_state)
        t = t_max

        return self._episodes(obs_buf, act_buf, rew_buf, mask_buf, term_buf, logp_buf, info_buf, last_obs, lengths,
                              t, n_tasks, n_eps, dtype, tasks, seed)

    def collect_timesteps(self, policy: nn.Module, params: Optional[Mapping[str, Tensor]],
                          tasks: Sequence[Mapping[str, Any]], timesteps: int, seed: Optional[int] = None,
                          lockstep: bool = False) -> Episodes:
        """Whole episodes per task until each task holds at least ``timesteps`` steps.

        This is how rllab sizes a batch (``batch_size`` in timesteps, whole paths), and so how the
        MAML paper's test scripts adapted: 4,000 steps per gradient step on 2D navigation, where
        an adapted policy reaches the goal early and 4,000 steps hold many more episodes than an
        unadapted one's. Collection runs in rounds of :meth:`collect`: the first collects
        ``ceil(timesteps / max_episode_steps)`` episodes for every task (enough when no episode
        ends early; the result then equals ``collect`` with that count and the same seed), each
        later one only for the tasks still short, as many episodes as their mean length says they
        need. Surplus episodes past the budget are dropped (:func:`~metarl.rollouts.episodes.join_tasks`),
        so tasks hold different numbers of episodes, the shorter ones padded with empty episodes;
        :meth:`Episodes.mean_returns` and the losses leave those out.

        ``lockstep=True`` instead reproduces rllab's ``VectorizedSampler``, which measured the MAML
        paper's test returns (:func:`lockstep_selection`): per task, ``timesteps //
        max_episode_steps`` envs (1..100) run in lock-step, each starting a new episode when one
        ends; collection stops at the first step at which the task's *completed* episodes hold
        ``timesteps`` steps, and the episodes still running then are dropped. Those are more
        often long ones (a long episode is more likely to be in flight), so the batch over-weights
        short episodes: when some episodes end early (an adapted policy reaching the goal) its mean
        return reads higher than the unbiased default's, and its gradient leans the same way.
        """
        if isinstance(timesteps, bool) or not isinstance(timesteps, (int, np.integer)) or timesteps < 1:
            raise ValueError(f"timesteps must be a positive int, got {timesteps!r}")
        tasks = [dict(t) for t in tasks]
        n = len(tasks)
        if n == 0:
            raise ValueError("collect_timesteps needs at least one task: pass env.sample_tasks(T, rng)")
        seed = secrets.randbits(62) if seed is None else seed
        stacked = self._stacked_params(policy, params, n)
        if lockstep:
            return self._collect_lockstep(policy, stacked, tasks, int(timesteps), seed)
        pieces: list[list[Episodes]] = [[] for _ in range(n)]
        steps, episodes = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        need = np.arange(n)
        per_task = -(-int(timesteps) // self.max_episode_steps)
        for round_ in range(10_000):
            if round_:
                per_task = int(np.max(np.ceil((timesteps - steps[need]) * episodes[need] / steps[need])))
            round_seed = seed if round_ == 0 else int(np.random.SeedSequence([seed, round_]).generate_state(1, np.uint64)[0] >> 2)
            idx = torch.from_numpy(need)
            batch = self.collect(policy, {k: v[idx] for k, v in stacked.items()}, [tasks[i] for i in need],
                                 max(per_task, 1), seed=round_seed)
            for j, i in enumerate(need):
                pieces[i].append(batch.task(j))
            steps[need] += batch.lengths.sum(-1).numpy()
            episodes[need] += batch.episodes_per_task
            need = need[steps[need] < timesteps]
            if need.size == 0:
                break
        return join_tasks(pieces, timesteps, tasks=tasks, seed=seed, env_id=self.env_id)

    def _collect_lockstep(self, policy, stacked, tasks, timesteps: int, seed: int) -> Episodes:
        """``collect_timesteps(lockstep=True)``: rounds of one episode per env slot (round r holds
        each slot's r-th episode), for the tasks whose stopping step is not yet known."""
        n, slots = len(tasks), max(1, min(timesteps // self.max_episode_steps, 100))  # rllab's n_envs
        rounds: list[list[Episodes]] = [[] for _ in range(n)]
        keep: list[Optional[Tensor]] = [None] * n
        need = np.arange(n)
        for round_ in range(10_000):
            round_seed = int(np.random.SeedSequence([seed, round_]).generate_state(1, np.uint64)[0] >> 2)
            idx = torch.from_numpy(need)
            batch = self.collect(policy, {k: v[idx] for k, v in stacked.items()}, [tasks[i] for i in need], slots,
                                 seed=round_seed)
            for j, i in enumerate(need):
                rounds[i].append(batch.task(j))
                keep[i] = lockstep_selection(torch.stack([b.lengths[0] for b in rounds[i]]), timesteps)
            need = np.array([i for i in need if keep[i] is None], dtype=np.int64)
            if need.size == 0:
                break
        per_task = [[join_tasks([r]).select(torch.nonzero(keep[i].flatten()).flatten())] for i, r in enumerate(rounds)]
        return join_tasks(per_task, tasks=[dict(t) for t in tasks], seed=seed, env_id=self.env_id)

    def _episodes(self, obs_buf, act_buf, rew_buf, mask_buf, term_buf, logp_buf, info_buf, last_obs, lengths, t_max,
                  n_tasks, n_eps, dtype, tasks, seed) -> Episodes:
        def task_major(x: Tensor) -> Tensor:
            # [Tmax, T*B, ...] (time-major, as filled) → [T, Tmax, B, ...]
            x = x[:t_max]
            return x.reshape(t_max, n_tasks, n_eps, *x.shape[2:]).movedim(1, 0).contiguous()

        def arr(x: np.ndarray, dt=dtype) -> Tensor:
            return task_major(torch.from_numpy(x).to(dt))

        returns = torch.from_numpy(rew_buf[:t_max].sum(0)).to(dtype).reshape(n_tasks, n_eps)
        return Episodes(
            obs=arr(obs_buf),
            actions=task_major(act_buf),
            rewards=arr(rew_buf),
            mask=arr(mask_buf),
            terminated=arr(term_buf, torch.bool),
            log_probs=task_major(logp_buf),
            returns=returns,
            lengths=torch.from_numpy(lengths).reshape(n_tasks, n_eps),
            last_obs=torch.from_numpy(last_obs).to(dtype).reshape(n_tasks, n_eps, -1),
            infos={k: arr(v) for k, v in info_buf.items()},
            tasks=tasks,
            seed=seed,
            env_id=self.env_id,
        )

    # -------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Stop the workers and close every env. Idempotent; the collector is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        probe = getattr(self, "_probe", None)
        if probe is not None:
            try:
                probe.close()
            except Exception:
                pass

    def __enter__(self) -> "Collector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        path = "mujoco-batch" if getattr(self, "fast_path", False) else "generic"
        return f"Collector({self.env_id!r}, path={path}, n_workers={self.n_workers}, max_episode_steps={self.max_episode_steps})"
