"""RL² (Duan et al. 2016) on the meta-RL track: the trial wrapper, the hidden state's life across
a trial, the faster LSTM pass against sb3-contrib's loop, bitwise resume, the evaluate contract,
and (slow) learning on 2D navigation."""
import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sb3_contrib", reason="RL² needs the baselines extra (sb3-contrib)")

from gymnasium.utils.env_checker import check_env  # noqa: E402

from metarl import config  # noqa: E402
from metarl.envs import make_task_env  # noqa: E402
from metarl.envs.trial import TrialEnv  # noqa: E402
from metarl.training import make_track, seed_everything, train  # noqa: E402


def test_trial_env_passes_check_env_and_makes_k_episodes_of_one_task_one_episode():
    env = TrialEnv(make_task_env("metarl/Navigation2D-v0", horizon=4, goal_radius=None), 3)
    check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=5)
    goal = info["task"]["goal"]
    assert obs.shape == (2 + 2 + 1 + 1,) and np.all(obs == 0)           # origin; no previous action, reward, done
    steps, total = 0, 0.0
    while True:
        action = np.array([0.5, -2.0], dtype=np.float32)                 # out of bounds: clipped to [-1, 1] in the obs
        obs, reward, terminated, truncated, info = env.step(action)
        steps, total = steps + 1, total + reward
        assert not truncated and info["episode_index"] == (steps - 1) // 4
        np.testing.assert_array_equal(obs[2:4], [0.5, -1.0])
        assert obs[4] == np.float32(reward)
        inner_done = steps % 4 == 0
        assert obs[5] == float(inner_done) and info["inner_done"] == inner_done
        if inner_done and not terminated:
            np.testing.assert_array_equal(obs[:2], [0.0, 0.0])           # the next episode starts at the origin
        assert env.task_env.get_task()["goal"] == goal                   # one task for the whole trial
        if terminated:
            break
    assert steps == 12 and np.isclose(sum(info["trial_episode_returns"]), total)
    # a new trial draws a new task from the distribution; a fixed one through options
    assert env.reset()[1]["task"]["goal"] != goal
    assert env.reset(options={"task": {"goal": [0.1, 0.2]}})[1]["task"] == {"goal": [0.1, 0.2]}
    with pytest.raises(ValueError, match="episodes_per_trial"):
        TrialEnv(make_task_env("metarl/Navigation2D-v0"), 0)


def rl2_cfg(**extra):
    data = {"track": "rl", "algorithm": "rl2", "iterations": 4, "checkpoint_every": 2, "log_every": 1, "meta_batch": 4,
            "env": {"id": "metarl/Navigation2D-v0", "kwargs": {"horizon": 6, "goal_radius": 0.25}},
            "rl2": {"episodes_per_trial": 3, "hidden": 8, "minibatch": 24, "epochs": 2},
            "sampler": {"workers": 0}, "eval": {"tasks": 3, "steps": 2}}
    return config.from_dict(config.merge(data, extra))


def test_hidden_state_carries_across_the_episodes_of_a_trial_and_resets_between_trials():
    """In RecurrentPPO's own rollout: the LSTM state stored before every step equals a hand
    unroll of the policy's LSTM over the trial so far from zero (so it carries across inner
    episode ends), and the reset flag is set exactly at trial starts, never at inner-episode
    starts (whose observations carry done = 1)."""
    seed_everything(0)
    method = make_track(rl2_cfg()).method
    before = copy.deepcopy(method.policy.state_dict())
    method.train_step([], seed=11)
    buf = method.model.rollout_buffer
    policy = method.new_policy()
    policy.load_state_dict(before)                      # the policy that collected the rollout
    n_steps, n_envs = method.model.n_steps, method.model.n_envs
    assert buf.generator_ready  # PPO's update has laid the batch out env-major: [n_envs * n_steps, ...]
    obs = torch.as_tensor(buf.observations).reshape(n_envs, n_steps, -1).transpose(0, 1)
    starts = buf.episode_starts.reshape(n_envs, n_steps).T
    hidden = torch.as_tensor(buf.hidden_states_pi).reshape(n_envs, n_steps, 1, -1).transpose(0, 1)  # [t, env, layer, h]
    inner_starts = trial_restarts = 0
    for e in range(n_envs):
        h = c = torch.zeros(1, 1, policy.lstm_actor.hidden_size)
        for t in range(n_steps):
            if starts[t, e]:
                h, c = torch.zeros_like(h), torch.zeros_like(c)
                trial_restarts += t > 0
            else:
                torch.testing.assert_close(hidden[t, e], h[:, 0], rtol=0, atol=1e-6)
                inner_starts += bool(obs[t, e, -1] == 1)
            # independently: a trial's first observation is the only one with no previous action, reward or done
            assert bool(starts[t, e]) == bool((obs[t, e, 2:] == 0).all()), (t, e)
            with torch.no_grad():
                _, (h, c) = policy.lstm_actor(obs[t, e].view(1, 1, -1), (h, c))
    assert inner_starts > 0 and trial_restarts > 0      # both cases occurred in this rollout


