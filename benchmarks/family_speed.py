"""Every method on one problem, side by side: seconds per meta-iteration and peak memory.

Omniglot 5-way 1-shot, meta-batch 32, each method at its own defaults (the paper's inner steps:
``--set algorithm=NAME`` on experiments/omniglot_5w1s.yaml, no baseline trained in the loop).
Each measurement is a fresh process (so peak memory is that method's own: the growth of the
process's peak resident set over one warm-up and ``--iterations`` timed ``train_step`` calls,
above what the built track already held), and the rounds interleave the methods
(A B C ... A B C ...) so the machine's drift hits all of them alike; the ratio to MAML is taken
within each round, then the median over rounds.

``--memory-steps 1 5 20 50`` adds peak memory of MAML vs iMAML (and any method given with
``--memory-methods``) against the number of inner steps: MAML keeps every inner step's graph for
the second-order meta-gradient, so it grows; iMAML's implicit gradient needs only the final φ.

Run: .venv/bin/python benchmarks/family_speed.py [--methods maml fomaml ...] [--rounds 3]
     [--iterations 3] [--memory-steps 1 5 20 50] [--meta-batch 32]
(``--methods maml meta_lstm --meta-batch 1``: the LSTM meta-learner at its paper's one episode
per update, beside MAML at the same meta-batch; add ``--with model.hidden=32 --with
episode.q_query=15`` for the episodes and learner of experiments/meta_lstm_omniglot_5w1s.yaml,
its 32-filter Conv4 and 15 queries per class, with MAML on the same.)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIG = str(Path(__file__).resolve().parents[1] / "experiments" / "omniglot_5w1s.yaml")


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(name: str, iterations: int, sets: list[str]) -> dict:
    """Build the track for ``name`` and time its train_step (this process only)."""
    from metarl import config
    from metarl.registry import build_track

    cfg = config.load(CONFIG, [f"algorithm={name}", "meta_batch=32", "baselines=[]", *sets])  # a --set meta_batch=N wins
    track = build_track(cfg)
    rng = np.random.default_rng(0)
    before = _rss_mb()
    track.train_step(0, rng)  # warm-up (first-call allocations count towards the peak)
    times = []
    for it in range(1, iterations + 1):
        t0 = time.perf_counter()
        track.train_step(it, rng)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    track.close()
    return {"seconds": float(np.median(times)), "peak_mb": peak - before}


def run_one(name: str, iterations: int, sets: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--iterations", str(iterations)] + [a for s in sets for a in ("--set", s)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"})
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", help="default: every supervised method in the registry")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--memory-steps", nargs="*", type=int, default=[])
    ap.add_argument("--memory-methods", nargs="+", default=["maml", "imaml"])
    ap.add_argument("--meta-batch", type=int, default=32,
                    help="episodes per meta-iteration for every method (e.g. 1: the LSTM meta-learner's own setting)")
    ap.add_argument("--with", dest="common", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override applied to every method (repeatable)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.iterations, args.set)))
        return
    from metarl import registry

    registry.load_all()
    methods = args.methods or registry.names("supervised")
    if "maml" in methods:
        methods = ["maml"] + [m for m in methods if m != "maml"]
    rows = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            rows[m].append(run_one(m, args.iterations, [f"meta_batch={args.meta_batch}", *args.common]))
    print(f"Omniglot 5-way 1-shot, meta-batch {args.meta_batch}, {' '.join(args.common) or ''} each method's own defaults; median of {args.rounds} interleaved rounds "
          f"of {args.iterations} timed iterations (fresh process each)")
    print(f"{'method':>12} {'s/iter':>8} {'x MAML':>7} {'peak MB':>8}")
    for m in methods:
        ok = [r for r in rows[m] if "error" not in r]
        if not ok:
            print(f"{m:>12}  failed: {rows[m][0]['error']}")
            continue
        ratio = ""
        if "maml" in rows and m != "maml":
            pairs = [a["seconds"] / b["seconds"] for a, b in zip(rows[m], rows["maml"]) if "error" not in a and "error" not in b]
            ratio = f"{np.median(pairs):.2f}" if pairs else ""
        print(f"{m:>12} {np.median([r['seconds'] for r in ok]):8.3f} {ratio or '1.00':>7} {np.median([r['peak_mb'] for r in ok]):8.0f}")
    if args.memory_steps:
        print("\npeak memory (MB above the built track) vs inner steps, one iteration each:")
        print(f"{'steps':>6} " + " ".join(f"{m:>10}" for m in args.memory_methods))
        for k in args.memory_steps:
            cells = []
            for m in args.memory_methods:
                key = {"imaml": "imaml.steps"}.get(m, "inner.steps")
                r = run_one(m, 1, [f"{key}={k}", *args.common])
                cells.append(f"{r['peak_mb']:10.0f}" if "error" not in r else f"{'failed':>10}")
            print(f"{k:>6} " + " ".join(cells))


if __name__ == "__main__":
    main()
