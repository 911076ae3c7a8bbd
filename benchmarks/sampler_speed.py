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

``--pool cheetah reach`` adds the env-pool comparison of issue #15 on the generic path, for
HalfCheetahVel and Meta-World ML1 reach-v3 (``metarl/MetaWorldML1-v0``: the metaworld extra, e.g. run
with .venv-mw/bin/python): a plain
single-process Gymnasium loop over one env (random actions, a seeded reset per episode), the
collector with one env per episode slot, and the collector with ``max_envs`` envs per worker,
side by side in one run; steps/s, the ratio to the plain loop, and the peak memory of the
driver + workers (the sum of their proportional set sizes, polled every 0.1 s; each collector
runs in a fresh process so that one's memory does not count in the other's). ``--pool-only``
skips the other sections:

    python benchmarks/sampler_speed.py --pool cheetah reach --pool-only --max-envs 10
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import mujoco
import numpy as np
import torch

from metarl.envs.half_cheetah import HalfCheetahVelEnv
from metarl.policies.gaussian import GaussianMLPPolicy
from metarl.rollouts import Collector
from metarl.rollouts.collector import _find_task_env, _make_env

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


# ============================================================================ env pool (issue #15)

POOL_ENVS = {  # name -> (collector env spec, env kwargs, label)
    "cheetah": (ENV_ID, {}, "HalfCheetahVel"),
    "reach": ("metarl/MetaWorldML1-v0", {"env_name": "reach-v3"}, "Meta-World ML1 reach-v3"),  # the metaworld extra
}


def _pss_kb(pid: int) -> int:
    """Proportional set size of ``pid`` in kB (shared pages split between their users, so the
    sum over the driver and its forked workers is their real footprint); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """Polls the summed PSS of this process and its live children every ``interval`` seconds
    (Linux /proc) and keeps the peak, in a daemon thread."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak_kb, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _children(self) -> list[int]:
        try:
            with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        total = _pss_kb(os.getpid()) + sum(_pss_kb(p) for p in self._children())
        self.peak_kb = max(self.peak_kb, total)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def plain_loop_rate(name: str, horizon: int, n_steps: int, seed: int = 0) -> float:
    """Env steps per second of a plain single-process Gymnasium loop over one env: precomputed
    uniform random actions, ``reset(seed=...)`` at the start of every episode (every ``horizon``
    steps or at termination), as the collector resets every episode."""
    spec, kw, _ = POOL_ENVS[name]
    env = _make_env(spec, {**kw, "horizon": horizon})
    task_env = _find_task_env(env)
    task_env.set_task(task_env.sample_tasks(1, np.random.default_rng(seed))[0])
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    actions = rng.uniform(low, high, size=(n_steps, *env.action_space.shape)).astype(env.action_space.dtype)
    start = time.perf_counter()
    env.reset(seed=seed)
    t = 0
    for k in range(n_steps):
        _, _, terminated, truncated, _ = env.step(actions[k])
        t += 1
        if terminated or truncated or t >= horizon:
            env.reset(seed=seed + k)
            t = 0
    rate = n_steps / (time.perf_counter() - start)
    env.close()
    return rate


def measure_pool(spec: dict) -> dict:
    """One collector configuration, in this (fresh) process: two ``collect`` calls (the first
    builds the envs), steps/s of the second, peak memory over both, envs per worker."""
    name = spec["env"]
    env, kw, _ = POOL_ENVS[name]
    kw = {**kw, "horizon": spec["horizon"]}
    torch.set_num_threads(1)
    out = {}
    with PeakMemory() as mem:
        col = Collector(env, kw, n_workers=spec["workers"], max_envs=spec["max_envs"], fast_path=False,
                        max_episode_steps=spec["horizon"])
        try:
            torch.manual_seed(0)
            policy = GaussianMLPPolicy(col.obs_dim, col.act_dim)
            tasks = _find_task_env(col._probe).sample_tasks(spec["tasks"], np.random.default_rng(0))
            start = time.perf_counter()
            col.collect(policy, None, tasks, spec["episodes"], seed=1)
            out["first_seconds"] = time.perf_counter() - start
            start = time.perf_counter()
            ep = col.collect(policy, None, tasks, spec["episodes"], seed=0)
            out["seconds"] = time.perf_counter() - start
            out["rate"] = ep.n_steps / out["seconds"]
            mem.sample()
        finally:
            col.close()
    out["peak_mb"] = mem.peak_kb / 1024
    return out


