"""Seconds per meta-iteration of the closed-form and metric heads vs MAML, and of metarl.qp vs qpth.

Setting: Omniglot 5-way 1-shot, 1 query per class, meta-batch 32, Conv4 (64 filters, stride-2),
random 28×28 images (speed does not depend on the pixels). One ``train_step`` (forward, backward,
Adam step) of each method, interleaved in rotating order so machine noise hits them alike;
medians over ``--repeats``. MAML: 1 second-order inner step (the omniglot_5w1s.yaml setting, task
workers 0). The heads train on the same 5-way episodes here (their configs' 60-way / 15-shot
training episodes cost more per step; that is a choice of episode, not of method).

``--qp``: the Crammer–Singer dual of ``--qp-shot``-shot 5-way episodes (meta-batch 8, as
MetaOptNet), 3 interior-point iterations, forward + backward, metarl.qp vs qpth's QPFunction
(``pip install --no-deps qpth`` into ``--qpth-path``; cvxpy, which qpth imports but its default
solver does not use, is stubbed). qpth factorises Q itself, so it gets MetaOptNet's 1·I jitter.
Run: .venv/bin/python benchmarks/heads_speed.py [--repeats 5] [--threads 2] [--qp --qpth-path DIR]
"""
from __future__ import annotations

import argparse
import sys
import time
import types

import numpy as np
import torch

from metarl import config
from metarl.algorithms.base import Problem
from metarl.objectives import accuracy, cross_entropy
from metarl.policies.conv4 import Conv4
from metarl.registry import find_algorithm, load_all
from metarl.tasks.batch import TaskBatch


def method(name: str, variant: dict):
    load_all()
    cfg = config.from_dict({"track": "fewshot", "algorithm": name, **variant})
    problem = Problem("fewshot", lambda: Conv4(1, 5, 64, 28, "stride"), cross_entropy, accuracy, "accuracy", True,
                      ("head.weight", "head.bias"), 5)
    return find_algorithm(name, "fewshot")(problem, cfg)


def batch(t=32, way=5, shot=1, q=1):
    g = torch.Generator().manual_seed(0)
    ys = torch.arange(way).repeat_interleave(shot).repeat(t, 1)
    yq = torch.arange(way).repeat_interleave(q).repeat(t, 1)
    return TaskBatch(torch.rand(t, way * shot, 1, 28, 28, generator=g), ys, torch.rand(t, way * q, 1, 28, 28, generator=g), yq)


def heads(repeats: int):
    variants = {"maml": ("maml", {}), "protonet": ("protonet", {}), "r2d2": ("r2d2", {}),
                "metaoptnet-svm": ("metaoptnet", {}), "metaoptnet-ridge": ("metaoptnet", {"metaoptnet": {"head": "ridge"}})}
    methods = {k: method(*v) for k, v in variants.items()}
    b = batch()
    for m in methods.values():  # warm-up
        m.train_step(b, 0)
    times = {k: [] for k in methods}
    names = list(methods)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            methods[k].train_step(b, r)
            times[k].append(time.perf_counter() - t0)
    base = np.median(times["maml"])
    print("method              s/iteration (median)   maml / method")
    for k, v in times.items():
        print(f"{k:20s}{np.median(v):10.3f}            {base / np.median(v):6.2f}x")


def qp(repeats: int, shot: int, qpth_path: str | None):
    from metarl.algorithms.metaoptnet import svm_dual
    from metarl.qp import solve_qp

    g = torch.Generator().manual_seed(0)
    zs = torch.randn(8, 5 * shot, 256, generator=g).relu()
    ys = torch.arange(5).repeat_interleave(shot).repeat(8, 1)

    def ours():
        x = zs.clone().requires_grad_()
        Q, p, G, h, A = svm_dual(x, ys, 5, 0.1)
        solve_qp(Q, p, G, h, A, None, 3).sum().backward()

    solvers = {"metarl.qp": ours}
    if qpth_path:
        sys.path.insert(0, qpth_path)
        sys.modules.setdefault("cvxpy", types.ModuleType("cvxpy"))
        from qpth.qp import QPFunction

        def theirs():
            x = zs.clone().requires_grad_()
            Q, p, G, h, A = svm_dual(x, ys, 5, 0.1)
            Q = Q + torch.eye(Q.shape[-1])
            QPFunction(verbose=-1, maxIter=3)(Q, p, G, h, A, torch.zeros(A.shape[:-1])).sum().backward()
        solvers["qpth"] = theirs
    for f in solvers.values():
        f()
    times = {k: [] for k in solvers}
    for _ in range(repeats):
        for k, f in solvers.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        print(f"QP {shot}-shot 5-way x 8 episodes, 3 iterations, fwd+bwd: {k:10s} {np.median(v):.4f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--qp", action="store_true")
    ap.add_argument("--qp-shot", type=int, default=15)
    ap.add_argument("--qpth-path", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.qp:
        qp(a.repeats, a.qp_shot, a.qpth_path)
    else:
        heads(a.repeats)
