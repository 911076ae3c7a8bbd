"""The two RL baselines of MAML, trained with stable-baselines3 PPO.

Finn et al. (2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
sec. 5.3) compare MAML on the 2D-navigation and locomotion task distributions against

* **pretrain** -- one policy trained on the whole *mixture* of tasks (a fresh task every
  episode, no task information in the observation) and then fine-tuned on the new task with
  the same policy-gradient inner loop MAML uses.  :class:`TaskMixtureEnv` is the training env,
  :func:`train_pretrain` trains it, and :func:`ppo_to_gaussian_policy` copies the result into
  the project's :class:`~metarl.policies.gaussian.GaussianMLPPolicy` so that the REINFORCE
  adaptation code can fine-tune it exactly like the MAML initialisation;
* **oracle** -- a policy that receives the task parameters as extra inputs (an upper bound that
  needs no adaptation).  :class:`OracleEnv` appends ``task_vector(task)`` to every observation,
  :func:`train_oracle` trains it and :func:`oracle_returns` / :class:`OraclePolicy` evaluate it.

Both are trained with PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms")
from stable-baselines3 with the MAML policy's shape: ``len(hidden)`` hidden layers of the same
widths and activation for the actor (and, separately, for the critic:
``net_arch=dict(pi=hidden, vf=hidden)``), a state-independent log-std (SB3's default for ``Box``
actions), no tanh squashing.  :data:`PPO_HYPERPARAMS` are Schulman et al.'s MuJoCo settings
(Table 3): 2048 transitions per update (``n_envs=4`` x ``n_steps=512``), 10 epochs of minibatch 64,
Adam 3e-4, gamma 0.99, GAE lambda 0.95, clip 0.2; override any of them with ``ppo_kwargs``.

Action clipping -- the one systematic difference between SB3 and the project's rollouts
--------------------------------------------------------------------------------------------
SB3 samples an *unclipped* Gaussian action, stores it for the PPO loss, and sends
``clip(a, action_space.low, action_space.high)`` to the env.  The project's collector does the
same (it stores the unclipped sample for the policy gradient and sends the clipped action), so
every method on the curve, the oracle included, is scored on clipped actions: the locomotion
envs charge the control cost on the action passed to ``step``, and an unclipped ``|a| > 1``
would pay more than any policy was trained to.  :func:`baseline_returns` clips by default;
``clip_actions=False`` (unclipped actions, as the oracle rows of RESULTS.md before session 7
were measured, reading low) is kept only to reproduce those figures.  No other pre-/post-processing exists: PPO here uses no observation
or reward normalisation, so the copied :class:`GaussianMLPPolicy` is the SB3 actor exactly.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from metarl.envs import find_task_env, make_task_env
from metarl.extras import require
from metarl.policies.gaussian import GaussianMLPPolicy

__all__ = [
    "PPO_HYPERPARAMS",
    "TaskMixtureEnv",
    "OracleEnv",
    "make_baseline_env",
    "train_pretrain",
    "train_oracle",
    "train_baseline",
    "save_baseline",
    "load_baseline",
    "ppo_to_gaussian_policy",
    "OraclePolicy",
    "baseline_returns",
    "oracle_returns",
]

#: PPO settings of Schulman et al. (2017, Table 3, MuJoCo): ``n_steps`` is *per env*, so the
#: default ``n_envs=4`` gives their horizon of 2048 transitions per update (10 Navigation2D
#: episodes of 100 steps ~ 20 episodes, or 10 HalfCheetah episodes of 200 steps).
PPO_HYPERPARAMS: dict[str, Any] = {
    "n_steps": 512,
    "batch_size": 64,
    "n_epochs": 10,
    "learning_rate": 3e-4,
    "gamma": 0.99,
    "gae_lambda": 0.95,
    "clip_range": 0.2,
    "ent_coef": 0.0,
    "vf_coef": 0.5,
    "max_grad_norm": 0.5,
}

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}
_TASK_STREAM = 0x7461736B  # "task": spawn key separating the task stream from the env's own RNG
_META_ATTR = "metarl_baseline"


def _task_rng(seed: int | None) -> np.random.Generator:
    """Task-sampling generator for ``reset(seed=seed)``.

    Gymnasium seeds the env's own ``np_random`` with ``SeedSequence(seed)``; an extra spawn key
    gives an independent stream, so the task drawn and the env's reset noise are not the same
    random numbers.  ``seed=None`` draws fresh OS entropy, like an unseeded Gymnasium reset."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_TASK_STREAM,)))


