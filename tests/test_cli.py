"""The command line contract, end to end in a subprocess."""
import json
import subprocess
import sys

import pytest


def run(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "metarl.cli", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_train_evaluate_plot(tmp_path):
    rd = tmp_path / "run"
    run("train", "experiments/sine_quick.yaml", "--set", "iterations=60", "--run-dir", str(rd))
    for f in ("config.yaml", "metrics.csv", "checkpoint.pt"):
        assert (rd / f).exists()
    assert list((rd / "tensorboard").glob("events.out.tfevents.*"))
    run("evaluate", str(rd), "--tasks", "30", "--steps", "4", "--seed", "3")
    data = json.loads((rd / "eval" / "adaptation.json").read_text())
    assert data["metric"] == "mse" and data["higher_is_better"] is False
    assert data["steps"] == [0, 1, 2, 3, 4] and data["n_tasks"] == 30
    assert set(data["methods"]) == {"maml", "pretrain", "oracle"}
    assert all(len(m["mean"]) == 5 and len(m["ci95"]) == 5 for m in data["methods"].values())
    for f in ("adaptation.csv", "adaptation.png", "sine_fits.png"):
        assert (rd / "eval" / f).stat().st_size > 0
    # same seed, same numbers
    first = data["methods"]["maml"]["mean"]
    run("evaluate", str(rd), "--tasks", "30", "--steps", "4", "--seed", "3")
    assert json.loads((rd / "eval" / "adaptation.json").read_text())["methods"]["maml"]["mean"] == first
    out = tmp_path / "overlay.png"
    run("plot", str(rd), str(rd), "--out", str(out))
    assert out.stat().st_size > 0


@pytest.mark.slow  # CI budget (15 min on 2 cores): run by `make test-slow` / .ci/slow
def test_snapshots_evaluate_an_earlier_iteration(tmp_path):
    rd = tmp_path / "run"
    run("train", "experiments/sine_quick.yaml", "--set", "iterations=40", "--set", "snapshot_every=20", "--run-dir", str(rd))
    assert sorted(p.name for p in (rd / "snapshots").iterdir()) == ["iteration_20.pt", "iteration_40.pt"]
    means = {}
    for it in (20, 40):
        run("evaluate", str(rd), "--iteration", str(it), "--tasks", "10", "--steps", "2")
        data = json.loads((rd / "eval" / f"iteration_{it}" / "adaptation.json").read_text())
        means[it] = data["methods"]["maml"]["mean"]
    assert means[20] != means[40]
    run("evaluate", str(rd), "--tasks", "10", "--steps", "2", "--out", str(tmp_path / "latest"))
    assert json.loads((tmp_path / "latest" / "adaptation.json").read_text())["methods"]["maml"]["mean"] == means[40]
    p = run("evaluate", str(rd), "--iteration", "30", check=False)
    assert p.returncode == 2 and "no snapshot of iteration 30" in p.stderr and "available: 20, 40" in p.stderr


def test_user_errors_are_one_line(tmp_path):
    p = run("train", "experiments/sine_quick.yaml", "--set", "outer.lrr=1", "--run-dir", str(tmp_path / "x"), check=False)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "did you mean 'outer.lr'" in p.stderr
    p = run("evaluate", str(tmp_path / "missing"), check=False)
    assert p.returncode == 2 and "no checkpoint" in p.stderr and p.stderr.strip().count("\n") == 0
