"""The README's recipe for a user's own env, end to end through the command line."""
import json
import subprocess
import sys

import numpy as np

from metarl import config


def test_user_env_recipe_trains_and_evaluates_from_the_cli(tmp_path):
    rd = tmp_path / "pend"
    common = [sys.executable, "-m", "metarl.cli"]
    p = subprocess.run(common + ["train", "experiments/pendulum_gravity.yaml", "--run-dir", str(rd),
                                 "--set", "iterations=2", "--set", "meta_batch=3", "--set", "inner.episodes=2"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(common + ["evaluate", str(rd), "--tasks", "3", "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    data = json.loads((rd / "eval" / "adaptation.json").read_text())
    maml = np.array(data["methods"]["maml"]["mean"])
    assert data["metric"] == "return" and maml.shape == (2,) and np.all(maml < 0)  # pendulum rewards are costs


def test_bad_user_module_is_a_config_error():
    import pytest
    with pytest.raises(config.ConfigError, match="cannot import 'examples.nope'"):
        config.load("experiments/pendulum_gravity.yaml", ["env.id=examples.nope:user/X-v0"])


# ---------------------------------------------------------------- outside the checkout, as installed

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = __import__("pathlib").Path(sys.executable).parent / "metarl"

# An env in the style of Meta-World: it cannot reset before it has a task (a bare assert), and its
# episode length is its own attribute, max_path_length, with no TimeLimit registered.
FAKE_METAWORLD = '''
import gymnasium as gym
import numpy as np
from metarl.envs import TaskWrapper


class ReachLike(gym.Env):
    max_path_length = 7
    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def __init__(self):
        self.goal = None
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        assert self.goal is not None  # Meta-World: "set_task must be called before reset"
        self.t, self.pos = 0, self.np_random.uniform(-0.1, 0.1, 2)
        return np.r_[self.pos, self.t], {}

    def step(self, action):
        self.t += 1
        self.pos = self.pos + 0.1 * np.clip(action, -1, 1)
        reward = -float(np.linalg.norm(self.pos - self.goal))
        return np.r_[self.pos, self.t], reward, False, self.t >= self.max_path_length, {}


def sample(n, rng):
    return [{"goal": rng.uniform(-1, 1, 2).tolist()} for _ in range(n)]


def set_goal(env, task):
    env.unwrapped.goal = np.array(task["goal"])


def make(**kwargs):
    return TaskWrapper(ReachLike(**kwargs), sample, set_goal)


if "user/ReachLike-v0" not in gym.registry:
    gym.register("user/ReachLike-v0", entry_point=make)
'''


def _user_dir(tmp_path):
    """A user's project folder: their env module and a config, nothing of the checkout."""
    import shutil

    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "__init__.py").write_text("")
    shutil.copy(REPO / "examples" / "pendulum_gravity.py", tmp_path / "examples")
    (tmp_path / "experiments").mkdir()
    shutil.copy(REPO / "experiments" / "pendulum_gravity.yaml", tmp_path / "experiments")
    (tmp_path / "reach_like.py").write_text(FAKE_METAWORLD)
    return tmp_path


def _clean_env():
    import os
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_readme_recipe_through_the_console_script_from_a_users_directory(tmp_path):
    """`metarl train experiments/pendulum_gravity.yaml` as the README says, with the installed
    `metarl` command (which, unlike `python -m`, does not put the working directory on sys.path),
    run from a folder holding examples/ but not the checkout; workers import the module too."""
    cwd = _user_dir(tmp_path)
    p = subprocess.run([str(CONSOLE_SCRIPT), "train", "experiments/pendulum_gravity.yaml", "--run-dir", "run",
                        "--set", "iterations=1", "--set", "meta_batch=2", "--set", "inner.episodes=2",
                        "--set", "sampler.workers=1", "--set", "eval.tasks=2", "--set", "inner.eval_steps=1",
                        "--evaluate"], cwd=cwd, capture_output=True, text=True, timeout=300, env=_clean_env())
    assert p.returncode == 0, p.stderr
    assert json.loads((cwd / "run" / "eval" / "adaptation.json").read_text())["metric"] == "return"


def test_env_that_cannot_reset_before_a_task_and_has_max_path_length(tmp_path, monkeypatch):
    """Meta-World's two traits: the collector's probe sets a task before resetting, and the episode
    length comes from max_path_length (no TimeLimit, no horizon); in-process and in a worker."""
    import gymnasium as gym
    import torch

    from metarl.envs import check_task_env, find_task_env
    from metarl.policies.gaussian import GaussianMLPPolicy
    from metarl.rollouts import Collector

    monkeypatch.chdir(_user_dir(tmp_path))
    env_id = "reach_like:user/ReachLike-v0"
    cfg = config.from_dict({"track": "rl", "env": {"id": env_id}})  # imports reach_like from the cwd
    assert cfg.env.id == env_id
    env = gym.make("user/ReachLike-v0")
    check_task_env(env)
    policy = GaussianMLPPolicy(3, 2, [8])
    tasks = find_task_env(env).sample_tasks(2, np.random.default_rng(1))
    results = []
    for workers in (0, 1):
        with Collector(env_id, n_workers=workers) as c:
            assert c.max_episode_steps == 7
            results.append(c.collect(policy, None, tasks, 3, seed=5))
    for ep in results:
        assert ep.mask.shape[0] == 2 and int(ep.mask[0].sum()) == 3 * 7  # [T, Tmax, B]: 3 episodes of 7 steps
    assert torch.equal(results[0].rewards, results[1].rewards)  # same seed, same episodes, whichever path


def test_check_task_env_names_a_missing_episode_length():
    import gymnasium as gym
    import pytest

    from metarl.envs import TaskEnvError, TaskWrapper, check_task_env

    env = TaskWrapper(gym.make("Pendulum-v1", max_episode_steps=None).unwrapped, lambda n, rng: [{"g": 9.8}] * n,
                      lambda e, t: setattr(e.unwrapped, "g", t["g"]))
    with pytest.raises(TaskEnvError, match="max_episode_steps=N"):
        check_task_env(env)


def test_misspelt_env_kwarg_names_the_closest_argument(tmp_path):
    p = subprocess.run([str(CONSOLE_SCRIPT), "train", str(REPO / "experiments" / "nav2d.yaml"), "--run-dir", "r",
                        "--set", "env.kwargs.goal_raduis=0.1"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=_clean_env())
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "env.kwargs" in p.stderr and "did you mean 'goal_radius'" in p.stderr
