"""Rollouts on Ray (``sampler.backend: ray``, metarl/rollouts/ray_collector.py).

The reference is the in-process collector (``n_workers=0``): the Ray actors' episodes must be
the same tensors (``torch.equal``), whatever the tasks' split over the actors. Then faults: a
killed actor (replaced, same batch), restarts exhausted and a hung actor (one line, within the
timeout), an env's own error (raised as itself), and a SIGKILLed driver leaving no Ray process.
Ray is an optional extra: without it these tests skip, and the config refuses the backend in one line.

CI runs the config checks and the equality test (~30 s: starting Ray and its actors is most of
it); the fault, CLI and SIGKILL tests start actors or whole Ray instances of their own
(10-25 s each on the shared 2-core machine) and are marked slow: ``pytest -m slow tests/test_ray_collector.py``.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from metarl import config
from metarl.config import ConfigError
from metarl.functional import params_of
from metarl.rollouts import Collector
from metarl.rollouts.collector import CollectorError, EnvOutputError

ROOT = Path(__file__).resolve().parents[1]
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed: pip install -e '.[distributed]'")

NAV = ("metarl/Navigation2D-v0", {"normalize_actions": True, "goal_radius": 0.05, "horizon": 30})
CHEETAH = ("metarl/HalfCheetahVel-v0", {"horizon": 15})
FIELDS = ("obs", "actions", "rewards", "mask", "terminated", "log_probs", "returns", "lengths", "last_obs")


def _rl_cfg(**sampler):
    return config.from_dict({"track": "rl", "env": {"id": NAV[0], "kwargs": NAV[1]}, "sampler": sampler})


# ------------------------------------------------------------------ config (no ray needed)

def test_an_unknown_backend_is_one_line():
    with pytest.raises(ConfigError, match="sampler.backend.*'rya'.*ray") as e:
        _rl_cfg(backend="rya")
    assert "\n" not in str(e.value)


def test_ray_settings_without_the_ray_backend_are_refused():
    with pytest.raises(ConfigError, match="sampler.backend=ray"):
        _rl_cfg(ray_address="auto")


def test_missing_ray_is_one_line_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[distributed\]'") as e:
        _rl_cfg(backend="ray")
    assert "\n" not in str(e.value)


@needs_ray
def test_bad_ray_settings_are_range_checked():
    with pytest.raises(ConfigError, match="sampler.workers"):
        _rl_cfg(backend="ray", workers=0)  # actors, not in-process
    with pytest.raises(ConfigError, match="sampler.ray_timeout"):
        _rl_cfg(backend="ray", ray_timeout=0)


def test_the_reaper_stops_the_instance_s_processes_when_its_pipe_closes(tmp_path):
    """No Ray needed: the reaper, given a marker and a session directory, stops a process that
    carries the marker in its environment and one that holds a file in the directory (as Ray's
    agents, whose environment setproctitle overwrote), once its stdin reaches end-of-file; it
    spares an unmarked process and the process that started it (this one, which also holds a
    file there)."""
    from metarl.rollouts import ray_reaper

    session = tmp_path / "session_x"
    session.mkdir()
    held = open(session / "driver.log", "w")  # the driver's own log: it must be spared
    sleeper = [sys.executable, "-c", "import sys, time; f = open(sys.argv[1], 'a') if len(sys.argv) > 1 else None; time.sleep(600)"]
    marked = subprocess.Popen(sleeper, env={**os.environ, ray_reaper.MARKER_VAR: "m-1"})
    holder = subprocess.Popen(sleeper + [str(session / "agent.log")])
    other = subprocess.Popen(sleeper, env={**os.environ, ray_reaper.MARKER_VAR: "m-2"})
    reaper = subprocess.Popen([sys.executable, ray_reaper.__file__, "m-1"], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (session / "agent.log").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        reaper.stdin.write(f"{session}\n".encode())
        reaper.stdin.close()
        assert reaper.wait(timeout=60) == 0
        assert marked.wait(timeout=10) == -signal.SIGTERM and holder.wait(timeout=10) == -signal.SIGTERM
        assert other.poll() is None
    finally:
        held.close()
        for proc in (marked, holder, other, reaper):
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ a local Ray instance

@pytest.fixture(scope="module")
def local_ray():
    """One local instance for the module (started and stopped as RayCollector does, reaper
    included); 4 logical CPUs so that two collectors' actors fit while one is being replaced."""
    if not HAVE_RAY:
        pytest.skip("ray is not installed: pip install -e '.[distributed]'")
    import ray

    from metarl.rollouts.ray_collector import _LocalInstance

    _LocalInstance.acquire(ray, 4)
    yield ray
    _LocalInstance.release(ray)


def _policy(obs_dim, act_dim, activation="tanh"):
    from metarl.policies.gaussian import GaussianMLPPolicy

    torch.manual_seed(0)
    return GaussianMLPPolicy(obs_dim, act_dim, [32, 32], activation)


