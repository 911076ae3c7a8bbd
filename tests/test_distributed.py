"""Meta-batch sharding over torchrun ranks (metarl/distributed.py): 2 ranks, launched by the tests
themselves on gloo (CPU), against the same computation in one process.

References: the single-process run of the same config in this process (the union of the ranks'
tasks is its meta-batch), in float64 so that equality is to rounding (tolerances 1e-10). A
check that the ranks agree with each other alone could pass with both wrong; each one is
compared with one process. The ranks are spawned processes joined as torchrun's workers would be
(its environment variables); the dead-rank test runs the real CLI that way, and a slow test runs
the CLI under torchrun itself.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from metarl import config, distributed
from metarl.training import make_track, seed_everything

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, size: int, port: int) -> dict:
    return {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "60"}


def _rank_main(rank, size, port, out, cases):
    os.environ.update(_env(rank, size, port))
    torch.set_num_threads(1)
    distributed.init_from_env()
    try:
        results = {key: globals()[fn](**kwargs) for key, (fn, kwargs) in cases.items()}
    except BaseException:
        distributed.shutdown()
        raise
    distributed.shutdown(wait=True)
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _on_ranks(out: Path, cases: dict, size: int = 2) -> list[dict]:
    """Each case ``key: (function name, kwargs)`` run in turn on ``size`` ranks (spawned
    processes in one gloo group, started once: a start costs seconds); per rank, key → result."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, size, port, str(out), cases)) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(size)]


SUPERVISED = [("sine", a) for a in ("maml", "fomaml", "meta_sgd", "anil", "maml_pp", "imaml", "cavia")]
OUTER = {"closed_form": {"fisher": "closed_form", "cg_damping": 0.1}, "autograd": {"fisher": "autograd", "cg_damping": 0.1},
         "vpg": {"optimizer": "vpg", "lr": 0.01}}


def _sine_run_cfg(iterations: int):
    return config.from_dict({"track": "sine", "meta_batch": 5, "iterations": iterations, "checkpoint_every": 3,
                             "log_every": 1, "baselines": ["pretrain"]})


def _train_case(run_dir: str, iterations: int, resume: bool):
    """``metarl.training.train`` on every rank (float32, as the CLI runs): only rank 0 writes."""
    from metarl.training import train

    torch.set_default_dtype(torch.float32)
    train(_sine_run_cfg(iterations), run_dir, resume=resume, tensorboard=False).close()
    return sorted(n for n in os.listdir(run_dir) if not n.startswith(".")) if distributed.world().is_main else None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, runs):
    """The 2-rank cases of this file, computed by one pair of spawned ranks (a start costs
    seconds): sine gradients, TRPO steps, a fresh run (runs/two) and the resumption of a
    single-process run (runs/one_then_two, 3 iterations in this process first)."""
    from metarl.training import train

    train(_sine_run_cfg(3), runs / "one_then_two", tensorboard=False).close()
    cases = {f"{kind}-{alg}": ("_supervised_case", {"kind": kind, "algorithm": alg}) for kind, alg in SUPERVISED}
    cases.update({f"rl-{name}": ("_rl_case", {"outer": outer}) for name, outer in OUTER.items()})
    cases["two"] = ("_train_case", {"run_dir": str(runs / "two"), "iterations": 3, "resume": False})
    cases["one_then_two"] = ("_train_case", {"run_dir": str(runs / "one_then_two"), "iterations": 6, "resume": True})
    with pytest.MonkeyPatch.context() as mp_:
        mp_.chdir(ROOT)
        return _on_ranks(tmp_path_factory.mktemp("ranks"), cases)


class _Float64Tasks:
    """The track's task distribution with float64 batches (the tests compare in float64)."""

    def __init__(self, tasks):
        self.tasks = tasks

    def sample(self, n, rng):
        return self.tasks.sample(n, rng).to(torch.float64)


def _supervised_cfg(kind: str, algorithm: str):
    if kind == "sine":
        extra = {"maml_pp": {"grad_clip": None}} if algorithm == "maml_pp" else {}  # clipping a share is refused
        return config.from_dict({"track": "sine", "algorithm": algorithm, "meta_batch": 5, "baselines": [],
                                 "inner": {"lr": 0.01, "steps": 2}, **extra})
    return config.load("experiments/omniglot_5w1s.yaml", [f"algorithm={algorithm}", "meta_batch=3", "episode.n_way=3",
                                                         "model.hidden=4", "baselines=[]", "inner.task_workers=1",
                                                         "inner.steps=2"])


