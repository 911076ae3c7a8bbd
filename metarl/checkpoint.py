"""Checkpoints that survive interruption: atomic writes, all RNG states, a kept previous copy.

A resumed run must end bitwise identical to an uninterrupted one, so a checkpoint holds every
source of randomness (torch, NumPy's task-sampling generator, Python's ``random``) next to the
parameters and optimizer state. Files are written to a temporary name, fsynced and renamed, so a
crash mid-write never leaves a half file under the real name; the previous good checkpoint is kept
as ``checkpoint.prev.pt`` by a hard link (or copy) made *before* the rename, so at every instant a
complete ``checkpoint.pt`` exists (a SIGKILL between two renames used to leave none). Each file
carries a SHA-256 of its contents (format 2), so flipped bytes on disk are refused instead of
resumed from; format-1 files (no checksum, written before) still load, unverified. Loading uses
``weights_only=True``: a checkpoint is data, not code.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
FORMAT = 2
FORMATS = (1, 2)  # 1: no checksum (still loadable, unverified)


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


def checksum(obj: Any) -> str:
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes and every scalar's
    ``repr``, walked in order. Computed on the loaded values, so it does not depend on how
    ``torch.save`` lays out its zip, and any flipped byte that changes a value changes it."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__[0]}{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"S{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (a power cut must not undo them)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(target: Path) -> Path:
    return target.parent / f".{target.name}.{os.getpid()}.tmp"


def _written_beside(target: Path, state: dict[str, Any]) -> Path:
    """``state`` fully written and synced to a temporary file next to ``target``, for an atomic rename."""
    tmp = _tmp_name(target)
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format": FORMAT, "checksum": checksum(state), **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _keep_previous(target: Path, previous: Path) -> None:
    """Make ``previous`` a copy of ``target`` while ``target`` stays in place: a hard link (no
    data copied) or, where links are unsupported, a synced copy, then an atomic rename."""
    tmp = _tmp_name(previous)
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:
        with open(target, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
    os.replace(tmp, previous)


def save(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``run_dir/checkpoint.pt``; the one it replaces becomes ``checkpoint.prev.pt``.

    Order: new file written and synced; the current one linked as the previous; then one
    ``os.replace`` puts the new one in place. A kill at any point leaves a complete
    ``checkpoint.pt`` (the old or the new one) and at worst a stale temporary file
    (:func:`remove_stale`)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / LATEST
    tmp = _written_beside(target, state)
    try:
        if target.exists():
            _keep_previous(target, run_dir / PREVIOUS)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(run_dir)
    return target


def remove_stale(run_dir: str | Path) -> list[Path]:
    """Delete temporary files a killed writer left in ``run_dir`` (and its snapshots folder).

    Call only while holding the run's lock (no other writer is alive). A temporary file is
    never needed: ``checkpoint.pt`` was complete at every instant, and a newer state that was
    still being written is recomputed bitwise on ``--resume``."""
    run_dir = Path(run_dir)
    stale = [p for d in (run_dir, run_dir / SNAPSHOTS) if d.is_dir() for p in d.glob(".*.pt.*.tmp")]
    stale += list(run_dir.glob(".metrics.csv.*.tmp"))  # metarl.logging's rewrite on resume
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def exists(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint ``load`` would read."""
    return any((Path(run_dir) / name).exists() for name in (LATEST, PREVIOUS))


def snapshot_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / SNAPSHOTS / f"iteration_{int(iteration)}.pt"


def save_snapshot(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write a kept copy of ``state`` as ``run_dir/snapshots/iteration_N.pt`` (papers
    report fixed iterations, e.g. MAML's HalfCheetahDir model is its iteration 100)."""
    path = snapshot_path(run_dir, state["iteration"])
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(_written_beside(path, state), path)
    _fsync_dir(path.parent)
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
    if not path.exists() and (run_dir / PREVIOUS).exists():
        path = run_dir / PREVIOUS  # left by a metarl before 0.1.1, which could lose checkpoint.pt mid-rotation
    if not path.exists():
        raise CheckpointError(f"no checkpoint in {run_dir}: train first (metarl train CONFIG --run-dir {run_dir}) or drop --resume")
    return _read(path, run_dir)


def _read(path: Path, run_dir: Path) -> dict[str, Any]:
    prev = run_dir / PREVIOUS
    fix = (f"the previous good checkpoint is {prev}: `mv {prev} {path}` to resume from it"
           if prev.exists() and path.name == LATEST else "delete it to start over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"refusing {path}: it is a pickle that would run code or build objects, not a "
                                  f"metarl checkpoint (weights_only=True); {fix}") from None
        raise CheckpointError(f"checkpoint {path} is corrupt (UnpicklingError): {fix}") from None
    except Exception as e:  # torch raises several types for truncated/garbled files
        raise CheckpointError(f"checkpoint {path} is corrupt ({type(e).__name__}): {fix}") from None
    if not isinstance(state, dict) or state.get("format") not in FORMATS:
        raise CheckpointError(f"{path} is not a metarl checkpoint of format {FORMAT}: point --run-dir at a metarl run")
    if state["format"] >= 2:
        stored = state.pop("checksum", None)
        if stored != checksum({k: v for k, v in state.items() if k != "format"}):
            raise CheckpointError(f"checkpoint {path} fails its checksum (changed on disk): {fix}")
    missing = [k for k in ("iteration", "config", "track", "rng") if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)} (not written by `metarl train`): {fix}")
    return state
