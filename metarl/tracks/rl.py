"""Meta-RL on task-distribution envs: the problem (env, policy family, collector) and its baselines.

Finn et al. 2017 sec. 5.3. The env is any :class:`metarl.envs.TaskEnv` registered with Gymnasium
(``env.id``), so a user's own env plugs in through ``metarl.envs.TaskWrapper`` plus
``gymnasium.register``. The method (``algorithm:``, default ``maml``: MAML-TRPO in
``metarl/algorithms/maml_trpo.py``) owns the policy θ and the outer update. On the adaptation curve:
- the method's name (e.g. **maml**): the meta-trained policy, adapted with ``inner.eval_steps``
  REINFORCE steps;
- **random**: a randomly initialised policy adapted the same way (its init is fixed by the seed);
- **pretrain**: one policy trained with PPO on the whole task mixture (stable-baselines3, same
  network shape), converted into the project's policy and adapted the same way;
- **oracle**: a PPO policy that sees the task parameters; not adapted (flat on the curve).
pretrain and oracle are trained by ``metarl baselines RUN_DIR`` (or at the end of ``metarl train``
when ``ppo_baselines.methods`` lists them) into ``RUN_DIR/baselines/{pretrain,oracle}.zip``;
evaluation includes those that exist.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

from .. import registry
from ..algorithms.meta_rl import AdvantageConfig, RLInnerConfig, collect_adapted, select_step_sizes
from ..algorithms.trpo import RLOuterConfig
from ..config import ConfigError, resumable
from ..evaluation import EvalResult, check_step_grid, step_size_record
from ..functional import params_of
from metarl.envs.base import sample_split
from ..registry import register_track
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
    """Hidden widths of the Gaussian policy's mean MLP (the paper: 100, 100)."""
    activation: Literal["relu", "tanh"] = "relu"
    """Activation of the mean MLP."""
    init_std: float = 1.0
    """Initial standard deviation of the state-independent Gaussian (a learned log-std per action)."""
    init: Literal["torch", "xavier"] = "torch"
    """Mean-network initialisation: "torch" (nn.Linear's default) or "xavier" (Xavier-uniform
    weights, zero biases: the MAML paper's code and pytorch-maml-rl)."""


@dataclass
class SamplerConfig:
    workers: int = 2
    """Worker processes stepping the envs (0 = in-process); with ``backend: ray``, the number of
    Ray actors (at least 1)."""
    backend: Literal["local", "ray"] = "local"
    """Where episodes are collected. "local": this machine's worker processes (or in-process).
    "ray": Ray actors, each holding its own envs and collecting a contiguous share of the
    meta-batch's tasks under the parameters it is sent (metarl/rollouts/ray_collector.py); the
    episodes are identical to "local" for the same seed. Needs the ``distributed`` extra."""
    ray_address: Optional[str] = None
    """With ``backend: ray``: the address of a running Ray cluster ("auto", "HOST:6379",
    "ray://HOST:10001"); null starts a local Ray instance with ``workers`` CPUs, which stops with
    the run, even a SIGKILLed one."""
    ray_timeout: float = 600.0
    """With ``backend: ray``: seconds a collection may take before the run stops with one line
    (an actor that hangs, or a cluster without the CPUs for the actors), never a hang."""
    ray_restarts: int = 1
    """With ``backend: ray``: how often, within one collection, an actor that died is replaced and
    its share re-collected (deterministically: the same episodes) before the run stops."""
    max_envs: Optional[int] = None
    """At most this many envs per worker (0 workers: in all); null = one env per episode slot.
    A meta-batch with more slots runs in waves that reuse the envs, each episode reset with its
    own task and seed: the same episodes, bit for bit, in less memory (Meta-World reach: ~21 MB per env),
    at the cost of one policy call over the whole batch per step of each wave. Needs an env whose
    set_task + reset(seed=...) fixes the episode (Gymnasium's contract; check_task_env checks it).
    Generic path only: the MuJoCo fast path holds one small MjData per slot."""


@dataclass
class RLEvalConfig(EvalConfig):
    tasks: int = 40
    steps: int = 3
    validation_tasks: int = 20
    """Fresh tasks (their own seed stream) on which ``inner.eval_lr_grid`` picks test step sizes."""


