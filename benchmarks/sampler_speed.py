"""Sampler throughput on HalfCheetahVel: the collector vs a single-core raw ``mujoco.mj_step`` loop.

Measures, in one run and on the same MuJoCo model:
- raw:     a single-process Python loop of ``mj_step(model, data, nstep=5)`` over T×B MjData
           (frame skip 5, the env step), with precomputed random controls and no policy at all;
- fast:    ``Collector`` on the MuJoCo fast path (mujoco.batch threads + one batched policy call
           per step), the default for HalfCheetahVel;
- generic: ``Collector(fast_path=False)``: one Gymnasium env per episode in worker processes.
and prints env steps / second and the ratios to the raw loop (target: fast >= 1.2x raw).
Default meta-batch 40 tasks × 20 episodes × 200 steps (MAML's HalfCheetah setting).

Run: .venv/bin/python benchmarks/sampler_speed.py [--tasks 40 --episodes 20 --workers 2]

Then it times one full HalfCheetahVel MAML-TRPO meta-iteration (same meta-batch, sampling before
and after adaptation, inner step, TRPO step with CG on Fisher-vector products through the inner
step and the line search) by phase, and prints each as a ratio to the raw-loop time of the same
number of env steps (target: total <= 1.5x). ``--no-breakdown`` skips it.
"""
from __future__ import annotations

import argparse
import time

import mujoco
import numpy as np
import torch

from metarl.envs.half_cheetah import HalfCheetahVelEnv
from metarl.policies.gaussian import GaussianMLPPolicy
from metarl.rollouts import Collector

ENV_ID = "metarl/HalfCheetahVel-v0"


def raw_mj_step_rate(env, n_states: int, n_steps: int, frame_skip: int = 5, seed: int = 0) -> float:
    """Env steps per second of a plain single-core loop: for each step, for each state,
    ``data.ctrl[:] = u; mj_step(model, data, nstep=frame_skip)``. No policy, no observations.
    The states start where the env's resets put them (``env`` is a HalfCheetahVel env), so the
    contacts, hence the cost per step, are those of real episodes."""
    rng = np.random.default_rng(seed)
    model, spec = env.unwrapped.model, mujoco.mjtState.mjSTATE_INTEGRATION
    row = np.empty(mujoco.mj_stateSize(model, spec))
    datas = []
    for i in range(n_states):
        env.reset(seed=seed + i)
        mujoco.mj_getState(model, env.unwrapped.data, row, spec)
        datas.append(mujoco.MjData(model))
        mujoco.mj_setState(model, datas[-1], row, spec)
    controls = rng.uniform(-1.0, 1.0, size=(n_steps, n_states, model.nu))
    start = time.perf_counter()
    for t in range(n_steps):
        u = controls[t]
        for i, d in enumerate(datas):
            d.ctrl[:] = u[i]
            mujoco.mj_step(model, d, nstep=frame_skip)
    return n_states * n_steps / (time.perf_counter() - start)


def collector_rate(collector: Collector, policy, tasks, episodes: int, seed: int = 0) -> tuple[float, float]:
    """(env steps per second, seconds) of one ``collect`` call, after a small warm-up call that
    builds the envs / batch so that start-up costs are not counted."""
    collector.collect(policy, None, tasks, episodes, seed=seed + 1)
    start = time.perf_counter()
    ep = collector.collect(policy, None, tasks, episodes, seed=seed)
    seconds = time.perf_counter() - start
    return ep.n_steps / seconds, seconds


def sampling_speed(n_tasks: int = 40, episodes: int = 20, horizon: int = 200, n_workers: int = 2,
                   generic: bool = True, seed: int = 0) -> dict:
    """Steps/second of the raw loop, the fast-path collector and (optionally) the generic one."""
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(17, 6)
    tasks = HalfCheetahVelEnv.sample_tasks(n_tasks, np.random.default_rng(seed))
    results: dict = {"tasks": n_tasks, "episodes": episodes, "horizon": horizon, "workers": n_workers}
    with Collector(ENV_ID, {"horizon": horizon}, n_workers=n_workers) as fast:
        if not fast.fast_path:
            raise RuntimeError(f"{ENV_ID} did not take the fast path: check that mujoco.batch is available (MuJoCo >= 4.0)")
        results["raw"] = raw_mj_step_rate(fast._probe, n_tasks * episodes, horizon)
        results["fast"], results["fast_seconds"] = collector_rate(fast, policy, tasks, episodes, seed)
    if generic:
        with Collector(ENV_ID, {"horizon": horizon}, n_workers=n_workers, fast_path=False) as slow:
            results["generic"], results["generic_seconds"] = collector_rate(slow, policy, tasks, episodes, seed)
    return results


