"""Collect a meta-batch on Ray actors (``sampler.backend: ray``), episode for episode the batch
the in-process :class:`~metarl.rollouts.collector.Collector` returns.

How the work is split
---------------------
``RayCollector(env, env_kwargs, n_actors=A)`` starts A actors (one CPU each). Each holds its own
in-process :class:`Collector` (its own envs, the MuJoCo fast path where the env has one) and
is sent, per call, the policy, a contiguous share of the tasks and those tasks' parameters
(θ expanded, or MAML's adapted φ_i). It runs the collector's own lock-step loop on its share as
a torchrun rank does (:mod:`metarl.distributed`): ``Collector.collect(..., shard=(first,
total))`` resets episode b of task i with the seed of (seed, i, b) by the task's index i in the
whole meta-batch and draws the action noise of all ``total`` tasks at every step, keeping its
slice. So how the tasks are shared out, and over how many actors, changes no random stream:
the driver pads the shares to the longest episode (:func:`~metarl.rollouts.episodes.join_tasks`,
zeros, as the collector pads) and gets the in-process batch bit for bit (tested with
``torch.equal`` on Navigation2D and HalfCheetahVel). ``collect_timesteps`` (batches sized in
steps, rllab's sampler) is the collector's own, running its rounds through this ``collect``.

Faults
------
Nothing waits forever: every collection has ``timeout`` seconds (an actor that hangs, a
cluster without CPUs for the actors), then stops with one line (:class:`CollectorError`). An
actor that dies (killed, out of memory, crashed in C) is replaced by a new one and its share
collected again, up to ``restarts`` times per collection: its episodes are a function of what
it was sent, so the batch is the one it would have been. An error the env raises inside an
actor (:class:`EnvOutputError`...) is raised again on the driver as itself.

The local instance
------------------
``address=None`` starts a local Ray instance with ``n_actors`` CPUs (no dashboard), stopped by
:meth:`close` when the last collector using it closes. A SIGKILLed driver cannot stop it, so a
small reaper process (:mod:`metarl.rollouts.ray_reaper`) watches the driver and stops every
process of that instance when it dies (those carrying its environment marker or holding files
in its session directory). With ``address`` (a running cluster) the actors are
created there and killed on :meth:`close`; the cluster is left running.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ..distributed import World
from ..extras import require
from . import ray_reaper
from .collector import Collector, CollectorError, EnvSpec, check_request
from .episodes import Episodes, join_tasks

__all__ = ["RayCollector"]

START_SECONDS = 300.0
"""The least time actors are given to start (see :meth:`RayCollector._ready`)."""


class _RolloutActor:
    """One actor: its own in-process collector, collecting the shares it is sent."""

    def __init__(self, env: EnvSpec, env_kwargs: Mapping[str, Any], max_episode_steps: int, info_keys: Sequence[str],
                 max_envs: Optional[int] = None):
        torch.set_num_threads(1)  # one CPU per actor: torch's threads would only contend with the simulator
        self.collector = Collector(env, env_kwargs, n_workers=0, max_episode_steps=max_episode_steps,
                                   info_keys=list(info_keys), max_envs=max_envs)

    def collect(self, policy: nn.Module, params, tasks, episodes_per_task: int, seed: int, shard: tuple[int, int]):
        """(episodes of ``tasks``, seconds spent collecting them here)."""
        start = time.perf_counter()
        eps = self.collector.collect(policy, params, tasks, episodes_per_task, seed=seed, shard=shard)
        return eps, time.perf_counter() - start

    def pid(self) -> int:
        return os.getpid()


class _LocalInstance:
    """The Ray instance this process started (shared by its collectors) and its reaper."""
    users = 0
    reaper: Optional[subprocess.Popen] = None

    @classmethod
    def acquire(cls, ray, n_cpus: int) -> None:
        if cls.users == 0:
            marker = f"{os.getpid()}-{secrets.token_hex(8)}"
            cls.reaper = subprocess.Popen([sys.executable, ray_reaper.__file__, marker], stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            os.environ[ray_reaper.MARKER_VAR] = marker  # inherited by the processes ray.init spawns, and theirs
            try:
                ray.init(address="local", num_cpus=n_cpus, include_dashboard=False, log_to_driver=False,
                         logging_level="WARNING")
            except BaseException:
                cls._stop_reaper()
                raise
            finally:
                os.environ.pop(ray_reaper.MARKER_VAR, None)
            cls._tell_reaper(_session_dir(ray))
        cls.users += 1

    @classmethod
    def release(cls, ray) -> None:
        cls.users -= 1
        if cls.users == 0:
            try:
                ray.shutdown()
            finally:
                cls._stop_reaper()

    @classmethod
    def _tell_reaper(cls, session_dir: Optional[str]) -> None:
        if session_dir and cls.reaper is not None:
            try:
                cls.reaper.stdin.write(session_dir.encode() + b"\n")
                cls.reaper.stdin.flush()
            except OSError:
                pass

    @classmethod
    def _stop_reaper(cls) -> None:
        """Closing its pipe is the signal: the reaper stops what ``ray.shutdown`` left behind."""
        if cls.reaper is not None:
            try:
                cls.reaper.stdin.close()
                cls.reaper.wait(timeout=30)
            except Exception:
                pass
            cls.reaper = None


class RayCollector(Collector):
    """:class:`Collector`'s interface, collecting on ``n_actors`` Ray actors (see the module doc).

    Args:
        env, env_kwargs, max_episode_steps, info_keys: as for :class:`Collector` (a factory must
            be picklable by cloudpickle; lambdas are).
        n_actors: actors, one CPU each; a meta-batch of T tasks uses min(T, n_actors) of them.
        address: a running Ray cluster to use ("auto", "HOST:PORT", "ray://HOST:10001"); None
            starts a local instance with ``n_actors`` CPUs (or uses the one ``ray.init`` already
            started in this process).
        timeout: seconds one collection may take before :class:`CollectorError`.
        restarts: how often per collection a share whose actor died is collected again on a new
            actor before :class:`CollectorError`.

    Attributes ``comm_seconds`` / ``compute_seconds`` / ``collections`` accumulate, over the
    collections made, the driver's wall time not spent inside the slowest actor's collection
    (sending the policy and parameters, scheduling, returning and joining the episodes) and that
    slowest collection time (the benchmark's communication time).
    """

    def __init__(self, env: EnvSpec, env_kwargs: Optional[Mapping[str, Any]] = None, *, n_actors: int = 2,
                 address: Optional[str] = None, timeout: float = 600.0, restarts: int = 1,
                 max_episode_steps: Optional[int] = None, info_keys: Optional[Sequence[str]] = None,
                 max_envs: Optional[int] = None):
        if isinstance(n_actors, bool) or not isinstance(n_actors, int) or n_actors < 1:
            raise ValueError(f"n_actors must be an int >= 1, got {n_actors!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
            raise ValueError(f"restarts must be an int >= 0, got {restarts!r}")
        self._ray = ray = require("ray", "distributed", "sampler.backend ray")
        self._env_spec, self._env_kwargs = env, dict(env_kwargs or {})
        self.n_actors, self.timeout, self.restarts = n_actors, float(timeout), restarts
        self._actors: list = []
        self._owns_instance = False
        self.comm_seconds = self.compute_seconds = 0.0
        self.collections = 0
        # The driver's own probe (spaces, episode cap, info keys): no workers, no fast path; the
        # actors build theirs. The actors record exactly the info keys the driver learned.
        super().__init__(env, env_kwargs, n_workers=0, fast_path=False, max_episode_steps=max_episode_steps,
                         info_keys=info_keys, max_envs=max_envs)
        try:
            if not ray.is_initialized():
                if address is None:
                    _LocalInstance.acquire(ray, n_actors)
                    self._owns_instance = True
                else:
                    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
            self._actor_cls = ray.remote(num_cpus=1, max_restarts=0)(_RolloutActor)
            self._actors = [self._new_actor() for _ in range(n_actors)]
            self._ready()  # their start-up (seconds: each imports torch) is not part of the first collection
        except BaseException:
            self.close()
            raise

    def _new_actor(self):
        return self._actor_cls.remote(self._env_spec, self._env_kwargs, self.max_episode_steps, tuple(self.info_spec),
                                      self.max_envs)

    def actor_pids(self) -> list[int]:
        """The actors' process ids (for tests and diagnostics)."""
        return self._ready()

    def _ready(self) -> list[int]:
        """Wait for every actor to be up; one line if one cannot start or none answers in time
        (``timeout``, but at least :data:`START_SECONDS`: an actor imports torch and builds its
        envs, which took 5-15 s on a loaded 2-core machine)."""
        ray = self._ray
        wait = max(self.timeout, START_SECONDS)
        try:
            return ray.get([a.pid.remote() for a in self._actors], timeout=wait)
        except ray.exceptions.GetTimeoutError:
            raise CollectorError(f"{self.env_id}: Ray actors did not start within {wait:g} s; check the "
                                 f"cluster has {len(self._actors)} free CPUs (one per actor)") from None
        except ray.exceptions.RayActorError as exc:
            raise CollectorError(f"{self.env_id}: a Ray actor could not start: {_first_line(exc)}") from None

    # --------------------------------------------------------------- collect
    def collect(self, policy: nn.Module, params, tasks: Sequence[Mapping[str, Any]], episodes_per_task: int,
                seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                shard: Optional[tuple[int, int]] = None) -> Episodes:
        """:meth:`Collector.collect`, the tasks shared out over the actors. ``generator`` is
        refused: the actors draw the action noise from ``seed``, and a generator's state cannot
        be advanced on the driver as one process drawing from it would."""
        if self._closed:
            raise RuntimeError("this RayCollector is closed; create a new one")
        if generator is not None:
            raise ValueError("RayCollector draws the action noise on its actors from the seed: pass seed=..., not generator")
        tasks = [dict(t) for t in tasks]
        n = len(tasks)
        seed = check_request(n, episodes_per_task, seed)
        first, total = (0, n) if shard is None else shard
        if not 0 <= first <= total - n:
            raise ValueError(f"shard {shard}: {n} tasks from index {first} do not fit a meta-batch of {total}")
        stacked = self._stacked_params(policy, params, n)
        k = min(n, len(self._actors))
        bounds = [World(rank=a, size=k).shard(n) for a in range(k)]
        start = time.perf_counter()
        policy_ref = self._ray.put(policy)

        def submit(a: int):
            lo, hi = bounds[a]
            # θ expanded over the tasks pickles as its one copy; a slice of per-task φ would pickle
            # every task's rows (a view keeps its whole storage), so it is copied first
            share = {name: p[lo:hi] if p.stride(0) == 0 else p[lo:hi].clone() for name, p in stacked.items()}
            return self._actors[a].collect.remote(policy_ref, share, tasks[lo:hi], episodes_per_task, seed,
                                                  (first + lo, total))

        results = self._gather({submit(a): a for a in range(k)}, submit)
        pieces = [[eps.task(j)] for eps, _ in results for j in range(eps.n_tasks)]
        out = join_tasks(pieces, tasks=tasks, seed=seed, env_id=self.env_id)
        slowest = max(seconds for _, seconds in results)
        self.compute_seconds += slowest
        self.comm_seconds += max(0.0, time.perf_counter() - start - slowest)
        self.collections += 1
        return out

    def _gather(self, pending: dict, submit) -> list:
        """Results by actor index; a dead actor is replaced and its share submitted again."""
        ray = self._ray
        results: dict[int, Any] = {}
        retries = {a: 0 for a in pending.values()}
        deadline = time.monotonic() + self.timeout
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted(pending.values())
                for a in late:  # a hung actor would answer the next call late: start fresh ones
                    self._replace(a)
                raise CollectorError(f"{self.env_id}: Ray actor(s) {late} did not finish their share within "
                                     f"{self.timeout:g} s (sampler.ray_timeout); the collection is abandoned")
            ref = ready[0]
            a = pending.pop(ref)
            try:
                results[a] = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                if retries[a] >= self.restarts:
                    self._replace(a)
                    raise CollectorError(f"{self.env_id}: Ray actor {a} died {retries[a] + 1} time(s) in one collection "
                                         f"(sampler.ray_restarts={self.restarts}): {_first_line(exc)}") from None
                retries[a] += 1
                self._replace(a)
                pending[submit(a)] = a
            except ray.exceptions.RayTaskError as exc:  # the env's own error (EnvOutputError, ...): raise it as is
                cause = getattr(exc, "cause", None)
                if isinstance(cause, Exception):
                    raise cause from None
                raise CollectorError(f"{self.env_id}: Ray actor {a} failed: {_first_line(exc)}") from None
        return [results[a] for a in sorted(results)]

    def _replace(self, a: int) -> None:
        try:
            self._ray.kill(self._actors[a], no_restart=True)
        except Exception:
            pass
        self._actors[a] = self._new_actor()

    # -------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Kill the actors and, if this collector started the local instance (and is the last to
        use it), stop it. Idempotent."""
        if getattr(self, "_closed", False):
            return
        super().close()
        ray = getattr(self, "_ray", None)
        for actor in getattr(self, "_actors", []):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self._actors = []
        if getattr(self, "_owns_instance", False):
            self._owns_instance = False
            _LocalInstance.release(ray)

    def __repr__(self) -> str:
        return f"RayCollector({self.env_id!r}, n_actors={self.n_actors}, max_episode_steps={self.max_episode_steps})"


def _session_dir(ray) -> Optional[str]:
    """The local instance's session directory (/tmp/ray/session_...), None if this Ray version
    hides it (the reaper then finds the processes by their environment marker alone)."""
    try:
        return str(ray._private.worker._global_node.get_session_dir_path())
    except Exception:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return " ".join(text[0].split()) if text else type(exc).__name__
