"""The shared outer loop: learning improves, resume is bitwise exact, failures keep saved state."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from metarl import checkpoint, config
from metarl.training import NonFiniteLoss, RunDirError, load_track, train


def sine_cfg(**extra):
    data = {"track": "sine", "iterations": 40, "checkpoint_every": 10, "log_every": 5, "meta_batch": 5,
            "eval": {"tasks": 20}}
    data.update(extra)
    return config.from_dict(data)


def params(track):
    return {f"{k}.{n}": p.detach().clone() for k, m in track.modules.items() for n, p in m.named_parameters()}


def test_resume_is_bitwise_identical(tmp_path):
    full = train(sine_cfg(), tmp_path / "full", tensorboard=False)
    train(sine_cfg(iterations=17), tmp_path / "split", tensorboard=False)
    resumed = train(sine_cfg(), tmp_path / "split", resume=True, tensorboard=False)
    a, b = params(full), params(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    adam_a = full.optimizers["maml"].state_dict()["state"][0]["exp_avg_sq"]
    adam_b = resumed.optimizers["maml"].state_dict()["state"][0]["exp_avg_sq"]
    assert torch.equal(adam_a, adam_b)
    rows = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    iters = [int(r.split(",")[0]) for r in rows[1:]]
    assert iters == sorted(set(iters)), "metrics.csv must not repeat iterations after a resume"


def test_sigint_checkpoints_and_resume_matches_uninterrupted(tmp_path):
    """A real interruption: SIGINT mid-run saves a checkpoint; --resume ends bitwise identical."""
    cmd = [sys.executable, "-m", "metarl.cli", "train", "experiments/sine_quick.yaml", "--set", "iterations=3000",
           "--set", "checkpoint_every=100000"]
    proc = subprocess.Popen(cmd + ["--run-dir", str(tmp_path / "cut")], stderr=subprocess.PIPE, text=True)
    csv = tmp_path / "cut" / "metrics.csv"
    deadline = time.time() + 60
    while not (csv.exists() and len(csv.read_text().splitlines()) > 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    cut_at = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["iteration"]
    assert 0 < cut_at < 3000
    assert "--resume" in err
    cfg = config.load("experiments/sine_quick.yaml", [f"iterations={cut_at + 30}", "checkpoint_every=100000"])
    resumed = train(cfg, tmp_path / "cut", resume=True, tensorboard=False)
    straight = train(cfg, tmp_path / "straight", tensorboard=False)
    a, b = params(straight), params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_overwrite_and_rejects_changed_config_on_resume(tmp_path):
    train(sine_cfg(iterations=5), tmp_path, tensorboard=False)
    with pytest.raises(RunDirError, match="--resume"):
        train(sine_cfg(iterations=5), tmp_path, tensorboard=False)
    with pytest.raises(RunDirError, match="inner.lr changed"):
        train(sine_cfg(iterations=10, inner={"lr": 0.5}), tmp_path, resume=True, tensorboard=False)


def test_snapshot_holds_the_state_of_a_run_that_stopped_there(tmp_path):
    train(sine_cfg(iterations=20, snapshot_every=5), tmp_path / "long", tensorboard=False).close()
    assert checkpoint.snapshots(tmp_path / "long") == [5, 10, 15, 20]
    train(sine_cfg(iterations=15), tmp_path / "short", tensorboard=False).close()
    snap, _, it = load_track(tmp_path / "long", iteration=15)
    short, _, _ = load_track(tmp_path / "short")
    assert it == 15
    for k, v in params(short).items():
        assert torch.equal(params(snap)[k], v), k
    latest, _, _ = load_track(tmp_path / "long")
    assert any(not torch.equal(params(latest)[k], v) for k, v in params(short).items())
    with pytest.raises(checkpoint.CheckpointError, match="no snapshot of iteration 7.*available: 5, 10, 15, 20"):
        load_track(tmp_path / "long", iteration=7)


def test_speed_only_settings_may_change_on_resume():
    """The fields declared resumable (config.resumable) are exactly the evaluation, bookkeeping and
    speed settings; anything that changes the trained numbers is not."""
    from metarl.config import resumable_keys
    from metarl.tracks.rl import RLConfig
    from metarl.tracks.sine import SineConfig
    from metarl.training import _resumable

    keys = resumable_keys(RLConfig)
    for key in ("iterations", "eval.tasks", "sampler.workers", "outer.threads", "inner.eval_lr", "inner.eval_steps"):
        assert _resumable(key, keys), key
    for key in ("inner.lr", "outer.max_kl", "outer.threads_extra", "samplers", "seed", "algorithm", "meta_batch"):
        assert not _resumable(key, keys), key
    sine = resumable_keys(SineConfig)
    assert "sine_eval" in sine and "inner.eval_steps" in sine
    assert "inner.task_workers" not in sine  # it regroups float sums: the result moves by ~1e-5


def test_corrupt_checkpoint_is_reported_and_previous_is_kept(tmp_path):
    train(sine_cfg(iterations=20), tmp_path, tensorboard=False)
    prev = tmp_path / checkpoint.PREVIOUS
    assert prev.exists() and torch.load(prev, weights_only=True)["iteration"] == 10
    (tmp_path / checkpoint.LATEST).write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt.*previous good checkpoint"):
        train(sine_cfg(iterations=30), tmp_path, resume=True, tensorboard=False)
    assert torch.load(prev, weights_only=True)["iteration"] == 10


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    # a real divergence: an absurd inner step size overflows the post-update loss
    with pytest.raises(NonFiniteLoss, match="became (inf|nan) at iteration .*lower the learning rates"):
        train(sine_cfg(iterations=400, inner={"lr": 1e6}), tmp_path / "diverged", tensorboard=False)
    assert not (tmp_path / "diverged" / checkpoint.LATEST).exists()
    # a NaN in the middle of a resumed run leaves the checkpoint on disk untouched
    train(sine_cfg(iterations=10), tmp_path, tensorboard=False)
    before = (tmp_path / checkpoint.LATEST).read_bytes()
    from metarl.tracks.sine import SineTrack
    real = SineTrack.train_step
    monkeypatch.setattr(SineTrack, "train_step", lambda self, it, rng: {"loss/maml": float("nan")} if it == 15 else real(self, it, rng))
    with pytest.raises(NonFiniteLoss, match="iteration 15.*last good checkpoint: iteration 10"):
        train(sine_cfg(iterations=40, checkpoint_every=20), tmp_path, resume=True, tensorboard=False)
    assert (tmp_path / checkpoint.LATEST).read_bytes() == before


@pytest.mark.slow  # 600 full meta-batches: `pytest -m slow` / `make test-slow`
def test_a_few_hundred_iterations_beat_the_pretrain_baseline(tmp_path):
    """After 600 meta-iterations MAML's post-update MSE is clearly below pretrain's (Finn et al. fig. 2)."""
    cfg = sine_cfg(iterations=600, meta_batch=25, checkpoint_every=600, log_every=100)
    train(cfg, tmp_path, tensorboard=False)
    track, _, it = load_track(tmp_path)
    assert it == 600
    res = track.evaluate(200, 10, seed=7)
    maml, pre = res.curves["maml"].mean(0), res.curves["pretrain"].mean(0)
    assert maml[1] < maml[0], "one inner step must improve MAML's fit"
    assert maml[1] < 0.8 * pre[1] and maml[10] < 0.8 * pre[10], (maml, pre)
    assert res.curves["oracle"].mean() < maml[10]