def _per_task(policy, n):
    """Different parameters per task (as MAML's adapted φ_i), so that a task sent to the wrong
    actor or with the wrong row of parameters shows."""
    return {k: torch.stack([v.detach() * (1 + 0.1 * i) for i in range(n)]) for k, v in params_of(policy).items()}


def assert_same_episodes(got, ref):
    assert got.obs.shape == ref.obs.shape, (got.obs.shape, ref.obs.shape)
    for f in FIELDS:
        a, b = getattr(got, f), getattr(ref, f)
        assert a.dtype == b.dtype and torch.equal(a, b), f
    assert got.infos.keys() == ref.infos.keys() and all(torch.equal(got.infos[k], ref.infos[k]) for k in ref.infos)
    assert got.tasks == ref.tasks and got.seed == ref.seed and got.env_id == ref.env_id


@pytest.fixture(scope="module", params=["nav2d", "cheetah"])
def pair(request, local_ray):
    """(env name, RayCollector with 2 actors, in-process reference Collector) for one env."""
    from metarl.rollouts.ray_collector import RayCollector

    env_id, kwargs = {"nav2d": NAV, "cheetah": CHEETAH}[request.param]
    ray_col = RayCollector(env_id, kwargs, n_actors=2, timeout=120)
    ref = Collector(env_id, kwargs, n_workers=0)
    yield request.param, ray_col, ref
    ray_col.close()
    ref.close()


def _tasks(col, n, seed=0):
    from metarl.envs import find_task_env

    return find_task_env(col._probe).sample_tasks(n, np.random.default_rng(seed))


@pytest.mark.parametrize("env", ["nav2d", "cheetah"])
def test_a_share_is_bitwise_its_slice_of_the_whole_batch(env):
    """In-process, no Ray: ``collect(..., shard=(first, total))`` on tasks first.. gives exactly
    those tasks' rows of one collection over all of them, for shares of several sizes. (Before the
    policy ran at the whole batch's shape, HalfCheetahVel's actions moved by 1 ulp: the SIMD tail
    of exp/tanh.) What every Ray actor and torchrun rank relies on."""
    env_id, kwargs = {"nav2d": NAV, "cheetah": CHEETAH}[env]
    with Collector(env_id, kwargs, n_workers=0) as col:
        policy, tasks = _policy(col.obs_dim, col.act_dim), _tasks(col, 7)
        for params in (None, _per_task(policy, 7)):
            whole = col.collect(policy, params, tasks, 3, seed=11)
            for lo, hi in [(0, 3), (3, 7), (2, 5), (6, 7)]:
                share = None if params is None else {k: v[lo:hi] for k, v in params.items()}
                part = col.collect(policy, share, tasks[lo:hi], 3, seed=11, shard=(lo, 7))
                n = part.max_length
                for f in FIELDS:
                    ref = getattr(whole, f)[lo:hi]
                    assert torch.equal(getattr(part, f), ref[:, :n] if f in ("obs", "actions", "rewards", "mask",
                                                                            "terminated", "log_probs") else ref), (f, lo, hi)


@needs_ray
def test_ray_episodes_equal_the_in_process_ones(pair):
    """5 tasks on 2 actors (shares of 2 and 3): θ for every task, then per-task φ_i; and a
    torchrun-style share (tasks 2..6 of 7). Every tensor equal, padding included."""
    name, ray_col, ref = pair
    policy = _policy(ref.obs_dim, ref.act_dim)
    tasks = _tasks(ref, 7)
    for params in (None, _per_task(policy, 5)):
        assert_same_episodes(ray_col.collect(policy, params, tasks[:5], 3, seed=11),
                             ref.collect(policy, params, tasks[:5], 3, seed=11))
    share = {k: v[2:] for k, v in _per_task(policy, 7).items()}
    assert_same_episodes(ray_col.collect(policy, share, tasks[2:], 2, seed=4, shard=(2, 7)),
                         ref.collect(policy, share, tasks[2:], 2, seed=4, shard=(2, 7)))
    if name == "nav2d":  # episodes end at the goal: several rounds of collect, tasks of unequal episode counts
        got = ray_col.collect_timesteps(policy, None, tasks[:3], 200, seed=2)
        assert_same_episodes(got, ref.collect_timesteps(policy, None, tasks[:3], 200, seed=2))
        assert ray_col.comm_seconds > 0 and ray_col.collections > 1


@needs_ray
def test_a_generator_is_refused(pair):
    _, ray_col, ref = pair
    with pytest.raises(ValueError, match="pass seed"):
        ray_col.collect(_policy(ref.obs_dim, ref.act_dim), None, _tasks(ref, 2), 1, generator=torch.Generator())


