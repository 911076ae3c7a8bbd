"""SNAIL's shared support prefix against one sequence per query: seconds per meta-iteration.

``SNAILNet.forward`` runs an episode's S support positions through the causal stack once and each
of its Q queries only as the last position (``metarl/algorithms/snail.py``, "Queries:"); before,
every query was its own sequence support ‖ query, Q·(S + 1) positions per episode. This times a
whole ``train_step`` (task sampling, forward, backward, Adam) of both on the same built track, in
one process, alternating (per-query, shared, per-query, shared, ...) so the machine's drift hits
both alike; the ratio is taken within each round, then the median over rounds. The per-query
forward is the old one (support tokens expanded Q times, ``SNAILNet.sequence``, the last
position); both forwards' logits on one batch are compared first (float32 rounding only). "Stack
alone" times forward and backward of the causal stack from fixed tokens (one meta-batch, the
embedding excluded), which is all the reformulation changes: the embedding of the N·K + Q images
per episode costs the same in both and bounds the whole iteration's speed-up.

Settings (each SNAIL config at its own meta-batch): 5w1s = experiments/snail_omniglot_5w1s.yaml
(meta-batch 32), 5w5s = the same with episode.k_shot=5, 20w1s = experiments/snail_omniglot_20w1s.yaml
(meta-batch 16); queries = K per class, as in the configs.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/snail_prefix.py [--settings 5w1s 5w5s 20w1s]
     [--rounds 3] [--iterations 2]
"""
from __future__ import annotations

import argparse
import time
import types
from pathlib import Path

import numpy as np
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SETTINGS = {"5w1s": ("snail_omniglot_5w1s.yaml", []),
            "5w5s": ("snail_omniglot_5w1s.yaml", ["episode.k_shot=5"]),
            "20w1s": ("snail_omniglot_20w1s.yaml", [])}


def per_query_forward(net, x_support, y_support, x_query):
    """The old forward: the support tokens expanded once per query, T·Q sequences of S + 1."""
    support, queries = net.tokens(x_support, y_support, x_query)
    t, s, q = x_support.shape[0], x_support.shape[1], x_query.shape[1]
    seq = torch.cat([support.unsqueeze(1).expand(t, q, s, support.shape[-1]), queries.unsqueeze(2)], dim=2)
    return net.sequence(seq.reshape(t * q, s + 1, -1))[:, -1].reshape(t, q, net.n_way), None


def stack_seconds(net, tokens, y_query, forward) -> float:
    """Forward and backward of the causal stack and output layer alone, from fixed tokens."""
    support, queries = (x.detach().requires_grad_() for x in tokens)
    t0 = time.perf_counter()
    if forward == "shared":
        for layer in net.layers:
            support, queries = layer.extend(support, queries)
        logits = net.out(queries)
    else:
        t, s, q = support.shape[0], support.shape[1], queries.shape[1]
        seq = torch.cat([support.unsqueeze(1).expand(t, q, s, support.shape[-1]), queries.unsqueeze(2)], dim=2)
        logits = net.sequence(seq.reshape(t * q, s + 1, -1))[:, -1].reshape(t, q, net.n_way)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y_query.flatten()).backward()
    return time.perf_counter() - t0


def timed(track, rng, iterations: int, start: int) -> float:
    times = []
    for it in range(start, start + iterations):
        t0 = time.perf_counter()
        track.train_step(it, rng)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=2, help="timed train_steps per variant per round (median)")
    args = ap.parse_args()
    from metarl import config
    from metarl.registry import build_track

    torch.set_num_threads(1)
    print(f"SNAIL train_step, shared support prefix vs one sequence per query; median of {args.iterations} "
          f"iterations per variant, {args.rounds} alternating rounds, ratio per round then median; 1 torch thread")
    print(f"{'setting':>7} {'meta-batch':>10} {'S':>3} {'Q':>3} {'per-query s/iter':>16} {'shared s/iter':>13} "
          f"{'speed-up':>8} {'stack alone: per-query s':>24} {'shared s':>8} {'speed-up':>8} {'max |Δlogit|':>12}")
    for name in args.settings:
        file, sets = SETTINGS[name]
        cfg = config.load(str(EXPERIMENTS / file), sets + ["baselines=[]"])
        track = build_track(cfg)
        net = track.method.model
        rng = np.random.default_rng(0)
        batch = track.train_tasks.sample(2, np.random.default_rng(1))
        net.eval()
        with torch.no_grad():
            diff = (net(batch.x_support, batch.y_support, batch.x_query)[0]
                    - per_query_forward(net, batch.x_support, batch.y_support, batch.x_query)[0]).abs().max().item()
        net.train()
        old = types.MethodType(per_query_forward, net)
        track.train_step(0, rng)  # warm-up
        full = track.train_tasks.sample(cfg.meta_batch, np.random.default_rng(2))
        with torch.no_grad():
            tokens = net.tokens(full.x_support, full.y_support, full.x_query)
        rows, it = [], 1
        for _ in range(args.rounds):
            net.forward = old
            a = timed(track, rng, args.iterations, it)
            del net.forward  # back to SNAILNet.forward
            b = timed(track, rng, args.iterations, it + args.iterations)
            rows.append((a, b, stack_seconds(net, tokens, full.y_query, "per-query"), stack_seconds(net, tokens, full.y_query, "shared")))
            it += 2 * args.iterations
        a, b, c, d = np.median(rows, axis=0)
        ratio, stack_ratio = np.median([r[0] / r[1] for r in rows]), np.median([r[2] / r[3] for r in rows])
        s, q = batch.x_support.shape[1], batch.x_query.shape[1]
        print(f"{name:>7} {cfg.meta_batch:>10} {s:>3} {q:>3} {a:16.2f} {b:13.2f} {ratio:7.1f}x {c:24.2f} {d:8.2f} "
              f"{stack_ratio:7.1f}x {diff:12.1e}", flush=True)
        track.close()


if __name__ == "__main__":
    main()