def test_one_call_lstm_pass_equals_sb3_contribs_step_loop():
    from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
    from metarl.policies.recurrent import TrialLstmPolicy

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(4, 6)
    n_seq, length = 5, 7
    features = torch.randn(n_seq * length, 4)
    starts = torch.zeros(n_seq, length)
    starts[[0, 2, 3], 0] = 1.0                           # some sequences start an episode (RecurrentPPO's layout)
    states = (torch.randn(1, n_seq, 6), torch.randn(1, n_seq, 6))
    ours = TrialLstmPolicy._process_sequence(features, states, starts.flatten(), lstm)
    ref = RecurrentActorCriticPolicy._process_sequence(features, states, starts.flatten(), lstm)
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-6)
    for a, b in zip(ours[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    starts[1, 3] = 1.0                                   # a reset inside a sequence: the loop itself
    ours = TrialLstmPolicy._process_sequence(features, states, starts.flatten(), lstm)
    ref = RecurrentActorCriticPolicy._process_sequence(features, states, starts.flatten(), lstm)
    assert torch.equal(ours[0], ref[0])


def test_resume_is_bitwise_identical(tmp_path):
    full = train(rl2_cfg(), tmp_path / "full", tensorboard=False)
    train(rl2_cfg(iterations=2), tmp_path / "split", tensorboard=False)
    resumed = train(rl2_cfg(), tmp_path / "split", resume=True, tensorboard=False)
    fresh = train(rl2_cfg(iterations=0), tmp_path / "zero", tensorboard=False)
    moved = False
    for k, p in full.modules["rl2"].state_dict().items():
        assert torch.equal(p, resumed.modules["rl2"].state_dict()[k]), k
        moved |= not torch.equal(p, fresh.modules["rl2"].state_dict()[k])
    assert moved
    sa, sb = full.optimizers["rl2"].state_dict()["state"], resumed.optimizers["rl2"].state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)
    assert full.method.model.num_timesteps == resumed.method.model.num_timesteps == 4 * 4 * 3 * 6


def test_cli_train_and_evaluate_write_the_contract(tmp_path):
    rd = tmp_path / "rl2"
    sets = ["iterations=2", "meta_batch=3", "env.kwargs={normalize_actions: true, goal_radius: 0.01, horizon: 10}", "rl2.hidden=8", "rl2.minibatch=20", "rl2.epochs=1", "rl2.episodes_per_trial=2",
            "eval.tasks=3", "eval.steps=2", "rl2.eval_trials=1"]
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "train", "experiments/rl2_nav2d.yaml", "--run-dir", str(rd),
                        *[a for s in sets for a in ("--set", s)], "--evaluate"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    data = json.loads((rd / "eval" / "adaptation.json").read_text())
    assert data["algorithm"] == "rl2" and data["metric"] == "return" and data["higher_is_better"] is True
    assert data["curve_axis"] == "episodes in the trial" and data["steps"] == [0, 1, 2]   # episodes 1, 2, 3
    assert set(data["methods"]) == {"rl2", "random"} and data["n_tasks"] == 3
    assert all(np.isfinite(data["methods"][m]["mean"]).all() for m in data["methods"])
    assert data["methods"]["rl2"]["mean"] != data["methods"]["random"]["mean"]
    # the same curve again from the saved run (evaluation is seeded and leaves training's RNG alone)
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "evaluate", str(rd), "--out", str(tmp_path / "again")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    again = json.loads((tmp_path / "again" / "adaptation.json").read_text())
    assert again["methods"] == data["methods"]


@pytest.mark.slow
def test_rl2_learns_to_exploit_the_first_episode_on_navigation():
    """A short RL² run on 2D navigation (20-step episodes, K = 2, 100 trials of 40 steps per
    iteration in minibatches of 200 steps, 80 iterations: 320,000 steps, ~5 min): on 40 fresh goals the second
    episode of a trial returns clearly more than the first (the policy found the goal in episode
    1 and goes there in episode 2), which an untrained policy does not."""
    cfg = config.from_dict({"track": "rl", "algorithm": "rl2", "seed": 0, "meta_batch": 100, "sampler": {"workers": 0},
                            "env": {"id": "metarl/Navigation2D-v0", "kwargs": {"horizon": 20, "goal_radius": None}},
                            "rl2": {"episodes_per_trial": 2, "hidden": 64, "minibatch": 200, "lr": 1e-3}})
    rng = seed_everything(0)
    track = make_track(cfg)
    for it in range(80):
        track.train_step(it, rng)
    curves = track.evaluate(40, 1, seed=123).curves
    gain = curves["rl2"][:, 1] - curves["rl2"][:, 0]
    assert gain.mean() > 0.5 and gain.mean() > 3 * gain.std(ddof=1) / np.sqrt(len(gain))
    random_gain = curves["random"][:, 1] - curves["random"][:, 0]
    assert gain.mean() > random_gain.mean() + 0.5


def test_without_sb3_contrib_the_cli_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['sb3_contrib'] = None\n"
            "from metarl.cli import main\n"
            f"sys.exit(main(['train', 'experiments/rl2_nav2d.yaml', '--run-dir', {str(tmp_path / 'r')!r}]))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "algorithm: rl2" in p.stderr and "pip install 'torch-metarl[baselines]'" in p.stderr
