"""Seconds per meta-iteration on 1 and 2 torchrun ranks, with the communication time measured.

Two benchmarks, each run as ``torchrun --nproc-per-node R`` of this file's worker (the same
sharded code path as ``torchrun -m metarl train``, :mod:`metarl.distributed`), side by side:
- **omniglot**: Omniglot 5-way 1-shot MAML (experiments/omniglot_5w1s.yaml; meta-batch 32,
  Conv4 64 filters, one second-order inner step), in-loop baselines off;
- **cheetah**: HalfCheetahVel MAML-TRPO (experiments/halfcheetah_vel.yaml), with a smaller
  meta-batch and fewer episodes by default so that one run stays short (the config's 40 x 20
  episodes take minutes per iteration here): ``--cheetah-tasks`` / ``--cheetah-episodes``.
Every rank runs one torch thread and steps its envs in-process (``sampler.workers=0``), so R
ranks use R cores: 1 rank vs 2 ranks is one core vs two.

Per benchmark and rank count it reports the median seconds per iteration (after one warm-up
iteration), the seconds per iteration spent inside all_reduce (``World.comm_seconds``, rank 0),
the collectives and bytes reduced per iteration, and the speed-up. From those, the scaling model
of the README: with compute C per iteration (sharded), a fixed part F (not sharded: sampling the
meta-batch, baselines, the optimizer step, Python) and all-reduce time A(R),
    T(R) = C/R + F + A(R),   A(R) ≈ 2(R−1)·k·α + 2(R−1)/R · bytes/β   (ring all-reduce: k collectives,
                                                                  latency α, bandwidth β)
C and F are read off T(1) and T(2) − A(2) here (two equations), α from A(2) (β assumed); the
script prints the model's T(8), T(64) and speed-ups (for R ≤ meta-batch: a rank needs a task). On a shared 2-core machine the 2-rank numbers
include whatever else runs: read them as an upper bound on T(2).

A third, **ray** (``sampler.backend: ray``, metarl/rollouts/ray_collector.py): the collector's
steps per second on HalfCheetahVel with the config's sampler settings (meta-batch 40 × 20
episodes of 200 steps, ``sampler.workers: 2``), the in-process collector (the MuJoCo fast path
on 2 threads) against a RayCollector with 2 actors (each the fast path on 1 thread) on a local
Ray instance, the two collections alternating in one process (``--ray-repeats`` of each, after one
warm-up of each), with the same policy, tasks and seeds (their episodes are checked equal). The
Ray side also reports its communication time per collection: the wall time not spent inside the
slowest actor's collection (sending the policy and parameters, scheduling, returning and joining
the episodes), and per MAML-TRPO iteration (``inner.steps`` + 1 collections). And what exact
shares cost: half of the tasks collected in-process on one thread as a share (its policy call at
the whole batch's shape, what an actor does) vs the same tasks on their own.

Run: .venv/bin/python benchmarks/distributed_speed.py [--iterations 3] [--ranks 1,2] [--only omniglot,cheetah,ray]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "DISTRIBUTED_SPEED "


def overrides(name: str, args) -> tuple[str, list[str]]:
    common = ["torch_threads=1", "checkpoint_every=1000000", "log_every=1000000"]
    if name == "omniglot":
        return "experiments/omniglot_5w1s.yaml", common + ["baselines=[]", "inner.task_workers=1",
                                                           f"meta_batch={args.omniglot_tasks}"]
    return "experiments/halfcheetah_vel.yaml", common + ["sampler.workers=0", "outer.threads=1", "baselines=[]",
                                                         f"meta_batch={args.cheetah_tasks}",
                                                         f"inner.episodes={args.cheetah_episodes}"]


def worker(name: str, args) -> None:
    """One rank: build the track, one warm-up iteration, then ``args.iterations`` timed ones."""
    import numpy as np
    import torch

    from metarl import config, distributed
    from metarl.training import make_track, seed_everything

    torch.set_num_threads(1)
    world = distributed.init_from_env()
    path, sets = overrides(name, args)
    cfg = config.load(str(ROOT / path), sets)
    rng = seed_everything(cfg.seed)
    track = make_track(cfg)
    distributed.check_supported(cfg, track.method)
    seconds, comm, calls, nbytes = [], [], [], []
    try:
        for it in range(args.iterations + 1):
            c0, n0, b0 = world.comm_seconds, world.comm_calls, world.comm_bytes
            t0 = time.perf_counter()
            track.train_step(it, rng)
            world.any(False)  # the training loop's per-iteration stop check
            if it:
                seconds.append(time.perf_counter() - t0)
                comm.append(world.comm_seconds - c0)
                calls.append(world.comm_calls - n0)
                nbytes.append(world.comm_bytes - b0)
    finally:
        track.close()
    distributed.shutdown(wait=True)
    if world.is_main:
        print(MARK + json.dumps({"benchmark": name, "ranks": world.size, "meta_batch": cfg.meta_batch,
                                 "sec_per_iter": float(np.median(seconds)), "all_reduce_sec": float(np.median(comm)),
                                 "collectives": int(np.median(calls)), "bytes": int(np.median(nbytes)),
                                 "samples": seconds}), flush=True)


def run(name: str, ranks: int, args) -> dict:
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(ranks), "--master-port",
           str(args.port + ranks), str(Path(__file__).resolve()), "--worker", name, "--iterations", str(args.iterations),
           "--cheetah-tasks", str(args.cheetah_tasks), "--cheetah-episodes", str(args.cheetah_episodes),
           "--omniglot-tasks", str(args.omniglot_tasks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line[len(MARK):] for line in p.stdout.splitlines() if line.startswith(MARK)]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{name} on {ranks} rank(s) failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def model(one: dict, two: dict, beta: float = 1e9) -> dict:
    """C, F, α of T(R) = C/R + F + A(R) from the 1- and 2-rank measurements (see the docstring),
    with a ring all-reduce A(R) = k·2(R−1)·α + 2(R−1)/R · bytes/β; β (bytes/s) is assumed (gloo
    over TCP: ~1 GB/s), α is what remains of the measured A(2) = 2kα + bytes/β."""
    a2 = two["all_reduce_sec"]
    c = max(0.0, 2.0 * (one["sec_per_iter"] - (two["sec_per_iter"] - a2)))
    f = max(0.0, one["sec_per_iter"] - c)
    k, nbytes = max(1, two["collectives"]), two["bytes"]
    alpha = max(0.0, (a2 - nbytes / beta) / (2 * k))

    def t(r):
        return c / r + f + (0.0 if r == 1 else k * 2 * (r - 1) * alpha + 2 * (r - 1) / r * nbytes / beta)
    ranks = [r for r in (2, 8, 64) if r <= one["meta_batch"]]  # a rank needs at least one task
    return {"C": c, "F": f, "alpha": alpha, "k": k, "bytes": nbytes, "T": {r: t(r) for r in [1] + ranks},
            "speedup": {r: t(1) / t(r) for r in ranks}}


def ray_vs_local(args) -> dict:
    """Steps/s of the in-process collector and of a RayCollector, alternating (see the docstring)."""
    import numpy as np
    import torch

    from metarl import config
    from metarl.rollouts import Collector
    from metarl.rollouts.ray_collector import RayCollector
    from metarl.training import make_track, seed_everything

    torch.set_num_threads(1)
    sets = ["baselines=[]"] + ([f"meta_batch={args.ray_tasks}"] if args.ray_tasks else []) + \
        ([f"inner.episodes={args.ray_episodes}"] if args.ray_episodes else [])
    cfg = config.load(str(ROOT / "experiments/halfcheetah_vel.yaml"), sets)
    rng = seed_everything(cfg.seed)
    track = make_track(cfg)  # its collector: the in-process one with the config's sampler.workers
    tasks = track.task_env.sample_tasks(cfg.meta_batch, rng)
    start = time.perf_counter()
    ray_col = RayCollector(cfg.env.id, cfg.env.kwargs, n_actors=cfg.sampler.workers)
    startup = time.perf_counter() - start
    # What one actor does for its half of the tasks, in this process on one thread: a share run at
    # the whole batch's shape (bitwise, what the actors do) vs the same tasks collected on their own
    half = Collector(cfg.env.id, cfg.env.kwargs, n_workers=0)
    n_half = max(1, cfg.meta_batch // 2)
    cols = {"local": track.collector, "ray": ray_col}
    calls = {name: (lambda c: lambda seed: c.collect(track.policy, None, tasks, cfg.inner.episodes, seed=seed))(col)
             for name, col in cols.items()}
    calls["share"] = lambda seed: half.collect(track.policy, None, tasks[:n_half], cfg.inner.episodes, seed=seed,
                                               shard=(0, cfg.meta_batch))
    calls["alone"] = lambda seed: half.collect(track.policy, None, tasks[:n_half], cfg.inner.episodes, seed=seed)
    rates: dict[str, list[float]] = {name: [] for name in calls}
    comm, compute = [], []
    try:
        for rep in range(args.ray_repeats + 1):
            batches = {}
            for name in (list(calls) if rep % 2 == 0 else list(calls)[::-1]):
                c0, k0 = ray_col.comm_seconds, ray_col.compute_seconds
                t0 = time.perf_counter()
                batches[name] = calls[name](rep)
                dt = time.perf_counter() - t0
                if rep:  # the first round warms every variant up
                    rates[name].append(batches[name].n_steps / dt)
                    if name == "ray":
                        comm.append(ray_col.comm_seconds - c0)
                        compute.append(ray_col.compute_seconds - k0)
            if not all(torch.equal(getattr(batches["local"], f), getattr(batches["ray"], f)) for f in ("obs", "actions", "rewards")):
                raise SystemExit("ray: the Ray episodes differ from the in-process ones")
    finally:
        ray_col.close()
        half.close()
        track.close()
    return {"tasks": cfg.meta_batch, "episodes": cfg.inner.episodes, "steps": int(batches["local"].n_steps),
            "workers": cfg.sampler.workers, "collections_per_iter": cfg.inner.steps + 1,
            "local_steps_per_s": float(np.median(rates["local"])), "ray_steps_per_s": float(np.median(rates["ray"])),
            "share_steps_per_s": float(np.median(rates["share"])), "alone_steps_per_s": float(np.median(rates["alone"])),
            "ray_comm_s": float(np.median(comm)), "ray_compute_s": float(np.median(compute)), "ray_startup_s": startup,
            "samples": rates}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--only", default="omniglot,cheetah,ray")
    p.add_argument("--ray-repeats", type=int, default=3)
    p.add_argument("--ray-tasks", type=int, default=None, help="meta-batch of the ray benchmark (default: the config's 40)")
    p.add_argument("--ray-episodes", type=int, default=None, help="episodes per task (default: the config's 20)")
    p.add_argument("--omniglot-tasks", type=int, default=32)
    p.add_argument("--cheetah-tasks", type=int, default=8)
    p.add_argument("--cheetah-episodes", type=int, default=4)
    p.add_argument("--port", type=int, default=29611)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args)
    ranks = [int(r) for r in args.ranks.split(",")]
    only = args.only.split(",")
    results = {name: {r: run(name, r, args) for r in ranks} for name in only if name != "ray"}
    ray = ray_vs_local(args) if "ray" in only else None
    if results:
        print(f"{'benchmark':>10} {'ranks':>5} {'tasks':>5} {'s/iter':>8} {'all_reduce s':>12} {'collectives':>11} "
              f"{'MB reduced':>10} {'speed-up':>8}")
    for name, by_rank in results.items():
        base = by_rank[ranks[0]]["sec_per_iter"]
        for r, d in by_rank.items():
            print(f"{name:>10} {r:>5} {d['meta_batch']:>5} {d['sec_per_iter']:>8.3f} {d['all_reduce_sec']:>12.4f} "
                  f"{d['collectives']:>11} {d['bytes'] / 1e6:>10.3f} {base / d['sec_per_iter']:>8.2f}")
    for name, by_rank in results.items():
        if 1 in by_rank and 2 in by_rank:
            m = model(by_rank[1], by_rank[2])
            pred = ", ".join(f"T({r})={m['T'][r]:.3f} s (x{m['speedup'][r]:.2f})" for r in m["speedup"])
            print(f"{name}: model C={m['C']:.3f} s (sharded), F={m['F']:.3f} s (fixed), {m['k']} collectives, "
                  f"{m['bytes'] / 1e6:.2f} MB, α={m['alpha'] * 1e3:.2f} ms; predicted {pred}")
    if ray is not None:
        ratio = ray["ray_steps_per_s"] / ray["local_steps_per_s"]
        per_iter = ray["ray_comm_s"] * ray["collections_per_iter"]
        print(f"ray: HalfCheetahVel, {ray['tasks']} tasks x {ray['episodes']} episodes ({ray['steps']} steps per "
              f"collection), {ray['workers']} workers/actors: in-process {ray['local_steps_per_s']:.0f} steps/s, "
              f"Ray {ray['ray_steps_per_s']:.0f} steps/s, ratio Ray/in-process {ratio:.2f}; Ray communication "
              f"{ray['ray_comm_s']:.3f} s per collection ({ray['ray_comm_s'] / (ray['ray_comm_s'] + ray['ray_compute_s']):.1%} "
              f"of it), {per_iter:.3f} s per MAML-TRPO iteration ({ray['collections_per_iter']} collections); "
              f"Ray start-up {ray['ray_startup_s']:.1f} s (once per run)")
        print(f"ray: one actor's half of the tasks on one thread: as a share (the policy at the whole batch's shape, "
              f"bitwise) {ray['share_steps_per_s']:.0f} steps/s, collected alone {ray['alone_steps_per_s']:.0f} steps/s, "
              f"ratio share/alone {ray['share_steps_per_s'] / ray['alone_steps_per_s']:.2f}")
    print(json.dumps({**results, **({"ray": ray} if ray is not None else {})}))


if __name__ == "__main__":
    main()
