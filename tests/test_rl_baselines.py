"""PPO baselines of Finn et al. (2017, sec. 5.3): task-mixture / oracle envs, SB3 -> GaussianMLPPolicy, evaluation."""
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")

from gymnasium.utils.env_checker import check_env as gym_check_env  # noqa: E402
from stable_baselines3.common.env_checker import check_env as sb3_check_env  # noqa: E402

from metarl.envs import Navigation2DEnv, make_task_env  # noqa: E402
from metarl.policies.gaussian import GaussianMLPPolicy  # noqa: E402
from metarl.rl_baselines import (  # noqa: E402
    OracleEnv,
    OraclePolicy,
    TaskMixtureEnv,
    baseline_returns,
    load_baseline,
    make_baseline_env,
    oracle_returns,
    ppo_to_gaussian_policy,
    save_baseline,
    train_oracle,
    train_pretrain,
)

NAV = "metarl/Navigation2D-v0"
CHEETAH = "metarl/HalfCheetahVel-v0"
# one PPO update of 256 transitions: enough to move every weight away from its initialisation
TINY = dict(timesteps=256, n_envs=2, ppo_kwargs=dict(n_steps=128, batch_size=64, n_epochs=2))


@pytest.fixture(scope="module")
def eval_tasks():
    return Navigation2DEnv.sample_tasks(10, np.random.default_rng(123))


@pytest.fixture(scope="module")
def trained_oracle():
    # 10 PPO updates of 2048 transitions (~10-15 s on 2 shared cores)
    return train_oracle(NAV, timesteps=20480, hidden=(100, 100), activation="relu", seed=0)


@pytest.fixture(scope="module")
def tiny_pretrain():
    return train_pretrain(NAV, hidden=(100, 100), activation="relu", seed=0, **TINY)


# ---------------------------------------------------------------------------------------- envs


@pytest.mark.parametrize("cls", [TaskMixtureEnv, OracleEnv])
@pytest.mark.parametrize("env_id", [NAV, CHEETAH])
def test_envs_pass_check_env(cls, env_id):
    env = cls(make_task_env(env_id))
    with warnings.catch_warnings():
        # wrapped env, and the inner envs' unbounded observation spaces: expected warnings only
        warnings.filterwarnings("ignore", message=".*different from the unwrapped version.*")
        warnings.filterwarnings("ignore", message=".*Box observation space (minimum|maximum) value.*")
        gym_check_env(env, skip_render_check=True)
        sb3_check_env(env, warn=False)
    env.close()


@pytest.mark.parametrize("cls", [TaskMixtureEnv, OracleEnv])
def test_resample_task_every_reset_reproducible_by_seed(cls):
    def tasks(seed, n=6):
        env = cls(make_task_env(NAV))
        out = [env.reset(seed=seed)[1]["task"]]
        for _ in range(n - 1):
            env.step(env.action_space.sample())
            out.append(env.reset()[1]["task"])  # unseeded resets continue the seeded task stream
        assert out[-1] == env.task == env.task_env.get_task()
        return [tuple(t["goal"]) for t in out]

    a = tasks(7)
    assert len(set(a)) == len(a)
    assert a == tasks(7)
    assert a != tasks(8)
    assert all(-0.5 <= g <= 0.5 for goal in a for g in goal)


def test_reset_option_installs_task_and_no_task_env_raises():
    env = TaskMixtureEnv(make_task_env(NAV))
    _, info = env.reset(seed=0, options={"task": {"goal": [0.3, -0.2]}})
    assert info["task"] == {"goal": [0.3, -0.2]} == env.task
    import gymnasium as gym

    with pytest.raises(ValueError, match="TaskWrapper"):
        TaskMixtureEnv(gym.make("Pendulum-v1"))


@pytest.mark.parametrize("env_id", [NAV, CHEETAH])
def test_oracle_obs_is_obs_plus_task_vector(env_id):
    oracle, plain = make_baseline_env(env_id, oracle=True), make_baseline_env(env_id, oracle=False)
    task_env = plain.task_env
    d = plain.observation_space.shape[0]
    assert oracle.observation_space.shape == (d + task_env.task_dim,)
    assert oracle.observation_space.dtype == plain.observation_space.dtype
    o1, i1 = oracle.reset(seed=3)
    o2, i2 = plain.reset(seed=3)
    assert i1["task"] == i2["task"]
    vec = task_env.task_vector(i2["task"]).astype(o1.dtype)
    np.testing.assert_array_equal(o1, np.concatenate([o2, vec]))
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.uniform(-1, 1, size=plain.action_space.shape).astype(np.float32)
        (o1, r1, *_), (o2, r2, *_) = oracle.step(a), plain.step(a)
        np.testing.assert_array_equal(o1, np.concatenate([o2, vec]))
        assert r1 == r2
        assert oracle.observation_space.contains(o1)


# --------------------------------------------------------------------------- SB3 -> our policy


