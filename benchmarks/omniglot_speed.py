"""Seconds per Omniglot meta-iteration with Conv4, engine vs per-task loop vs naive vmap.

Setting (Finn et al. 2017, Omniglot 5-way 1-shot): Conv4(64 filters, stride-2 convs, transductive
batch norm; Vinyals et al. 2016), 28×28 inputs, meta-batch 32, 1 inner step with lr 0.4, second
order, the full meta-gradient (backward to θ). Q = query images per class (Q=1 and Q=15 by default).
``--way/--shot/--meta-batch/--steps/--lr`` time another setting (the 20-way configs).
Random images (speed does not depend on the pixels). Three implementations of the same gradient:
- engine: what few-shot training runs, ``meta_backward(batched=True, workers=0)``: θ stacked per
  task, ``Conv4.forward_tasks`` (grouped convolutions, channels-last, per-task batch norm as 2-D
  batch norm; see policies/conv4.py), the meta-batch cut into one shard per torch thread, each
  shard adapted and backpropagated on its own worker thread (metarl/threads.py);
- engine_serial: the same batched path on the calling thread alone (``workers=1``), its
  operations split across the torch threads instead (the engine before task workers);
- loop:   ``query_losses(batched=False)``: one task at a time through the module's own forward;
- vmap:   ``torch.func.vmap`` over tasks of ``torch.func.grad`` through ``functional_call`` (the
  naive functorch MAML). Its meta-gradient is WRONG through batch norm on torch 2.13 (conv biases
  get ~1e-2 instead of 0; pytorch/functorch#534, tests/test_conv_meta_gradient.py), so it is timed
  for reference only;
- vmap_fwd: the engine's generic path for a model without ``forward_tasks`` (``vmap`` over the
  forward only, ordinary autograd outside it): exact, shows what the native forward buys.
It checks that the meta-gradients agree (exactly, in float64 on 4 of the tasks: float32 itself is
off by ~1e-4..3e-3 relative on this problem for every variant, loop included, because batch norm
over 5 support images is ill-conditioned, so float32 differences are only reported), times the variants interleaved (each repeat runs every
variant once, in rotating order, so machine noise hits them alike) and reports medians and ratios.
Peak memory: each variant runs alone in a fresh subprocess; reported is its peak resident set size
during two meta-iterations minus its resident set just before the first one (so it excludes
Python/torch start-up and the data; it includes allocator caching). The peak is Linux's VmHWM after
resetting it (/proc/self/clear_refs), not ``ru_maxrss``: a child's ru_maxrss inherits the parent's
high-water mark across fork+exec, which made every delta read 0 when the parent was this script.
``--tune-malloc`` reruns everything with glibc told to keep freed memory (MALLOC_MMAP_THRESHOLD_=32 MB,
MALLOC_TRIM_THRESHOLD_=1 GB): the engine's larger tensors otherwise pay page faults every iteration
on a loaded machine (see the docstring of policies/conv4.py for the measured effect).
Run: .venv/bin/python benchmarks/omniglot_speed.py [--repeats 7] [--threads 2] [--q 1,15] [--tune-malloc]
     20-way 5-shot setting: ... --way 20 --shot 5 --meta-batch 16 --steps 5 --lr 0.1 --q 5 --variants engine,engine_serial,loop
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from metarl.algorithms.maml import meta_backward, query_losses
from metarl.functional import params_of
from metarl.objectives import cross_entropy
from metarl.policies.conv4 import Conv4
from metarl.tasks.batch import TaskBatch

SIZE = 28


class S:
    """The benchmarked setting (the paper's 5-way 1-shot unless --way/--shot/... say otherwise)."""
    way, shot, meta_batch, steps, lr = 5, 1, 32, 1, 0.4
VARIANTS = ("engine", "engine_serial", "loop", "vmap", "vmap_fwd")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def make_model(chunk=None, images_per_chunk=None):
    torch.manual_seed(0)
    model = Conv4(1, S.way, hidden=64, image_size=SIZE, pooling="stride")
    if chunk is not None:
        model.task_chunk = chunk
    if images_per_chunk is not None:
        model.images_per_chunk = images_per_chunk
    return model


def make_batch(q, seed):
    g = torch.Generator().manual_seed(seed)
    labels = lambda k: torch.arange(S.way).repeat_interleave(k).expand(S.meta_batch, S.way * k)
    return TaskBatch(torch.rand(S.meta_batch, S.way * S.shot, 1, SIZE, SIZE, generator=g), labels(S.shot),
                     torch.rand(S.meta_batch, S.way * q, 1, SIZE, SIZE, generator=g), labels(q))


def engine(model, batch, workers=0):
    model.zero_grad(set_to_none=True)
    meta_backward(model, params_of(model), batch, cross_entropy, workers=workers, steps=S.steps, lr=S.lr, batched=True)
    return [p.grad for p in model.parameters()]


def engine_serial(model, batch):
    return engine(model, batch, workers=1)


def loop(model, batch):
    p = params_of(model)
    loss = query_losses(model, p, batch, cross_entropy, steps=S.steps, lr=S.lr, batched=False).mean()
    return torch.autograd.grad(loss, list(p.values()))


def vmapped(model, batch):
    p = params_of(model)

    def task_loss(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    def task_query_loss(params, xs, ys, xq, yq):
        g = grad(task_loss)(params, xs, ys)
        return task_loss({k: params[k] - S.lr * g[k] for k in params}, xq, yq)  # one step (main() checks)

    losses = vmap(task_query_loss, in_dims=(None, 0, 0, 0, 0))(p, batch.x_support, batch.y_support, batch.x_query, batch.y_query)
    return torch.autograd.grad(losses.mean(), list(p.values()))


class Generic(torch.nn.Module):
    """The same network without a native ``forward_tasks``: the engine falls back to vmap."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def vmap_fwd(model, batch):
    generic = Generic(model)
    p = params_of(generic)
    loss = query_losses(generic, p, batch, cross_entropy, steps=S.steps, lr=S.lr, batched=True).mean()
    return torch.autograd.grad(loss, list(p.values()))


FNS = {"engine": engine, "engine_serial": engine_serial, "loop": loop, "vmap": vmapped, "vmap_fwd": vmap_fwd}


def relative_error(got, ref):
    a = torch.cat([g.reshape(-1) for g in got])
    b = torch.cat([g.reshape(-1) for g in ref])
    return ((a - b).norm() / b.norm()).item()


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(variant, q, threads, chunk):
    """Runs in a fresh process: peak RSS during two meta-iterations of one variant minus the RSS
    before them (MB). Linux: VmHWM reset through /proc/self/clear_refs; elsewhere ru_maxrss."""
    torch.set_num_threads(threads)
    model, batch = make_model(chunk), make_batch(q, 0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS high-water mark to the current RSS
        before, peak = _status_kb("VmRSS"), lambda: _status_kb("VmHWM")
        how = "VmHWM"
    except OSError:
        before, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        how = "ru_maxrss"
    for _ in range(2):
        FNS[variant](model, batch)
    print(json.dumps({"delta_mb": (peak() - before) / 1024, "before_mb": before / 1024, "how": how}))


def peak_memory(variant, q, threads, chunk):
    cmd = [sys.executable, __file__, "--memory-child", variant, "--q", str(q), "--threads", str(threads), "--way", str(S.way),
           "--shot", str(S.shot), "--meta-batch", str(S.meta_batch), "--steps", str(S.steps), "--lr", str(S.lr)]
    if chunk is not None:
        cmd += ["--chunk", str(chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed meta-iterations per variant and Q")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2: both cores of the reference "
                    "machine, as training uses them; pause other jobs first, a loaded machine makes 2 threads erratic)")
    ap.add_argument("--q", default="1,15", help="query images per class, comma-separated")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--chunk", type=int, default=None, help="override Conv4.task_chunk (tasks per grouped convolution)")
    ap.add_argument("--images-per-chunk", type=int, default=None, help="override Conv4.images_per_chunk (the automatic chunk's target)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory subprocesses")
    ap.add_argument("--tune-malloc", action="store_true", help="rerun with glibc malloc keeping freed memory (fewer page faults)")
    ap.add_argument("--way", type=int, default=S.way, help="classes per task (20-way configs: --way 20 --meta-batch 16 --steps 5 --lr 0.1)")
    ap.add_argument("--shot", type=int, default=S.shot, help="support images per class")
    ap.add_argument("--meta-batch", type=int, default=S.meta_batch)
    ap.add_argument("--steps", type=int, default=S.steps, help="inner steps (the vmap variants support 1 only)")
    ap.add_argument("--lr", type=float, default=S.lr, help="inner step size")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    S.way, S.shot, S.meta_batch, S.steps, S.lr = args.way, args.shot, args.meta_batch, args.steps, args.lr
    if args.tune_malloc and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        # glibc reads these at start-up only: re-execute this script with them set (children inherit them)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], {**os.environ, **MALLOC_ENV})
    qs = [int(q) for q in args.q.split(",")]
    if args.memory_child:
        return memory_child(args.memory_child, qs[0], args.threads, args.chunk)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown or "engine" not in variants or "loop" not in variants:
        raise SystemExit(f"--variants must include engine and loop, from {VARIANTS}; got {variants}")
    if S.steps != 1 and {"vmap", "vmap_fwd"} & set(variants):
        raise SystemExit("the vmap variants take one inner step: use --variants engine,engine_serial,loop with --steps")
    torch.set_num_threads(args.threads)
    model = make_model(args.chunk, args.images_per_chunk)
    chunk = f"task_chunk {model.task_chunk}" if model.task_chunk else f"task_chunk auto (~{model.images_per_chunk} images per chunk)"
    print(f"Omniglot Conv4(64) meta-iteration: {S.way}-way {S.shot}-shot, meta-batch {S.meta_batch}, {SIZE}x{SIZE}, "
          f"{S.steps} inner step(s) (lr {S.lr}), "
          f"second order, full meta-gradient; {args.threads} thread(s), {chunk}, median of {args.repeats} interleaved repeats"
          f"{', malloc tuned' if args.tune_malloc else ''}")
    results = {}
    for q in qs:
        batches = [make_batch(q, s) for s in range(2)]
        small = TaskBatch(*(t[:4] for t in (batches[0].x_support, batches[0].y_support, batches[0].x_query, batches[0].y_query)))
        model64, small64 = make_model(args.chunk, args.images_per_chunk).double(), small.to(torch.float64)
        ref64 = loop(model64, small64)
        errors64 = {v: relative_error(FNS[v](model64, small64), ref64) for v in variants if v != "loop"}
        if errors64["engine"] > 1e-10:
            raise SystemExit(f"engine meta-gradient differs from the loop's in float64: relative error {errors64['engine']:.2e}")
        ref = loop(model, batches[0])
        errors = {v: relative_error(FNS[v](model, batches[0]), ref) for v in variants if v != "loop"}  # also warms up
        times = {v: [] for v in variants}
        for r in range(args.repeats):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                t0 = time.perf_counter()
                FNS[v](model, batches[r % 2])
                times[v].append(time.perf_counter() - t0)
        med = {v: float(np.median(t)) for v, t in times.items()}
        mem = {} if args.no_memory else {v: peak_memory(v, q, args.threads, args.chunk) for v in variants}
        results[q] = (med, errors64, mem)
        print(f"\nQ={q} ({S.way * q} query images per task):")
        for v in variants:
            err = "reference" if v == "loop" else f"rel. error vs loop: float64 {errors64[v]:.0e}{' WRONG' if errors64[v] > 1e-8 else ''}, float32 {errors[v]:.0e}"
            spread = f"[{min(times[v]):.3f}-{max(times[v]):.3f}]"
            m = f", peak RSS +{mem[v]['delta_mb']:.0f} MB" if mem else ""
            print(f"  {v:>13}: {med[v]:6.3f} s {spread:>13}  loop/{v} = {med['loop'] / med[v]:4.2f}x  ({err}{m})")
    print(f"\n(relative error = ||g - g_loop|| / ||g_loop|| over all of θ: float64 on 4 tasks, float32 on all {S.meta_batch}"
          + ("" if args.no_memory else "; peak RSS = growth of the resident set from just before two meta-iterations "
             "to its peak during them, each variant alone in a fresh process") + ")")
    parts = []
    for q, (med, errors, mem) in results.items():
        s = f"at Q={q} the engine takes {med['engine']:.2f} s per meta-iteration vs {med['loop']:.2f} s for the loop ({med['loop'] / med['engine']:.2f}x"
        if "vmap" in med:
            s += f"; naive vmap {med['vmap']:.2f} s, {med['loop'] / med['vmap']:.2f}x, with a wrong gradient"
        if "engine_serial" in med:
            s += f"; without task workers {med['engine_serial']:.2f} s, {med['loop'] / med['engine_serial']:.2f}x"
        if "vmap_fwd" in med:
            s += f"; engine without the native forward {med['vmap_fwd']:.2f} s, {med['loop'] / med['vmap_fwd']:.2f}x"
        s += ")"
        if mem:
            s += f" with peak memory +{mem['engine']['delta_mb']:.0f} MB vs +{mem['loop']['delta_mb']:.0f} MB"
        parts.append(s)
    met = [f"Q={q}" for q, (med, _, _) in results.items() if med["loop"] / med["engine"] >= 1.5]
    print("\nSummary: " + "; ".join(parts) + f". The engine's meta-gradient matches the loop's to a relative "
          f"{max(e['engine'] for _, e, _ in results.values()):.0e} in float64. Target engine >= 1.5x loop: "
          f"met at {', '.join(met) if met else 'no Q'}. Timings are medians on a shared CPU; rerun to gauge the noise.")


if __name__ == "__main__":
    main()
