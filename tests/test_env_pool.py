"""A bounded env pool (``Collector(max_envs=M)``, ``sampler.max_envs``): episodes run in waves that
reuse M envs per worker and come out bit-identical to one env per episode slot (issue #15)."""
from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch

from metarl import config
from metarl.config import ConfigError
from metarl.envs import TaskEnvError, TaskWrapper, check_task_env
from metarl.policies.gaussian import GaussianMLPPolicy
from metarl.rollouts import Collector, Episodes
from metarl.rollouts.collector import waves
from tests.test_rollouts import BrokenEnv

NAV = "metarl/Navigation2D-v0"
NAV_KW = {"goal_radius": 0.1, "horizon": 30}  # a big goal box: episodes end at many different steps
NAV_TASKS = [{"goal": [0.15, 0.1]}, {"goal": [-0.1, 0.2]}, {"goal": [0.05, -0.1]}]
CHEETAH = "metarl/HalfCheetahVel-v0"


def assert_every_field_equal(a: Episodes, b: Episodes) -> None:
    """torch.equal on every tensor field of Episodes (NaN infos compared as NaN), == on the rest."""
    for f in dataclasses.fields(Episodes):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        elif f.name == "infos":
            assert x.keys() == y.keys()
            for key in x:
                assert torch.equal(torch.isnan(x[key]), torch.isnan(y[key])), key
                assert torch.equal(torch.nan_to_num(x[key]), torch.nan_to_num(y[key])), key
        else:
            assert x == y, f.name


