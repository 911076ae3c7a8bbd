"""Meta-RL end to end on 2D navigation: adaptation helps, meta-training helps, the CLI contract holds."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from metarl import config
from metarl.training import load_track, train


def nav_cfg(**extra):
    data = {"track": "rl", "iterations": 6, "checkpoint_every": 3, "log_every": 1, "meta_batch": 10,
            "env": {"id": "metarl/Navigation2D-v0", "kwargs": {"normalize_actions": True, "goal_radius": 0.01}},
            "inner": {"lr": 0.1, "episodes": 10, "eval_episodes": 20, "eval_steps": 1},
            "sampler": {"workers": 0}, "eval": {"tasks": 10, "steps": 1}}
    data.update(extra)
    return config.from_dict(data)


def test_one_inner_step_improves_return_and_meta_training_improves_post_update_return(tmp_path):
    track = train(nav_cfg(), tmp_path, tensorboard=False)
    track.close()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    pre = np.array([float(r.split(",")[header.index("return/pre")]) for r in rows[1:]])
    post = np.array([float(r.split(",")[header.index("return/post")]) for r in rows[1:]])
    assert (post > pre).mean() >= 5 / 6, (pre, post)     # adapting helps at (almost) every iteration
    assert post[-2:].mean() > post[:2].mean() + 5, post   # and meta-training makes it help more
    track, cfg, it = load_track(tmp_path)
    try:
        res = track.evaluate(20, 1, seed=5)
    finally:
        track.close()
    maml = res.curves["maml"]
    diff = maml[:, 1] - maml[:, 0]
    # most tasks improve (robust to one task that overshoots; the training curve above is the strong check)
    assert (diff > 0).mean() >= 0.6 and np.median(diff) > 0, maml
    assert set(res.curves) == {"maml", "random"}


def _theta(track):
    return {n: p.detach().clone() for n, p in track.policy.named_parameters()}


def _csv_column(run_dir, name):
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    i = rows[0].split(",").index(name)
    return np.array([float(r.split(",")[i]) for r in rows[1:]])


def test_first_order_and_vpg_options_change_the_update_as_documented(tmp_path):
    """Each option is a real run whose inner step still helps, and each changes what it claims:
    first order gives a different θ than second order from the same seed and data (the
    dropped second-order terms are not zero); VPG steps Adam (its state counts the steps) where
    TRPO keeps no optimizer and logs its KL."""
    base = dict(iterations=3, meta_batch=4, checkpoint_every=100)
    inner = {"lr": 0.1, "episodes": 5}
    runs = {"second": nav_cfg(**base, inner=inner), "first": nav_cfg(**base, inner={**inner, "first_order": True}),
            "vpg": nav_cfg(**base, inner=inner, outer={"optimizer": "vpg", "lr": 0.01})}
    theta, tracks = {}, {}
    for name, cfg in runs.items():
        track = train(cfg, tmp_path / name, tensorboard=False)
        track.close()
        theta[name], tracks[name] = _theta(track), track
        pre, post = _csv_column(tmp_path / name, "return/pre"), _csv_column(tmp_path / name, "return/post")
        assert np.isfinite(pre).all() and np.isfinite(post).all()
        assert (post > pre).sum() >= 2, (name, pre, post)  # adaptation helps in (almost) every iteration
    init = _theta(train(nav_cfg(**{**base, "iterations": 0}), tmp_path / "init", tensorboard=False))
    for name in runs:
        assert any(not torch.equal(theta[name][k], init[k]) for k in init), f"{name}: θ did not move"
    assert any(not torch.equal(theta["first"][k], theta["second"][k]) for k in init), "first_order had no effect"
    adam = tracks["vpg"].optimizers["maml"]
    assert isinstance(adam, torch.optim.Adam)
    assert all(int(st["step"]) == 3 for st in adam.state_dict()["state"].values())
    assert "maml" not in tracks["second"].optimizers
    assert (_csv_column(tmp_path / "second", "trpo/kl") <= 0.01 * 1.5).all()
    with pytest.raises(ValueError):
        _csv_column(tmp_path / "vpg", "trpo/kl")


def test_unknown_env_id_is_one_line_with_suggestion():
    with pytest.raises(config.ConfigError, match="unknown env.id 'metarl/Navigation2d-v0': did you mean metarl/Navigation2D-v0"):
        nav_cfg(env={"id": "metarl/Navigation2d-v0"})


def test_cli_evaluate_writes_return_contract(tmp_path):
    rd = tmp_path / "nav"
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "train", "experiments/nav2d.yaml", "--run-dir", str(rd),
                        "--set", "iterations=1", "--set", "meta_batch=4", "--set", "inner.episodes=4",
                        "--set", "inner.eval_episodes=4", "--set", "sampler.workers=2"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "baselines", str(rd), "--timesteps", "2048"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (rd / "baselines" / "pretrain.zip").exists() and (rd / "baselines" / "oracle.zip").exists()
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "evaluate", str(rd), "--tasks", "4", "--steps", "2"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    data = json.loads((rd / "eval" / "adaptation.json").read_text())
    assert data["metric"] == "return" and data["higher_is_better"] is True and data["steps"] == [0, 1, 2]
    assert set(data["methods"]) == {"maml", "random", "pretrain", "oracle"}
    oracle = data["methods"]["oracle"]["mean"]
    assert oracle[0] == oracle[1] == oracle[2]          # the oracle is not adapted
    pre = data["methods"]["pretrain"]["mean"]
    assert pre[0] != pre[1]                              # the converted PPO policy is adapted by the inner loop
    assert (rd / "eval" / "trajectories.png").stat().st_size > 0
    # a fixed task list instead of fresh tasks (e.g. the paper's 40 goals)
    tasks = [{"goal": [0.3, -0.2]}, {"goal": [-0.1, 0.4]}, {"goal": [0.0, 0.25]}]
    (tmp_path / "goals.json").write_text(json.dumps({"source": "hand-made", "tasks": tasks}))
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "evaluate", str(rd), "--tasks-file", str(tmp_path / "goals.json"),
                        "--steps", "1", "--out", str(tmp_path / "fixed")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    data = json.loads((tmp_path / "fixed" / "adaptation.json").read_text())
    assert data["n_tasks"] == 3 and "goals.json" in p.stdout
    # test step sizes chosen on validation tasks, for every adapted method (pretrain included)
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "evaluate", str(rd), "--tasks", "3", "--steps", "1",
                        "--set", "inner.eval_lr_grid=[0.1,0.5]", "--set", "eval.validation_tasks=2", "--out", str(tmp_path / "grid")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    sizes = json.loads((tmp_path / "grid" / "adaptation.json").read_text())["step_sizes"]
    assert set(sizes) == {"maml", "random", "pretrain"} and all(d["chosen"][0] in (0.1, 0.5) for d in sizes.values())
    assert "step sizes chosen on 2 validation tasks" in p.stdout
    (tmp_path / "bad.json").write_text(json.dumps([{"goal": [0.3, -0.2]}, {"gaol": [0.1, 0.1]}]))
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "evaluate", str(rd), "--tasks-file", str(tmp_path / "bad.json")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "task 1" in p.stderr and "goal" in p.stderr and p.stderr.strip().count("\n") == 0


def test_locomotion_evaluation_draws_velocity_traces(tmp_path, monkeypatch):
    """One panel per evaluated task (their targets drawn from the evaluation seed's stream),
    each with a curve before and after the inner step over the whole horizon and the target."""
    from metarl.envs.half_cheetah import HalfCheetahVelEnv
    import metarl.plotting as plotting

    cfg = config.load("experiments/halfcheetah_vel.yaml", ["iterations=1", "meta_batch=2", "inner.episodes=2",
                                                           "sampler.workers=0", "env.kwargs={horizon: 20}"])
    track = train(cfg, tmp_path, tensorboard=False)
    figures = []
    real_close = plotting.plt.close
    monkeypatch.setattr(plotting.plt, "close", lambda fig=None: (figures.append(fig), real_close(fig)))
    try:
        res = track.evaluate(3, 1, seed=0)
        assert res.curves["maml"].shape == (3, 2)
        res.figures["velocity.png"](tmp_path / "v.png")
    finally:
        track.close()
    assert (tmp_path / "v.png").stat().st_size > 0
    targets = [t["velocity"] for t in HalfCheetahVelEnv.sample_tasks(3, np.random.default_rng([0, 1]))]
    axes = figures[-1].axes
    assert len(axes) == 3
    for ax, target in zip(axes, targets):
        curves = [ln for ln in ax.lines if ln.get_linestyle() != "--"]
        (line,) = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
        assert np.allclose(line.get_ydata(), target) and ax.get_title() == f"target velocity {target:.2f}"
        assert [c.get_label() for c in curves] == ["pre-update", "1 step"]
        assert all(len(c.get_ydata()) == 20 and np.isfinite(c.get_ydata()).all() for c in curves)
        assert not np.array_equal(curves[0].get_ydata(), curves[1].get_ydata())


def test_per_step_evaluation_step_sizes():
    """inner.eval_lr may list one step size per inner step (the last repeats): a second step of
    size 0 leaves the fast weights where the first step put them."""
    import torch

    from metarl.algorithms.meta_rl import collect_adapted, step_sizes
    from metarl.functional import params_of
    from metarl.tracks.rl import RLTrack

    assert step_sizes(0.5, 3) == [0.5, 0.5, 0.5]
    assert step_sizes([0.5, 0.25], 3) == [0.5, 0.25, 0.25]
    assert step_sizes([0.5, 0.25, 0.1], 2) == [0.5, 0.25]
    with pytest.raises(ValueError, match="at least one"):
        step_sizes([], 1)
    cfg = nav_cfg(inner={"lr": 0.1, "episodes": 4, "eval_lr": [0.5, 0.0]})
    assert cfg.inner.eval_lr == [0.5, 0.0] and nav_cfg(inner={"eval_lr": 0.3}).inner.eval_lr == 0.3
    track = RLTrack(cfg)
    try:
        tasks = track.task_env.sample_tasks(3, np.random.default_rng(0))
        theta = params_of(track.policy)
        _, one, _ = collect_adapted(track.policy, track.collector, theta, tasks, 4, cfg.advantages, 1, 0.5, seed=3)
        _, two, _ = collect_adapted(track.policy, track.collector, theta, tasks, 4, cfg.advantages, 2, [0.5, 0.0], seed=3)
        _, moved, _ = collect_adapted(track.policy, track.collector, theta, tasks, 4, cfg.advantages, 2, 0.5, seed=3)
    finally:
        track.close()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=0)
    assert any(not torch.equal(moved[k], one[k]) for k in one)


def test_evaluation_with_a_timestep_budget():
    """inner.eval_timesteps (the paper's 4,000-step test batches) sizes every evaluation batch in
    steps: each task's batch at each inner step holds at least that many, in whole episodes."""
    from metarl.algorithms.meta_rl import collect_adapted
    from metarl.functional import params_of
    from metarl.tracks.rl import RLTrack

    cfg = nav_cfg(inner={"lr": 0.1, "episodes": 4, "eval_timesteps": 250},
                  env={"id": "metarl/Navigation2D-v0", "kwargs": {"normalize_actions": True, "goal_radius": 0.2}})
    track = RLTrack(cfg)
    try:
        tasks = track.task_env.sample_tasks(4, np.random.default_rng(0))
        data, _, _ = collect_adapted(track.policy, track.collector, params_of(track.policy), tasks, 4,
                                     cfg.advantages, 2, 0.5, seed=3, timesteps=250)
        result = track.evaluate(n_tasks=4, steps=2, seed=0)
    finally:
        track.close()
    for eps, adv in data:
        assert (eps.lengths.sum(-1) >= 250).all()
        assert (eps.lengths.sum(-1) - eps.lengths.max(-1).values < 250).all()
        assert adv.shape == eps.rewards.shape and (adv[eps.mask == 0] == 0).all()
    curve = result.curves["maml"]
    assert curve.shape == (4, 3) and np.isfinite(curve).all()
    with pytest.raises(Exception, match="eval_timesteps"):
        nav_cfg(inner={"eval_timesteps": -5})


def test_tasks_file_holds_the_papers_test_goals(tmp_path):
    """experiments/nav2d_paper_goals.json: the 40 goals of the paper's test script (numpy's
    legacy RNG, seed 1); malformed files end with one line naming the file."""
    from metarl.config import ConfigError
    from metarl.tracks.rl import RLTrack

    track = RLTrack(nav_cfg())
    try:
        tasks = track.load_tasks("experiments/nav2d_paper_goals.json")
        np.random.seed(1)
        np.testing.assert_array_equal(np.array([t["goal"] for t in tasks]), np.random.uniform(-0.5, 0.5, size=(40, 2)))
        for text, match in [("[1, 2", "not readable JSON"), ('[{"goal": [0, 0]}]', "at least 2"),
                            ('{"tasks": [{"goal": [0, 0]}, {"goal": [0, "x"]}]}', "task 1")]:
            (tmp_path / "t.json").write_text(text)
            with pytest.raises(ConfigError, match=match):
                track.load_tasks(tmp_path / "t.json")
        with pytest.raises(ConfigError, match="no such file"):
            track.load_tasks(tmp_path / "missing.json")
    finally:
        track.close()


def test_evaluation_with_the_rllab_protocol():
    """inner.eval_protocol: rllab collects the test batches as the paper's sampler did
    (Collector.collect_timesteps(lockstep=True)); it needs eval_timesteps."""
    from metarl.tracks.rl import RLTrack

    kw = {"normalize_actions": True, "goal_radius": 0.2}
    cfg = nav_cfg(inner={"lr": 0.1, "episodes": 4, "eval_timesteps": 250, "eval_protocol": "rllab"},
                  env={"id": "metarl/Navigation2D-v0", "kwargs": kw})
    track = RLTrack(cfg)
    calls = []
    original = track.collector.collect_timesteps
    track.collector.collect_timesteps = lambda *a, **k: calls.append(k["lockstep"]) or original(*a, **k)
    try:
        result = track.evaluate(n_tasks=3, steps=1, seed=0)
    finally:
        track.close()
    assert calls and all(calls) and result.curves["maml"].shape == (3, 2) and np.isfinite(result.curves["maml"]).all()
    with pytest.raises(Exception, match="set inner.eval_timesteps"):
        nav_cfg(inner={"eval_protocol": "rllab"}, env={"id": "metarl/Navigation2D-v0", "kwargs": kw})
    with pytest.raises(Exception, match="eval_protocol"):
        nav_cfg(inner={"eval_protocol": "lockstep", "eval_timesteps": 100})


def test_step_sizes_chosen_on_validation_tasks():
    """select_step_sizes picks, step by step, the grid entry with the best validation return:
    a one-size grid reproduces collect_adapted's curve exactly (same batches and seeds), a
    candidate is scored on the same seed whatever the other candidates are, and each step
    continues from the chosen candidate and its batch (collect_adapted with the chosen sizes
    reproduces the chosen scores)."""
    from metarl.algorithms.meta_rl import collect_adapted, select_step_sizes
    from metarl.functional import params_of
    from metarl.tracks.rl import RLTrack

    import torch

    torch.manual_seed(0)  # the policy's initialisation
    cfg = nav_cfg(inner={"lr": 0.1, "episodes": 10})
    track = RLTrack(cfg)
    try:
        tasks = track.task_env.sample_tasks(6, np.random.default_rng(11))
        theta = params_of(track.policy)
        kw = dict(episodes=10, adv_cfg=cfg.advantages, steps=2, seed=4)
        data, _, _ = collect_adapted(track.policy, track.collector, theta, tasks, lr=0.5, **kw)
        one, table_one = select_step_sizes(track.policy, track.collector, theta, tasks, grid=[0.5], **kw)
        chosen, table = select_step_sizes(track.policy, track.collector, theta, tasks, grid=[0.0, 0.5, 1.5], **kw)
        replay, _, _ = collect_adapted(track.policy, track.collector, theta, tasks, lr=chosen, **kw)
        with pytest.raises(ValueError, match="grid"):
            select_step_sizes(track.policy, track.collector, theta, tasks, grid=[0.5, -0.1], **kw)
    finally:
        track.close()
    assert one == [0.5, 0.5]
    curve = [float(eps.mean_returns().mean()) for eps, _ in data]
    assert [row[0] for row in table_one] == curve[1:]          # exactly collect_adapted's steps 1 and 2
    assert table[0][1] == table_one[0][0]                      # same start, same seed: same score
    assert len(table) == 2 and all(len(row) == 3 for row in table)
    assert chosen == [[0.0, 0.5, 1.5][int(np.argmax(row))] for row in table]
    assert [float(eps.mean_returns().mean()) for eps, _ in replay[1:]] == [max(row) for row in table]
    assert len(set(table[0])) == 3                             # the step size matters on this problem
    with pytest.raises(config.ConfigError, match="eval_lr_grid"):
        nav_cfg(inner={"eval_lr_grid": [0.1, -1.0]})


def test_evaluation_with_a_step_size_grid():
    """inner.eval_lr_grid: every adapted method gets its step sizes from validation tasks drawn
    apart from the test tasks, the curve is collect_adapted's with those sizes, and the choices
    go to adaptation.json."""
    from metarl import evaluation
    from metarl.algorithms import meta_rl
    from metarl.functional import params_of
    from metarl.tracks import rl as rl_track

    cfg = nav_cfg(inner={"lr": 0.1, "episodes": 6, "eval_lr_grid": [0.05, 0.5]}, eval={"tasks": 4, "validation_tasks": 3})
    track = rl_track.RLTrack(cfg)
    seen = []
    original = rl_track.select_step_sizes
    rl_track.select_step_sizes = lambda policy, collector, theta, tasks, **k: seen.append(tasks) or original(policy, collector, theta, tasks, **k)
    try:
        result = track.evaluate(n_tasks=4, steps=2, seed=0)
        test_tasks = track.task_env.sample_tasks(4, np.random.default_rng([0, 1]))
        chosen = result.step_sizes["maml"]["chosen"]
        data, _, _ = meta_rl.collect_adapted(track.policy, track.collector, params_of(track.policy), test_tasks, 6,
                                               cfg.advantages, 2, chosen, 0)
    finally:
        rl_track.select_step_sizes = original
        track.close()
    assert len(seen) == 2 and all(len(t) == 3 and t != test_tasks[:3] for t in seen)   # maml and random, on validation tasks
    sizes = result.step_sizes
    assert set(sizes) == {"maml", "random"} and all(len(d["chosen"]) == 2 and set(d["chosen"]) <= {0.05, 0.5} for d in sizes.values())
    np.testing.assert_array_equal(result.curves["maml"], np.stack([e.mean_returns().numpy() for e, _ in data], axis=1))
    summary = evaluation.summary(result)
    assert summary["step_sizes"]["random"]["grid"] == [0.05, 0.5] and len(summary["step_sizes"]["maml"]["validation_scores"]) == 2
