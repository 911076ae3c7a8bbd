"""Episode collection: layout, padding, reproducibility, workers, per-task params, fast path, errors."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from metarl.envs.base import TaskEnv
from metarl.envs.half_cheetah import HalfCheetahVelEnv
from metarl.functional import forward_tasks, params_of, stack
from metarl.policies.gaussian import GaussianMLPPolicy, log_prob
from metarl.rollouts import Collector, Episodes, EnvOutputError
from metarl.rollouts import mujoco_batch
from metarl.rollouts.mujoco_batch import MujocoBatchStepper

NAV = "metarl/Navigation2D-v0"
NAV_KW = {"goal_radius": 0.1, "horizon": 30}  # a big goal box: some episodes end early
NAV_TASKS = [{"goal": [0.15, 0.1]}, {"goal": [-0.1, 0.2]}]
CHEETAH = "metarl/HalfCheetahVel-v0"
STEP_FIELDS = ("obs", "actions", "rewards", "mask", "terminated", "log_probs")
# The fast path steps with mujoco.batch, which exists from MuJoCo 4.0 on; the metaworld extra pins
# 3.3.0, under which these checks cannot run (the collector then uses the generic path: tested below).
needs_mujoco_batch = pytest.mark.skipif(
    mujoco_batch._mj_batch is None,
    reason=f"mujoco.batch needs MuJoCo >= 4.0, installed {mujoco_batch._mujoco.__version__} (e.g. the metaworld extra's pin)")


def nav_policy(seed: int = 0) -> GaussianMLPPolicy:
    torch.manual_seed(seed)
    return GaussianMLPPolicy(2, 2, hidden=(8,))


def assert_same(a: Episodes, b: Episodes) -> None:
    for name in STEP_FIELDS + ("returns", "lengths", "last_obs"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.infos.keys() == b.infos.keys()
    for key in a.infos:
        assert torch.equal(torch.nan_to_num(a.infos[key]), torch.nan_to_num(b.infos[key])), key


@pytest.fixture(scope="module")
def nav_episodes():
    with Collector(NAV, NAV_KW, n_workers=0) as c:
        yield c.collect(nav_policy(), None, NAV_TASKS, 6, seed=0)


def test_padding_mask_and_terminations_on_navigation(nav_episodes):
    ep = nav_episodes
    T, B = len(NAV_TASKS), 6
    assert ep.n_tasks == T and ep.episodes_per_task == B
    assert ep.obs.shape == (T, ep.max_length, B, 2) and ep.actions.shape == (T, ep.max_length, B, 2)
    for name in ("rewards", "mask", "terminated", "log_probs"):
        assert getattr(ep, name).shape == (T, ep.max_length, B), name
    assert ep.returns.shape == ep.lengths.shape == (T, B)
    lengths = ep.lengths
    assert len(set(lengths.flatten().tolist())) > 2, "the test needs episodes of different lengths"
    assert ep.max_length == int(lengths.max()) == NAV_KW["horizon"]
    steps = torch.arange(ep.max_length)[None, :, None]
    assert torch.equal(ep.mask, (steps < lengths[:, None, :]).to(ep.mask.dtype))  # a prefix, incl. the last step
    assert ep.n_steps == int(ep.mask.sum()) == int(lengths.sum())
    # a true termination is flagged exactly on the last step of an episode that ended early
    ended_early = lengths < NAV_KW["horizon"]
    assert ended_early.any() and (~ended_early).any()
    assert torch.equal(ep.terminated.sum(1), ended_early.long())
    last = (lengths - 1).clamp(min=0)
    assert torch.equal(ep.terminated.gather(1, last[:, None, :])[:, 0], ended_early)
    # padding is zero everywhere; returns are the undiscounted sums of the valid rewards
    pad = ep.mask == 0
    for name in ("rewards", "log_probs"):
        assert (getattr(ep, name)[pad] == 0).all(), name
    assert (ep.obs[pad] == 0).all() and (ep.actions[pad] == 0).all()
    torch.testing.assert_close(ep.returns, (ep.rewards * ep.mask).sum(1))
    # observations chain: s_0 is the origin, s_{t+1} is the position reported after step t
    assert (ep.obs[:, 0] == 0).all()
    pos = ep.infos["position"]
    assert pos.shape == (T, ep.max_length, B, 2)
    valid_next = (ep.mask[:, 1:] > 0)
    torch.testing.assert_close(ep.obs[:, 1:][valid_next], pos[:, :-1][valid_next])
    torch.testing.assert_close(ep.rewards[ep.mask > 0], -ep.infos["distance"][ep.mask > 0])
    final_pos = pos.gather(1, last[:, None, :, None].expand(T, 1, B, 2))[:, 0]
    torch.testing.assert_close(ep.last_obs, final_pos)
    # one task's view keeps the task axis
    t1 = ep.task(1)
    assert t1.n_tasks == 1 and t1.tasks == [NAV_TASKS[1]] and torch.equal(t1.rewards[0], ep.rewards[1])


def test_same_seed_same_episodes_and_different_seed_differs(nav_episodes):
    with Collector(NAV, NAV_KW, n_workers=0) as c:
        again = c.collect(nav_policy(), None, NAV_TASKS, 6, seed=0)
        other = c.collect(nav_policy(), None, NAV_TASKS, 6, seed=1)
    assert_same(nav_episodes, again)
    assert again.seed == 0
    assert not torch.equal(other.actions[:, 0], again.actions[:, 0])


def test_workers_give_the_in_process_episodes(nav_episodes):
    with Collector(NAV, NAV_KW, n_workers=0) as c:
        small_ref = c.collect(nav_policy(), None, NAV_TASKS[1:], 3, seed=4)
    with Collector(NAV, NAV_KW, n_workers=2) as c:
        assert not c.fast_path
        ep = c.collect(nav_policy(), None, NAV_TASKS, 6, seed=0)
        procs = list(c._backend.procs)
        assert len(procs) == 2 and all(p.is_alive() for p in procs)
        small = c.collect(nav_policy(), None, NAV_TASKS[1:], 3, seed=4)  # another size, same workers
        assert c._backend.procs == procs
    assert_same(nav_episodes, ep)
    assert_same(small_ref, small)
    assert not any(p.is_alive() for p in procs), "close() must stop the workers"


def test_spawned_workers_give_the_in_process_episodes():
    with Collector(NAV, NAV_KW, n_workers=0) as c:
        ref = c.collect(nav_policy(), None, NAV_TASKS[:1], 2, seed=3)
    with Collector(NAV, NAV_KW, n_workers=1, start_method="spawn") as c:
        ep = c.collect(nav_policy(), None, NAV_TASKS[:1], 2, seed=3)
    assert_same(ref, ep)


def test_theta_and_stacked_theta_are_the_same_collection(nav_episodes):
    policy = nav_policy()
    theta = {k: v.detach() for k, v in params_of(policy).items()}
    with Collector(NAV, NAV_KW, n_workers=0) as c:
        ep = c.collect(policy, stack(theta, len(NAV_TASKS)), NAV_TASKS, 6, seed=0)
        with pytest.raises(ValueError, match="stacked"):
            c.collect(policy, stack(theta, 3), NAV_TASKS, 6, seed=0)
    assert_same(nav_episodes, ep)


def test_each_task_acts_with_its_own_params():
    policy = nav_policy()
    stacked = {k: v.detach().clone() for k, v in stack(params_of(policy), 2).items()}
    stacked["mean.layers.1.bias"][1] += 100.0  # task 1's policy always pushes hard to +x, +y
    with Collector(NAV, {"goal_radius": None, "horizon": 10}, n_workers=0) as c:
        ep = c.collect(policy, stacked, NAV_TASKS, 4, seed=0)
    assert ep.actions[0].abs().mean() < 5 and (ep.actions[1] > 50).all()
    # stored actions are the unclipped samples; the env received them clipped to [-1, 1]
    torch.testing.assert_close(ep.infos["applied_action"][1], torch.full_like(ep.infos["applied_action"][1], 0.1))
    torch.testing.assert_close(ep.obs[1, -1], torch.full_like(ep.obs[1, -1], 0.9))


def test_log_probs_are_the_policy_log_prob_of_the_stored_actions(nav_episodes):
    ep, policy = nav_episodes, nav_policy()
    assert not ep.log_probs.requires_grad
    mean, log_std = forward_tasks(policy, stack(params_of(policy), ep.n_tasks), ep.obs)
    expected = log_prob(mean, log_std, ep.actions).detach()
    valid = ep.mask > 0
    torch.testing.assert_close(ep.log_probs[valid], expected[valid], rtol=1e-5, atol=1e-5)


@needs_mujoco_batch
def test_fast_path_steps_exactly_like_gymnasium_envs():
    rng = np.random.default_rng(0)
    tasks = HalfCheetahVelEnv.sample_tasks(3, rng)
    seeds = [11, 12, 13]
    actions = np.clip(rng.normal(size=(60, 3, 6)), -1, 1).astype(np.float32)
    envs = [gym.make(CHEETAH) for _ in tasks]
    ref_obs, ref_rew = np.zeros((60, 3, 17)), np.zeros((60, 3))
    starts = []
    for k, env in enumerate(envs):
        env.unwrapped.set_task(tasks[k])
        starts.append(env.reset(seed=seeds[k])[0])
        for t in range(60):
            o, r, *_ = env.step(actions[t, k])
            ref_obs[t, k], ref_rew[t, k] = o, r
    template = gym.make(CHEETAH)
    stepper = MujocoBatchStepper(template, nthread=2)
    obs0 = stepper.reset(tasks, seeds)
    assert np.array_equal(obs0, np.stack(starts))  # same reset distribution, same draws
    active = np.ones(3, dtype=bool)
    for t in range(60):
        o, r, term, trunc, info = stepper.step(actions[t], active)
        assert np.array_equal(o, ref_obs[t]), t
        assert np.array_equal(r, ref_rew[t]), t
        assert not term.any() and not trunc.any()


def _independent_reward(kind, target, x_before, x_after, dt, action):
    """The task rewards written out from the papers' definitions (Finn et al. 2017 sec. 5.3 via
    pytorch-maml-rl), not from the project's env code: v = Δx / dt of the root,
    HalfCheetahVel: -|v - target| - 0.05·Σa²; AntVel: -|v - target| + 1 - 0.005·Σa² + 0.05."""
    v = (x_after - x_before) / dt
    if kind == "cheetah":
        return -abs(v - target) - 0.05 * float(np.sum(np.square(action, dtype=np.float64)))
    return -abs(v - target) + 1.0 - 0.005 * float(np.sum(np.square(action, dtype=np.float64))) + 0.05


@needs_mujoco_batch
@pytest.mark.parametrize("env_id,stock_id,kind,act_dim", [(CHEETAH, "HalfCheetah-v5", "cheetah", 6),
                                                          ("metarl/AntVel-v0", "Ant-v5", "ant", 8)])
def test_fast_path_rewards_match_an_independent_formula_on_stock_gymnasium_states(env_id, stock_id, kind, act_dim):
    """The fast path against stock Gymnasium (``HalfCheetah-v5`` / ``Ant-v5``, none of the
    project's env code): same start state, same actions; the stock env's states give the
    velocity, and the formula above the reward (the ant's termination: torso z outside [0.2, 1])."""
    rng = np.random.default_rng(3)
    tasks = [{"velocity": 0.7}, {"velocity": 1.9}]
    seeds = [5, 6]
    template = gym.make(env_id)
    stepper = MujocoBatchStepper(template, nthread=1)
    stepper.reset(tasks, seeds)
    stock = []
    for task, seed in zip(tasks, seeds):
        own = gym.make(env_id)
        own.unwrapped.set_task(task)
        own.reset(seed=seed)  # only to read the start state the stepper also uses
        env = gym.make(stock_id)
        env.reset(seed=0)
        env.unwrapped.set_state(own.unwrapped.data.qpos.copy(), own.unwrapped.data.qvel.copy())
        stock.append(env)
    active = np.ones(2, dtype=bool)
    checked = 0
    for t in range(80):
        actions = np.clip(rng.normal(size=(2, act_dim)), -1, 1).astype(np.float32)
        _, reward, term, _, _ = stepper.step(actions, active)
        for k, env in enumerate(stock):
            if not active[k]:
                continue
            x0 = float(env.unwrapped.data.qpos[0])
            _, _, stock_term, _, _ = env.step(actions[k])
            want = _independent_reward(kind, tasks[k]["velocity"], x0, float(env.unwrapped.data.qpos[0]),
                                       env.unwrapped.dt, actions[k])
            assert reward[k] == pytest.approx(want, rel=1e-9, abs=1e-9), (t, k)
            assert bool(term[k]) == bool(stock_term), (t, k)
            checked += 1
        active &= ~term
        if not active.any():
            break
    assert checked >= 40


@needs_mujoco_batch
@pytest.mark.parametrize("env_id", [CHEETAH, "metarl/AntVel-v0"])
def test_fast_path_collection_equals_generic_collection(env_id):
    kw = {"horizon": 40}
    policy_args = (17, 6) if env_id == CHEETAH else (27, 8)
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(*policy_args, hidden=(16,))
    tasks = [{"velocity": 0.5}, {"velocity": 1.5}]
    with Collector(env_id, kw, n_workers=2) as fast, Collector(env_id, kw, n_workers=0, fast_path=False) as slow:
        assert fast.fast_path and not slow.fast_path
        a = fast.collect(policy, None, tasks, 2, seed=5)
        b = slow.collect(policy, None, tasks, 2, seed=5)
    assert_same(a, b)
    assert "forward_velocity" in a.infos
    if env_id != CHEETAH:  # the ant falls over: early terminations are reproduced too
        assert a.terminated.any() and (a.lengths < kw["horizon"]).any()


def test_without_mujoco_batch_the_generic_path_runs_and_says_so_once(monkeypatch):
    """MuJoCo 3.x (the metaworld extra's 3.3.0) has no mujoco.batch: the built-in MuJoCo envs then
    collect on the generic path, and one RuntimeWarning per process says so (not one per collector)."""
    import warnings

    monkeypatch.setattr(mujoco_batch, "_mj_batch", None)
    monkeypatch.setattr(mujoco_batch, "_said_generic", False)
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(17, 6, hidden=(8,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Collector(CHEETAH, {"horizon": 10}, n_workers=0) as first, \
                Collector(CHEETAH, {"horizon": 10}, n_workers=0) as second:
            assert not first.fast_path and not second.fast_path
            ep = first.collect(policy, None, [{"velocity": 1.0}], 2, seed=3)
    said = [w for w in caught if "mujoco.batch" in str(w.message)]
    assert len(said) == 1 and issubclass(said[0].category, RuntimeWarning), [str(w.message) for w in caught]
    assert "generic path" in str(said[0].message)
    assert ep.lengths.eq(10).all() and torch.isfinite(ep.returns).all()


# ---------------------------------------------------------------------------- user envs and errors


class BrokenEnv(gym.Env, TaskEnv):
    """A tiny task env whose step output goes bad at step 3 (``mode`` picks how)."""

    task_dim = 1
    observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, mode: str = "nan"):
        self.mode, self.t, self.task = mode, 0, {"x": 0.0}

    def sample_tasks(self, n, rng=None):
        return [{"x": float(v)} for v in rng.uniform(size=n)]

    def set_task(self, task):
        self.task = dict(task)

    def get_task(self):
        return dict(self.task)

    def task_vector(self, task):
        return np.array([task["x"]])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        obs, reward = np.zeros(2, np.float32), 0.0
        if self.t >= 3 and self.task["x"] > 0.5:
            if self.mode == "nan":
                obs = np.array([0.0, np.nan], np.float32)
            elif self.mode == "shape":
                obs = np.zeros(3, np.float32)
            else:
                reward = np.zeros(2)
        return obs, reward, False, self.t >= 10, {"t": self.t}


@pytest.mark.parametrize("mode, problem", [("nan", "NaN"), ("shape", "shape"), ("reward", "real scalar reward")])
@pytest.mark.parametrize("n_workers", [0, 1])
def test_bad_env_output_raises_one_line_error_naming_the_env(mode, problem, n_workers):
    policy = GaussianMLPPolicy(2, 1, hidden=(4,))
    with Collector(BrokenEnv, {"mode": mode}, n_workers=n_workers, max_episode_steps=10) as c:
        with pytest.raises(EnvOutputError) as info:
            c.collect(policy, None, [{"x": 0.0}, {"x": 0.9}], 2, seed=0)
    msg = str(info.value)
    assert "BrokenEnv" in msg and "task 1" in msg and problem in msg and "\n" not in msg


def test_env_without_time_limit_needs_a_cap():
    policy = GaussianMLPPolicy(2, 1, hidden=(4,))
    with pytest.raises(ValueError, match="max_episode_steps"):
        Collector(BrokenEnv, n_workers=0)
    with Collector(BrokenEnv, n_workers=0, max_episode_steps=6) as c:
        ep = c.collect(policy, None, [{"x": 0.1}], 3, seed=0)
    assert ep.lengths.eq(6).all() and not ep.terminated.any()
    assert ep.infos["t"][0, :, 0].tolist() == list(range(1, 7))


def make_gravity_pendulum():
    """A user's env: stock Pendulum with the gravity as the task, through TaskWrapper."""
    from metarl.envs import TaskWrapper

    def sample(n, rng):
        return [{"g": float(g)} for g in rng.uniform(5.0, 15.0, size=n)]

    def set_gravity(env, task):
        env.unwrapped.g = task["g"]

    return TaskWrapper(gym.make("Pendulum-v1"), sample, set_gravity)


def test_a_task_wrapped_gymnasium_env_takes_the_generic_path():
    policy = GaussianMLPPolicy(3, 1, hidden=(4,))
    with Collector(make_gravity_pendulum, n_workers=1, max_episode_steps=15) as c:
        assert not c.fast_path
        ep = c.collect(policy, None, [{"g": 5.0}, {"g": 15.0}], 2, seed=0)
    assert ep.obs.shape == (2, 15, 2, 3) and ep.lengths.eq(15).all() and torch.isfinite(ep.returns).all()


def test_timestep_budget_equals_episode_count_when_no_episode_ends_early():
    """With a fixed horizon, a budget of k·horizon steps is k episodes: the same batch as
    collect(k) at the same seed, bit for bit."""
    kw = {"goal_radius": None, "horizon": 30}
    with Collector(NAV, kw, n_workers=0) as c:
        by_steps = c.collect_timesteps(nav_policy(), None, NAV_TASKS, 100, seed=5)  # ceil(100/30) = 4
        by_count = c.collect(nav_policy(), None, NAV_TASKS, 4, seed=5)
    assert_same(by_steps, by_count)
    assert by_steps.episode_counts.tolist() == [4, 4]


def test_timestep_budget_gives_each_task_whole_episodes_up_to_its_budget():
    """rllab's batch_size: per task, whole episodes until the step count reaches the budget;
    tasks whose episodes end early get more of them, the others are padded with empty ones."""
    from metarl.objectives import masked_mean

    kw = {"goal_radius": 0.3, "horizon": 30}
    tasks = [{"goal": [0.05, 0.0]}, {"goal": [0.45, -0.45]}]  # inside the goal box at once / far
    budget = 200
    with Collector(NAV, kw, n_workers=0) as c:
        ep = c.collect_timesteps(nav_policy(), None, tasks, budget, seed=1)
    counts = ep.episode_counts
    steps = ep.lengths.sum(-1)
    assert counts[0] > counts[1] and int(counts.max()) == ep.episodes_per_task
    for i in range(2):
        n = int(counts[i])
        lengths = ep.lengths[i]
        assert (lengths[:n] > 0).all() and (lengths[n:] == 0).all()
        assert steps[i] >= budget and steps[i] - lengths[n - 1] < budget  # minimal: whole episodes
        assert ep.mask[i, :, n:].sum() == 0 and ep.returns[i, n:].abs().sum() == 0
        torch.testing.assert_close(ep.mean_returns()[i], ep.returns[i, :n].mean())
        # the padding changes no loss: per-episode averages over the task's own episodes only
        x = torch.randn(ep.max_length, n, dtype=ep.rewards.dtype)
        padded = torch.cat([x, torch.zeros(ep.max_length, ep.episodes_per_task - n, dtype=x.dtype)], 1)
        for reduction in ("episode", "step"):
            torch.testing.assert_close(masked_mean(padded, ep.mask[i], reduction), masked_mean(x, ep.mask[i, :, :n], reduction))


def rllab_vectorized_sampler(lengths: np.ndarray, budget: int) -> np.ndarray:
    """rllab's VectorizedSampler loop, step by step: S slots, slot j plays episodes of lengths
    lengths[:, j] back to back; after every step the finished episodes' lengths join the count;
    stop once it reaches the budget. Returns the kept mask [R, S]."""
    rounds, slots = lengths.shape
    kept = np.zeros_like(lengths, dtype=bool)
    current, elapsed, count = np.zeros(slots, int), np.zeros(slots, int), 0
    while count < budget:
        elapsed += 1
        for j in range(slots):
            if elapsed[j] == lengths[current[j], j]:
                kept[current[j], j] = True
                count += lengths[current[j], j]
                current[j], elapsed[j] = current[j] + 1, 0
    return kept


def test_lockstep_selection_reproduces_rllabs_vectorized_sampler():
    from metarl.rollouts.collector import lockstep_selection

    rng = np.random.default_rng(0)
    for _ in range(200):
        slots, budget = int(rng.integers(1, 6)), int(rng.integers(1, 60))
        lengths = rng.integers(1, 12, size=(40, slots))
        want = rllab_vectorized_sampler(lengths, budget)
        rounds = int(np.nonzero(want.any(1))[0].max()) + 1
        got = None
        for r in range(1, 41):  # the fewest rounds that decide it
            got = lockstep_selection(torch.from_numpy(lengths[:r]), budget)
            if got is not None:
                break
        assert got is not None and r >= rounds
        assert np.array_equal(got.numpy(), want[:r]) and not want[r:].any()
    # undecidable: a slot's known episodes end before the stopping step
    assert lockstep_selection(torch.tensor([[2, 1]]), 3) is None
    assert lockstep_selection(torch.tensor([[2, 1], [5, 1]]), 3).tolist() == [[True, True], [False, True]]
    assert lockstep_selection(torch.tensor([[5, 5]]), 11) is None  # never reaches the budget


def test_lockstep_batches_favour_short_episodes():
    """collect_timesteps(lockstep=True): budget // horizon slots per task, at least the budget in
    completed episodes, and the in-flight episodes dropped at the end are mostly the long ones,
    so the kept episodes are shorter on average than an unbiased batch's."""
    kw = {"goal_radius": 0.3, "horizon": 30}
    tasks = [{"goal": [0.4, 0.0]}, {"goal": [0.0, -0.45]}]  # about 30% of the episodes time out
    with Collector(NAV, kw, n_workers=0) as c:
        lock = c.collect_timesteps(nav_policy(), None, tasks, 120, seed=3, lockstep=True)
        plain = c.collect_timesteps(nav_policy(), None, tasks, 3000, seed=3)
    counts = lock.episode_counts
    for i in range(2):
        n = int(counts[i])
        assert lock.lengths[i, :n].sum() >= 120 and (lock.lengths[i, :n] > 0).all() and (lock.lengths[i, n:] == 0).all()
    mean_len = lambda ep: float(ep.lengths.sum() / ep.episode_counts.sum())
    long_ = plain.lengths[plain.lengths > 0]
    assert 0.1 < float((long_ == 30).float().mean()) < 0.9  # a real mixture of lengths
    # averaged over many seeds, the lockstep batches hold shorter episodes than the unbiased rate
    with Collector(NAV, kw, n_workers=0) as c:
        locks = [c.collect_timesteps(nav_policy(), None, tasks, 120, seed=s, lockstep=True) for s in range(30)]
    assert np.mean([mean_len(ep) for ep in locks]) < mean_len(plain) - 1.0


def test_timestep_budget_rejects_a_non_positive_budget():
    with Collector(NAV, NAV_KW, n_workers=0) as c:
        with pytest.raises(ValueError, match="positive int"):
            c.collect_timesteps(nav_policy(), None, NAV_TASKS, 0)
