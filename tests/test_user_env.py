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