def _supervised_case(kind: str, algorithm: str = "maml", iterations: int = 3):
    """(reduced meta-gradient of iteration 0, parameters after ``iterations``, metrics of each)."""
    torch.set_default_dtype(torch.float64)
    cfg = _supervised_cfg(kind, algorithm)
    rng = seed_everything(cfg.seed)
    track = make_track(cfg)
    track.train_tasks = _Float64Tasks(track.train_tasks)
    params = {f"{k}.{n}": p for k, m in track.method.modules.items() for n, p in m.named_parameters()}
    grads, metrics = None, []
    for it in range(iterations):
        metrics.append(track.train_step(it, rng))
        if it == 0:
            grads = {k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None}
    return grads, {k: p.detach().clone() for k, p in params.items()}, metrics


def _close(a: dict, b: dict, tol=1e-10):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float64
        err = (a[k] - b[k]).abs().max().item()
        assert err <= tol * (1 + b[k].abs().max().item()), (k, err)


def _check_supervised(ranks, kind, algorithm):
    one_grads, one_params, one_metrics = _supervised_case(kind, algorithm)
    assert one_grads and any(g.abs().max() > 0 for g in one_grads.values())
    for grads, params, metrics in ranks:
        _close(grads, one_grads)
        _close(params, one_params)
        for m, ref in zip(metrics, one_metrics):
            # metrics: the whole batch's (accuracy is averaged in float32 by the metric itself), except
            # a norm of the rank's own gradient (iMAML's grad_norm), which is the ranks' weighted mean
            assert m.keys() == ref.keys(), (m, ref)
            assert all(abs(m[k] - ref[k]) <= 1e-6 * (1 + abs(ref[k])) for k in ref if not k.startswith("grad_norm/")), (m, ref)
    assert all(torch.equal(ranks[0][1][k], ranks[1][1][k]) for k in one_params)  # bitwise the same on every rank


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind,algorithm", SUPERVISED)
def test_two_ranks_give_the_single_process_meta_gradient_and_parameters(two_ranks, kind, algorithm):
    """The outer gradient of a 2-rank sine meta-batch (ranks of 2 and 3 tasks) is the
    single-process gradient, every rank ends each iteration with the same parameters, equal to
    the single-process ones, and the metrics every rank returns are the whole batch's."""
    _check_supervised([r[f"{kind}-{algorithm}"] for r in two_ranks], kind, algorithm)


