"""The few-shot track end to end: real Omniglot learns beyond chance; other datasets plug in."""
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from metarl import config
from metarl.training import load_track, train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_short_omniglot_run_clearly_beats_chance(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("METARL_CACHE", cache)
    cfg = config.load("experiments/omniglot_5w1s.yaml", [
        "iterations=60", "meta_batch=8", "checkpoint_every=60", "log_every=20", "model.hidden=16",
        "pretrain.batch_size=64", "fewshot_eval.validation_episodes=20", "fewshot_eval.pretrain_lrs=[0.1,1.0]"])
    train(cfg, tmp_path, tensorboard=False)
    track, _, _ = load_track(tmp_path)
    assert track.train_baselines(updates=60) == ["pretrain"] and (tmp_path / "baselines" / "pretrain.pt").exists()
    res = track.evaluate(100, 3, seed=11)
    maml = res.curves["maml"]
    assert maml.shape == (100, 4) and res.metric == "accuracy"
    chance = 1 / 5
    mean, sd = maml[:, 1].mean(), maml[:, 1].std(ddof=1)
    assert mean - 2 * sd / np.sqrt(100) > chance + 0.15, maml.mean(0)   # far above 20% after one step
    assert maml[:, 1].mean() > maml[:, 0].mean()                       # and the step is what helps
    assert "pretrain" in res.curves and res.curves["pretrain"][:, 0].mean() == pytest.approx(chance)  # zero head


def test_evaluation_episodes_are_fixed_by_seed(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("METARL_CACHE", cache)
    cfg = config.load("experiments/omniglot_5w1s.yaml", ["iterations=2", "meta_batch=2", "model.hidden=8",
                                                        "baselines=[]", "checkpoint_every=2"])
    train(cfg, tmp_path, tensorboard=False)
    track, _, _ = load_track(tmp_path)
    a = track.evaluate(20, 1, seed=3).curves["maml"]
    b = track.evaluate(20, 1, seed=3).curves["maml"]
    c = track.evaluate(20, 1, seed=4).curves["maml"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_task_workers_train_deterministically(tmp_path, monkeypatch, cache):
    """The default few-shot training path cuts each meta-batch across task-worker threads: two
    runs give bitwise-identical weights (shard gradients are added in a fixed order), and a run
    on the calling thread alone ends at the same weights up to float32 rounding."""
    monkeypatch.setenv("METARL_CACHE", cache)
    assert config.load("experiments/omniglot_5w1s.yaml", []).inner.task_workers == 0  # the default: one per torch thread
    weights = {}
    for name, workers in (("a", 2), ("b", 2), ("serial", 1)):
        cfg = config.load("experiments/omniglot_5w1s.yaml", ["iterations=3", "meta_batch=5", "model.hidden=8", "baselines=[]",
                                                            "checkpoint_every=3", f"inner.task_workers={workers}"])
        track = train(cfg, tmp_path / name, tensorboard=False)
        weights[name] = {k: v.detach().clone() for k, v in track.model.named_parameters()}
    for k in weights["a"]:
        assert torch.equal(weights["a"][k], weights["b"][k]), k
        assert torch.allclose(weights["a"][k], weights["serial"][k], rtol=0, atol=1e-5), (k, (weights["a"][k] - weights["serial"][k]).abs().max())


def write_cifar_fs_fixture(root, n_classes=(6, 5, 5), per_class=6):
    rng = np.random.default_rng(0)
    label = 0
    for split, n in zip(("train", "val", "test"), n_classes):
        data, labels = [], []
        for _ in range(n):
            proto = rng.integers(0, 256, size=(1, 32, 32, 3))
            data.append(np.clip(proto + rng.integers(-20, 20, size=(per_class, 32, 32, 3)), 0, 255).astype(np.uint8))
            labels += [label] * per_class
            label += 1
        with open(root / f"CIFAR_FS_{split}.pickle", "wb") as fh:
            pickle.dump({"data": np.concatenate(data), "labels": labels}, fh)


def test_cifar_fs_fixture_through_the_cli(tmp_path):
    data = tmp_path / "cifar"
    data.mkdir()
    write_cifar_fs_fixture(data)
    rd = tmp_path / "run"
    sets = ["--set", "data.dataset=cifar_fs", "--set", "data.train_split=train", "--set", "iterations=3", "--set", "pretrain.updates=5",
            "--set", "meta_batch=2", "--set", "model.hidden=8", "--set", "model.pooling=max", "--set", "episode.k_shot=1",
            "--set", "pretrain.batch_size=8", "--set", "fewshot_eval.validation_episodes=4", "--set", "eval.tasks=6"]
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "train", "experiments/omniglot_5w1s.yaml", "--run-dir", str(rd),
                        "--data-dir", str(data), *sets], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "METARL_CACHE": str(tmp_path / "c")})
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "evaluate", str(rd), "--tasks", "6", "--steps", "2",
                        "--data-dir", str(data)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads((rd / "eval" / "adaptation.json").read_text())
    assert out["metric"] == "accuracy" and out["steps"] == [0, 1, 2] and set(out["methods"]) == {"maml", "pretrain"}


def test_missing_data_dir_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "train", "experiments/omniglot_5w1s.yaml",
                        "--run-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "nowhere")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "--data-dir" in p.stderr and "METARL_DATA" in p.stderr


def test_pretrain_baseline_never_trains_on_its_validation_classes(tmp_path, monkeypatch, cache):
    """The pretrain step size is chosen on val episodes, so the pretrain classifier trains on the
    meta-training classes minus the val classes (vinyals: trainval − val = train; lake likewise),
    on demand (`pretrain.when: after`), and not at all inside the meta-training loop."""
    monkeypatch.setenv("METARL_CACHE", cache)
    from metarl.registry import build_track
    for protocol in ("vinyals", "lake"):
        cfg = config.load("experiments/omniglot_5w1s.yaml", ["model.hidden=8", f"data.protocol={protocol}"])
        track = build_track(cfg)
        names = set(track.pretrain_pool.class_names)
        assert names and names.isdisjoint(track.val_pool.class_names) and names < set(track.train_pool.class_names)
        assert names | set(track.val_pool.class_names) == set(track.train_pool.class_names)
        assert "pretrain" not in track.modules  # trained after meta-training, not in the loop
    in_loop = build_track(config.load("experiments/omniglot_5w1s.yaml", ["model.hidden=8", "pretrain.when=in_loop"]))
    assert in_loop.modules["pretrain"].head.out_features == in_loop.pretrain_pool.n_classes
