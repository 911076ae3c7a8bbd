"""Fault injection: nothing lost, no hangs, no orphans; every bad input a one-line error.

Each test injects a real fault (SIGKILL, SIGINT/SIGTERM, a killed worker, an unwritable
directory, damaged files, a second trainer) into real `metarl` processes and checks the outcome
against an independent reference: the uninterrupted run's state (bitwise), the process table,
and the exact stderr contract (``metarl: error: ...`` on one line, exit status 2). Long
campaigns are marked ``slow`` (``pytest -m slow``); the counts they report go to the README.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metarl import checkpoint, config
from metarl.tasks.episodes import SHARED_DATA, DataError, cached_arrays
from metarl.training import NonFiniteLoss, train

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = SHARED_DATA / "omniglot"
needs_omniglot = pytest.mark.skipif(not (OMNIGLOT / "images_background.zip").is_file(),
                                    reason=f"shared Omniglot not at {OMNIGLOT}")

SINE = ["experiments/sine_quick.yaml", "--set", "meta_batch=4", "--set", "baselines=[]", "--set", "eval.tasks=10"]
FEWSHOT = ["experiments/omniglot_5w1s.yaml", "--set", "model.hidden=8", "--set", "meta_batch=2", "--set", "baselines=[]",
           "--set", "snapshot_every=0", "--set", "log_every=1", "--set", "eval.tasks=4"]
RL = ["experiments/nav2d.yaml", "--set", "meta_batch=2", "--set", "inner.episodes=2", "--set", "policy.hidden=[8]",
      "--set", "env.kwargs.horizon=20", "--set", "snapshot_every=0", "--set", "baselines=[]", "--set", "outer.threads=1",
      "--set", "eval.tasks=4"]
CONFIGS = {"sine": SINE, "fewshot": FEWSHOT, "rl": RL}


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "metarl.cli", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def run(*args, timeout=180, **kw):
    p = cli(*args, **kw)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def assert_one_line_error(p, *fragments):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("metarl: error: "), p.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def cfg_of(name, *sets):
    args = CONFIGS[name]
    overrides = [args[i + 1] for i in range(1, len(args), 2)] + list(sets)
    return config.load(args[0], overrides)


def sets(*pairs):
    return [x for p in pairs for x in ("--set", p)]


def wait_for_rows(run_dir, rows, proc, timeout=120):
    """Until metrics.csv holds ``rows`` data rows (the run is under way); fails if the run ends."""
    csv = Path(run_dir) / "metrics.csv"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if csv.exists() and len(csv.read_text().splitlines()) > rows:
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    raise AssertionError("the run did not start")


def same(a, b):
    """Bitwise deep equality of two checkpoint states (torch.equal on tensors, == elsewhere)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def final_state(run_dir):
    s = checkpoint.load(run_dir)
    return {"iteration": s["iteration"], "track": s["track"], "rng": s["rng"]}


def children(pid):
    """Pids whose parent is ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def alive(pid):
    """Running (not gone, not a zombie waiting for its reaper)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, seconds=10.0):
    deadline = time.time() + seconds
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


# ============================================================================ random SIGKILLs


