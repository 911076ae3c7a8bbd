"""Adaptation curves: the metric after 0..K inner steps on fresh tasks, per method.

Every track's ``evaluate`` returns an :class:`EvalResult`; :func:`write` turns it into the output
contract of ``metarl evaluate``: ``eval/adaptation.json``, ``adaptation.csv`` and
``adaptation.png``. Each method is scored on the same tasks, and the 95% interval is
1.96 · sample std / √n over tasks.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class EvalResult:
    metric: str                      # "mse" | "accuracy" | "return"
    higher_is_better: bool
    curves: dict[str, np.ndarray]    # method -> [n_tasks, steps + 1]
    figures: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # extra plots: name -> writer
    extra: dict = field(default_factory=dict)  # more JSON-able facts for adaptation.json (e.g. chosen step sizes)

    @property
    def steps(self) -> list[int]:
        return list(range(next(iter(self.curves.values())).shape[1]))

    @property
    def n_tasks(self) -> int:
        return int(next(iter(self.curves.values())).shape[0])


def mean_ci95(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and 95% normal-approximation half-width over axis 0."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    sd = values.std(axis=0, ddof=1) if n > 1 else np.zeros(values.shape[1:])
    return values.mean(axis=0), 1.96 * sd / np.sqrt(n)


def summary(result: EvalResult) -> dict:
    methods = {}
    for name, vals in result.curves.items():
        m, c = mean_ci95(vals)
        methods[name] = {"mean": m.tolist(), "ci95": c.tolist()}
    return {"metric": result.metric, "higher_is_better": result.higher_is_better,
            "steps": result.steps, "n_tasks": result.n_tasks, "methods": methods, **result.extra}


def write(result: EvalResult, out_dir: str | Path, title: str = "") -> dict:
    from .plotting import adaptation_plot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = summary(result)
    (out / "adaptation.json").write_text(json.dumps(data, indent=2))
    with open(out / "adaptation.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "step", "mean", "ci95", "n_tasks"])
        for name, d in data["methods"].items():
            for s, (m, c) in enumerate(zip(d["mean"], d["ci95"])):
                w.writerow([name, s, m, c, data["n_tasks"]])
    adaptation_plot({"": data}, out / "adaptation.png", title=title)
    for name, writer in result.figures.items():
        writer(out / name)
    return data


def load(run_or_eval_dir: str | Path) -> dict:
    p = Path(run_or_eval_dir)
    for cand in (p / "eval" / "adaptation.json", p / "adaptation.json", p):
        if cand.is_file():
            return json.loads(cand.read_text())
    raise FileNotFoundError(f"no adaptation.json under {p}: run `metarl evaluate {p}` first")
