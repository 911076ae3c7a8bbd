"""What a ``mujoco.rollout`` fast path could gain on MuJoCo 3.x (no ``mujoco.batch``), HalfCheetahVel.

On MuJoCo 3.x (e.g. the 3.3.0 the ``metaworld`` extra pins) the collector steps the built-in
MuJoCo envs on the generic path. ``mujoco.rollout`` exists there and steps many states in C on
a thread pool, but a closed-loop policy needs one call per env step and a call cannot return the
solver's warm-start, so such a path would not be bit-identical to ``env.step``
(metarl/rollouts/mujoco_batch.py); this measures whether it would be worth an inexact mode.

Side by side in one run, on the same model, B episodes of ``--horizon`` steps:
- raw:      ``benchmarks/sampler_speed.py``'s single-core ``mj_step`` loop (the reference);
- rollout:  one ``rollout.rollout(..., nstep=frame_skip)`` call per env step over the B states
            (random controls, no policy), on ``--threads`` threads, observations and rewards
            recomputed with the env's ``batch_observation``/``batch_reward``;
- generic:  ``Collector(fast_path=False)`` in ``--workers`` worker processes with a policy;
- fast:     on MuJoCo >= 4 only, the exact ``mujoco.batch`` collector, for comparison.
Prints env steps / second and the ratios to raw.

Run: python benchmarks/mujoco_rollout_speed.py [--episodes 200 --horizon 200 --threads 2 --workers 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import mujoco
import numpy as np
import torch
from mujoco import rollout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampler_speed import ENV_ID, collector_rate, raw_mj_step_rate  # noqa: E402

from metarl.envs.half_cheetah import HalfCheetahVelEnv  # noqa: E402
from metarl.policies.gaussian import GaussianMLPPolicy  # noqa: E402
from metarl.rollouts import Collector  # noqa: E402


def rollout_rate(env, n_states: int, n_steps: int, threads: int, seed: int = 0) -> float:
    """Env steps per second of one ``rollout`` call per env step over ``n_states`` states (the
    states of the env's own resets), with the env's vectorised observation and reward."""
    base = env.unwrapped
    model, fs, nq, nv = base.model, base.frame_skip, base.model.nq, base.model.nv
    spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
    states = np.empty((n_states, mujoco.mj_stateSize(model, spec)))
    for i in range(n_states):
        env.reset(seed=seed + i)
        mujoco.mj_getState(model, base.data, states[i], spec)
    task = np.tile(base.task_vector(base.get_task()), (n_states, 1))
    controls = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(n_steps, n_states, model.nu))
    datas = [mujoco.MjData(model) for _ in range(max(1, threads))]
    runner = rollout.Rollout(nthread=threads) if threads > 1 else None
    start = time.perf_counter()
    for t in range(n_steps):
        ctrl = np.repeat(controls[t][:, None, :], fs, axis=1)  # [B, frame_skip, nu]
        if runner is None:
            out, _ = rollout.rollout(model, datas[0], states, ctrl)
        else:
            out, _ = runner.rollout([model] * n_states, datas, states, ctrl)
        new = out[:, -1]
        qpos_before = states[:, 1:1 + nq]
        qpos, qvel = new[:, 1:1 + nq], new[:, 1 + nq:1 + nq + nv]
        base.batch_observation(qpos, qvel)
        base.batch_reward(qpos_before, qpos, controls[t], task, base.dt)
        states = new
    seconds = time.perf_counter() - start
    if runner is not None:
        runner.close()
    return n_states * n_steps / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=200, help="B: episodes stepped together (MAML: 40 tasks x 20 = 800)")
    ap.add_argument("--horizon", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tasks_n = max(1, args.episodes // 10)
    tasks = HalfCheetahVelEnv.sample_tasks(tasks_n, np.random.default_rng(0))
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(17, 6)
    with Collector(ENV_ID, {"horizon": args.horizon}, n_workers=args.workers, fast_path=False) as slow:
        probe = slow._probe
        probe.unwrapped.set_task(tasks[0])
        raw = raw_mj_step_rate(probe, args.episodes, args.horizon)
        roll = rollout_rate(probe, args.episodes, args.horizon, args.threads)
        generic, _ = collector_rate(slow, policy, tasks, args.episodes // tasks_n)
    rows = [("raw mj_step loop (1 core)", raw), (f"rollout per env step ({args.threads} threads)", roll),
            (f"generic collector ({args.workers} workers)", generic)]
    with Collector(ENV_ID, {"horizon": args.horizon}, n_workers=args.threads) as fast:
        if fast.fast_path:  # MuJoCo >= 4: the exact mujoco.batch path, for comparison
            rows.append((f"fast collector, mujoco.batch ({args.threads} threads)",
                         collector_rate(fast, policy, tasks, args.episodes // tasks_n)[0]))
    print(f"MuJoCo {mujoco.__version__}, HalfCheetahVel, {args.episodes} episodes x {args.horizon} steps")
    for name, rate in rows:
        print(f"  {name:40s} {rate:10.0f} steps/s   {rate / raw:5.2f}x raw")


if __name__ == "__main__":
    main()
