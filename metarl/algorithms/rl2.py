"""RL²: fast reinforcement learning via slow reinforcement learning (Duan, Schulman, Chen,
Bartlett, Sutskever & Abbeel 2016, arXiv:1611.02779).

The learner is a recurrent policy; "adaptation" is its hidden state. A trial is K episodes of one
task; the hidden state carries across the episodes of a trial and is reset only between trials
(sec. 2.2), and the policy sees the previous action, reward and done flag next to the observation,
so it can infer the task from its own experience and exploit it in later episodes. The slow
learner maximises the return of whole trials over the task distribution with an ordinary
policy-gradient method: PPO here (Schulman et al. 2017; the RL² paper used TRPO; RL²-PPO is what
ProMP, garage and the Meta-World benchmark run).

Implementation: sb3-contrib's ``RecurrentPPO`` (maintained, tested) on :class:`metarl.envs.trial.
TrialEnv`, which makes one trial one Gymnasium episode, so RecurrentPPO's reset of the state at
each episode start is exactly RL²'s reset between trials. One metarl iteration is one PPO
iteration: ``meta_batch`` trial envs, each reset with a task drawn from the track's distribution
(from the iteration's seed) and rolled out for ``K × horizon`` steps (one full trial when no
inner episode ends early), then ``rl2.epochs`` epochs of clipped-ratio updates on minibatches of
whole sequences (GAE with the track's ``advantages.gamma`` / ``gae_lambda``).

The policy is sb3-contrib's ``MlpLstmPolicy`` with one equivalent, faster sequence pass
(:class:`metarl.policies.recurrent.TrialLstmPolicy`: sb3-contrib loops over time steps in every
minibatch that holds an episode start, i.e. always under RL²).

Deviation from the paper: RecurrentPPO's recurrent cell is an LSTM (``nn.LSTM`` is hard-wired in
sb3-contrib 2.x; the paper used a GRU). Writing a GRU variant would mean re-implementing recurrent
PPO's sequence minibatching, which sb3-contrib already tests; an LSTM is a strict superset of what
a GRU can represent at the same width.

Resume is bitwise: every iteration starts from a fresh reset of the envs seeded from the metarl
iteration seed (a trial cut off at the end of an iteration is bootstrapped by the value function,
as PPO does with any truncated rollout, and never continued), NumPy's global generator (which
RecurrentPPO's minibatch split draws from) is seeded from the same seed, and torch's generator
(action sampling, minibatch order) is in the metarl checkpoint. So the state between iterations
is the policy's weights, its Adam state and two counters, all in the ordinary checkpoint
(``weights_only`` loadable; SB3's own zip format unpickles code, so it is not used).

Evaluation: the adaptation curve is the return of episode 1..K of a trial on the track's test
tasks (``curve_axis`` "episodes in the trial"; point i of ``steps`` is episode i + 1; a curve of
``eval.steps + 1`` episodes, so ``eval.steps: K − 1`` evaluates the trained trial length).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch

from ..config import ConfigError, resumable
from ..extras import require
from ..registry import algorithm
from .base import Method


@dataclass
class RL2Config:
    """RL²'s own settings (config section ``rl2``); γ and the GAE λ are ``advantages.gamma`` /
    ``advantages.gae_lambda``, the trials per iteration ``meta_batch``."""
    episodes_per_trial: int = 2
    """K: episodes of one task per trial, the hidden state carried across them (the paper: 2 to 10)."""
    hidden: int = 256
    """Width of the recurrent cell (the paper's GRU: 256 units; garage's RL²-PPO: 64)."""
    net_arch: list[int] = field(default_factory=list)
    """Hidden widths of the MLP between the recurrent cell and the action / value outputs ([] = a
    linear read-out, as in the paper)."""
    lr: float = 3e-4
    """Adam step size of the PPO updates."""
    epochs: int = 10
    """PPO epochs over each iteration's batch."""
    minibatch: int = 500
    """Steps per PPO minibatch (RecurrentPPO cuts the batch into sequence pieces of about this size)."""
    clip_range: float = 0.2
    """PPO's likelihood-ratio clip ε."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    max_grad_norm: float = 0.5
    """Gradient-norm clip of each PPO update."""
    init_std: float = 1.0
    """Initial standard deviation of the Gaussian actions (a learned, state-independent log-std)."""
    eval_trials: int = resumable(2, why="evaluation only")
    """Trials per test task at evaluation (each a fresh hidden state; their returns are averaged)."""
    eval_deterministic: bool = resumable(False, why="evaluation only")
    """Act with the mean action at evaluation instead of sampling (RL²'s exploration lives in the
    sampling too, so the default samples)."""
    vec_env: Literal["dummy", "subproc"] = "dummy"
    """SB3 vector env of the training trials: "dummy" steps them in-process (cheap envs such as 2D
    navigation), "subproc" one process each (MuJoCo)."""

    def validate(self):
        from ..config import in_range
        in_range("rl2.episodes_per_trial", self.episodes_per_trial, 1, 10_000)
        in_range("rl2.hidden", self.hidden, 1, 100_000)
        in_range("rl2.net_arch", self.net_arch, 1, 100_000)
        in_range("rl2.lr", self.lr, 0, open_low=True)
        in_range("rl2.epochs", self.epochs, 1, 10_000)
        in_range("rl2.minibatch", self.minibatch, 2, 100_000_000)
        in_range("rl2.clip_range", self.clip_range, 0, open_low=True)
        in_range("rl2.ent_coef", self.ent_coef, 0)
        in_range("rl2.vf_coef", self.vf_coef, 0)
        in_range("rl2.max_grad_norm", self.max_grad_norm, 0, open_low=True)
        in_range("rl2.init_std", self.init_std, 0, open_low=True)
        in_range("rl2.eval_trials", self.eval_trials, 1, 100_000)


def _sb3():
    return require("sb3_contrib", "baselines", "algorithm: rl2 (sb3-contrib's RecurrentPPO)")


def _horizon(env) -> int:
    """The inner episodes' step cap: the smaller of the env's TimeLimit and its own ``horizon``."""
    caps = [getattr(env.spec, "max_episode_steps", None) if env.spec is not None else None,
            getattr(env.unwrapped, "horizon", None)]
    caps = [int(c) for c in caps if c]
    if not caps:
        raise ConfigError("algorithm rl2 needs episodes of bounded length: register the env with max_episode_steps")
    return min(caps)


@algorithm("rl2", kinds=("rl",))
class RL2(Method):
    """RL² on the RL track: owns the recurrent actor-critic (``policy``, with its Adam state) and
    an sb3-contrib ``RecurrentPPO`` that trains it on :class:`TrialEnv` trials."""
    Config = RL2Config
    curve_axis = "episodes in the trial"
    defaults = {
        # RL²-PPO as garage runs it (rl2_ppo_halfcheetah: γ 0.99, GAE λ 0.95, clip 0.2, 10 epochs);
        # the curve: K = 2 episodes (eval.steps = K - 1)
        "rl": {"advantages": {"gae_lambda": 0.95}, "meta_batch": 10, "baselines": ["random"], "eval": {"steps": 1}},
    }

    def __init__(self, track, cfg):
        super().__init__(track, cfg)
        sb3c = _sb3()
        from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv
        from metarl.envs import make_task_env
        from metarl.envs.trial import TrialEnv

        o, env_id, kwargs = self.own, cfg.env.id, dict(cfg.env.kwargs)
        K = o.episodes_per_trial
        make = lambda: TrialEnv(make_task_env(env_id, **kwargs), K)  # noqa: E731
        probe = make()
        self.horizon = _horizon(probe.env)
        self.obs_space, self.act_space = probe.observation_space, probe.action_space
        self.make_trial_env = make
        vec = (SubprocVecEnv if o.vec_env == "subproc" else DummyVecEnv)([make] * cfg.meta_batch)
        from metarl.policies.recurrent import TrialLstmPolicy
        self.model = sb3c.RecurrentPPO(
            TrialLstmPolicy, vec, learning_rate=o.lr, n_steps=K * self.horizon, batch_size=o.minibatch, n_epochs=o.epochs,
            gamma=cfg.advantages.gamma, gae_lambda=cfg.advantages.gae_lambda, clip_range=o.clip_range,
            normalize_advantage=cfg.advantages.normalize, ent_coef=o.ent_coef, vf_coef=o.vf_coef,
            max_grad_norm=o.max_grad_norm, policy_kwargs=self._policy_kwargs(), device="cpu", seed=None, verbose=0)
        from stable_baselines3.common.logger import Logger
        self.model.set_logger(Logger(folder=None, output_formats=[]))  # metrics go through metarl's logger
        self.policy = self.model.policy
        self.modules[self.name] = self.policy
        self.optimizers[self.name] = self.policy.optimizer

    def _policy_kwargs(self) -> dict:
        o = self.own
        return dict(lstm_hidden_size=o.hidden, n_lstm_layers=1, net_arch=dict(pi=list(o.net_arch), vf=list(o.net_arch)),
                    log_std_init=math.log(o.init_std))

    def new_policy(self):
        """A freshly initialised policy of the same architecture (the ``random`` baseline)."""
        return self.model.policy_class(self.obs_space, self.act_space, self.model.lr_schedule, **self._policy_kwargs())

    # ---------------------------------------------------------------------------- training
    def train_step(self, tasks, seed: int) -> dict[str, float]:
        """One RecurrentPPO iteration on fresh trials (``tasks``, drawn by the track, are not used:
        each trial env draws its own task from the same distribution at every trial reset)."""
        from stable_baselines3.common.callbacks import BaseCallback

        model, trials = self.model, []

        class _Trials(BaseCallback):  # the per-episode returns of every trial that ended
            def _on_step(self) -> bool:
                trials.extend(info["trial_episode_returns"] for info in self.locals["infos"] if "trial_episode_returns" in info)
                return True

        np.random.seed(seed % 2**32)  # RecurrentPPO's minibatch split draws from NumPy's global generator
        model.env.seed(seed)          # every trial env: seed + i, its task and start state from that
        model._last_obs = None        # learn() resets the envs (a new trial each)
        model._last_lstm_states = type(model._last_lstm_states)(
            *[tuple(torch.zeros_like(t) for t in pair) for pair in model._last_lstm_states])
        model.learn(model.n_steps * model.n_envs, callback=_Trials(), reset_num_timesteps=False)
        logged = model.logger.name_to_value
        metrics = {f"ppo/{k.split('/', 1)[1]}": float(v) for k, v in logged.items()
                   if k.startswith("train/") and k != "train/n_updates" and np.isscalar(v)}
        metrics["loss/ppo"] = float(logged.get("train/loss", float("nan")))
        if trials:
            ret = np.asarray(trials, dtype=np.float64)
            metrics["return/trial"] = float(ret.sum(1).mean())
            metrics["return/first_episode"], metrics["return/last_episode"] = float(ret[:, 0].mean()), float(ret[:, -1].mean())
        return metrics

    def close(self) -> None:
        """Stop the training trial envs (worker processes with ``rl2.vec_env: subproc``)."""
        self.model.env.close()

    def extra_state(self) -> dict:
        return {"num_timesteps": int(self.model.num_timesteps), "n_updates": int(self.model._n_updates)}

    def load_extra_state(self, state: dict) -> None:
        self.model.num_timesteps = int(state.get("num_timesteps", 0))
        self.model._n_updates = int(state.get("n_updates", 0))

    # -------------------------------------------------------------------------- evaluation
    def evaluate_curves(self, policies: dict, tasks: list[dict], steps: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
        """Per policy, the return of episode 1..steps+1 of a trial on each task, averaged over
        ``rl2.eval_trials`` trials: {"return": {name: [n_tasks, steps + 1]}}, and when the env
        reports ``info["success"]`` (Meta-World) the fraction of those episodes that succeed at
        any step under "success"."""
        out: dict[str, dict[str, np.ndarray]] = {"return": {}, "success": {}}
        for name, policy in policies.items():
            successes: dict = {}
            out["return"][name] = trial_returns(policy, self.make_trial_env, tasks, steps + 1, self.own.eval_trials,
                                                seed, deterministic=self.own.eval_deterministic, successes=successes)
            if "success" in successes:
                out["success"][name] = successes["success"]
        if not out["success"]:
            del out["success"]
        return out


def trial_returns(policy, make_trial_env, tasks: list[dict], episodes: int, trials: int, seed: int,
                  deterministic: bool = False, successes: Optional[dict] = None) -> np.ndarray:
    """Run ``trials`` trials of ``episodes`` inner episodes on every task with the recurrent
    ``policy`` (one hidden state per trial, carried across its episodes, fresh at its start) and
    return each episode's return averaged over the trials: [n_tasks, episodes].

    All trials step together in one batch; a trial that has ended only waits. Sampling uses its
    own torch generator state (seeded by ``seed``), so evaluating does not move training's.
    With a dict ``successes``, an env reporting ``info["success"]`` also fills
    ``successes["success"]``: the fraction of trials whose episode k had the flag at any step
    (Meta-World's count), [n_tasks, episodes]."""
    envs = []
    for _ in range(len(tasks) * trials):
        env = make_trial_env()
        env.episodes_per_trial = episodes
        envs.append(env)
    obs = np.stack([env.reset(seed=seed * 7919 + j, options={"task": tasks[j // trials]})[0] for j, env in enumerate(envs)])
    returns = np.zeros((len(envs), episodes))
    hit, reported = np.zeros((len(envs), episodes), dtype=bool), False
    active = np.ones(len(envs), dtype=bool)
    state, start = None, np.ones(len(envs), dtype=bool)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while active.any():
            actions, state = policy.predict(obs, state=state, episode_start=start, deterministic=deterministic)
            start = np.zeros(len(envs), dtype=bool)  # the state carries on until the trial ends
            for j in np.flatnonzero(active):
                o, r, trial_over, _, info = envs[j].step(actions[j])
                returns[j, info["episode_index"]] += r
                if "success" in info:
                    reported = True
                    hit[j, info["episode_index"]] |= bool(info["success"])
                obs[j] = o
                active[j] = not trial_over
    for env in envs:
        env.close()
    if successes is not None and reported:
        successes["success"] = hit.reshape(len(tasks), trials, episodes).mean(1)
    return returns.reshape(len(tasks), trials, episodes).mean(1)