class TaskMixtureEnv(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """A task env that draws a fresh task at every reset: the *pretrain* baseline's env.

    Finn et al. (2017, sec. 5.3) pretrain "one policy on all of the tasks"; sampling a task per
    episode from ``sample_tasks(1, rng)`` trains a single policy on the task mixture.  ``rng`` is
    re-seeded whenever ``reset`` receives a seed (from ``seed`` through an independent
    ``SeedSequence`` stream) and carries on across unseeded resets, so a seeded vectorised env
    replays the same task sequence.  ``reset(options={"task": task})`` installs ``task`` instead
    of sampling one (the evaluation path); the installed task is also in ``info["task"]``.

    Args:
        env: a task env (``make_task_env(...)``, a :class:`~metarl.envs.TaskEnv` or anything
            wrapping one, e.g. a :class:`~metarl.envs.TaskWrapper`).
    """

    def __init__(self, env: gym.Env):
        task_env = find_task_env(env)
        if task_env is None:
            raise ValueError(
                f"{type(self).__name__} needs a task env, got {env}; build it with "
                f"make_task_env('metarl/Navigation2D-v0') or wrap it in TaskWrapper(env, sample_fn, set_fn)"
            )
        gym.utils.RecordConstructorArgs.__init__(self)  # lets env.spec.make() rebuild the wrapper stack
        gym.Wrapper.__init__(self, env)
        self.task_env = task_env
        self._rng: np.random.Generator | None = None

    @property
    def task(self) -> dict:
        """The task of the current episode."""
        return self.task_env.get_task()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None or self._rng is None:
            self._rng = _task_rng(seed)
        options = dict(options or {})
        task = options.pop("task", None)
        if task is None:
            task = self.task_env.sample_tasks(1, self._rng)[0]
        self.task_env.set_task(task)
        obs, info = self.env.reset(seed=seed, options=options or None)
        info = dict(info)
        info["task"] = self.task_env.get_task()
        return obs, info


class OracleEnv(TaskMixtureEnv):
    """:class:`TaskMixtureEnv` whose observation is ``concat(obs, task_vector(task))``.

    The *oracle* of Finn et al. (2017, sec. 5.3) "receives the parameters of the task as input";
    it is trained on the same task mixture as the pretrain baseline.  The observation space is
    the wrapped ``Box`` extended by ``task_dim`` unbounded entries, in the wrapped space's dtype.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        inner = env.observation_space
        if not isinstance(inner, spaces.Box) or len(inner.shape) != 1:
            raise ValueError(
                f"OracleEnv needs a flat Box observation space, got {inner}; flatten it first with "
                f"gymnasium.wrappers.FlattenObservation(env)"
            )
        task_dim = getattr(self.task_env, "task_dim", None)
        if task_dim is None:
            task_dim = int(np.asarray(self.task_env.task_vector(self.task_env.get_task())).size)
        self.task_dim = int(task_dim)
        dtype = inner.dtype
        low = np.concatenate([inner.low, np.full(self.task_dim, -np.inf)]).astype(dtype)
        high = np.concatenate([inner.high, np.full(self.task_dim, np.inf)]).astype(dtype)
        self.observation_space = spaces.Box(low=low, high=high, dtype=dtype)

    def observation(self, obs: np.ndarray) -> np.ndarray:
        """Append the current task's vector to ``obs`` (in the observation dtype)."""
        vec = np.asarray(self.task_env.task_vector(self.task_env.get_task()), dtype=np.float64)
        return np.concatenate([np.asarray(obs, dtype=np.float64).reshape(-1), vec]).astype(
            self.observation_space.dtype
        )

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = super().reset(seed=seed, options=options)
        return self.observation(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self.observation(obs), reward, terminated, truncated, info


def make_baseline_env(env_id: str, env_kwargs: Mapping[str, Any] | None = None, oracle: bool = False) -> gym.Env:
    """``OracleEnv`` (``oracle=True``) or ``TaskMixtureEnv`` around ``make_task_env(env_id, **env_kwargs)``."""
    env = make_task_env(env_id, **dict(env_kwargs or {}))
    return OracleEnv(env) if oracle else TaskMixtureEnv(env)


class _EnvFactory:
    """Picklable env constructor (SubprocVecEnv ships it to the worker processes)."""

    def __init__(self, env_id: str, env_kwargs: Mapping[str, Any], oracle: bool):
        self.env_id, self.env_kwargs, self.oracle = env_id, dict(env_kwargs), oracle

    def __call__(self) -> gym.Env:
        return make_baseline_env(self.env_id, self.env_kwargs, self.oracle)


def _check_arch(hidden: Sequence[int], activation: str) -> tuple[list[int], type[nn.Module]]:
    hidden = [int(h) for h in hidden]
    if not hidden or any(h < 1 for h in hidden):
        raise ValueError(f"hidden must be a non-empty list of positive widths, got {hidden}; e.g. hidden=(100, 100)")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: choose one of {sorted(_ACTIVATIONS)}")
    return hidden, _ACTIVATIONS[activation]


def train_baseline(
    kind: str,
    env_id: str,
    env_kwargs: Mapping[str, Any] | None = None,
    timesteps: int = 1_000_000,
    hidden: Sequence[int] = (100, 100),
    activation: str = "relu",
    seed: int = 0,
    n_envs: int = 4,
    ppo_kwargs: Mapping[str, Any] | None = None,
    ortho_init: bool = True,
    log_std_init: float = 0.0,
    vec_env_cls: type | None = None,
    device: str = "cpu",
):
    """Train the ``"pretrain"`` or ``"oracle"`` baseline with PPO; returns the SB3 ``PPO`` model.

    ``n_envs`` copies of the env run in a ``DummyVecEnv`` (in-process; ``SubprocVecEnv`` was
    measured slower on 2 shared cores, see ``vec_env_cls``), seeded ``seed, seed+1, ...``; the
    PPO update is :data:`PPO_HYPERPARAMS` updated with ``ppo_kwargs``.  ``ortho_init`` is SB3's
    orthogonal initialisation (gain 0.01 on the mean head, so the initial mean is ~0) and
    ``log_std_init=0`` matches the MAML policy's ``init_std=1``.  The model carries
    ``model.metarl_baseline`` (kind, env, architecture, seed, timesteps), which
    :func:`save_baseline` / :func:`load_baseline` round-trip.

    Throughput with these defaults (hidden 100x100, one torch thread, 2 shared CPU cores):
    ~2,300-2,600 timesteps/s on Navigation2D and ~1,300-1,500 on HalfCheetahVel, about 60% of
    the time in the 10 epochs of minibatch-64 updates (``batch_size=256`` gives ~1.5x).
    """
    require("stable_baselines3", "baselines", "training the PPO baselines")
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    if kind not in ("pretrain", "oracle"):
        raise ValueError(f"kind must be 'pretrain' or 'oracle', got {kind!r}")
    hidden, act_cls = _check_arch(hidden, activation)
    if int(n_envs) < 1 or int(timesteps) < 0:
        raise ValueError(f"need n_envs >= 1 and timesteps >= 0 (0: untrained model), got {n_envs} and {timesteps}")
    params = dict(PPO_HYPERPARAMS)
    unknown = set(ppo_kwargs or {}) - set(inspect.signature(PPO.__init__).parameters)
    if unknown:
        raise ValueError(f"unknown PPO argument(s) {sorted(unknown)}; see stable_baselines3.PPO for valid names")
    params.update(ppo_kwargs or {})
    env_kwargs = dict(env_kwargs or {})
    vec_env = make_vec_env(
        _EnvFactory(env_id, env_kwargs, kind == "oracle"), n_envs=int(n_envs), seed=int(seed), vec_env_cls=vec_env_cls
    )
    policy_kwargs = dict(
        net_arch=dict(pi=list(hidden), vf=list(hidden)),
        activation_fn=act_cls,
        ortho_init=ortho_init,
        log_std_init=float(log_std_init),
    )
    model = PPO("MlpPolicy", vec_env, policy_kwargs=policy_kwargs, seed=int(seed), verbose=0, device=device, **params)
    if int(timesteps) > 0:
        model.learn(total_timesteps=int(timesteps))
    setattr(model, _META_ATTR, {
        "kind": kind, "env_id": env_id, "env_kwargs": env_kwargs, "hidden": list(hidden),
        "activation": activation, "seed": int(seed), "timesteps": int(model.num_timesteps),
        "n_envs": int(n_envs), "ppo": params,
    })
    return model


def train_pretrain(env_id: str, env_kwargs: Mapping[str, Any] | None = None, timesteps: int = 1_000_000,
                   hidden: Sequence[int] = (100, 100), activation: str = "relu", seed: int = 0, n_envs: int = 4,
                   **kwargs: Any):
    """The *pretrain* baseline (Finn et al. 2017 sec. 5.3): PPO on :class:`TaskMixtureEnv`.

    Fine-tune it with the project's inner loop after :func:`ppo_to_gaussian_policy`.  Extra
    keyword arguments go to :func:`train_baseline` (``ppo_kwargs``, ``ortho_init``...)."""
    return train_baseline("pretrain", env_id, env_kwargs, timesteps, hidden, activation, seed, n_envs, **kwargs)


def train_oracle(env_id: str, env_kwargs: Mapping[str, Any] | None = None, timesteps: int = 1_000_000,
                 hidden: Sequence[int] = (100, 100), activation: str = "relu", seed: int = 0, n_envs: int = 4,
                 **kwargs: Any):
    """The *oracle* baseline (Finn et al. 2017 sec. 5.3): PPO on :class:`OracleEnv` (task vector as input).

    Evaluate it with :func:`oracle_returns`.  Extra keyword arguments go to :func:`train_baseline`."""
    return train_baseline("oracle", env_id, env_kwargs, timesteps, hidden, activation, seed, n_envs, **kwargs)


def save_baseline(model, path: str | Path) -> Path:
    """Save an SB3 model (weights, optimiser, ``metarl_baseline`` metadata) to ``path`` (``.zip``)."""
    path = Path(path)
    if path.suffix != ".zip":
        path = path.with_name(path.name + ".zip")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def load_baseline(path: str | Path, device: str = "cpu"):
    """Load a model written by :func:`save_baseline` (no env attached; ``model.metarl_baseline`` restored)."""
    require("stable_baselines3", "baselines", f"loading the PPO baseline {path}")
    from stable_baselines3 import PPO

    path = Path(path)
    if not path.is_file() and path.with_name(path.name + ".zip").is_file():
        path = path.with_name(path.name + ".zip")
    if not path.is_file():
        raise FileNotFoundError(f"no baseline at {path}: train one with train_pretrain/train_oracle and save_baseline")
    return PPO.load(path, device=device)


# ------------------------------------------------------------------------------------------------
# SB3 actor -> GaussianMLPPolicy
# ------------------------------------------------------------------------------------------------


def _sb3_actor(ppo_model) -> tuple[list[nn.Linear], str, nn.Linear, torch.Tensor]:
    """The SB3 actor's hidden linears, activation name, mean head and log-std, after checking that
    the actor is exactly ``mean = head(act(...act(L1(obs))))`` with a state-independent log-std."""
    from stable_baselines3.common.distributions import DiagGaussianDistribution
    from stable_baselines3.common.torch_layers import FlattenExtractor

    sb = ppo_model.policy
    if not isinstance(sb.action_dist, DiagGaussianDistribution) or sb.squash_output:
        raise ValueError(
            f"need a plain diagonal-Gaussian actor, got {type(sb.action_dist).__name__} "
            f"(squash_output={sb.squash_output}); train with use_sde=False on a Box action space"
        )
    obs_space = sb.observation_space
    if not isinstance(obs_space, spaces.Box) or len(obs_space.shape) != 1:
        raise ValueError(f"need a flat Box observation space, got {obs_space}; use a vector-observation env")
    if not isinstance(sb.pi_features_extractor, FlattenExtractor):
        raise ValueError(
            f"features extractor {type(sb.pi_features_extractor).__name__} is not the identity; "
            f"train with the default FlattenExtractor (MlpPolicy)"
        )
    linears, act_names = [], set()
    for module in sb.mlp_extractor.policy_net:
        if isinstance(module, nn.Linear):
            linears.append(module)
        elif isinstance(module, (nn.ReLU, nn.Tanh)):
            act_names.add("relu" if isinstance(module, nn.ReLU) else "tanh")
        else:
            raise ValueError(f"unsupported layer {module} in the SB3 actor; use activation_fn=nn.ReLU or nn.Tanh")
    if len(act_names) > 1:
        raise ValueError(f"mixed activations {sorted(act_names)} in the SB3 actor; use a single activation_fn")
    activation = act_names.pop() if act_names else "relu"
    return linears, activation, sb.action_net, sb.log_std


def ppo_to_gaussian_policy(ppo_model, policy: GaussianMLPPolicy | None = None) -> GaussianMLPPolicy:
    """Copy an SB3 PPO actor into a :class:`GaussianMLPPolicy` (``policy``, or a new one) and return it.

    Why: the pretrain baseline of Finn et al. (2017, sec. 5.3) is fine-tuned with the *same*
    policy-gradient inner loop as MAML; the project's adaptation code works on
    ``GaussianMLPPolicy`` parameters, so the PPO actor is transplanted layer by layer:
    ``mlp_extractor.policy_net`` linears -> ``mean.layers.0..L-1``, ``action_net`` ->
    ``mean.layers.L``, ``log_std`` -> ``log_std``.  The result has the same mean and log-std as
    ``ppo_model.policy.get_distribution(obs)`` for every observation (float32 exact up to
    matmul rounding; ``policy`` may be float64).  The copied policy is *unclipped*: see the
    module docstring for how that changes rewards in the locomotion envs.  Raises a one-line
    ``ValueError`` if shapes or activation differ.
    """
    linears, activation, head, log_std = _sb3_actor(ppo_model)
    obs_dim = int(ppo_model.policy.observation_space.shape[0])
    act_dim = int(head.out_features)
    hidden = [lin.out_features for lin in linears]
    if policy is None:
        dtype = torch.get_default_dtype()
        policy = GaussianMLPPolicy(obs_dim, act_dim, hidden=hidden, activation=activation).to(dtype)
    ours = list(policy.mean.layers)
    if (policy.obs_dim, policy.act_dim) != (obs_dim, act_dim) or [l.out_features for l in ours[:-1]] != hidden:
        raise ValueError(
            f"policy shape {policy.obs_dim}->{[l.out_features for l in ours[:-1]]}->{policy.act_dim} does not match "
            f"the PPO actor {obs_dim}->{hidden}->{act_dim}: build GaussianMLPPolicy({obs_dim}, {act_dim}, hidden={hidden})"
        )
    if hidden and policy.mean.activation != activation:
        raise ValueError(
            f"policy activation {policy.mean.activation!r} differs from the PPO actor's {activation!r}: "
            f"build GaussianMLPPolicy(..., activation={activation!r})"
        )
    if float(log_std.detach().min()) < policy.min_log_std:
        raise ValueError(
            f"PPO log_std {log_std.detach().min().item():.2f} is below the policy's floor {policy.min_log_std:.2f}: "
            f"build GaussianMLPPolicy(..., min_std=1e-8) or smaller"
        )
    with torch.no_grad():
        for src, dst in zip([*linears, head], ours):
            dst.weight.copy_(src.weight.detach().to(dst.weight))
            dst.bias.copy_(src.bias.detach().to(dst.bias))
        policy.log_std.copy_(log_std.detach().to(policy.log_std))
    return policy


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------


def _mean_std(ppo_model, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SB3's own Gaussian (mean, std) for a batch of observations, as float64 numpy arrays."""
    obs = np.asarray(obs, dtype=np.float32)
    single = obs.ndim == 1
    with torch.no_grad():
        obs_t = torch.as_tensor(obs[None] if single else obs, device=ppo_model.policy.device)
        dist = ppo_model.policy.get_distribution(obs_t).distribution
        mean, std = dist.mean.cpu().double().numpy(), dist.stddev.cpu().double().numpy()
    return (mean[0], std[0]) if single else (mean, std)


class OraclePolicy:
    """Act with an SB3 baseline on raw task-env observations.

    For an oracle model, :meth:`act` appends ``task_vector`` (the task's parameters, Finn et al.
    2017 sec. 5.3) to the observation first; for a pretrain model it is passed through.
    Stochastic actions are ``mean + std * N(0, 1)`` drawn from the caller's ``rng`` (reproducible,
    leaving torch's global RNG alone); deterministic ones are the mean.  Actions are clipped to the
    action space like SB3's ``predict`` unless ``clip_actions=False``.
    """

    def __init__(self, model, task_vector: np.ndarray | None = None, clip_actions: bool = True):
        self.model = model
        self.obs_dim = int(model.policy.observation_space.shape[0])
        self.task_vector = None if task_vector is None else np.asarray(task_vector, dtype=np.float64).reshape(-1)
        self.clip_actions = clip_actions
        space = model.policy.action_space
        self._low, self._high = np.asarray(space.low, np.float64), np.asarray(space.high, np.float64)

    def inputs(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64)
        if self.task_vector is not None:
            obs = np.concatenate([obs, np.broadcast_to(self.task_vector, obs.shape[:-1] + self.task_vector.shape)], -1)
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(
                f"model expects {self.obs_dim} inputs, got {obs.shape[-1]} (task vector "
                f"{'appended' if self.task_vector is not None else 'absent'}): pass task_vector only for oracle models"
            )
        return obs

    def act(self, obs: np.ndarray, rng: np.random.Generator | None = None, deterministic: bool = False) -> np.ndarray:
        """Action(s) for ``obs`` ([obs_dim] or [B, obs_dim]); ``rng`` is required unless deterministic."""
        mean, std = _mean_std(self.model, self.inputs(obs))
        if deterministic:
            action = mean
        else:
            if rng is None:
                raise ValueError("stochastic act needs rng=np.random.Generator; or pass deterministic=True")
            action = mean + std * rng.standard_normal(mean.shape)
        if self.clip_actions:
            action = np.clip(action, self._low, self._high)
        return action.astype(np.float32)

    __call__ = act


def baseline_returns(model, env_id: str, env_kwargs: Mapping[str, Any] | None, tasks: Sequence[Mapping[str, Any]],
                     episodes: int = 1, seed: int = 0, deterministic: bool = False,
                     clip_actions: bool = True, *, _require_oracle: bool = False) -> np.ndarray:
    """Mean undiscounted episode return of an SB3 baseline on each task: ``float64 [n_tasks]``.

    Whether the task vector is appended is read off the model's input size (oracle:
    ``obs_dim + task_dim``, pretrain: ``obs_dim``).  Episode ``j`` of task ``i`` resets the env
    and draws its action noise from ``SeedSequence([seed, i, j])``, so the result is a
    function of ``(model, tasks, episodes, seed)`` only.  Stochastic by default, as the MAML
    evaluation samples its actions too (Finn et al. 2017 sec. 5.3 report sampled returns).
    """
    if int(episodes) < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    env = make_task_env(env_id, **dict(env_kwargs or {}))
    try:
        task_env = find_task_env(env)
        env_obs = int(np.prod(env.observation_space.shape))
        model_obs = int(model.policy.observation_space.shape[0])
        out = np.zeros(len(tasks), dtype=np.float64)
        for i, task in enumerate(tasks):
            task_env.set_task(task)
            vec = np.asarray(task_env.task_vector(task_env.get_task()), dtype=np.float64)
            if model_obs == env_obs + vec.size:
                actor = OraclePolicy(model, vec, clip_actions)
            elif model_obs == env_obs and not _require_oracle:
                actor = OraclePolicy(model, None, clip_actions)
            else:
                raise ValueError(
                    f"model takes {model_obs} inputs but {env_id} gives {env_obs} (+{vec.size} task dims for an "
                    f"oracle): evaluate the model on the env it was trained on, an oracle from train_oracle"
                )
            total = 0.0
            for j in range(int(episodes)):
                env_ss, act_ss = np.random.SeedSequence([int(seed), i, j]).spawn(2)
                rng = np.random.default_rng(act_ss)
                obs, _ = env.reset(seed=int(env_ss.generate_state(1)[0]))
                done = False
                while not done:
                    obs, reward, terminated, truncated, _ = env.step(actor.act(obs, rng, deterministic))
                    total += float(reward)
                    done = terminated or truncated
            out[i] = total / int(episodes)
        return out
    finally:
        env.close()


def oracle_returns(model, env_id: str, env_kwargs: Mapping[str, Any] | None, tasks: Sequence[Mapping[str, Any]],
                   episodes: int = 1, seed: int = 0, deterministic: bool = False,
                   clip_actions: bool = True) -> np.ndarray:
    """:func:`baseline_returns` for an *oracle* model (raises if the model does not take the task vector).

    The oracle row of Finn et al. (2017, sec. 5.3, Fig. 4/5) is flat over gradient steps: it
    is evaluated once per task, without adaptation."""
    meta = getattr(model, _META_ATTR, None)
    if meta is not None and meta.get("kind") != "oracle":
        raise ValueError(f"model is a {meta.get('kind')!r} baseline; use baseline_returns for it or train_oracle")
    return baseline_returns(model, env_id, env_kwargs, tasks, episodes, seed, deterministic, clip_actions,
                            _require_oracle=True)