@dataclass
class PPOBaselineConfig:
    methods: list[Literal["pretrain", "oracle"]] = field(default_factory=list)
    """Which PPO baselines ``metarl train`` trains after meta-training (``metarl baselines`` trains any)."""
    timesteps: int = 1_000_000
    """Environment steps of PPO training per baseline."""


@dataclass
class RLConfig(RunConfig):
    track: str = "rl"
    iterations: int = resumable(500, why="length of the run")
    checkpoint_every: int = resumable(10, why="bookkeeping")
    log_every: int = resumable(1, why="bookkeeping")
    meta_batch: int = 20
    """Tasks per meta-update."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """The task-distribution env (a registered Gymnasium id) and its arguments."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The Gaussian MLP policy."""
    inner: RLInnerConfig = field(default_factory=RLInnerConfig)
    """The inner REINFORCE loop, in training and at evaluation."""
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    """Returns, baseline and advantages."""
    outer: RLOuterConfig = field(default_factory=RLOuterConfig)
    """The outer rule (TRPO, vanilla PG or PPO)."""
    sampler: SamplerConfig = resumable(why="speed only", default_factory=SamplerConfig)
    """The rollout collector."""
    baselines: list[Literal["random"]] = field(default_factory=lambda: ["random"])
    """Baselines adapted like the method at evaluation (random: a random initial policy)."""
    ppo_baselines: PPOBaselineConfig = field(default_factory=PPOBaselineConfig)
    """PPO pretrain/oracle baselines (stable-baselines3)."""
    eval: RLEvalConfig = resumable(why="evaluation only", default_factory=RLEvalConfig)

    def validate(self):
        super().validate()
        import difflib

        import gymnasium as gym
        from metarl.envs.registration import check_env_kwargs, import_env_module  # importing metarl.envs registers the built-ins
        try:
            bare = import_env_module(self.env.id)
        except ValueError as e:
            raise ConfigError(f"env.id: {e}") from None
        from metarl.envs.registration import missing_extra
        if bare not in gym.registry and missing_extra(bare):
            raise ConfigError(f"env.id: {missing_extra(bare)}")
        if bare not in gym.registry:
            near = difflib.get_close_matches(self.env.id, [k for k in gym.registry if "/" in k], n=3)
            raise ConfigError(f"unknown env.id '{self.env.id}'" + (f": did you mean {', '.join(near)}?" if near else
                              ": register it with gymnasium.register (see README, 'Your own environment')"))
        try:
            check_env_kwargs(bare, self.env.kwargs)
        except ValueError as e:
            raise ConfigError(f"env.kwargs: {e}") from None
        if self.meta_batch < 1 or self.inner.episodes < 1:
            raise ConfigError("meta_batch and inner.episodes must be >= 1")
        from ..config import in_range  # upper bounds: one iteration must end (see in_range)
        in_range("meta_batch", self.meta_batch, 1, 100_000), in_range("sampler.workers", self.sampler.workers, 0, 1_024)
        self._validate_sampler()
        in_range("sampler.max_envs", self.sampler.max_envs, 1, 1_000_000)
        in_range("policy.hidden", self.policy.hidden, 1, 100_000), in_range("policy.init_std", self.policy.init_std, 0, open_low=True)
        in_range("ppo_baselines.timesteps", self.ppo_baselines.timesteps, 1)
        for key in ("timesteps", "eval_episodes", "eval_timesteps"):
            value = getattr(self.inner, key)
            if value is not None and value < 1:
                raise ConfigError(f"inner.{key} must be >= 1 (or null for the default), got {value}")
        if self.inner.eval_lr_grid is not None:
            try:
                check_step_grid(self.inner.eval_lr_grid)
            except ValueError as e:
                raise ConfigError(f"inner.eval_lr_grid: {e}") from None
        if self.outer.optimizer == "ppo" and self.outer.minibatches > self.meta_batch:
            raise ConfigError(f"outer.minibatches ({self.outer.minibatches}) splits the meta-batch's tasks: it must be "
                              f"<= meta_batch ({self.meta_batch})")
        if self.eval.validation_tasks < 1:
            raise ConfigError(f"eval.validation_tasks must be >= 1, got {self.eval.validation_tasks}")
        if self.inner.eval_protocol == "rllab" and self.inner.eval_timesteps is None:
            raise ConfigError("inner.eval_protocol 'rllab' sizes test batches in steps: set inner.eval_timesteps too (the paper: 4000)")

    def _validate_sampler(self):
        """sampler.backend and its Ray settings: one line each, before any env or actor starts."""
        from ..config import in_range
        s = self.sampler
        if s.backend != "ray":
            if s.ray_address is not None:
                raise ConfigError(f"sampler.ray_address is set ({s.ray_address!r}) but sampler.backend is "
                                  f"'{s.backend}': add --set sampler.backend=ray")
            return
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            from ..extras import DISTRIBUTION
            raise ConfigError(f"sampler.backend ray needs ray: pip install '{DISTRIBUTION}[distributed]' "
                              f"(in a checkout: pip install -e '.[distributed]')")
        in_range("sampler.workers", s.workers, 1, 1_024)
        in_range("sampler.ray_timeout", s.ray_timeout, 0, open_low=True)
        in_range("sampler.ray_restarts", s.ray_restarts, 0, 100)


