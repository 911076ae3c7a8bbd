"""Meta-World task distributions (metarl/envs/metaworld.py): splits, task encoding, any-step success,
and a tiny MAML-TRPO run through the CLI. Needs the ``metaworld`` extra (``make test`` runs this
file in ``.venv-mw``, which has it); without it only the missing-extra message is checked."""
from __future__ import annotations

import importlib.util
import json
import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

HAS_METAWORLD = importlib.util.find_spec("metaworld") is not None
needs_metaworld = pytest.mark.skipif(not HAS_METAWORLD, reason="needs the metaworld extra: pip install -e '.[metaworld]' "
                                                               "(make test runs this file in .venv-mw, which has it)")
ML1 = "metarl/MetaWorldML1-v0"
SEED = 0  # the benchmark seed the envs default to


@pytest.fixture(scope="module")
def reach():
    import metarl.envs  # noqa: F401 - registers the ids

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*maximum and minimum values are equal.*")
        env = gym.make(ML1, env_name="reach-v3")
    yield env
    env.close()


@pytest.mark.skipif(HAS_METAWORLD, reason="checks the message shown when the metaworld extra is absent")
def test_without_metaworld_the_ids_name_the_extra():
    from metarl.config import ConfigError, load
    from metarl.envs import make_task_env

    with pytest.raises(ValueError, match=r"pip install -e '\.\[metaworld\]'"):
        make_task_env(ML1)
    with pytest.raises(ConfigError, match="metaworld"):
        load("experiments/metaworld_ml1_reach.yaml")


@needs_metaworld
def test_ml1_reach_builds_with_meta_worlds_spaces_and_horizon(reach):
    from metarl.envs import check_task_env

    env = reach.unwrapped
    assert reach.observation_space.shape == (39,) and reach.action_space.shape == (4,)
    assert env.horizon == 500 and gym.spec(ML1).max_episode_steps == 500
    check_task_env(reach)
    env.set_task(env.sample_tasks(1, np.random.default_rng(0))[0])
    obs, _ = reach.reset(seed=0)
    assert obs.shape == (39,) and np.all(obs[-3:] == 0)  # ML benchmarks hide the goal
    _, reward, terminated, truncated, info = reach.step(np.zeros(4, dtype=np.float32))
    assert np.isfinite(reward) and not terminated and not truncated and "success" in info


@needs_metaworld
def test_train_and_test_goals_are_meta_worlds_splits_and_differ(reach):
    """The tasks are metaworld.ML1(env_name, seed)'s own train / test tasks (independent
    reference: the benchmark object built here), and the two splits share no goal."""
    import metaworld

    bench = metaworld.ML1("reach-v3", seed=SEED)
    env = reach.unwrapped
    rng = np.random.default_rng(1)
    train = env.sample_tasks(50, rng, split="train")
    test = env.sample_tasks(50, rng, split="test")
    assert sorted(t["index"] for t in train) == list(range(50)) == sorted(t["index"] for t in test)
    for tasks, reference in ((train, bench.train_tasks), (test, bench.test_tasks)):
        for t in tasks:
            ref = pickle.loads(reference[t["index"]].data)
            assert np.array_equal(np.asarray(t["rand_vec"]), ref["rand_vec"])
            mine = pickle.loads(env.meta_world_task(t).data)  # the Task set_task installs
            assert mine.keys() == ref.keys() and mine["env_cls"] is ref["env_cls"]
            assert mine["partially_observable"] is ref["partially_observable"] is True
    train_goals = {tuple(t["rand_vec"]) for t in train}
    assert len(train_goals) == 50 and not train_goals & {tuple(t["rand_vec"]) for t in test}
    assert env.sample_tasks(3, np.random.default_rng(1)) == env.sample_tasks(3, np.random.default_rng(1), split="train")
    json.dumps(train)  # JSON tasks: a --tasks-file can hold them; nothing is unpickled from one


