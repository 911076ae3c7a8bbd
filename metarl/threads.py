"""Torch threading: intra-op thread counts for a block, and task-parallel worker threads.

Two ways to use the machine's cores in one process. Intra-op threads split each operation
(``torch.set_num_threads``); they pay off for large operations only. Task-parallel workers
(:func:`task_pool`) each run whole tasks of a meta-batch, one intra-op thread apiece: each
worker's graph is its own, so its forward *and* its backward run concurrently with the others'
(autograd runs a CPU graph's backward on the thread that calls it). Why this exists: at
Omniglot's Q = 15 the MAML meta-batch is 32 per-task query paths of ~1.2 GFLOP each whose
convolutions, one task at a time, gain only 1.2x from a second intra-op thread; two workers of
16 tasks each use both cores (see ``metarl.algorithms.maml.meta_backward``).

The per-thread count is real isolation: OpenMP's thread count and MKL's are per calling thread,
so a worker's ``torch.set_num_threads(1)`` leaves the main thread's setting alone.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

_POOLS: dict[int, ThreadPoolExecutor] = {}


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads (0: leave the setting alone), restoring
    the previous count afterwards."""
    old = torch.get_num_threads()
    if n > 0 and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def resolve_workers(workers: int, n_tasks: int) -> int:
    """Task-parallel workers to use: ``workers``, or for 0 one per intra-op thread of the calling
    thread (so ``OMP_NUM_THREADS=1`` runs everything in the caller), at most one per task."""
    if workers < 0:
        raise ValueError(f"task workers must be >= 0 (0 = one per torch thread), got {workers}")
    n = workers or torch.get_num_threads()
    return max(1, min(n, n_tasks))


def task_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads, each limited to one torch intra-op thread
    (created once per size, reused by every meta-iteration)."""
    if workers not in _POOLS:
        torch.get_num_threads()  # settle the caller's own count first: torch initialises it lazily from the last set_num_threads
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="metarl-task",
                                             initializer=torch.set_num_threads, initargs=(1,))
    return _POOLS[workers]
