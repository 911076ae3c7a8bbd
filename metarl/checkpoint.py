"""Checkpoints that survive interruption: atomic writes, all RNG states, a kept previous copy.

A resumed run must end bitwise identical to an uninterrupted one, so a checkpoint holds every
source of randomness (torch, NumPy's task-sampling generator, Python's ``random``) next to the
parameters and optimizer state. Files are written to a temporary name and renamed, so a crash
mid-write never leaves a half file under the real name, and the previous good checkpoint is kept
as ``checkpoint.prev.pt``. Loading uses ``weights_only=True``: a checkpoint is data, not code.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the one-line way out."""


def rng_state(np_rng: np.random.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np_rng.bit_generator.state,
            "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2]}


def restore_rng(state: dict, np_rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np_rng.bit_generator.state = state["numpy"]
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


SNAPSHOTS = "snapshots"


def _written_beside(target: Path, state: dict[str, Any]) -> Path:
    """``state`` fully written and synced to a temporary file next to ``target``, for an atomic rename."""
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        torch.save({"format": FORMAT, **state}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def save(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``run_dir/checkpoint.pt``; the one it replaces becomes ``checkpoint.prev.pt``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / LATEST
    tmp = _written_beside(target, state)
    if target.exists():
        os.replace(target, run_dir / PREVIOUS)
    os.replace(tmp, target)
    return target


def snapshot_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / SNAPSHOTS / f"iteration_{int(iteration)}.pt"


def save_snapshot(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write a kept copy of ``state`` as ``run_dir/snapshots/iteration_N.pt`` (papers
    report fixed iterations, e.g. MAML's HalfCheetahDir model is its iteration 100)."""
    path = snapshot_path(run_dir, state["iteration"])
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(_written_beside(path, state), path)
    return path


def snapshots(run_dir: str | Path) -> list[int]:
    """Iterations that have a snapshot in ``run_dir``, ascending."""
    found = Path(run_dir, SNAPSHOTS).glob("iteration_*.pt")
    return sorted(int(p.stem.split("_")[1]) for p in found if p.stem.split("_")[1].isdigit())


def load(run_dir: str | Path, iteration: int | None = None) -> dict[str, Any]:
    """Read ``run_dir/checkpoint.pt``, or the snapshot of ``iteration``; a missing or corrupt file
    raises :class:`CheckpointError`."""
    run_dir = Path(run_dir)
    if iteration is not None:
        path = snapshot_path(run_dir, iteration)
        if not path.exists():
            have = snapshots(run_dir)
            raise CheckpointError(f"no snapshot of iteration {iteration} in {run_dir}: "
                                  + (f"available: {', '.join(map(str, have))}" if have else
                                     "train with --set snapshot_every=N to keep some"))
        return _read(path, run_dir)
    path = run_dir / LATEST
    if not path.exists():
        raise CheckpointError(f"no checkpoint in {run_dir}: train first (metarl train CONFIG --run-dir {run_dir}) or drop --resume")
    return _read(path, run_dir)


def _read(path: Path, run_dir: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/garbled files
        prev = run_dir / PREVIOUS
        fix = (f"the previous good checkpoint is {prev}: `mv {prev} {path}` to resume from it"
               if prev.exists() and path.name == LATEST else "delete it to start over")
        raise CheckpointError(f"checkpoint {path} is corrupt ({type(e).__name__}): {fix}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a metarl checkpoint of format {FORMAT}: point --run-dir at a metarl run")
    return state