def kill_campaign(name, tmp_path, kills, total, rng, extra=()):
    """SIGKILL a run ``kills`` times at random moments (checkpoint every iteration, so many kills
    land inside a checkpoint write), resuming after each; then finish it and compare with an
    uninterrupted run. Returns (kills injected, kills that landed during a write, runs lost)."""
    args = CONFIGS[name] + sets(f"iterations={total}", "checkpoint_every=1", *extra)
    run_dir = tmp_path / f"{name}-killed"
    during_write = lost = 0
    for k in range(kills):
        proc = cli("train", *args, "--run-dir", run_dir, *(["--resume"] if k else []))
        wait_for_rows(run_dir, 1, proc)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.communicate()
        if proc.returncode == 0:
            break  # the run finished before the kill
        if list(run_dir.glob(".*.tmp")):
            during_write += 1
        if checkpoint.exists(run_dir):
            try:
                checkpoint.load(run_dir)  # at every instant a loadable checkpoint
            except checkpoint.CheckpointError:
                lost += 1
    p = run("train", *args, "--run-dir", run_dir, "--resume")
    assert p.returncode == 0, p.stderr
    assert not list(run_dir.glob(".*.tmp")), "stale temporary files must be removed"
    rows = [int(r.split(",")[0]) for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert rows == sorted(set(rows)), "metrics.csv must not repeat or interleave iterations"
    straight = tmp_path / f"{name}-straight"  # in a subprocess too: same torch threads, same sums
    assert run("train", *args, "--run-dir", straight).returncode == 0
    if not same(final_state(run_dir), final_state(straight)):
        lost += 1
    return kills, during_write, lost


@pytest.mark.parametrize("name", ["rl"])
def test_sigkill_at_random_moments_then_resume_is_bitwise(name, tmp_path):
    """Two kills in CI; sine and few-shot (and more kills) in the slow campaign below."""
    kills, _, lost = kill_campaign(name, tmp_path, kills=2, total={"rl": 40}[name],
                                   rng=random.Random(hash(name) % 1000))
    assert lost == 0


KILL_IN_WRITE = textwrap.dedent("""
    import os, signal, sys
    from metarl import checkpoint, cli
    stage, calls = sys.argv[1], {"save": 0, "replace": 0}
    real_save, real_replace = checkpoint.torch.save, checkpoint.os.replace

    def save(obj, fh):  # the third checkpoint: half of its bytes, then SIGKILL
        calls["save"] += 1
        if stage == "mid-write" and calls["save"] == 3:
            fh.write(b"PK half a checkpoint")
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, fh)

    def replace(a, b):  # the third checkpoint: previous linked, new one not yet in place
        if stage == "after-link" and calls["save"] == 3 and str(b).endswith(checkpoint.LATEST):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(a, b)

    checkpoint.torch.save, checkpoint.os.replace = save, replace
    sys.exit(cli.main(sys.argv[2:]))
""")


@pytest.mark.parametrize("stage", ["mid-write", "after-link"])
def test_sigkill_inside_a_checkpoint_write(tmp_path, stage):
    """A real SIGKILL at the two dangerous points of a rotation (half the temporary file written;
    the previous checkpoint linked but the new one not yet renamed): the run directory holds a
    loadable checkpoint of the iteration before, and --resume ends bitwise equal to a straight run."""
    args = [*SINE, *sets("iterations=6", "checkpoint_every=1")]
    proc = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, stage, "train", *args, "--run-dir", tmp_path / "cut"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert checkpoint.load(tmp_path / "cut")["iteration"] == 2
    assert list((tmp_path / "cut").glob(".checkpoint.pt.*.tmp")), "the kill left its temporary file"
    assert run("train", *args, "--run-dir", tmp_path / "cut", "--resume").returncode == 0
    assert not list((tmp_path / "cut").glob(".*.tmp"))
    assert run("train", *args, "--run-dir", tmp_path / "straight").returncode == 0
    assert same(final_state(tmp_path / "cut"), final_state(tmp_path / "straight"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sine", "rl", pytest.param("fewshot", marks=needs_omniglot)])
def test_sigkill_campaign(name, tmp_path):
    """The README's reliability counts come from this campaign (printed with -s)."""
    kills, during_write, lost = kill_campaign(name, tmp_path, kills=8, total={"sine": 200, "rl": 100, "fewshot": 120}[name],
                                              rng=random.Random(1))
    print(f"\n{name}: {kills} SIGKILLs, {during_write} during a checkpoint write, {lost} runs lost")
    assert lost == 0


# ============================================================================ SIGINT / SIGTERM


@pytest.mark.parametrize("name", ["rl", pytest.param("fewshot", marks=needs_omniglot)])
def test_sigint_mid_run_then_resume_is_bitwise(name, tmp_path):
    """A real SIGINT: the run saves and exits 130; --resume ends bitwise where an uninterrupted run does."""
    cut = tmp_path / "cut"
    proc = cli("train", *CONFIGS[name], *sets("iterations=100000", "checkpoint_every=100000"), "--run-dir", cut)
    wait_for_rows(cut, 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in err, err
    at = checkpoint.load(cut)["iteration"]
    assert 0 < at < 100000
    more = CONFIGS[name] + sets(f"iterations={at + 4}", "checkpoint_every=100000")
    # both in subprocesses, as the cut run: the same torch thread count gives the same float sums
    assert run("train", *more, "--run-dir", cut, "--resume").returncode == 0
    assert run("train", *more, "--run-dir", tmp_path / "straight").returncode == 0
    assert same(final_state(cut), final_state(tmp_path / "straight"))


STUCK = textwrap.dedent("""
    import sys, threading
    from metarl.tracks.sine import SineTrack
    from metarl import cli
    real = SineTrack.train_step
    def step(self, it, rng):
        if it == 5:
            print("stuck", file=sys.stderr, flush=True)
            threading.Event().wait()  # an iteration that never ends by itself
        return real(self, it, rng)
    SineTrack.train_step = step
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_ends_the_run_at_once_and_keeps_the_checkpoint(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-c", STUCK, "train", *SINE, *sets("iterations=100", "checkpoint_every=2"),
                             "--run-dir", tmp_path], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline().strip() == "stuck"
    proc.send_signal(sig)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=1)  # one signal only asks to stop after the iteration
    proc.send_signal(sig)
    err = proc.communicate(timeout=30)[1]
    assert proc.returncode == 130, err
    assert "second signal" in err and "iteration 4" in err and err.strip().count("\n") == 0, err
    assert checkpoint.load(tmp_path)["iteration"] == 4


# ============================================================================ collector workers


def _worker_pids(trainer_pid, n=2, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = children(trainer_pid)
        if len(kids) >= n:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"no {n} collector workers under {trainer_pid}")


def test_sigkilled_trainer_leaves_no_collector_workers(tmp_path):
    proc = cli("train", *RL, *sets("iterations=100000"), "--run-dir", tmp_path)
    wait_for_rows(tmp_path, 2, proc)
    workers = _worker_pids(proc.pid)
    proc.kill()
    proc.communicate()
    left = wait_gone(workers, seconds=10)
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"orphaned collector workers {left}"


def test_killed_worker_is_one_line_from_the_cli(tmp_path):
    """SIGTERM to one worker mid-run (workers must die on SIGTERM): the trainer stops with
    'collector worker N died' on one line, within seconds, and keeps its last checkpoint."""
    proc = cli("train", *RL, *sets("iterations=100000", "checkpoint_every=1"), "--run-dir", tmp_path)
    wait_for_rows(tmp_path, 2, proc)
    workers = _worker_pids(proc.pid)
    os.kill(workers[0], signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        for p in children(proc.pid):
            os.kill(p, signal.SIGKILL)
        raise AssertionError("the run went on with a SIGTERMed worker (or hung)")
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), "collector worker", "died")
    assert checkpoint.load(tmp_path)["iteration"] >= 1
    assert not wait_gone(workers, 10)


def _nav_collector(n_workers=2):
    from metarl.rollouts.collector import Collector

    return Collector("metarl/Navigation2D-v0", {"horizon": 200}, n_workers=n_workers)


def _policy():
    from metarl.policies.gaussian import GaussianMLPPolicy

    return GaussianMLPPolicy(2, 2, hidden=(8,))


def test_worker_killed_between_steps_is_a_collector_error_not_broken_pipe():
    """The next command to a dead worker fails in ``send`` (BrokenPipeError before the fix)."""
    from metarl.rollouts.collector import CollectorError

    tasks = [{"goal": [0.1, 0.2]}] * 2
    with _nav_collector() as col:
        policy = _policy()
        col.collect(policy, None, tasks, 2, seed=0)
        pool = col._backend
        pool.reset(tasks * 2, [1, 2, 3, 4], 2)
        victim = pool.procs[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(5)
        with pytest.raises(CollectorError, match="collector worker 1 died \\(killed by SIGKILL\\)"):
            pool.step(np.zeros((4, 2)), np.ones(4, dtype=bool))
        ep = col.collect(policy, None, tasks, 2, seed=1)  # fresh workers: the collector recovers
        assert ep.lengths.shape == (2, 2)


def test_worker_killed_mid_collection_is_a_clear_error_not_a_hang():
    import threading

    from metarl.rollouts.collector import CollectorError

    tasks = [{"goal": [0.4, -0.4]}] * 4
    with _nav_collector() as col:
        policy = _policy()
        col.collect(policy, None, tasks, 1, seed=0)
        pid = col._backend.procs[0].pid
        killer = threading.Timer(0.05, os.kill, (pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(CollectorError, match="collector worker 0 died"):
            for s in range(1000):  # until the kill lands mid-collection
                col.collect(policy, None, tasks, 50, seed=s)
        killer.join()


def test_worker_exits_when_its_parent_dies_and_on_sigterm(tmp_path):
    """Direct check of the worker contract, through a parent we SIGKILL ourselves."""
    script = textwrap.dedent("""
        import os, signal, sys, time
        from metarl.rollouts.collector import Collector
        from metarl.policies.gaussian import GaussianMLPPolicy
        signal.signal(signal.SIGTERM, lambda *a: None)   # a trainer's handler, inherited through fork
        col = Collector("metarl/Navigation2D-v0", {"horizon": 20}, n_workers=3)
        col.collect(GaussianMLPPolicy(2, 2, hidden=(8,)), None, [{"goal": [0.1, 0.1]}] * 3, 1, seed=0)
        print(*[p.pid for p in col._backend.procs], flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    workers = [int(x) for x in proc.stdout.readline().split()]
    assert len(workers) == 3
    os.kill(workers[2], signal.SIGTERM)
    assert not wait_gone(workers[2:], 10), "a worker must die on SIGTERM"
    proc.kill()
    proc.wait()
    left = wait_gone(workers[:2], 10)
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "workers must exit when their parent dies"


@pytest.mark.parametrize("env_id,fragment", [("tests.faulty_env:faulty/NanPendulum-v0", "NaN"),
                                             ("tests.faulty_env:faulty/ShapePendulum-v0", "shape (4,)")])
def test_bad_env_output_is_one_line(tmp_path, env_id, fragment):
    p = run("train", "experiments/pendulum_gravity.yaml", *sets(f"env.id={env_id}", "meta_batch=2", "inner.episodes=1",
                                                                "iterations=2"), "--run-dir", tmp_path)
    assert_one_line_error(p, "faulty/", fragment, "episode")


# ============================================================================ the run directory


def test_two_trainers_on_one_run_dir(tmp_path):
    first = cli("train", *SINE, *sets("iterations=100000", "checkpoint_every=50"), "--run-dir", tmp_path)
    wait_for_rows(tmp_path, 2, first)
    for extra in ([], ["--resume"]):
        second = run("train", *SINE, *sets("iterations=100000", "checkpoint_every=50"), "--run-dir", tmp_path, *extra)
        assert_one_line_error(second, "in use by another `metarl train`", f"pid {first.pid}")
    assert first.poll() is None, "the first run must go on"
    first.send_signal(signal.SIGINT)
    assert first.wait(60) == 130
    rows = [int(r.split(",")[0]) for r in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert rows == sorted(set(rows))
    p = run("train", *SINE, *sets("iterations=5"), "--run-dir", tmp_path)  # lock released by the exit
    assert_one_line_error(p, "already holds a run")


def test_fresh_train_never_destroys_a_run_without_checkpoint_pt(tmp_path):
    """What the old rotation left after an unlucky SIGKILL: checkpoint.prev.pt and metrics.csv
    only. A fresh train must refuse; --resume continues from the previous checkpoint."""
    train(cfg_of("sine", "iterations=20", "checkpoint_every=10"), tmp_path, tensorboard=False)
    os.replace(tmp_path / checkpoint.LATEST, tmp_path / checkpoint.PREVIOUS)
    csv_before = (tmp_path / "metrics.csv").read_text()
    prev_before = (tmp_path / checkpoint.PREVIOUS).read_bytes()
    p = run("train", *SINE, *sets("iterations=30", "checkpoint_every=10"), "--run-dir", tmp_path)
    assert_one_line_error(p, "already holds a run", "--resume")
    assert (tmp_path / "metrics.csv").read_text() == csv_before
    assert (tmp_path / checkpoint.PREVIOUS).read_bytes() == prev_before
    assert run("train", *SINE, *sets("iterations=30", "checkpoint_every=10"), "--run-dir", tmp_path, "--resume").returncode == 0
    assert checkpoint.load(tmp_path)["iteration"] == 30
    rows = [int(r.split(",")[0]) for r in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert rows[0] == 0 and rows == sorted(set(rows))


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_over(tmp_path):
    train(cfg_of("sine", "iterations=3", "checkpoint_every=100"), tmp_path, tensorboard=False)
    for f in (checkpoint.LATEST, checkpoint.PREVIOUS):
        (tmp_path / f).unlink(missing_ok=True)  # as if killed before the first save
    assert run("train", *SINE, *sets("iterations=3"), "--run-dir", tmp_path, "--resume").returncode == 0
    train(cfg_of("sine", "iterations=3"), tmp_path / "ref", tensorboard=False)
    assert same(final_state(tmp_path), final_state(tmp_path / "ref"))


def test_unwritable_run_dir_at_start_is_one_line(tmp_path):
    assert_one_line_error(run("train", *SINE, *sets("iterations=2"), "--run-dir", "/sys/metarl-run"), "/sys/metarl-run")


def _without_root_file_powers():
    """preexec_fn for a child that obeys file permissions even as root (chmod does not stop
    root): drop CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER from its bounding set, so
    the exec'd python lacks them. None when not root."""
    if os.geteuid() != 0:
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def drop():
        for cap in (1, 2, 3):
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    return drop


def test_run_dir_made_unwritable_mid_run_is_one_line_and_keeps_the_checkpoint():
    base = Path(tempfile.mkdtemp(prefix="metarl-ro-"))
    try:
        run_dir = base / "run"
        proc = cli("train", *SINE, *sets("iterations=100000", "checkpoint_every=20"), "--run-dir", run_dir,
                   preexec_fn=_without_root_file_powers())
        deadline = time.time() + 120
        while not (run_dir / checkpoint.LATEST).exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
            time.sleep(0.02)
        os.chmod(run_dir, 0o555)
        _, err = proc.communicate(timeout=120)
        assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", err),
                              "cannot write", "Permission denied", "is kept")
        assert checkpoint.load(run_dir)["iteration"] >= 20
        assert not list(run_dir.glob(".*.tmp"))
    finally:
        os.chmod(base / "run", 0o755) if (base / "run").exists() else None
        shutil.rmtree(base, ignore_errors=True)


# ============================================================================ damaged files


@pytest.fixture(scope="module")
def sine_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sine-run")
    train(cfg_of("sine", "iterations=20", "checkpoint_every=10"), d, tensorboard=False).close()
    return d


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def test_truncated_checkpoint_is_one_line(sine_run, tmp_path):
    rd = _copy_run(sine_run, tmp_path / "run")
    data = (rd / checkpoint.LATEST).read_bytes()
    (rd / checkpoint.LATEST).write_bytes(data[: len(data) // 3])
    p = run("train", *SINE, *sets("iterations=30", "checkpoint_every=10"), "--run-dir", rd, "--resume")
    assert_one_line_error(p, "is corrupt", "checkpoint.prev.pt")
    assert_one_line_error(run("evaluate", rd, "--tasks", "4", "--steps", "1"), "is corrupt")


def test_flipped_byte_in_checkpoint_is_one_line(sine_run, tmp_path):
    rd = _copy_run(sine_run, tmp_path / "run")
    data = bytearray((rd / checkpoint.LATEST).read_bytes())
    w = checkpoint.load(rd)["track"]["modules"]["maml"]["layers.1.weight"].numpy().tobytes()
    data[data.find(w) + 17] ^= 0x01
    (rd / checkpoint.LATEST).write_bytes(bytes(data))
    assert_one_line_error(run("evaluate", rd, "--tasks", "4", "--steps", "1"), "fails its checksum")


def test_checkpoint_that_is_a_code_pickle_is_refused_and_not_run(sine_run, tmp_path):
    rd = _copy_run(sine_run, tmp_path / "run")
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": 2, "iteration": 20, "config": {}, "track": Payload()}, rd / checkpoint.LATEST)
    assert_one_line_error(run("evaluate", rd, "--tasks", "4", "--steps", "1"), "would run code")
    assert_one_line_error(run("train", *SINE, *sets("iterations=30"), "--run-dir", rd, "--resume"), "would run code")
    assert not marker.exists()


def test_checkpoint_without_its_config_is_one_line(sine_run, tmp_path):
    rd = _copy_run(sine_run, tmp_path / "run")
    state = checkpoint.load(rd)
    del state["config"]
    checkpoint.save(rd, {k: v for k, v in state.items() if k != "format"})
    assert_one_line_error(run("evaluate", rd, "--tasks", "4", "--steps", "1"), "lacks config")


def test_evaluate_of_a_diverged_checkpoint_refuses_in_one_line(sine_run, tmp_path):
    """A checkpoint written before the state guard existed, with parameters that overflow."""
    rd = _copy_run(sine_run, tmp_path / "run")
    state = checkpoint.load(rd)
    for k, v in state["track"]["modules"]["maml"].items():
        v.fill_(1e30)
    checkpoint.save(rd, {k: v for k, v in state.items() if k != "format"})
    p = run("evaluate", rd, "--tasks", "4", "--steps", "1")
    assert_one_line_error(p, "non-finite mse", "maml", "diverged")
    assert not (rd / "eval" / "adaptation.json").exists()


@pytest.mark.parametrize("lr", [1e3, 1e5])
def test_diverging_inner_lr_never_saves_a_non_finite_state(tmp_path, lr):
    """inner.lr 1e3-1e5: the loss stays finite (~1e20) while Adam's second moment overflows.
    The run must stop, and any checkpoint on disk must be finite throughout."""
    with pytest.raises(NonFiniteLoss, match="exp_avg_sq became inf"):
        train(cfg_of("sine", "iterations=100", "checkpoint_every=20", f"inner.lr={lr}"), tmp_path, tensorboard=False)
    if checkpoint.exists(tmp_path):
        def finite(x):
            if isinstance(x, torch.Tensor):
                return not x.is_floating_point() or bool(torch.isfinite(x).all())
            if isinstance(x, dict):
                return all(finite(v) for v in x.values())
            return True
        assert finite(checkpoint.load(tmp_path)["track"])


def test_corrupted_cache_file_is_rebuilt(tmp_path):
    src = tmp_path / "source.bin"
    src.write_bytes(b"data")
    builds = []

    def build():
        builds.append(1)
        return {"x": np.arange(6, dtype=np.uint8)}

    first = cached_arrays("t", "key", [src], build, tmp_path / "cache")
    cache = next((tmp_path / "cache").glob("t-*.npz"))
    good = cache.read_bytes()
    for damage in (b"", good[: len(good) // 2], b"garbage" * 10, good[:-40] + b"\0" * 40):
        cache.write_bytes(damage)
        got = cached_arrays("t", "key", [src], build, tmp_path / "cache")
        np.testing.assert_array_equal(got["x"], first["x"])
        again = cached_arrays("t", "key", [src], build, tmp_path / "cache")  # repaired: no rebuild
        np.testing.assert_array_equal(again["x"], first["x"])
    assert len(builds) == 5


def _tiny_omniglot(folder, damage=None):
    """Two zips of one character each (20 drawers of 8x8 PNGs): a stand-in for Omniglot's."""
    import io

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for z in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(folder / f"{z}.zip", "w", compression=zipfile.ZIP_STORED) as zf:
            for d in range(1, 21):
                buf = io.BytesIO()
                Image.fromarray(np.full((8, 8), 17 * (d % 15), np.uint8)).save(buf, "PNG")
                zf.writestr(f"{z}/Alpha/character01/0001_{d:02d}.png", buf.getvalue())
    if damage:
        damage(folder / "images_background.zip")
    return folder


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_in_member(path):
    data = bytearray(path.read_bytes())
    at = data.find(b"IDAT") + 8  # inside a stored PNG: the zip's CRC-32 no longer matches
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_in_member])
def test_damaged_data_zip_without_md5sums_is_a_data_error(tmp_path, damage):
    from metarl.tasks.omniglot import load_omniglot

    assert load_omniglot(_tiny_omniglot(tmp_path / "good"), cache_dir=tmp_path / "c").n_characters == 2
    folder = _tiny_omniglot(tmp_path / "bad", damage)
    with pytest.raises(DataError, match="images_background.zip is damaged") as err:
        load_omniglot(folder, cache_dir=tmp_path / "c")
    assert "\n" not in str(err.value)
    assert not [p for p in (tmp_path / "c").glob("*.npz") if "bad" in p.name]


def test_truncated_data_zip_is_one_line_from_the_cli(tmp_path):
    folder = _tiny_omniglot(tmp_path / "data", _truncate)
    p = run("train", *FEWSHOT, *sets("iterations=2"), "--data-dir", folder, "--run-dir", tmp_path / "run",
            env=dict(os.environ, METARL_CACHE=str(tmp_path / "cache")))
    assert_one_line_error(p, "images_background.zip is damaged")


def test_evaluate_writes_an_overshooting_later_step_as_null_with_a_warning(sine_run, tmp_path):
    """Finite before adaptation but non-finite after an absurd step (Meta-SGD's one-step α reused
    at step 3 does this): a result, not a diverged checkpoint. It is written as strict JSON with
    null there, and stderr says from which step."""
    import json
    rd = _copy_run(sine_run, tmp_path / "run")
    p = run("evaluate", rd, "--tasks", "4", "--steps", "4", "--set", "inner.lr=1e8")
    assert p.returncode == 0, p.stderr
    assert "warning: maml's mse is non-finite from step" in p.stderr
    def no_constants(name):
        raise AssertionError(f"adaptation.json holds {name}: not strict JSON")
    data = json.loads((rd / "eval" / "adaptation.json").read_text(), parse_constant=no_constants)
    mean = data["methods"]["maml"]["mean"]
    assert mean[0] is not None and None in mean
    assert (rd / "eval" / "adaptation.png").exists()