class RLTrack(Track):
    def __init__(self, cfg: RLConfig):
        super().__init__(cfg)
        from metarl.envs import find_task_env, make_task_env
        from metarl.policies.gaussian import GaussianMLPPolicy
        from ..rollouts import Collector

        probe = make_task_env(cfg.env.id, **cfg.env.kwargs)
        self.task_env = find_task_env(probe)  # the TaskEnv may be a wrapper (TaskWrapper), not .unwrapped
        self.obs_dim = obs_dim = int(np.prod(probe.observation_space.shape))
        self.act_dim = act_dim = int(np.prod(probe.action_space.shape))
        mk = lambda: GaussianMLPPolicy(obs_dim, act_dim, cfg.policy.hidden, cfg.policy.activation, cfg.policy.init_std,
                                       init=cfg.policy.init)
        self._new_policy = mk
        if cfg.sampler.backend == "ray":
            from ..rollouts.ray_collector import RayCollector
            s = cfg.sampler
            self.collector = RayCollector(cfg.env.id, env_kwargs=cfg.env.kwargs, n_actors=s.workers, address=s.ray_address,
                                          timeout=s.ray_timeout, restarts=s.ray_restarts, max_envs=s.max_envs)
        else:
            self.collector = Collector(cfg.env.id, env_kwargs=cfg.env.kwargs, n_workers=cfg.sampler.workers,
                                       max_envs=cfg.sampler.max_envs)
        self.method = registry.find_algorithm(cfg.algorithm, "rl")(self, cfg)
        self.policy = self.method.policy
        self.modules.update(self.method.modules)
        self.optimizers.update(self.method.optimizers)
        if "random" in cfg.baselines:  # a fresh policy of the method's own family (a method may bring one: RL²)
            self.modules["random"] = getattr(self.method, "new_policy", mk)()
        self.run_dir = None  # set by metarl.training when a run directory is known

    # ---- PPO baselines ------------------------------------------------------------------------
    def baseline_path(self, kind: str):
        from pathlib import Path
        return Path(self.run_dir) / "baselines" / f"{kind}.zip"

    def train_baselines(self, methods=None, timesteps=None, overwrite=False) -> list[str]:
        """Train the PPO pretrain/oracle baselines into RUN_DIR/baselines (skips existing ones)."""
        from .. import rl_baselines as rb

        cfg = self.cfg
        done = []
        for kind in methods if methods is not None else cfg.ppo_baselines.methods:
            path = self.baseline_path(kind)
            if path.exists() and not overwrite:
                continue
            train = rb.train_pretrain if kind == "pretrain" else rb.train_oracle
            model = train(cfg.env.id, cfg.env.kwargs, timesteps=timesteps or cfg.ppo_baselines.timesteps,
                          hidden=tuple(cfg.policy.hidden), activation=cfg.policy.activation, seed=cfg.seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            rb.save_baseline(model, path)
            done.append(kind)
        return done

    def after_training(self) -> list[str]:
        return self.train_baselines()

    def close(self):
        self.collector.close()
        getattr(self.method, "close", lambda: None)()  # a method's own envs (RL²'s vector env)

    def train_step(self, iteration: int, rng: np.random.Generator) -> dict[str, float]:
        tasks = sample_split(self.task_env, self.cfg.meta_batch, rng, "train")
        seed = int(rng.integers(2**31 - 1))
        return self.method.train_step(tasks, seed)

    def load_tasks(self, path) -> list[dict]:
        """Evaluation tasks from a JSON file (``metarl evaluate --tasks-file``): a list of task
        dicts, or an object whose ``tasks`` key holds that list (other keys are free for notes on
        where the tasks come from, e.g. experiments/nav2d_paper_goals.json). Each task is checked
        by the env's ``set_task``; any problem ends with one line naming the file and the task."""
        import json
        from pathlib import Path

        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"--tasks-file {path}: no such file") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"--tasks-file {path}: not readable JSON ({e})") from None
        tasks = data.get("tasks") if isinstance(data, dict) else data
        if not isinstance(tasks, list) or len(tasks) < 2:
            raise ConfigError(f"--tasks-file {path}: expected a JSON list of at least 2 task dicts "
                              f"(or {{\"tasks\": [...]}}), e.g. [{json.dumps(self.task_env.sample_tasks(1, np.random.default_rng(0))[0])}, ...]")
        for i, task in enumerate(tasks):
            try:
                self.task_env.set_task(task)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"--tasks-file {path}: task {i}: {e}") from None
        return [dict(t) for t in tasks]

    def evaluate(self, n_tasks: int, steps: int, seed: int, tasks: list[dict] | None = None) -> EvalResult:
        """Adaptation curves on ``n_tasks`` fresh tasks drawn with ``seed``, or on ``tasks``.
        Fresh tasks come from the env's test split when it has one (Meta-World's held-out goals
        and classes), else from its one distribution on a seed stream disjoint from training's.
        With ``inner.eval_lr_grid`` each adapted method's step sizes are first chosen on
        validation tasks drawn from a separate stream of the train split (never the test tasks).
        When the env reports ``info["success"]`` the result also holds the success curve
        (:func:`success_curves`)."""
        cfg = self.cfg
        # an env with a held-out split says which one the curves are on (adaptation.json "eval_split")
        split_note = {"eval_split": "test" if tasks is None else "tasks file"} if getattr(self.task_env, "task_splits", ()) else {}
        if tasks is None:
            tasks = sample_split(self.task_env, n_tasks, np.random.default_rng([seed, 1]), "test")
        if hasattr(self.method, "evaluate_curves"):  # a black-box method (RL²): its own curve, no inner steps
            by_metric = self.method.evaluate_curves(dict(self.modules), tasks, steps, seed)
            curves = {**by_metric["return"], **self._oracle_curve(tasks, seed, steps)}
            result = EvalResult("return", True, curves, algorithm=self.method.name, curve_axis=self.method.curve_axis)
            result.extra.update({**success_summary(by_metric.get("success", {}), tasks), **split_note})
            return result
        adapted = dict(self.modules)
        if self.run_dir is not None and self.baseline_path("pretrain").exists():
            from .. import rl_baselines as rb
            adapted["pretrain"] = rb.ppo_to_gaussian_policy(rb.load_baseline(self.baseline_path("pretrain")), self._new_policy())
        batch = dict(episodes=cfg.inner.eval_episodes or cfg.inner.episodes, adv_cfg=cfg.advantages, seed=seed,
                     timesteps=cfg.inner.eval_timesteps, lockstep=cfg.inner.eval_protocol == "rllab")
        grid = cfg.inner.eval_lr_grid
        validation = None if grid is None else sample_split(self.task_env, cfg.eval.validation_tasks,
                                                            np.random.default_rng([seed, 2]), "train")
        fixed_lr = cfg.inner.eval_lr if cfg.inner.eval_lr is not None else cfg.inner.lr
        curves, data_by_method, chosen = {}, {}, {}
        for name, policy in adapted.items():
            lr = fixed_lr
            if grid is not None and steps > 0:
                lr, table = select_step_sizes(policy, self.collector, params_of(policy), validation, steps=steps, grid=grid, **batch)
                chosen[name] = step_size_record(lr, grid, table, len(validation), "greedy per step")
            data, _, _ = collect_adapted(policy, self.collector, params_of(policy), tasks, steps=steps, lr=lr, **batch)
            curves[name] = np.stack([eps.mean_returns().numpy() for eps, _ in data], axis=1)
            data_by_method[name] = data
        curves.update(self._oracle_curve(tasks, seed, steps))
        result = EvalResult("return", True, curves, step_sizes=chosen, algorithm=self.method.name,
                            curve_axis=self.method.curve_axis)
        result.extra.update({**success_curves(data_by_method, tasks), **split_note})
        maml_data = data_by_method[self.method.name]
        if "Navigation2D" in cfg.env.id:
            result.figures["trajectories.png"] = lambda path: _nav_plot(path, tasks, maml_data)
        if "forward_velocity" in (maml_data[0][0].infos or {}):
            result.figures["velocity.png"] = lambda path: _velocity_plot(path, tasks, maml_data)
        return result


    def _oracle_curve(self, tasks, seed: int, steps: int) -> dict:
        """{"oracle": [n_tasks, steps + 1]} (flat: it is not adapted) when RUN_DIR/baselines has one."""
        if self.run_dir is None or not self.baseline_path("oracle").exists():
            return {}
        from .. import rl_baselines as rb
        cfg = self.cfg
        ret = rb.oracle_returns(rb.load_baseline(self.baseline_path("oracle")), cfg.env.id, cfg.env.kwargs, tasks,
                                episodes=cfg.inner.eval_episodes or cfg.inner.episodes, seed=seed)
        return {"oracle": np.repeat(np.asarray(ret)[:, None], steps + 1, axis=1)}