@needs_metaworld
def test_set_task_installs_the_benchmarks_goal(reach):
    """Our rebuilt Task and the benchmark's own Task put a fresh Meta-World env in the same state."""
    import metaworld

    bench = metaworld.ML1("reach-v3", seed=SEED)
    env = reach.unwrapped
    task = env.sample_tasks(1, np.random.default_rng(5), split="test")[0]
    env.set_task(task)
    ours, _ = reach.reset(seed=0)
    ref_env = bench.test_classes["reach-v3"]()
    ref_env.set_task(bench.test_tasks[task["index"]])
    theirs, _ = ref_env.reset()
    assert np.array_equal(ours, theirs)
    np.testing.assert_array_equal(env._current._target_pos, ref_env._target_pos)
    ref_env.close()


@needs_metaworld
def test_collection_is_reproducible_in_process_and_in_workers(reach):
    """The collector's contract holds for Meta-World: the same seed gives the same episodes in
    process and in a worker, and the success flag is recorded per step."""
    from metarl.policies.gaussian import GaussianMLPPolicy
    from metarl.rollouts import Collector

    tasks = reach.unwrapped.sample_tasks(2, np.random.default_rng(3), split="test")
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(39, 4, hidden=(8,))
    kw = {"env_name": "reach-v3", "horizon": 12}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*maximum and minimum values are equal.*")
        with Collector(ML1, kw, n_workers=0) as here, Collector(ML1, kw, n_workers=1) as there:
            a = here.collect(policy, None, tasks, 2, seed=7)
            b = there.collect(policy, None, tasks, 2, seed=7)
    for name in ("obs", "actions", "rewards", "mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.lengths.eq(12).all() and a.infos["success"].shape == (2, 12, 2)
    assert not torch.equal(a.rewards[0], a.rewards[1])  # two goals, two reward streams


@needs_metaworld
def test_bad_tasks_are_one_line_errors(reach):
    env = reach.unwrapped
    task = env.sample_tasks(1, np.random.default_rng(0))[0]
    for bad, match in (({**task, "env_name": "push-v3"}, "not a train class"), ({"goal": [0, 0]}, "exactly the keys"),
                       ({**task, "split": "val"}, "split"), ({**task, "rand_vec": [float("nan")] * 6}, "rand_vec")):
        with pytest.raises(ValueError, match=match) as e:
            env.set_task(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="did you mean reach-v3"):
        gym.make(ML1, env_name="reech-v3")


@needs_metaworld
def test_ml10_test_classes_never_appear_in_training(monkeypatch):
    import metaworld
    from metaworld.env_dict import ML10_V3

    import metarl.envs  # noqa: F401
    from metarl.envs import metaworld as mw_envs

    # 5 goals per class instead of 50 (the class split does not depend on it): builds in 1/10 the time
    monkeypatch.setattr(metaworld, "_N_GOALS", 5)
    monkeypatch.setattr(mw_envs, "_BENCHMARKS", {})
    env = gym.make("metarl/MetaWorldML10-v0").unwrapped
    try:
        train = env.sample_tasks(200, np.random.default_rng(0), split="train")
        test = env.sample_tasks(25, np.random.default_rng(0), split="test")
        assert {t["env_name"] for t in train} == set(ML10_V3["train"])  # every class, 20 tasks each (5 goals)
        assert all(n == 20 for n in np.unique([t["env_name"] for t in train], return_counts=True)[1])
        assert {t["env_name"] for t in test} == set(ML10_V3["test"])
        assert not {t["env_name"] for t in train} & set(ML10_V3["test"])
        with pytest.raises(ValueError, match="not a train class"):
            env.set_task({**test[0], "split": "train"})
        env.set_task(test[0])  # a test class is installed from its own split
        assert env.reset(seed=0)[0].shape == (39,)
        assert env.task_vector(test[0]).shape == (env.task_dim,)
    finally:
        env.close()


def test_success_counts_any_step_of_an_episode():
    """Meta-World's evaluation: an episode succeeds if the flag is set at any step. Hand-built
    episodes, 1 task x 3: success only at the last of 3 steps (counts); never, with one step
    unrecorded (NaN); only on the padding step after a 2-step episode's end (must not count)."""
    from metarl.rollouts import Episodes

    T, B = 1, 3
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=torch.float64).reshape(T, 3, B)
    success = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.float64).reshape(T, 3, B)
    success[0, 0, 1] = float("nan")  # a step without the key recorded is not a success
    ep = Episodes(obs=torch.zeros(T, 3, B, 1), actions=torch.zeros(T, 3, B, 1), rewards=torch.zeros(T, 3, B),
                  mask=mask, terminated=torch.zeros(T, 3, B, dtype=torch.bool), log_probs=torch.zeros(T, 3, B),
                  returns=torch.zeros(T, B, dtype=torch.float64), lengths=torch.tensor([[3, 3, 2]]),
                  infos={"success": success})
    assert ep.any_step("success").tolist() == [[True, False, False]]
    assert ep.any_step_rate("success").tolist() == [pytest.approx(1 / 3)]