def pool_comparison(name: str, args: argparse.Namespace) -> None:
    """Plain loop, one env per slot and ``max_envs`` per worker, printed side by side."""
    env = POOL_ENVS[name][0]
    horizon = args.pool_horizon or (args.horizon if env == ENV_ID else 500)
    n_slots = args.pool_tasks * args.pool_episodes
    base = {"env": name, "tasks": args.pool_tasks, "episodes": args.pool_episodes, "horizon": horizon}

    def in_fresh_process(workers, max_envs):
        spec = json.dumps({**base, "workers": workers, "max_envs": max_envs})
        p = subprocess.run([sys.executable, __file__, "--measure-pool", spec], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"measuring {spec} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    per_worker = -(-n_slots // max(1, args.workers))
    configs = {  # label -> (workers, max_envs, envs per worker)
        "collector, in-process, one env per slot": (0, None, n_slots),
        f"collector, {args.workers} workers, one env per slot": (args.workers, None, per_worker),
        f"collector, {args.workers} workers, max_envs={args.max_envs}": (args.workers, args.max_envs,
                                                                         min(per_worker, args.max_envs)),
    }
    if not args.pool_inprocess:
        configs.pop("collector, in-process, one env per slot")
    load = os.getloadavg()[0]
    plain_steps = min(n_slots * horizon, args.plain_steps)
    plain, runs = [plain_loop_rate(name, horizon, plain_steps)], {label: [] for label in configs}
    for _ in range(args.pool_repeats):  # interleaved, so that a change of machine load hits them all
        for label, (workers, max_envs, _) in configs.items():
            runs[label].append(in_fresh_process(workers, max_envs))
            plain.append(plain_loop_rate(name, horizon, plain_steps))
    median = lambda rs: {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
    ref = float(np.median(plain))
    print(f"{label_of(name)}, generic path: {args.pool_tasks} tasks x {args.pool_episodes} episodes x {horizon} steps = "
          f"{n_slots * horizon} env steps per collect, torch threads 1; "
          f"load average at start {load:.1f} on {os.cpu_count()} cores")
    print(f"  {'':44s} {'envs/worker':>11s} {'peak memory':>12s} {'1st collect':>12s} {'steps/s':>9s} {'vs plain':>9s}")
    print(f"  {'plain loop (1 process, 1 env)':44s} {1:11d} {'':>12s} {'':>12s} {ref:9.0f} {1.0:8.2f}x   "
          f"(median of {len(plain)} runs, interleaved: {', '.join(f'{r:.0f}' for r in plain)})")
    for label, (_, _, n_envs) in configs.items():
        r, rates = median(runs[label]), [f"{x['rate']:.0f}" for x in runs[label]]
        each = f"   (steps/s of {len(rates)} runs: {', '.join(rates)})" if len(rates) > 1 else ""
        print(f"  {label:44s} {n_envs:11d} {r['peak_mb']:9.0f} MB {r['first_seconds']:10.1f} s {r['rate']:9.0f} "
              f"{r['rate'] / ref:8.2f}x{each}")
    full, bounded = (median(runs[k]) for k in list(configs)[-2:])
    print(f"  bounded / one env per slot ({args.workers} workers): peak memory {bounded['peak_mb'] / full['peak_mb']:.2f}x, "
          f"steps/s {bounded['rate'] / full['rate']:.2f}x, first collect {bounded['first_seconds'] / full['first_seconds']:.2f}x")


def label_of(name: str) -> str:
    return POOL_ENVS[name][2]


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
    ap.add_argument("--pool", nargs="+", choices=sorted(POOL_ENVS), default=[],
                    help="env-pool comparison (plain loop, one env per slot, max_envs) on these envs")
    ap.add_argument("--pool-only", action="store_true", help="run only the --pool comparison")
    ap.add_argument("--pool-tasks", type=int, default=10)
    ap.add_argument("--pool-episodes", type=int, default=10)
    ap.add_argument("--pool-horizon", type=int, default=None,
                    help="episode length (default: --horizon for HalfCheetahVel, 500 for Meta-World)")
    ap.add_argument("--max-envs", type=int, default=10, help="the bounded collector's envs per worker")
    ap.add_argument("--plain-steps", type=int, default=20_000, help="steps of each plain-loop measurement")
    ap.add_argument("--pool-inprocess", action="store_true",
                    help="also measure the collector in-process (0 workers): its overhead without processes")
    ap.add_argument("--pool-repeats", type=int, default=1, help="measurements of each collector (medians printed)")
    ap.add_argument("--measure-pool", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_pool:
        print(json.dumps(measure_pool(json.loads(args.measure_pool))))
        return
    torch.set_num_threads(args.torch_threads)
    for name in args.pool:
        pool_comparison(name, args)
    if args.pool_only:
        return

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