def _kill(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.mark.slow
@needs_ray
def test_a_killed_actor_is_replaced_and_the_batch_is_the_same(local_ray):
    from metarl.rollouts.ray_collector import RayCollector

    env_id, kwargs = NAV
    with RayCollector(env_id, kwargs, n_actors=2, timeout=120, restarts=1) as col, \
            Collector(env_id, kwargs, n_workers=0) as ref:
        policy, tasks = _policy(ref.obs_dim, ref.act_dim), _tasks(ref, 4)
        pids = col.actor_pids()
        _kill(pids[1])
        assert_same_episodes(col.collect(policy, None, tasks, 2, seed=3), ref.collect(policy, None, tasks, 2, seed=3))
        new = col.actor_pids()
        assert new[0] == pids[0] and new[1] != pids[1]


@pytest.mark.slow
@needs_ray
def test_an_actor_dying_more_often_than_allowed_stops_with_one_line(local_ray):
    from metarl.rollouts.ray_collector import RayCollector

    env_id, kwargs = NAV
    with RayCollector(env_id, kwargs, n_actors=2, timeout=120, restarts=0) as col:
        policy, tasks = _policy(col.obs_dim, col.act_dim), _tasks(col, 4)
        _kill(col.actor_pids()[0])
        with pytest.raises(CollectorError, match=r"actor 0 died.*ray_restarts=0") as e:
            col.collect(policy, None, tasks, 2, seed=3)
        assert "\n" not in str(e.value)
        col.collect(policy, None, tasks, 2, seed=3)  # the dead actor was replaced: the collector still works


@pytest.mark.slow
@needs_ray
def test_a_hung_actor_stops_the_collection_within_the_timeout(local_ray):
    from metarl.rollouts.ray_collector import RayCollector

    env_id, kwargs = NAV
    with RayCollector(env_id, kwargs, n_actors=2, timeout=4) as col:
        policy, tasks = _policy(col.obs_dim, col.act_dim), _tasks(col, 4)
        pid = col.actor_pids()[1]
        _kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(CollectorError, match=r"actor\(s\) \[1\] did not finish.*within 4 s"):
                col.collect(policy, None, tasks, 2, seed=3)
            assert time.monotonic() - start < 60  # the timeout, plus a loaded machine's slack; not a hang
        finally:
            _kill(pid, signal.SIGCONT)


@pytest.mark.slow
@needs_ray
def test_an_env_error_inside_an_actor_is_raised_as_itself(local_ray):
    from metarl.rollouts.ray_collector import RayCollector

    sys.path.insert(0, str(ROOT))  # tests.faulty_env, imported in the actors through the module:id form
    try:
        with RayCollector("tests.faulty_env:faulty/NanPendulum-v0", n_actors=1, timeout=120) as col:
            with pytest.raises(EnvOutputError, match="NaN"):
                col.collect(_policy(col.obs_dim, col.act_dim), None, [{"g": 9.0}], 1, seed=0)
    finally:
        sys.path.remove(str(ROOT))


# ------------------------------------------------------------------ the CLI

TRAIN = ["train", "experiments/nav2d.yaml", "--set", "iterations=2", "--set", "meta_batch=3", "--set", "inner.episodes=2",
         "--set", "policy.hidden=[16,16]", "--set", "env.kwargs.horizon=20", "--set", "baselines=[]",
         "--set", "checkpoint_every=1", "--set", "snapshot_every=0", "--set", "torch_threads=1"]


def _train(run_dir, *sets, wait=True):
    cmd = [sys.executable, "-m", "metarl", *TRAIN, "--run-dir", str(run_dir)] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)["track"]["modules"]


@pytest.mark.slow
@needs_ray
def test_train_on_ray_ends_with_the_in_process_parameters(tmp_path):
    """`metarl train --set sampler.backend=ray` (its own local Ray instance, 2 actors) and the
    in-process run (sampler.workers=0) end with bitwise equal parameters."""
    ray_run = _train(tmp_path / "ray", "sampler.backend=ray", "sampler.workers=2")
    local_run = _train(tmp_path / "local", "sampler.workers=0")
    assert ray_run.keys() == local_run.keys()
    for module in local_run:
        for k in local_run[module]:
            assert torch.equal(ray_run[module][k], local_run[module][k]), (module, k)


def _descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every live descendant of ``pid`` (from /proc, independently of the reaper)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = {}, [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out[c] = _cmdline(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@needs_ray
def test_a_sigkilled_driver_leaves_no_ray_process(tmp_path):
    """SIGKILL a `metarl train` on Ray in the middle of its run: the GCS server, raylet, agents
    and actors it started (its process tree, read from /proc before the kill) are all gone soon
    after; without the reaper the agents outlived it by more than a minute (ray 2.60)."""
    p = _train(tmp_path / "run", "sampler.backend=ray", "sampler.workers=2", "iterations=100000", wait=False)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "metrics.csv").exists() or len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) < 2:
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run did not log an iteration in 300 s"
            time.sleep(0.5)
        tree = _descendants(p.pid)
        ray_procs = {pid: cmd for pid, cmd in tree.items() if "ray" in cmd}
        assert any("raylet" in c for c in ray_procs.values()) and sum("ray::_RolloutActor" in c for c in ray_procs.values()) == 2, tree
    finally:
        p.kill()
        p.communicate()
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {pid: cmd for pid, cmd in tree.items() if _alive(pid)}
    assert not left, left
