"""Checks every method's tests share: bitwise resume and the CLI's train → evaluate contract.

Each method's test file states what is particular to it (its config, its meta-parameters, its
`step_sizes` record); what a resume must restore, and how the CLI is driven, is said once here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from metarl.training import train


def assert_same_training_state(full, resumed) -> None:
    """Every module's tensors (parameters and buffers) and every optimizer's state and step sizes
    are bitwise equal, and there is optimizer state to compare (a run that never stepped proves
    nothing), except for plain SGD, which keeps none."""
    assert full.modules.keys() == resumed.modules.keys(), (sorted(full.modules), sorted(resumed.modules))
    for name in full.modules:
        a, b = full.modules[name].state_dict(), resumed.modules[name].state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert full.optimizers.keys() == resumed.optimizers.keys()
    for name in full.optimizers:
        sa, sb = full.optimizers[name].state_dict(), resumed.optimizers[name].state_dict()
        assert [g.get("lr") for g in sa["param_groups"]] == [g.get("lr") for g in sb["param_groups"]], name
        stateless = isinstance(full.optimizers[name], torch.optim.SGD) and all(g["momentum"] == 0 for g in sa["param_groups"])
        assert sa["state"].keys() == sb["state"].keys() and (len(sa["state"]) > 0 or stateless), name
        for i in sa["state"]:
            for key, v in sa["state"][i].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][i][key])), (name, i, key)


def resume_round_trip(make_cfg: Callable[[int], object], tmp_path: Path, total: int, split: int):
    """Train ``total`` iterations in one go, and ``split`` then ``--resume`` to ``total`` in another
    run directory; assert the two end states are bitwise equal and return (full, resumed)."""
    full = train(make_cfg(total), tmp_path / "full", tensorboard=False)
    train(make_cfg(split), tmp_path / "split", tensorboard=False)
    resumed = train(make_cfg(total), tmp_path / "split", resume=True, tensorboard=False)
    assert_same_training_state(full, resumed)
    return full, resumed


def run_cli(*args: str, env: Optional[Mapping[str, str]] = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m metarl.cli ARGS`` in a fresh process; fails the test with its stderr unless it exits 0."""
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "metarl.cli", *args], capture_output=True, text=True,
                       timeout=timeout, env=full_env)
    assert p.returncode == 0, p.stderr
    return p


def cli_train_and_evaluate(config: str, run_dir: Path, sets: Sequence[str], evaluate: Sequence[str] = (),
                           env: Optional[Mapping[str, str]] = None, timeout: float = 600) -> dict:
    """``metarl train CONFIG --run-dir RUN --set ...`` then ``metarl evaluate RUN EVALUATE...``, as a
    user runs them; returns the adaptation.json the evaluation wrote."""
    run_cli("train", config, "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)], env=env, timeout=timeout)
    run_cli("evaluate", str(run_dir), *evaluate, env=env, timeout=timeout)
    return json.loads((Path(run_dir) / "eval" / "adaptation.json").read_text())