def test_waves_split_the_slots_in_consecutive_blocks_of_at_most_max_envs_per_worker():
    assert waves(15, 2, None) == [(0, 15)]  # one env per slot: one wave
    assert waves(15, 2, 2) == [(0, 4), (4, 8), (8, 12), (12, 15)]  # 2 workers x 2 envs per wave
    assert waves(15, 0, 4) == [(0, 4), (4, 8), (8, 12), (12, 15)]  # in-process: 4 envs in all
    assert waves(15, 1, 100) == [(0, 15)]
    assert waves(6, 2, 3) == [(0, 6)]
    # each worker's block of a wave (the pool splits a wave as ceil(len / workers)) fits the bound
    for n, w, m in [(15, 2, 2), (800, 2, 25), (7, 3, 1), (13, 2, 5)]:
        ranges = waves(n, w, m)
        assert ranges[0][0] == 0 and ranges[-1][1] == n and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(-(-(hi - lo) // w) <= m for lo, hi in ranges)


# (env, kwargs, policy dims, tasks, episodes per task, cases of (workers, max_envs)); no max_envs divides the slots
CASES = [
    (NAV, NAV_KW, (2, 2), NAV_TASKS, 5, [(0, 4), (2, 2), (2, 3)]),                               # 15 slots
    (CHEETAH, {"horizon": 12}, (17, 6), [{"velocity": 0.5}, {"velocity": 1.5}], 3, [(0, 4), (2, 2)]),  # 6 slots
]


@pytest.mark.parametrize("env_id, kw, dims, tasks, n_eps, cases", CASES, ids=["nav2d", "half_cheetah_vel"])
def test_waves_of_reused_envs_equal_one_env_per_slot(env_id, kw, dims, tasks, n_eps, cases):
    """Every field of Episodes, and the action-noise generator's final state, are those of one
    env per slot; in-process and in 2 worker processes; the pool never holds more than max_envs
    envs per group. The reference is the in-process one-env-per-slot collector (the original path)."""
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(*dims, hidden=(8,))
    stacked = {k: v.detach() + 0.1 * torch.randn(len(tasks), *v.shape) for k, v in policy.named_parameters()}

    def run(n_workers, max_envs):
        with Collector(env_id, kw, n_workers=n_workers, max_envs=max_envs, fast_path=False) as c:
            generator = torch.Generator().manual_seed(11)
            ep = c.collect(policy, stacked, tasks, n_eps, seed=3, generator=generator)
            again = c.collect(policy, stacked, tasks, n_eps, seed=3)  # the same envs reused by a second collection
            if n_workers == 0:
                assert len(c._backend.group.envs) == min(max_envs or n_eps * len(tasks), n_eps * len(tasks))
        return ep, generator.get_state(), again

    ref, ref_state, ref_again = run(0, None)
    if env_id == NAV:
        assert len(set(ref.lengths.flatten().tolist())) > 3, "the test needs episodes that end at different steps"
    for n_workers, max_envs in cases:
        ep, state, again = run(n_workers, max_envs)
        assert_every_field_equal(ref, ep)
        assert_every_field_equal(ref_again, again)
        assert torch.equal(ref_state, state), (n_workers, max_envs)


@pytest.mark.parametrize("lockstep", [False, True])
def test_timestep_budgets_in_waves_equal_one_env_per_slot(lockstep):
    """collect_timesteps runs rounds of collect: with waves its batches are the same, bit for bit."""
    torch.manual_seed(1)
    policy = GaussianMLPPolicy(2, 2, hidden=(8,))
    got = []
    for max_envs in (None, 3):
        with Collector(NAV, NAV_KW, n_workers=0, max_envs=max_envs) as c:
            got.append(c.collect_timesteps(policy, None, NAV_TASKS, 100, seed=2, lockstep=lockstep))
    assert_every_field_equal(*got)


def test_a_torchrun_share_collected_in_waves_is_its_share_of_one_env_per_slot():
    """shard=(first, total) (a rank's tasks, noise drawn for the whole meta-batch) composes with waves."""
    torch.manual_seed(2)
    policy = GaussianMLPPolicy(2, 2, hidden=(8,))
    got = []
    for max_envs in (None, 4):
        with Collector(NAV, NAV_KW, n_workers=0, max_envs=max_envs) as c:
            got.append(c.collect(policy, None, NAV_TASKS[1:], 5, seed=4, shard=(1, 3)))
    assert_every_field_equal(*got)


def test_a_bad_step_in_a_later_wave_names_its_own_task_and_episode():
    policy = GaussianMLPPolicy(2, 1, hidden=(4,))
    with Collector(BrokenEnv, {"mode": "nan"}, n_workers=0, max_episode_steps=10, max_envs=1) as c:
        with pytest.raises(Exception, match=r"task 1, episode 0\)"):  # global slot 2, run in the third wave
            c.collect(policy, None, [{"x": 0.0}, {"x": 0.9}], 2, seed=0)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_max_envs_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="max_envs must be a positive int"):
        Collector(NAV, NAV_KW, n_workers=0, max_envs=bad)
    if not isinstance(bad, str):  # config values from YAML / --set are parsed first ("4" is 4 there)
        with pytest.raises(ConfigError, match="sampler.max_envs"):
            config.from_dict({"track": "rl", "sampler": {"max_envs": bad}})


def test_sampler_max_envs_reaches_the_collector_and_may_change_on_resume():
    cfg = config.from_dict({"track": "rl", "sampler": {"max_envs": 3}})
    assert cfg.sampler.max_envs == 3 and config.from_dict({"track": "rl"}).sampler.max_envs is None
    assert "sampler.max_envs" in config.resumable_keys(type(cfg)) or "sampler" in config.resumable_keys(type(cfg))
    from metarl.tracks.rl import RLTrack

    track = RLTrack(config.from_dict({"track": "rl", "sampler": {"workers": 0, "max_envs": 3}}))
    try:
        assert track.collector.max_envs == 3
    finally:
        track.collector.close()


def test_check_task_env_refuses_an_env_whose_reset_seed_does_not_fix_the_episode():
    """Reuse needs set_task + reset(seed) to fix the episode: a Pendulum whose start angle carries
    over from the previous episode passes every other check but fails this one."""
    def sample(n, rng):
        return [{"g": float(g)} for g in rng.uniform(5.0, 15.0, size=n)]

    def set_g(env, task):
        env.unwrapped.g = task["g"]

    check_task_env(TaskWrapper(gym.make("Pendulum-v1"), sample, set_g))  # stock Pendulum honours the contract

    class Carryover(TaskWrapper):
        def reset(self, *, seed=None, options=None):
            last = getattr(self.unwrapped, "state", None)
            last = None if last is None else last.copy()
            obs, info = super().reset(seed=seed, options=options)
            if last is not None:  # starts where the previous episode stopped
                self.unwrapped.state = last
                obs = self.unwrapped._get_obs()
            return obs, info

    with pytest.raises(TaskEnvError, match=r"reset\(seed=0\) gave a different start observation") as err:
        check_task_env(Carryover(gym.make("Pendulum-v1"), sample, set_g))
    assert "\n" not in str(err.value) and "reuses envs" in str(err.value)