def success_curves(data_by_method: dict, tasks: list[dict]) -> dict:
    """``{"success": {method: {"mean", "ci95"}}, "success_by_env": {method: {env_name: [...]}}}``
    when the episodes carry ``info["success"]`` (Meta-World), else ``{}``.

    Counted as Meta-World's ``evaluation.py`` counts it: an episode succeeds if the flag is set at
    any of its steps (its evaluation ends an episode at the first success); a task's success at
    inner step k is the fraction of its episodes collected after k inner steps that succeed; the
    95% interval is over tasks, as the return's. ``success_by_env`` averages the tasks of each
    Meta-World class (ML10/ML45 report success per test class)."""
    first = next(iter(data_by_method.values()))
    if "success" not in (first[0][0].infos or {}):
        return {}
    return success_summary({name: np.stack([eps.any_step_rate("success").numpy() for eps, _ in data], axis=1)
                            for name, data in data_by_method.items()}, tasks)


def success_summary(rates: dict, tasks: list[dict]) -> dict:
    """The adaptation.json entries of :func:`success_curves` from per-task success rates
    {method: [n_tasks, steps + 1]} ({} when there are none)."""
    from ..evaluation import mean_ci95

    if not rates:
        return {}
    out, by_env = {}, {}
    names = [t.get("env_name", "") for t in tasks]
    for name, rate in rates.items():
        mean, ci = mean_ci95(rate)
        out[name] = {"mean": mean.tolist(), "ci95": ci.tolist()}
        by_env[name] = {env: rate[[i for i, n in enumerate(names) if n == env]].mean(0).tolist()
                        for env in dict.fromkeys(names)}
    return {"success": out, "success_by_env": by_env}


def _velocity_plot(path, tasks, data):
    from ..plotting import velocity_traces

    velocity_traces(path, tasks, [eps.infos["forward_velocity"] for eps, _ in data], [eps.mask for eps, _ in data])


def _nav_plot(path, tasks, data):
    from ..plotting import navigation_trajectories

    navigation_trajectories(path, tasks, [eps.obs for eps, _ in data], [eps.mask for eps, _ in data])


register_track("rl", kind="rl", config=RLConfig, cls=RLTrack)