@needs_metaworld
def test_tiny_maml_trpo_run_trains_and_evaluates_success_on_test_goals(tmp_path):
    from checks import run_cli

    rd = tmp_path / "run"
    sets = ["iterations=2", "meta_batch=2", "inner.episodes=2", "inner.eval_episodes=2", "env.kwargs={env_name: reach-v3, horizon: 15}",
            "policy.hidden=[8]", "sampler.workers=1", "checkpoint_every=1"]
    quiet = {"PYTHONWARNINGS": "ignore"}
    run_cli("train", "experiments/metaworld_ml1_reach.yaml", "--run-dir", str(rd), *[a for x in sets for a in ("--set", x)], env=quiet)
    out = run_cli("evaluate", str(rd), "--tasks", "3", "--steps", "1", env=quiet).stdout
    assert "3 held-out test-split tasks" in out and "success rate after 0..1 inner steps" in out, out
    data = json.loads((rd / "eval" / "adaptation.json").read_text())
    assert {"success/pre", "success/post"} <= set((rd / "metrics.csv").read_text().splitlines()[0].split(","))
    assert data["metric"] == "return" and data["n_tasks"] == 3 and data["eval_split"] == "test"
    for name in ("maml", "random"):
        s = data["success"][name]
        assert len(s["mean"]) == len(s["ci95"]) == 2 and all(0.0 <= m <= 1.0 for m in s["mean"])
        assert set(data["success_by_env"][name]) == {"reach-v3"}
    assert len(data["methods"]["maml"]["mean"]) == 2


class _FlagEnv(gym.Env):
    """3-step episodes whose info["success"] is 1 at step 1 of the task's chosen episode (1-based
    count of resets since the task was set), else 0: a known answer for RL²'s success count."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)

    def __init__(self):
        self.episode, self.resets, self.t = 1, 0, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.resets, self.t = self.resets + 1, 0
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        success = float(self.resets == self.episode and self.t == 1)
        return np.zeros(1, dtype=np.float32), 0.0, False, self.t == 3, {"success": success}


def test_rl2_trials_count_success_per_episode_at_any_step():
    from metarl.algorithms.rl2 import trial_returns
    from metarl.envs import TaskWrapper
    from metarl.envs.trial import TrialEnv

    def set_episode(env, task):
        env.unwrapped.episode, env.unwrapped.resets = int(task["episode"]), 0

    def make():
        return TrialEnv(TaskWrapper(_FlagEnv(), lambda n, rng: [{"episode": 1.0}] * n, set_episode), 2)

    class Still:  # the recurrent policy's predict interface, acting 0
        def predict(self, obs, state=None, episode_start=None, deterministic=False):
            return np.zeros((len(obs), 1), dtype=np.float32), state

    out: dict = {}
    tasks = [{"episode": 1.0}, {"episode": 2.0}, {"episode": 9.0}]
    returns = trial_returns(Still(), make, tasks, episodes=2, trials=2, seed=0, successes=out)
    assert returns.shape == (3, 2)
    assert out["success"].tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