@pytest.mark.slow
@pytest.mark.usefixtures("float64")
def test_two_ranks_give_the_single_process_omniglot_meta_gradient(tmp_path, monkeypatch):
    """The same on Omniglot (3-way 1-shot, Conv4 with 4 filters, ranks of 1 and 2 episodes, two
    second-order inner steps through batch norm). Slow only for building the Omniglot cache."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("METARL_CACHE", str(tmp_path / "cache"))  # the spawned ranks inherit it
    make_track(_supervised_cfg("omniglot", "maml"))  # builds the cache once, before the ranks read it
    ranks = _on_ranks(tmp_path, {"o": ("_supervised_case", {"kind": "omniglot", "algorithm": "maml"})})
    _check_supervised([r["o"] for r in ranks], "omniglot", "maml")


def _nav_cfg(**extra):
    data = {"track": "rl", "meta_batch": 3, "seed": 3,
            "env": {"id": "metarl/Navigation2D-v0", "kwargs": {"normalize_actions": True, "goal_radius": 0.01, "horizon": 20}},
            "policy": {"hidden": [8, 8]}, "inner": {"lr": 0.1, "episodes": 3}, "sampler": {"workers": 0}}
    data.update(extra)
    return config.from_dict(data)


def _rl_case(iterations: int = 2, **extra):
    torch.set_default_dtype(torch.float64)
    cfg = _nav_cfg(**extra)
    rng = seed_everything(cfg.seed)
    track = make_track(cfg)
    try:
        metrics = [track.train_step(it, rng) for it in range(iterations)]
    finally:
        track.close()
    return {k: p.detach().clone() for k, p in track.policy.named_parameters()}, metrics


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("outer", list(OUTER))
def test_two_ranks_take_the_single_process_outer_step(two_ranks, outer):
    """MAML-TRPO on a tiny 2D navigation (ranks of 1 and 2 tasks): each rank collects its share
    of the tasks (the episodes one process collects for them), and the reduced surrogate
    gradient, Fisher-vector products and line search give the single-process TRPO step,
    iteration after iteration (the same returns, KL, line-search fraction and parameters), with
    either Fisher path; and the vanilla policy gradient (Adam) its single-process step."""
    ranks = [r[f"rl-{outer}"] for r in two_ranks]
    # TRPO at damping 0.1: with 1e-5 on this tiny, near-singular Fisher, 10 CG iterations amplify
    # the rounding of a regrouped sum (Σ over ranks of shares vs one mean) to 1e-5 even in float64
    one_params, one_metrics = _rl_case(outer=OUTER[outer])
    keys = ["return/pre", "return/post", "loss/surrogate"] + (["trpo/kl", "trpo/step_fraction"] if outer != "vpg" else [])
    for params, metrics in ranks:
        _close(params, one_params)
        for m, ref in zip(metrics, one_metrics):
            for k in keys:
                assert abs(m[k] - ref[k]) <= 1e-10 * (1 + abs(ref[k])), (k, m[k], ref[k])
    if outer != "vpg":
        assert all(m["trpo/accepted"] == 1.0 for m in one_metrics)  # the line search's reduced loss and KL accepted it


def test_a_share_of_tasks_is_collected_as_its_slice_of_the_whole_batch():
    """Collector.collect(..., shard=(first, total)): the slice of one collection over all tasks,
    for every contiguous share (reset seeds by global index, noise drawn for the whole batch)."""
    cfg = _nav_cfg()
    track = make_track(cfg)
    from metarl.rollouts import Collector

    tasks = track.task_env.sample_tasks(5, np.random.default_rng(0))
    col = Collector(cfg.env.id, env_kwargs=cfg.env.kwargs, n_workers=0)
    try:
        whole = col.collect(track.policy, None, tasks, 2, seed=5)
        for lo, hi in [(0, 2), (2, 5), (4, 5)]:
            part = col.collect(track.policy, None, tasks[lo:hi], 2, seed=5, shard=(lo, 5))
            n = part.obs.shape[1]
            assert torch.equal(part.obs, whole.obs[lo:hi, :n]) and torch.equal(part.actions, whole.actions[lo:hi, :n])
        with pytest.raises(ValueError, match="do not fit"):
            col.collect(track.policy, None, tasks[3:5], 2, seed=5, shard=(4, 5))
    finally:
        col.close()
        track.close()


# ------------------------------------------------------------------------- the CLI under torchrun

def _cli(args, nproc=None, timeout=240, env=None):
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "60", **(env or {})}
    if nproc is None:
        cmd = [sys.executable, "-m", "metarl"] + args
    else:
        cmd = [str(TORCHRUN), "--nproc-per-node", str(nproc), "--master-port", str(_free_port()), "-m", "metarl"] + args
    return subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=timeout)


def _weights(run_dir):
    state = torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)
    return state["iteration"], state["track"]["modules"]


def _same_run(got_dir, ref_dir, tol=1e-5):
    it, ref = _weights(ref_dir)
    it_got, got = _weights(got_dir)
    assert it_got == it
    for module in ref:
        for k in ref[module]:
            assert torch.allclose(got[module][k], ref[module][k], rtol=tol, atol=tol), (got_dir, module, k)
    rows = (Path(got_dir) / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(it))  # one row per iteration: rank 0 alone logs


def test_resume_across_rank_counts(two_ranks, runs):
    """A 2-rank run resumed in one process, and a single-process run resumed on 2 ranks, end
    where 6 single-process iterations end (float32: to rounding; the checkpoint holds no
    per-rank state). Rank 0 alone wrote each run directory."""
    from metarl.training import train

    assert two_ranks[0]["two"] == ["checkpoint.pt", "config.yaml", "metrics.csv"]  # no TensorBoard: tensorboard=False
    train(_sine_run_cfg(6), runs / "one", tensorboard=False).close()
    train(_sine_run_cfg(6), runs / "two", resume=True, tensorboard=False).close()
    _same_run(runs / "two", runs / "one")
    _same_run(runs / "one_then_two", runs / "one")


SINE = ["train", "sine", "--set", "meta_batch=4", "--set", "checkpoint_every=3", "--set", "log_every=1",
        "--set", "baselines=[pretrain]"]


@pytest.mark.slow
def test_resume_across_rank_counts_through_torchrun(tmp_path):
    """The same through the command line: `torchrun --nproc-per-node 2 -m metarl train`, resumed
    by `metarl train --resume`, and the other way round."""
    one = _cli(SINE + ["--set", "iterations=6", "--run-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two_then_one = _cli(SINE + ["--set", "iterations=3", "--run-dir", str(tmp_path / "a")], nproc=2)
    assert two_then_one.returncode == 0, two_then_one.stderr
    assert "on 2 ranks" in two_then_one.stdout
    assert _cli(SINE + ["--set", "iterations=6", "--run-dir", str(tmp_path / "a"), "--resume"]).returncode == 0
    assert _cli(SINE + ["--set", "iterations=3", "--run-dir", str(tmp_path / "b")]).returncode == 0
    p = _cli(SINE + ["--set", "iterations=6", "--run-dir", str(tmp_path / "b"), "--resume"], nproc=2)
    assert p.returncode == 0, p.stderr
    _same_run(tmp_path / "a", tmp_path / "one", tol=1e-4)
    _same_run(tmp_path / "b", tmp_path / "one", tol=1e-4)


@pytest.mark.parametrize("sets,message", [
    (["track=sine", "algorithm=reptile"], "its outer update is the interpolation"),
    (["track=sine", "algorithm=alpha_maml"], "hypergradients"),
    (["track=sine", "algorithm=meta_lstm"], "--set meta_lstm.clip_norm=0 to shard it"),
    (["track=sine", "algorithm=cavia", "cavia.grad_clip=10"], "--set cavia.grad_clip=null"),
    (["track=rl", "inner.timesteps=100", "sampler.workers=0"], "inner.timesteps"),
    (["track=sine", "meta_batch=1"], "meta_batch 1 is smaller than the 2 ranks"),
])
def test_what_cannot_be_sharded_is_refused_in_one_line(monkeypatch, sets, message):
    """Under torchrun (a world of 2 here; the check itself does not communicate) a method whose
    update is not a mean gradient, or a meta-batch smaller than the world, stops with one line."""
    from metarl.config import ConfigError

    data = dict(s.split("=", 1) for s in sets)
    cfg = config.from_dict(config.merge({"track": data.pop("track")}, config.parse_overrides([f"{k}={v}" for k, v in data.items()])))
    track = make_track(cfg)
    try:
        distributed.check_supported(cfg, track.method)  # one process: everything runs
        monkeypatch.setattr(distributed, "_WORLD", distributed.World(rank=0, size=2))
        with pytest.raises(ConfigError, match="torchrun|ranks") as e:
            distributed.check_supported(cfg, track.method)
        assert message in str(e.value) and "\n" not in str(e.value)
    finally:
        track.close()


def test_a_killed_rank_ends_the_others_with_one_line_within_the_timeout(tmp_path):
    """Rank 1 is killed mid-run (two ranks started by hand, as torchrun would, so that no agent
    tears the other down): rank 0 stops with one `metarl: error:` line naming the dead peer, well
    within the process-group timeout (5 s here), instead of hanging."""
    port = _free_port()
    args = [sys.executable, "-m", "metarl", "train", "sine", "--set", "iterations=1000000", "--set", "meta_batch=4",
            "--set", "checkpoint_every=1000000", "--run-dir", str(tmp_path / "k")]
    procs = [subprocess.Popen(args, cwd=ROOT, env={**os.environ, **_env(r, 2, port), distributed.TIMEOUT_ENV: "5"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "k" / "metrics.csv").exists():  # both ranks are training
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.2)
        killed = time.monotonic()
        procs[1].send_signal(signal.SIGKILL)
        _, err = procs[0].communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("metarl: error: rank 0 of 2:"), err
    assert "another rank died or did not answer within 5 s" in lines[0]
    assert took < 30
