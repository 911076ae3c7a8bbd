"""Seconds per sine meta-iteration (meta-batch 25, K=10, 1 inner step, second order), side by side.

Three implementations of the same meta-gradient on the same data:
- engine: ``metarl.algorithms.maml.query_losses`` (stacked θ, one batched pass, MLP.forward_tasks);
- loop:   a plain per-task loop with ``torch.autograd.grad(create_graph=True)``;
- vmap:   a straightforward ``torch.func.grad`` inside ``torch.func.vmap`` over tasks.
It checks the three meta-gradients agree, then prints the ratios (loop time / engine time etc.).
Run: .venv/bin/python benchmarks/sine_speed.py [--repeats 200]

``--cli`` times what a user gets instead: the whole ``metarl train experiments/sine.yaml`` process
at default settings (sampling, the method's step, both baselines, logging, checkpoints), against
the same command with ``--set torch_threads=0`` (torch's default of one thread per core) and
with ``OMP_NUM_THREADS=1``; milliseconds per iteration come from the difference between a long
and a short run, so start-up cancels. Runs are interleaved (A B C A B C ...).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from metarl.algorithms.maml import query_losses
from metarl.functional import params_of
from metarl.objectives import mse
from metarl.policies.mlp import MLP
from metarl.tasks import sine

LR = 0.01


def engine(model, batch):
    p = params_of(model)
    return torch.autograd.grad(query_losses(model, p, batch, mse, steps=1, lr=LR).mean(), list(p.values()))


def loop(model, batch):
    p = params_of(model)
    total = 0.0
    for i in range(batch.n_tasks):
        l_s = ((functional_call(model, p, (batch.x_support[i],)) - batch.y_support[i]) ** 2).mean()
        g = torch.autograd.grad(l_s, list(p.values()), create_graph=True)
        phi = {k: v - LR * gk for (k, v), gk in zip(p.items(), g)}
        total = total + ((functional_call(model, phi, (batch.x_query[i],)) - batch.y_query[i]) ** 2).mean()
    return torch.autograd.grad(total / batch.n_tasks, list(p.values()))


def vmapped(model, batch):
    p = params_of(model)

    def support_loss(params, x, y):
        return ((functional_call(model, params, (x,)) - y) ** 2).mean()

    def task_query_loss(params, xs, ys, xq, yq):
        g = grad(support_loss)(params, xs, ys)
        phi = {k: params[k] - LR * g[k] for k in params}
        return support_loss(phi, xq, yq)

    losses = vmap(task_query_loss, in_dims=(None, 0, 0, 0, 0))(p, batch.x_support, batch.y_support, batch.x_query, batch.y_query)
    return torch.autograd.grad(losses.mean(), list(p.values()))


def cli_iteration_ms(repeats: int, short: int = 200, long: int = 1200) -> None:
    import os
    import subprocess
    import sys
    import tempfile

    variants = {"default": ([], {}), "torch_threads=0": (["--set", "torch_threads=0"], {}),
                "OMP_NUM_THREADS=1": ([], {"OMP_NUM_THREADS": "1"})}
    times = {k: {short: [], long: []} for k in variants}
    for _ in range(repeats):
        for name, (sets, env) in variants.items():
            for n in (short, long):
                with tempfile.TemporaryDirectory() as d:
                    cmd = [sys.executable, "-m", "metarl.cli", "train", "experiments/sine.yaml", "--run-dir", d,
                           "--set", f"iterations={n}", "--set", "checkpoint_every=100000", *sets]
                    t0 = time.perf_counter()
                    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **env})
                    times[name][n].append(time.perf_counter() - t0)
    ms = {k: (np.median(v[long]) - np.median(v[short])) / (long - short) * 1e3 for k, v in times.items()}
    print(f"whole `metarl train experiments/sine.yaml` iteration, ms (median of {repeats}, ({long} - {short}) iterations):")
    for k, v in ms.items():
        print(f"  {k:>18}: {v:6.2f} ms   ({ms['torch_threads=0'] / v:.2f}x the torch-default threads)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cli", action="store_true", help="time the whole metarl train iteration at default settings")
    args = ap.parse_args()
    if args.cli:
        return cli_iteration_ms(min(args.repeats, 5))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MLP(1, 1, [40, 40])
    rng = np.random.default_rng(0)
    cfg = sine.SineTaskConfig(k_shot=10, k_query=10)
    batches = [sine.make_batch(cfg, sine.sample_tasks(cfg, 25, rng), 10, 10, rng) for _ in range(8)]
    fns = {"engine": engine, "loop": loop, "vmap": vmapped}
    ref = fns["loop"](model, batches[0])
    for name, fn in fns.items():
        got = fn(model, batches[0])
        err = max((a - b).abs().max().item() for a, b in zip(got, ref))
        assert err < 1e-5, f"{name} meta-gradient differs from the loop's by {err}"
    times = {k: [] for k in fns}
    for r in range(args.repeats):  # interleaved, so machine noise hits every method alike
        for name, fn in fns.items():
            b = batches[r % len(batches)]
            t0 = time.perf_counter()
            fn(model, b)
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"sine meta-iteration (meta-batch 25, K=10, 1 step, 2nd order), {args.threads} thread(s), median of {args.repeats}:")
    for k, v in med.items():
        print(f"  {k:>6}: {v * 1e3:7.2f} ms")
    print("meta-gradients agree (max abs diff < 1e-5)")
    print(f"speed-up vs loop: engine {med['loop'] / med['engine']:.1f}x, vmap {med['loop'] / med['vmap']:.1f}x; "
          f"engine vs vmap {med['vmap'] / med['engine']:.2f}x  (target: engine >= 8x loop)")


if __name__ == "__main__":
    main()