def _assert_same_distribution(model, policy, obs_dim, dtype=torch.float32):
    obs = torch.randn(64, obs_dim, generator=torch.Generator().manual_seed(0)) * 2.0
    with torch.no_grad():
        dist = model.policy.get_distribution(obs).distribution
        mean, log_std = policy(obs.to(dtype))
    torch.testing.assert_close(mean.float(), dist.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_std.float().expand_as(mean), dist.stddev.log(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_std.float(), model.policy.log_std.detach(), rtol=0, atol=0)


def test_weight_conversion_is_exact(tiny_pretrain):
    model = tiny_pretrain
    assert model.num_timesteps == 256
    # the update moved log_std away from its init of 0, so copying it is actually tested
    assert model.policy.log_std.detach().abs().max() > 0
    policy = GaussianMLPPolicy(2, 2, hidden=(100, 100), activation="relu", init_std=0.5)
    out = ppo_to_gaussian_policy(model, policy)
    assert out is policy
    _assert_same_distribution(model, policy, 2)
    # built from scratch, and into a float64 policy
    _assert_same_distribution(model, ppo_to_gaussian_policy(model), 2)
    p64 = ppo_to_gaussian_policy(model, GaussianMLPPolicy(2, 2, hidden=(100, 100)).double())
    _assert_same_distribution(model, p64, 2, torch.float64)


def test_weight_conversion_tanh_oracle_and_mismatch():
    model = train_oracle(NAV, hidden=(32, 16), activation="tanh", seed=1, **TINY)
    policy = ppo_to_gaussian_policy(model)
    assert policy.mean.activation == "tanh" and [l.out_features for l in policy.mean.layers] == [32, 16, 2]
    _assert_same_distribution(model, policy, 4)
    with pytest.raises(ValueError, match="GaussianMLPPolicy"):
        ppo_to_gaussian_policy(model, GaussianMLPPolicy(4, 2, hidden=(32, 32), activation="tanh"))
    with pytest.raises(ValueError, match="activation"):
        ppo_to_gaussian_policy(model, GaussianMLPPolicy(4, 2, hidden=(32, 16), activation="relu"))


# -------------------------------------------------------------------------------- evaluation


def test_oracle_training_improves_return(trained_oracle, eval_tasks):
    untrained = train_oracle(NAV, timesteps=0, seed=0)
    before = oracle_returns(untrained, NAV, None, eval_tasks, episodes=2, seed=0)
    after = oracle_returns(trained_oracle, NAV, None, eval_tasks, episodes=2, seed=0)
    # measured: about -64 before, -8 after (returns are minus the summed distance to the goal)
    assert after.mean() > before.mean() + 20.0, (before.mean(), after.mean())
    assert after.mean() > -25.0
    greedy = oracle_returns(trained_oracle, NAV, None, eval_tasks, episodes=1, seed=0, deterministic=True)
    assert greedy.mean() > before.mean() + 20.0


def test_oracle_returns_shape_and_determinism(trained_oracle, eval_tasks):
    tasks = eval_tasks[:4]
    a = oracle_returns(trained_oracle, NAV, None, tasks, episodes=2, seed=5)
    assert a.shape == (4,) and a.dtype == np.float64 and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, oracle_returns(trained_oracle, NAV, None, tasks, episodes=2, seed=5))
    assert not np.array_equal(a, oracle_returns(trained_oracle, NAV, None, tasks, episodes=2, seed=6))
    # a task's result does not depend on the other tasks in the list
    np.testing.assert_array_equal(a[:1], oracle_returns(trained_oracle, NAV, None, tasks[:1], episodes=2, seed=5))
    # Navigation2D resets to the origin: greedy returns do not depend on the seed
    d5 = oracle_returns(trained_oracle, NAV, None, tasks, episodes=1, seed=5, deterministic=True)
    np.testing.assert_array_equal(d5, oracle_returns(trained_oracle, NAV, None, tasks, episodes=1, seed=9,
                                                     deterministic=True))


def test_oracle_policy_matches_sb3_predict(trained_oracle, eval_tasks):
    task = eval_tasks[0]
    vec = Navigation2DEnv.task_vector(task)
    actor = OraclePolicy(trained_oracle, vec)
    obs = np.array([0.1, -0.2], dtype=np.float32)
    expected, _ = trained_oracle.predict(np.concatenate([obs, vec]).astype(np.float32), deterministic=True)
    np.testing.assert_allclose(actor.act(obs, deterministic=True), expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="rng"):
        actor.act(obs)


def test_pretrain_returns_and_oracle_guard(tiny_pretrain, eval_tasks):
    r = baseline_returns(tiny_pretrain, NAV, None, eval_tasks[:2], episodes=1, seed=0)
    assert r.shape == (2,)
    with pytest.raises(ValueError, match="train_oracle"):
        oracle_returns(tiny_pretrain, NAV, None, eval_tasks[:2])


def test_save_load_roundtrip(tiny_pretrain, tmp_path):
    path = save_baseline(tiny_pretrain, tmp_path / "sub" / "pretrain")
    assert path.name == "pretrain.zip" and path.is_file()
    loaded = load_baseline(tmp_path / "sub" / "pretrain")
    assert loaded.metarl_baseline["kind"] == "pretrain"
    assert loaded.metarl_baseline["env_id"] == NAV and loaded.metarl_baseline["hidden"] == [100, 100]
    for (k, v), (k2, v2) in zip(tiny_pretrain.policy.state_dict().items(), loaded.policy.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(FileNotFoundError, match="save_baseline"):
        load_baseline(tmp_path / "missing")
