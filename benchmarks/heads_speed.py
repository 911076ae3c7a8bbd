"""Seconds per meta-iteration of the closed-form and metric heads vs MAML, and of metarl.qp's solvers (vs qpth).

Setting: Omniglot 5-way 1-shot, 1 query per class, meta-batch 32, Conv4 (64 filters, stride-2),
random 28×28 images (speed does not depend on the pixels). One ``train_step`` (forward, backward,
Adam step) of each method, interleaved in rotating order so machine noise hits them alike;
medians over ``--repeats``. MAML: 1 second-order inner step (the omniglot_5w1s.yaml setting, task
workers 0). The heads train on the same 5-way episodes here (their configs' 60-way / 15-shot
training episodes cost more per step; that is a choice of episode, not of method).

``--qp``: the Crammer–Singer dual of 8 episodes (meta-batch 8, as MetaOptNet), d = 64 random
non-negative features (Conv4's), 3 interior-point iterations, forward + backward: the dense
metarl.qp.solve_qp and the structured metarl.qp.solve_crammer_singer side by side at 5-way
``--qp-shot``-shot (15: the paper's training episodes), the structured one at 20-way 1-, 5- and
15-shot; seconds (median) and peak resident memory, each in a fresh process; with
``--qpth-path DIR`` also qpth's QPFunction (``pip install --no-deps qpth`` into DIR; cvxpy, which
qpth imports but its default solver does not use, is stubbed; qpth factorises Q itself, so it gets
MetaOptNet's 1·I jitter). ``--woodbury``: the Woodbury variant of the structured factorisation,
timed and run to convergence (why metarl.qp does not use it).
Run: .venv/bin/python benchmarks/heads_speed.py [--repeats 5] [--threads 2] [--qp [--qpth-path DIR] | --woodbury]
"""
from __future__ import annotations

import argparse
import resource
import subprocess
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


