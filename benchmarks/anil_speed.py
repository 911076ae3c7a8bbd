"""Seconds per meta-iteration, ANIL (features once, head-only inner loop) vs MAML, on Omniglot-sized
random episodes: Conv4 64 filters, 5-way 1-shot (Q=1), meta-batch 32, second order, full backward
to θ. Interleaved repeats, medians. Usage: python benchmarks/anil_speed.py [--steps 1] [--repeats 5]."""
import argparse
import statistics
import time

import torch

from metarl.algorithms.anil import head_query_predictions
from metarl.algorithms.maml import meta_backward, query_predictions
from metarl.functional import params_of
from metarl.objectives import cross_entropy
from metarl.policies.conv4 import Conv4
from metarl.tasks.batch import TaskBatch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, T, n = Conv4(1, 5, hidden=64, image_size=28), a.meta_batch, 5
    y = torch.arange(n).expand(T, n).contiguous()
    batch = TaskBatch(torch.rand(T, n, 1, 28, 28), y, torch.rand(T, n, 1, 28, 28), y)
    head = ["head.weight", "head.bias"]
    variants = {"maml": dict(predictions=query_predictions, only=None),
                "maml only=head (full net)": dict(predictions=query_predictions, only=head),
                "anil (features once)": dict(predictions=head_query_predictions, only=head)}
    times = {k: [] for k in variants}
    for _ in range(a.repeats):
        for name, kw in variants.items():
            for p in model.parameters():
                p.grad = None
            t = time.perf_counter()
            meta_backward(model, params_of(model), batch, cross_entropy, steps=a.steps, lr=0.4, **kw)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["maml"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:>28}: {m:.3f} s/iteration (min {min(ts):.3f}), MAML/this {base / m:.2f}x")


if __name__ == "__main__":
    main()
