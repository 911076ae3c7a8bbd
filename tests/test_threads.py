"""Thread helpers: intra-op counts restored, task workers isolated to one torch thread each and
really concurrent."""
import time

import pytest
import torch

from metarl.threads import resolve_workers, task_pool, torch_threads


def test_torch_threads_restores_the_setting():
    old = torch.get_num_threads()
    with torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == old
    with torch_threads(0):
        assert torch.get_num_threads() == old
    with pytest.raises(RuntimeError):
        with torch_threads(2):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == old


def test_resolve_workers():
    with torch_threads(2):
        assert resolve_workers(0, 32) == 2     # one per torch thread
        assert resolve_workers(0, 1) == 1      # never more than the tasks
    with torch_threads(1):
        assert resolve_workers(0, 32) == 1     # OMP_NUM_THREADS=1 runs in the caller
    assert resolve_workers(3, 32) == 3 and resolve_workers(5, 2) == 2
    with pytest.raises(ValueError, match="task workers"):
        resolve_workers(-1, 4)


def test_task_pool_workers_use_one_torch_thread_and_leave_the_caller_alone():
    with torch_threads(2):
        pool = task_pool(2)
        assert set(pool.map(lambda _: torch.get_num_threads(), range(4))) == {1}
        assert torch.get_num_threads() == 2
        assert task_pool(2) is pool  # one pool per size, reused


def test_task_pool_work_does_not_hold_the_gil():
    """While a worker runs one long torch op, the caller keeps running Python: the op released the
    GIL, so workers' forwards and backwards can overlap (the premise of task workers)."""
    a = torch.randn(1500, 1500)

    def work(_):
        t0 = time.perf_counter()
        a @ a @ a
        return t0, time.perf_counter()

    future = task_pool(1).submit(work, None)
    ticks = []
    while not future.done():
        ticks.append(time.perf_counter())
    t0, t1 = future.result()
    inside = [t for t in ticks if t0 <= t <= t1]
    assert t1 - t0 > 0.02, "the op was too short to test"
    assert inside and max(b - a for a, b in zip([t0, *inside], [*inside, t1])) < 0.5 * (t1 - t0)
