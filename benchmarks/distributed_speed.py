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

Run: .venv/bin/python benchmarks/distributed_speed.py [--iterations 3] [--ranks 1,2] [--only omniglot,cheetah]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--only", default="omniglot,cheetah")
    p.add_argument("--omniglot-tasks", type=int, default=32)
    p.add_argument("--cheetah-tasks", type=int, default=8)
    p.add_argument("--cheetah-episodes", type=int, default=4)
    p.add_argument("--port", type=int, default=29611)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args)
    ranks = [int(r) for r in args.ranks.split(",")]
    results = {name: {r: run(name, r, args) for r in ranks} for name in args.only.split(",")}
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
    print(json.dumps(results))


if __name__ == "__main__":
    main()
