"""The contract of the closed-form and metric heads (protonet, r2d2, metaoptnet) on the few-shot
track: a short Omniglot run beats chance, resume is bitwise, `metarl evaluate` writes their flat
curve, training episodes may have more ways, other datasets' configs run, sine is refused."""
import subprocess
import sys

import numpy as np
import pytest

from tests.checks import resume_round_trip, cli_train_and_evaluate
from metarl import config
from metarl.config import ConfigError
from metarl.training import load_track, train

from test_fewshot_track import write_cifar_fs_fixture

HEADS = ["protonet", "r2d2", "metaoptnet"]
TINY = ["model.hidden=8", "baselines=[]", "log_every=1000"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny(name, *extra):
    """The method's own Omniglot config at toy size, on the test's 5-way 1-shot episodes."""
    own = {"protonet": ["protonet.train_way=10", "protonet.train_query=2"],
           "r2d2": ["r2d2.train_way=10", "r2d2.train_query=2"],
           "metaoptnet": ["metaoptnet.train_shot=2", "metaoptnet.train_query=2"]}[name]
    return config.load(f"experiments/{name}_omniglot_5w1s.yaml", TINY + own + list(extra))


@pytest.mark.parametrize("name", HEADS + ["metaoptnet-ridge"])
def test_short_omniglot_run_clearly_beats_chance(name, tmp_path, monkeypatch, cache):
    monkeypatch.setenv("METARL_CACHE", cache)
    algo, *variant = name.split("-")
    extra = ["iterations=40", "meta_batch=4", "checkpoint_every=40", "model.hidden=16", "outer.lr=0.003"]
    if variant:
        extra.append(f"metaoptnet.head={variant[0]}")
    train(tiny(algo, *extra), tmp_path, tensorboard=False)
    track, _, _ = load_track(tmp_path)
    res = track.evaluate(100, 2, seed=11)
    acc = res.curves[algo]
    assert acc.shape == (100, 3) and res.curve_axis == "closed-form head (no inner steps)"
    assert np.array_equal(acc[:, 0], acc[:, 2])                        # a closed-form head: flat curve
    mean, se = acc[:, 0].mean(), acc[:, 0].std(ddof=1) / np.sqrt(100)
    assert mean - 2 * se > 0.2 + 0.15, mean                            # far above chance (20%)


@pytest.mark.parametrize("name", HEADS)
def test_resume_is_bitwise_identical(name, tmp_path, monkeypatch, cache):
    monkeypatch.setenv("METARL_CACHE", cache)
    full, _ = resume_round_trip(lambda n: tiny(name, f"iterations={n}", "meta_batch=2", "checkpoint_every=2"), tmp_path, 4, 2)
    assert (name == "protonet") == (f"{name}.head" not in full.modules)


@pytest.mark.parametrize("name", HEADS)
def test_metarl_evaluate_writes_the_contract(name, tmp_path, cache):
    own = {"protonet": ["protonet.train_way=5"], "r2d2": ["r2d2.train_way=5"], "metaoptnet": ["metaoptnet.train_shot=2"]}[name]
    out = cli_train_and_evaluate(f"experiments/{name}_omniglot_5w1s.yaml", tmp_path / "run",
                                 TINY + own + ["iterations=2", "meta_batch=2", "checkpoint_every=2", "eval.tasks=10"],
                                 ["--tasks", "10", "--steps", "2"], env={"METARL_CACHE": cache})
    assert out["algorithm"] == name and out["curve_axis"] == "closed-form head (no inner steps)"
    assert out["steps"] == [0, 1, 2] and len(set(out["methods"][name]["mean"])) == 1


def test_training_episodes_take_the_method_s_way_and_query(tmp_path, monkeypatch, cache):
    """protonet.train_way / train_query reach the training sampler; evaluation keeps the episode's."""
    monkeypatch.setenv("METARL_CACHE", cache)
    from metarl.registry import build_track

    track = build_track(tiny("protonet", "protonet.train_way=12", "protonet.train_query=3", "iterations=1"))
    batch = track.train_tasks.sample(2, np.random.default_rng(0))
    assert batch.x_support.shape[1] == 12 and batch.x_query.shape[1] == 36 and int(batch.y_query.max()) == 11
    test = next(iter(track.eval_batches(4, seed=0)))
    assert test.x_support.shape[1] == 5 and test.x_query.shape[1] == 5
    assert track.method.predict(test, 1)[0].shape == (4, 5, 5)
    with pytest.raises(ConfigError, match="training episodes"):
        build_track(tiny("protonet", "protonet.train_way=100000"))


@pytest.mark.parametrize("name", HEADS)
def test_sine_is_refused_in_one_line(name, tmp_path):
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "train", "experiments/sine_quick.yaml", "--set", f"algorithm={name}",
                        "--run-dir", str(tmp_path / "r")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "few-shot classification" in p.stderr and f"{name}_omniglot_5w1s.yaml" in p.stderr


@pytest.mark.parametrize("cfg", ["protonet_cifar_fs_5w1s", "r2d2_cifar_fs_5w1s", "metaoptnet_cifar_fs_5w1s"])
def test_cifar_fs_configs_train_on_the_fixture(cfg, tmp_path, monkeypatch):
    data = tmp_path / "cifar"
    data.mkdir()
    write_cifar_fs_fixture(data, per_class=8)
    monkeypatch.setenv("METARL_CACHE", str(tmp_path / "c"))
    name = cfg.split("_")[0]
    small = {"protonet": ["protonet.train_way=6", "protonet.train_query=2"], "r2d2": ["r2d2.train_way=6", "r2d2.train_query=2"],
             "metaoptnet": ["metaoptnet.train_shot=2", "metaoptnet.train_query=2"]}[name]
    c = config.load(f"experiments/{cfg}.yaml", TINY + small + [f"data.dir={data}", "iterations=2", "meta_batch=2", "checkpoint_every=2",
                                                             "episode.q_query=2"])
    train(c, tmp_path / "run", tensorboard=False)
    track, _, _ = load_track(tmp_path / "run")
    assert track.evaluate(4, 1, seed=0).curves[name].shape == (4, 2)


def test_every_head_config_loads():
    for name in ["protonet_omniglot_5w1s", "r2d2_omniglot_5w1s", "metaoptnet_omniglot_5w1s", "protonet_cifar_fs_5w1s",
                 "protonet_mini_imagenet_5w1s", "r2d2_cifar_fs_5w1s", "r2d2_mini_imagenet_5w1s", "metaoptnet_mini_imagenet_5w1s",
                 "metaoptnet_cifar_fs_5w1s"]:
        cfg = config.load(f"experiments/{name}.yaml", [])
        assert cfg.algorithm == name.split("_")[0]
    with pytest.raises(ConfigError, match="lambda_init"):
        config.load("experiments/r2d2_omniglot_5w1s.yaml", ["r2d2.lambda_init=0"])
    with pytest.raises(ConfigError, match="metaoptnet"):
        config.load("experiments/metaoptnet_omniglot_5w1s.yaml", ["metaoptnet.C=-1"])
