"""Thread helpers: intra-op counts restored, task workers isolated to one torch thread each and
really concurrent."""
import sys
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
    GIL, so workers' forwards and backwards can overlap (the premise of task workers).

    No clocks: with a huge switch interval the interpreter never takes the GIL from a thread by
    time, only when that thread releases it. The caller can then see ``inside`` set only if the
    worker let go of the GIL inside the op (it clears the flag before it could let go otherwise)."""
    a = torch.randn(1500, 1500)
    state = {"inside": False}

    def work(_):
        state["inside"] = True
        a @ a @ a
        state["inside"] = False

    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        future = task_pool(1).submit(work, None)
        seen_inside = 0
        while not future.done():
            time.sleep(0)  # let the worker take the GIL (it keeps it unless the op releases it)
            seen_inside += state["inside"]
        future.result()
    finally:
        sys.setswitchinterval(old)
    assert seen_inside > 0, "the caller never ran while the worker was inside the op"
