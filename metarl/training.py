"""The outer loop every track shares: sample, update, log, checkpoint, resume, stop cleanly.

A track (see :mod:`metarl.tracks`) owns the problem and the method its config names (``algorithm:``,
:mod:`metarl.registry`) owns the update rule; this loop owns everything that must be the same for
all of them: seeding, the RNG that samples tasks, logging, atomic checkpoints every
``checkpoint_every`` iterations and on SIGINT/SIGTERM, bitwise-exact ``--resume``, and stopping on
a non-finite loss without touching the last good checkpoint.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

from . import checkpoint, config as configlib, distributed
from .logging import NullLogger, RunLogger
from .threads import torch_threads


class NonFiniteLoss(FloatingPointError):
    pass


class RunDirError(RuntimeError):
    pass


def check_finite(metrics: dict[str, float], iteration: int) -> None:
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    if bad:
        k, v = next(iter(bad.items()))
        raise NonFiniteLoss(f"{k} became {v} at iteration {iteration}: lower the learning rates "
                            f"(--set outer.lr=..., --set inner.lr=...) and --resume from the last good checkpoint")


def _resumable(key: str, keys: list[str]) -> bool:
    """May ``key`` change on --resume? ``keys``: the config's fields declared with
    :func:`metarl.config.resumable` (a section's name covers its fields)."""
    return any(key == r or key.startswith(r + ".") for r in keys)


def _changed_keys(now: dict, saved: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ. Keys the saved config lacks come from a newer metarl and
    keep their defaults, so a run started with an older version can still be resumed."""
    out = []
    for k, v in now.items():
        if k not in saved:
            continue
        if isinstance(v, dict) and isinstance(saved[k], dict):
            out += _changed_keys(v, saved[k], f"{prefix}{k}.")
        elif v != saved[k]:
            out.append(prefix + k)
    return out


def check_state_finite(state, iteration: int, where: str = "") -> None:
    """Raise :class:`NonFiniteLoss` if any floating tensor of ``state`` (parameters, optimizer
    moments) holds inf/NaN. A finite loss does not prove a finite state: with inner.lr 1e3-1e5
    losses stayed near 1e20 while Adam's second moment overflowed to inf, and every checkpoint
    then held it. Checked before each save, so the last checkpoint on disk stays a good one."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            kind = "nan" if bool(torch.isnan(state).any()) else "inf"
            raise NonFiniteLoss(f"{where or 'state'} became {kind} at iteration {iteration}: lower the learning rates "
                                f"(--set outer.lr=..., --set inner.lr=...) and --resume from the last good checkpoint")
    elif isinstance(state, dict):
        for k, v in state.items():
            check_state_finite(v, iteration, f"{where}.{k}" if where else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            check_state_finite(v, iteration, f"{where}[{i}]")


LOCK = ".lock"


class _RunLock:
    """An exclusive ``fcntl.lockf`` lock on ``RUN_DIR/.lock`` for the life of one ``train``.

    Two trainers on one run directory would mix checkpoints and interleave ``metrics.csv``; the
    second refuses in one line instead. POSIX record locks are dropped by the kernel when the
    holder dies (SIGKILL included), so no stale lock outlives a run, and fork children (collector
    workers) do not inherit them."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.fd = None

    def __enter__(self):
        if fcntl is None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(f"{self.path.parent} is in use by another `metarl train` (pid {holder}): "
                              f"wait for it to finish or choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file stays (removing it would race a waiter)
            self.fd = None


def _holds_a_run(run_dir: Path) -> bool:
    """Anything a fresh ``train`` would overwrite or truncate: checkpoints, snapshots, metrics."""
    return any((run_dir / name).exists() for name in (checkpoint.LATEST, checkpoint.PREVIOUS, "metrics.csv")) \
        or bool(checkpoint.snapshots(run_dir))


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def make_track(cfg):
    from .registry import build_track

    return build_track(cfg)


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the current iteration.

    A second signal ends the run at once (an iteration can take minutes): it raises
    KeyboardInterrupt wherever the main thread is; the last checkpoint on disk stays valid
    because every write is atomic."""

    def __init__(self):
        self.signal = None
        self.count = 0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt(f"stopped at once by a second signal ({signal.Signals(signum).name})")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _state(track, cfg, iteration: int, rng: np.random.Generator) -> dict:
    return {"iteration": iteration, "config": configlib.to_dict(cfg), "track": track.state_dict(),
            "rng": checkpoint.rng_state(rng)}


def train(cfg, run_dir: str | Path, resume: bool = False, tensorboard: bool = True):
    """Run (or continue) meta-training of ``cfg`` in ``run_dir``; returns the trained track.

    Raises :class:`RunDirError` rather than overwrite a run that has a checkpoint. Under torchrun
    (:mod:`metarl.distributed`) every rank calls this; rank 0 alone locks, checks and writes the
    run directory (logs, TensorBoard, metrics.csv, checkpoints), the others only read the
    checkpoint they resume from, and a rank that fails to start makes the others stop too."""
    run_dir = Path(run_dir)
    world = distributed.world()
    lock = None
    try:
        try:
            if world.is_main:
                try:
                    run_dir.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise RunDirError(f"cannot create run directory {run_dir} ({e.strerror}): choose a writable --run-dir") from None
                try:
                    lock = _RunLock(run_dir).__enter__()
                except PermissionError as e:
                    raise RunDirError(f"cannot write in run directory {run_dir} ({e.strerror}): fix its permissions or choose "
                                      f"another --run-dir") from None
            started = _start(cfg, run_dir, resume, tensorboard and world.is_main)
        except BaseException:
            world.agree(False, "start-up")
            raise
        world.agree(True, "start-up")
        return _loop(cfg, run_dir, *started)
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        raise RunDirError(_disk_message(e, run_dir)) from None
    finally:
        if lock is not None:
            lock.__exit__()


_DISK_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _disk_message(e: OSError, run_dir: Path, last_saved: int | None = None) -> str:
    kept = (f"; the checkpoint of iteration {last_saved} is kept: --resume once it is fixed" if last_saved else "")
    return (f"cannot write {e.filename or run_dir} ({e.strerror}): fix the permissions or free space of {run_dir}, "
            f"or choose another --run-dir{kept}")


def _start(cfg, run_dir: Path, resume: bool, tensorboard: bool):
    """The track, the task-sampling RNG, the first iteration and the logger of a (resumed) run."""
    world = distributed.world()
    if world.is_main:
        if not resume and _holds_a_run(run_dir):
            raise RunDirError(f"{run_dir} already holds a run: pass --resume to continue it or choose another --run-dir")
        checkpoint.remove_stale(run_dir)  # we hold the lock: any temporary file is a killed writer's
    if resume and not checkpoint.exists(run_dir) and (run_dir / "config.yaml").exists():
        resume = False  # killed before its first checkpoint: nothing to continue, so start it over
    rng = seed_everything(cfg.seed)
    track = make_track(cfg)
    track.run_dir = run_dir
    start = 0
    try:
        distributed.check_supported(cfg, track.method)
        if resume:
            state = checkpoint.load(run_dir)
            saved = dict(state["config"])
            now = configlib.to_dict(cfg)
            keys = configlib.resumable_keys(type(cfg))
            changed = [k for k in _changed_keys(now, saved) if not _resumable(k, keys)]
            if changed:
                raise RunDirError(f"--resume with a different config ({', '.join(changed)} changed): only "
                                  f"{', '.join(keys)} may change; use a new --run-dir otherwise")
            track.load_state_dict(state["track"])
            checkpoint.restore_rng(state["rng"], rng)
            start = int(state["iteration"])
        if world.is_main:
            (run_dir / "config.yaml").write_text(configlib.dump(cfg))
            logger = RunLogger(run_dir, cfg.iterations, start, tensorboard=tensorboard)
            logger.hyperparameters(configlib.to_dict(cfg))
        else:
            logger = NullLogger()
    except BaseException:
        track.close()
        raise
    return track, rng, start, logger


def _loop(cfg, run_dir: Path, track, rng: np.random.Generator, start: int, logger):
    """Iterations ``start``..``cfg.iterations``: step, log, checkpoint, stop cleanly."""
    world = distributed.world()
    last_saved = start
    try:
        with _StopFlag() as stop, torch_threads(cfg.torch_threads):
            for it in range(start, cfg.iterations):
                metrics = track.train_step(it, rng)
                check_finite(metrics, it)
                done = it + 1
                if it % cfg.log_every == 0 or done == cfg.iterations:
                    logger.log(it, metrics)
                logger.advance()
                stopping = world.any(stop.signal is not None)  # a signal to one rank stops them all here
                snap = cfg.snapshot_every > 0 and done % cfg.snapshot_every == 0
                if snap or done % cfg.checkpoint_every == 0 or done == cfg.iterations or stopping:
                    state = _state(track, cfg, done, rng)
                    check_state_finite(state["track"], it)
                    if world.is_main:
                        checkpoint.save(run_dir, state)
                        if snap:
                            checkpoint.save_snapshot(run_dir, state)
                    last_saved = done
                if stopping:
                    raise KeyboardInterrupt(f"stopped by signal {stop.signal or 'of another rank'} after iteration {done}; "
                                            f"checkpoint saved: continue with --resume")
    except FloatingPointError as e:
        track.close()
        where = f"last good checkpoint: iteration {last_saved} in {run_dir}" if last_saved else "no checkpoint was saved yet"
        raise NonFiniteLoss(f"{e} ({where})") from None
    except OSError as e:
        track.close()
        if e.errno not in _DISK_ERRNOS:
            raise
        raise RunDirError(_disk_message(e, run_dir, last_saved)) from None
    except KeyboardInterrupt as e:
        track.close()
        if "second signal" in str(e):
            kept = f"checkpoint of iteration {last_saved} kept: continue with --resume" if last_saved else "no checkpoint was saved yet"
            raise KeyboardInterrupt(f"{e}; {kept}") from None
        raise
    except BaseException:
        track.close()
        raise
    finally:
        logger.close()
    return track  # the caller closes it (it may still evaluate with its workers)


def load_track(run_dir: str | Path, overrides: list[str] | None = None, iteration: int | None = None):
    """Rebuild a trained track from ``run_dir`` (config + latest checkpoint, or the snapshot of
    ``iteration``) for evaluation.

    ``overrides`` (``--set`` pairs) change evaluation-time settings, e.g. ``sine_eval.k_shot=5``
    to test a K=10-trained model with 5 support points."""
    state = checkpoint.load(run_dir, iteration)
    cfg = configlib.from_dict(configlib.merge(state["config"], configlib.parse_overrides(overrides or [])))
    track = make_track(cfg)
    track.load_state_dict(state["track"])
    track.run_dir = Path(run_dir)
    return track, cfg, int(state["iteration"])


def replace(cfg, **changes):
    """``dataclasses.replace`` that reaches into nested sections: replace(cfg, eval={"tasks": 10})."""
    out = {}
    for k, v in changes.items():
        cur = getattr(cfg, k)
        out[k] = dataclasses.replace(cur, **v) if isinstance(v, dict) and dataclasses.is_dataclass(cur) else v
    return dataclasses.replace(cfg, **out)
