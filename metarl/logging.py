"""Run logging: ``metrics.csv``, TensorBoard event files, and a progress bar on terminals only.

Every line of ``metrics.csv`` is one logged iteration, so curves can be re-plotted without
TensorBoard; on resume, rows past the checkpoint's iteration are dropped so the file reads as if
the run had never stopped. The progress bar shows iteration, loss and ETA when stderr is a
terminal and prints nothing in CI logs.
"""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

from tqdm import tqdm


class RunLogger:
    def __init__(self, run_dir: str | Path, total: int, start: int = 0, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / "metrics.csv"
        self._fields: list[str] | None = None
        self._truncate(start)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start or None)
        self._bar = tqdm(total=total, initial=start, disable=not sys.stderr.isatty(),
                         dynamic_ncols=True, desc="meta-train")

    def _truncate(self, start: int) -> None:
        if not self.csv_path.exists():
            return
        with open(self.csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            return
        self._fields = list(rows[0].keys())
        # a row cut short by a kill mid-write has missing fields: drop it, never misread it
        kept = [r for r in rows if None not in r.values() and r["iteration"].isdigit() and int(r["iteration"]) < start]
        # rewritten beside and renamed: a kill during the rewrite must not lose the log
        tmp = self.csv_path.with_name(f".{self.csv_path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self._fields)
            w.writeheader()
            w.writerows(kept)
        os.replace(tmp, self.csv_path)

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        row = {"iteration": iteration, **{k: float(v) for k, v in metrics.items()}}
        new_file = not self.csv_path.exists() or self._fields is None
        if self._fields is None:
            self._fields = list(row)
        with open(self.csv_path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self._fields, extrasaction="ignore")
            if new_file:
                w.writeheader()
            w.writerow(row)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), iteration)
        self._bar.set_postfix({k: f"{float(v):.4g}" for k, v in list(metrics.items())[:3]})

    def hyperparameters(self, config: dict) -> None:
        """The run's resolved config as a two-column table in TensorBoard's Text tab (cleanrl's
        habit: the numbers beside the curves they produced)."""
        if self._tb is None:
            return
        rows = [f"|{k}|{v}|" for k, v in flatten(config).items()]
        self._tb.add_text("hyperparameters", "|parameter|value|\n|-|-|\n" + "\n".join(rows), 0)

    def advance(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


class NullLogger:
    """What ranks other than 0 log under torchrun: nothing (rank 0 writes the run's logs)."""

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        pass

    def hyperparameters(self, config: dict) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested sections as dotted keys: {"inner": {"lr": 0.1}} -> {"inner.lr": 0.1}."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