def episodes(way: int, shot: int, d: int = 64, t: int = 8):
    """t support sets of ``way`` x ``shot`` random non-negative d-dim features (Conv4's d = 64)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(t, way * shot, d, generator=g).relu(), torch.arange(way).repeat_interleave(shot).repeat(t, 1)


def qp_solver(name: str, way: int, shot: int, qpth_path: str | None = None):
    """One forward + backward of the SVM dual of 8 episodes, 3 iterations, by ``name``."""
    from metarl.algorithms.metaoptnet import svm_problem
    from metarl.qp import crammer_singer_qp, solve_crammer_singer, solve_qp

    zs, ys = episodes(way, shot)
    if name == "structured":
        def run():
            x = zs.clone().requires_grad_()
            solve_crammer_singer(*svm_problem(x, ys, way, 0.1), 3).sum().backward()
    elif name == "dense":
        def run():
            x = zs.clone().requires_grad_()
            Q, p, G, h, A = crammer_singer_qp(*svm_problem(x, ys, way, 0.1))
            solve_qp(Q, p, G, h, A, None, 3).sum().backward()
    else:
        sys.path.insert(0, qpth_path)
        sys.modules.setdefault("cvxpy", types.ModuleType("cvxpy"))
        from qpth.qp import QPFunction

        def run():
            x = zs.clone().requires_grad_()
            Q, p, G, h, A = crammer_singer_qp(*svm_problem(x, ys, way, 0.1))
            Q = Q + torch.eye(Q.shape[-1])
            QPFunction(verbose=-1, maxIter=3)(Q, p, G, h, A, torch.zeros(A.shape[:-1])).sum().backward()
    return run


def qp_one(name: str, way: int, shot: int, repeats: int, qpth_path: str | None):
    """In a fresh process (``--qp-one``): median seconds and peak resident memory above the
    process's size before the first solve (getrusage's ru_maxrss), printed as one line."""
    run = qp_solver(name, way, shot, qpth_path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    print(np.median(times), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)


def qp(repeats: int, threads: int, shot: int, qpth_path: str | None):
    """The dense and structured solvers (and qpth) side by side at 5-way ``shot``-shot, the
    structured one at 20-way 1/5/15-shot: each in its own process, so each peak is its own."""
    from metarl.qp import crammer_singer_bytes

    rows = [("dense", 5, shot), ("structured", 5, shot)] + ([("qpth", 5, shot)] if qpth_path else []) + \
           [("structured", 20, 1), ("structured", 20, 5), ("structured", 20, 15)]
    print("SVM dual, 8 episodes, d = 64, 3 iterations, forward + backward")
    print("solver       episode    unknowns  s (median)  peak MB  estimate MB (check_svm_fits)")
    for name, way, k in rows:
        out = subprocess.run([sys.executable, __file__, "--qp-one", name, str(way), str(k), "--repeats", str(repeats),
                              "--threads", str(threads)] + (["--qpth-path", qpth_path] if qpth_path else []),
                             capture_output=True, text=True, check=True).stdout.split()
        est = f"{crammer_singer_bytes(8, way * k, way) / 2**20:8.0f}" if name == "structured" else ""
        print(f"{name:12s} {f'{way}w{k}s':9s}  {way * way * k:6d}   {float(out[0]):9.3f}  {float(out[1]):7.0f}  {est}")


def woodbury(repeats: int):
    """The other reduction the structure allows, for the record: H_k⁻¹ by Woodbury through the
    feature dimension, D_k⁻¹ − D_k⁻¹Z(I + ZᵀD_k⁻¹Z)⁻¹ZᵀD_k⁻¹ with D_k = diag(λ_k/s_k), O(K(n²d + nd²))
    instead of O(Kn³). Timed against metarl.qp._cs_factor at 20-way 15-shot, and run through the
    interior point to see where D_k⁻¹ = s/λ (→ ∞ on inactive coordinates near the optimum) breaks it."""
    from metarl import qp as qplib
    from metarl.algorithms.metaoptnet import svm_problem

    zs, ys = episodes(20, 15)
    Z = zs.double()

    def factor(M, s, lam):
        w = (s / lam).transpose(1, 2)                                  # D_k⁻¹, [t, K, n]
        U = w.unsqueeze(-1) * Z.unsqueeze(1)
        C = Z.transpose(1, 2).unsqueeze(1) @ U
        C.diagonal(dim1=-2, dim2=-1).add_(1.0)
        V = torch.linalg.solve_triangular(torch.linalg.cholesky(C), U.transpose(-1, -2), upper=False)
        R = -(V.transpose(-1, -2) @ V)
        R.diagonal(dim1=-2, dim2=-1).add_(w)
        return R, torch.linalg.cholesky(R.sum(1))

    M, P, H = svm_problem(zs, ys, 20, 0.1)
    g = torch.Generator().manual_seed(1)
    s, lam = torch.rand(P.shape, generator=g, dtype=torch.float64) + 0.01, torch.rand(P.shape, generator=g, dtype=torch.float64) + 0.01
    for name, f in (("direct (metarl.qp)", qplib._cs_factor), ("woodbury", factor)):
        f(M, s, lam)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(M, s, lam)
            times.append(time.perf_counter() - t0)
        print(f"20w15s x 8, one Newton factorisation: {name:20s} {np.median(times):.3f} s")
    direct = qplib._cs_factor
    for it in (3, 8, 15):
        ref = qplib.solve_crammer_singer_with_duals(M, P, H, it)[0]
        qplib._cs_factor = factor
        try:
            out = f"max |α_woodbury − α_direct| = {(qplib.solve_crammer_singer_with_duals(M, P, H, it)[0] - ref).abs().max():.1e}"
        except torch.linalg.LinAlgError as e:
            out = f"woodbury fails: {str(e).split(':')[1].strip()[:60]}"
        finally:
            qplib._cs_factor = direct
        print(f"20w15s x 8, {it:2d} iterations: {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--qp", action="store_true")
    ap.add_argument("--qp-shot", type=int, default=15)
    ap.add_argument("--qpth-path", default=None)
    ap.add_argument("--woodbury", action="store_true")
    ap.add_argument("--qp-one", nargs=3, metavar=("SOLVER", "WAY", "SHOT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.qp_one:
        qp_one(a.qp_one[0], int(a.qp_one[1]), int(a.qp_one[2]), a.repeats, a.qpth_path)
    elif a.qp:
        qp(a.repeats, a.threads, a.qp_shot, a.qpth_path)
    elif a.woodbury:
        woodbury(a.repeats)
    else:
        heads(a.repeats)
