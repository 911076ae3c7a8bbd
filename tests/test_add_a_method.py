"""The README's "Add a method" example, verbatim in spirit: one class on the seam is a method."""
from dataclasses import dataclass

import torch

from metarl import config
from metarl.algorithms.maml import MAML
from metarl.registry import algorithm
from metarl.training import train


@dataclass
class WarmMAMLConfig:
    first_order_iterations: int = 100
    """Meta-iterations run first order before switching to second order."""


@algorithm("warm_maml")
class WarmMAML(MAML):
    Config = WarmMAMLConfig
    defaults = {"sine": {"inner": {"steps": 2}}}

    def train_step(self, batch, iteration):
        self.first_order = iteration < self.own.first_order_iterations
        return super().train_step(batch, iteration)


def sine(**extra):
    data = {"track": "sine", "iterations": 4, "meta_batch": 3, "checkpoint_every": 2, "baselines": [], **extra}
    return config.from_dict(data)


def weights(track):
    return {k: v.detach().clone() for k, v in track.model.named_parameters()}


def test_the_example_is_first_order_then_second_order(tmp_path):
    cfg = sine(algorithm="warm_maml", warm_maml={"first_order_iterations": 2})
    assert cfg.inner.steps == 2 and cfg.warm_maml.first_order_iterations == 2  # the method's default, its section
    assert config.from_dict({"track": "sine", "algorithm": "warm_maml", "inner": {"steps": 3}}).inner.steps == 3  # the file wins
    warm = train(cfg, tmp_path / "warm", tensorboard=False)
    # the same 4 iterations by hand: 2 of FOMAML then 2 of MAML, from the same seed and tasks
    fo = train(sine(algorithm="fomaml", inner={"steps": 2}, iterations=2), tmp_path / "fo", tensorboard=False)
    assert not torch.equal(weights(fo)["layers.0.weight"], weights(train(sine(inner={"steps": 2}, iterations=2), tmp_path / "so", tensorboard=False))["layers.0.weight"])
    half = train(sine(algorithm="warm_maml", warm_maml={"first_order_iterations": 2}, iterations=2), tmp_path / "half", tensorboard=False)
    for k, v in weights(half).items():
        assert torch.equal(v, weights(fo)[k]), k  # first two iterations: exactly FOMAML
    resumed = train(sine(algorithm="warm_maml", warm_maml={"first_order_iterations": 2}), tmp_path / "half", resume=True, tensorboard=False)
    for k, v in weights(resumed).items():
        assert torch.equal(v, weights(warm)[k]), k  # resumed across the switch: bitwise the straight run
    so_all = train(sine(algorithm="warm_maml", warm_maml={"first_order_iterations": 0}), tmp_path / "so_all", tensorboard=False)
    maml = train(sine(inner={"steps": 2}), tmp_path / "maml", tensorboard=False)
    for k, v in weights(so_all).items():
        assert torch.equal(v, weights(maml)[k]), k  # no first-order iterations: exactly MAML
    assert not torch.equal(weights(so_all)["layers.0.weight"], weights(warm)["layers.0.weight"])  # the switch matters