def meta_iteration_breakdown(args: argparse.Namespace, seed: int = 0) -> dict:
    """Seconds of one MAML-TRPO meta-iteration by phase, via the metrics ``meta_update`` reports
    (time/sample, time/adapt, time/outer), after one warm-up iteration, with the closed-form
    TRPO gradient and Fisher-vector products (``RLOuterConfig(fisher="closed_form")``) and the
    process's torch threads (``--torch-threads``) for sampling and ``--trpo-threads`` for the TRPO
    step (``outer.threads``; the simulators are idle then), and ``--fvp-subsample``. Then one more iteration with
    ``fisher="autograd"`` (double backpropagation through the KL closure, the default and
    generic path) gives the outer step's reference time on a batch of the same size."""
    from metarl.algorithms.maml_trpo import meta_update
    from metarl.algorithms.meta_rl import AdvantageConfig, RLInnerConfig
    from metarl.algorithms.trpo import RLOuterConfig

    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(17, 6)
    tasks = HalfCheetahVelEnv.sample_tasks(args.tasks, np.random.default_rng(seed))
    inner = RLInnerConfig(lr=0.1, steps=1, episodes=args.episodes)
    fast = RLOuterConfig(fisher="closed_form", threads=args.trpo_threads, fvp_subsample=args.fvp_subsample)
    with Collector(ENV_ID, {"horizon": args.horizon}, n_workers=args.workers) as col:
        meta_update(policy, col, tasks, inner, AdvantageConfig(), fast, seed)
        start = time.perf_counter()
        m = meta_update(policy, col, tasks, inner, AdvantageConfig(), fast, seed + 1)
        total = time.perf_counter() - start
        ref = meta_update(policy, col, tasks, inner, AdvantageConfig(),
                          RLOuterConfig(fisher="autograd", threads=args.trpo_threads), seed + 2)
    return {"sampling": m["time/sample"], "adaptation (+advantages)": m["time/adapt"], "TRPO outer step": m["time/outer"],
            "total": total, "(TRPO step, autograd FVPs)": ref["time/outer"],
            "env steps": 2 * args.tasks * args.episodes * args.horizon}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--horizon", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2, help="collector workers (threads on the fast path)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads for the policy call (the simulators already use the cores)")
    ap.add_argument("--trpo-threads", type=int, default=0,
                    help="torch threads for the TRPO step only (outer.threads; 0 = same as --torch-threads)")
    ap.add_argument("--fvp-subsample", type=float, default=1.0, help="outer.fvp_subsample (1.0 = exact TRPO)")
    ap.add_argument("--no-generic", action="store_true", help="skip the generic-path measurement")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the meta-iteration breakdown")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)

    r = sampling_speed(args.tasks, args.episodes, args.horizon, args.workers, generic=not args.no_generic)
    n_steps = r["tasks"] * r["episodes"] * r["horizon"]
    print(f"HalfCheetahVel, {r['tasks']} tasks x {r['episodes']} episodes x {r['horizon']} steps = {n_steps} env steps, "
          f"{r['workers']} workers, torch threads {args.torch_threads}")
    print(f"  raw mj_step loop (1 core, frame skip 5): {r['raw']:10.0f} steps/s")
    print(f"  collector, fast path                   : {r['fast']:10.0f} steps/s  ({r['fast_seconds']:.2f} s)  "
          f"ratio to raw {r['fast'] / r['raw']:.2f}x (target >= 1.2x)")
    if "generic" in r:
        print(f"  collector, generic path                : {r['generic']:10.0f} steps/s  ({r['generic_seconds']:.2f} s)  "
              f"ratio to raw {r['generic'] / r['raw']:.2f}x")
    if not args.no_breakdown:
        b = meta_iteration_breakdown(args)
        raw_seconds = b.pop("env steps") / r["raw"]
        print(f"one MAML-TRPO meta-iteration ({args.tasks} tasks x {args.episodes} episodes, before and after adaptation; "
              f"TRPO threads {args.trpo_threads or args.torch_threads}, fvp_subsample {args.fvp_subsample}); "
              f"raw simulation of the same steps: {raw_seconds:.2f} s")
        for phase, seconds in b.items():
            print(f"  {phase:<26s} {seconds:7.2f} s  = {seconds / raw_seconds:5.2f}x raw simulation time")
        print(f"  target: total <= 1.5x raw simulation time")


if __name__ == "__main__":
    main()
