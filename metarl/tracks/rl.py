"""Meta-RL: MAML with a REINFORCE inner loop and a TRPO outer loop on task-distribution envs.

Finn et al. 2017 sec. 5.3. The env is any :class:`metarl.envs.TaskEnv` registered with Gymnasium
(``env.id``), so a user's own env plugs in through ``metarl.envs.TaskWrapper`` plus
``gymnasium.register``. Methods on the adaptation curve:
- **maml**: the meta-trained policy, adapted with ``inner.eval_steps`` REINFORCE steps;
- **random**: a randomly initialised policy adapted the same way (its init is fixed by the seed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..algorithms.maml_trpo import (AdvantageConfig, RLInnerConfig, RLOuterConfig, collect_adapted, meta_update)
from ..config import ConfigError, register_track
from ..evaluation import EvalResult
from ..functional import params_of
from .base import EvalConfig, RunConfig, Track


@dataclass
class EnvConfig:
    id: str = "metarl/Navigation2D-v0"
    """A registered Gymnasium id of a TaskEnv (see metarl.envs.TASK_ENV_IDS)."""
    kwargs: dict = field(default_factory=dict)
    """Constructor arguments, e.g. {normalize_actions: true, goal_radius: 0.01} for Navigation2D."""


@dataclass
class PolicyConfig:
    hidden: list[int] = field(default_factory=lambda: [100, 100])
    activation: Literal["relu", "tanh"] = "relu"
    init_std: float = 1.0


@dataclass
class SamplerConfig:
    workers: int = 2
    """Worker processes stepping the envs (0 = in-process)."""


@dataclass
class RLEvalConfig(EvalConfig):
    tasks: int = 40
    steps: int = 3


@register_track("rl")
@dataclass
class RLConfig(RunConfig):
    track: str = "rl"
    iterations: int = 500
    checkpoint_every: int = 10
    log_every: int = 1
    meta_batch: int = 20
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    inner: RLInnerConfig = field(default_factory=RLInnerConfig)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    outer: RLOuterConfig = field(default_factory=RLOuterConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    baselines: list[Literal["random"]] = field(default_factory=lambda: ["random"])
    eval: RLEvalConfig = field(default_factory=RLEvalConfig)

    def validate(self):
        super().validate()
        from metarl.envs import TASK_ENV_IDS  # noqa: F401  (registers the built-in ids)
        import gymnasium as gym
        import difflib
        if self.env.id not in gym.registry:
            near = difflib.get_close_matches(self.env.id, [k for k in gym.registry if "/" in k], n=3)
            raise ConfigError(f"unknown env.id '{self.env.id}'" + (f": did you mean {', '.join(near)}?" if near else
                              ": register it with gymnasium.register (see README, 'Your own environment')"))
        if self.meta_batch < 1 or self.inner.episodes < 1:
            raise ConfigError("meta_batch and inner.episodes must be >= 1")


class RLTrack(Track):
    def __init__(self, cfg: RLConfig):
        super().__init__(cfg)
        from metarl.envs import make_task_env
        from metarl.policies.gaussian import GaussianMLPPolicy
        from ..rollouts import Collector

        probe = make_task_env(cfg.env.id, **cfg.env.kwargs)
        self.task_env = probe.unwrapped
        obs_dim = int(np.prod(probe.observation_space.shape))
        act_dim = int(np.prod(probe.action_space.shape))
        mk = lambda: GaussianMLPPolicy(obs_dim, act_dim, cfg.policy.hidden, cfg.policy.activation, cfg.policy.init_std)
        self.policy = mk()
        self.modules["maml"] = self.policy
        if "random" in cfg.baselines:
            self.modules["random"] = mk()
        if cfg.outer.optimizer == "vpg":
            self.optimizers["maml"] = torch.optim.Adam(self.policy.parameters(), lr=cfg.outer.lr)
        self.collector = Collector(cfg.env.id, env_kwargs=cfg.env.kwargs, n_workers=cfg.sampler.workers)

    def close(self):
        self.collector.close()

    def train_step(self, iteration: int, rng: np.random.Generator) -> dict[str, float]:
        cfg = self.cfg
        tasks = self.task_env.sample_tasks(cfg.meta_batch, rng)
        seed = int(rng.integers(2**31 - 1))
        return meta_update(self.policy, self.collector, tasks, cfg.inner, cfg.advantages, cfg.outer, seed,
                           optimizer=self.optimizers.get("maml"))

    def evaluate(self, n_tasks: int, steps: int, seed: int) -> EvalResult:
        cfg = self.cfg
        rng = np.random.default_rng([seed, 1])
        tasks = self.task_env.sample_tasks(n_tasks, rng)
        lr = cfg.inner.eval_lr if cfg.inner.eval_lr is not None else cfg.inner.lr
        curves, data_by_method = {}, {}
        for name, policy in self.modules.items():
            data, _ = collect_adapted(policy, self.collector, params_of(policy), tasks,
                                      cfg.inner.eval_episodes or cfg.inner.episodes, cfg.advantages, steps, lr, seed)
            curves[name] = np.stack([eps.returns.mean(-1).numpy() for eps, _ in data], axis=1)
            data_by_method[name] = data
        result = EvalResult("return", True, curves)
        if "Navigation2D" in cfg.env.id:
            result.figures["trajectories.png"] = lambda path: _nav_plot(path, tasks, data_by_method["maml"])
        return result


def _nav_plot(path, tasks, data):
    from ..plotting import navigation_trajectories

    navigation_trajectories(path, tasks, [eps.obs for eps, _ in data], [eps.mask for eps, _ in data])
