"""Evaluation in one place: adaptation curves for any method, the validation step-size search,
and the output contract of ``metarl evaluate``.

- :func:`curve`: the metric after 0..K units of adaptation (inner steps for gradient methods) on
  fixed test tasks, for any method's ``predict``; every method and baseline is scored on the
  same tasks.
- :func:`choose_step_size` / :func:`choose_step_sizes_greedy`: test-time step sizes picked on
  validation tasks (never the test tasks), one size for all steps or greedily one per step, and
  :func:`step_size_record`, the one way the choice is written into ``adaptation.json``.
- :func:`write`: ``eval/adaptation.json``, ``adaptation.csv`` and ``adaptation.png``; the 95%
  interval is 1.96 · sample std / √n over tasks.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import math

import numpy as np
import torch


@dataclass
class EvalResult:
    metric: str                      # "mse" | "accuracy" | "return"
    higher_is_better: bool
    curves: dict[str, np.ndarray]    # method -> [n_tasks, steps + 1]
    figures: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # extra plots: name -> writer
    extra: dict = field(default_factory=dict)  # more JSON-able facts for adaptation.json
    step_sizes: dict = field(default_factory=dict)  # method -> step_size_record(...) or {"inner_lr": ...}
    algorithm: str = ""              # the meta-learning method of the run
    curve_axis: str = "inner steps"  # what the x axis counts

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
    with np.errstate(invalid="ignore", over="ignore"):  # a non-finite step stays non-finite (written as null)
        sd = values.std(axis=0, ddof=1) if n > 1 else np.zeros(values.shape[1:])
        return values.mean(axis=0), 1.96 * sd / np.sqrt(n)


def summary(result: EvalResult) -> dict:
    methods = {}
    for name, vals in result.curves.items():
        m, c = mean_ci95(vals)
        # strict JSON has no inf/NaN: a step whose adaptation overshot (e.g. Meta-SGD's one-step α
        # reused at step 3) is written as null, and the CLI says which
        methods[name] = {"mean": [float(x) if np.isfinite(x) else None for x in m],
                         "ci95": [float(x) if np.isfinite(x) else None for x in c]}
    out = {"metric": result.metric, "higher_is_better": result.higher_is_better, "algorithm": result.algorithm,
           "curve_axis": result.curve_axis, "steps": result.steps, "n_tasks": result.n_tasks, "methods": methods}
    if result.step_sizes:
        out["step_sizes"] = result.step_sizes
    return {**out, **result.extra}


# ------------------------------------------------------------------------------ curves

def curve(predict: Callable[[Any], Sequence[torch.Tensor]], batches: Iterable, metric) -> np.ndarray:
    """[n_tasks, K + 1]: ``metric(prediction, batch.y_query)`` after each of the K + 1 adaptation
    stages that ``predict(batch)`` returns, over every task of ``batches`` (chunks of a fixed
    test set, so memory stays bounded)."""
    chunks = []
    for batch in batches:
        with torch.no_grad():
            preds = predict(batch)
            chunks.append(torch.stack([metric(p, batch.y_query) for p in preds], dim=1))
    return torch.cat(chunks).double().numpy()


# ------------------------------------------------------------------------------ step sizes

def check_step_grid(grid: Sequence[float]) -> None:
    """A step-size grid is a non-empty list of finite sizes >= 0 (ValueError naming the grid)."""
    if not grid or any(not math.isfinite(lr) or lr < 0 for lr in grid):
        raise ValueError(f"step-size grid must be a non-empty list of finite sizes >= 0, e.g. [0.05, 0.1, 0.25, 0.5], got {list(grid)}")


def _better(a: float, b: Optional[float], higher_is_better: bool) -> bool:
    """Is score ``a`` better than ``b``? A non-finite score is never better; anything finite beats
    a non-finite or missing ``b``; ties keep ``b`` (the earlier grid entry)."""
    if not math.isfinite(a):
        return False
    if b is None or not math.isfinite(b):
        return True
    return a > b if higher_is_better else a < b


def choose_step_size(score: Callable[[float], float], grid: Sequence[float], higher_is_better: bool) -> tuple[float, list[float]]:
    """One step size for every step: the grid entry whose validation ``score(lr)`` is best
    (non-finite scores never win; if none is finite, the smallest size). As the MAML paper picked
    its baselines' fine-tuning step sizes on validation tasks (sec. 5.1). Returns (size, scores)."""
    check_step_grid(grid)
    scores = [float(score(float(lr))) for lr in grid]
    best = None
    for lr, sc in zip(grid, scores):
        if _better(sc, None if best is None else best[1], higher_is_better):
            best = (float(lr), sc)
    return (best[0] if best else float(min(grid))), scores


def choose_step_sizes_greedy(start, advance: Callable[[Any, float, int], tuple[Any, float]], grid: Sequence[float],
                             steps: int, higher_is_better: bool) -> tuple[list[float], list[list[float]]]:
    """One step size per step, greedily: step k takes the grid entry whose state after that step,
    ``advance(state, lr, k) -> (new state, validation score)``, scores best, given the sizes
    already chosen for steps 0..k-1; the chosen candidate's state starts step k + 1. Meta-RL uses
    it because MAML shapes θ for its training step size and a later test step, starting from φ_k,
    can overshoot with the same size (RESULTS.md, 2D navigation). Returns (sizes, [steps][grid])."""
    check_step_grid(grid)
    state, chosen, table = start, [], []
    for k in range(steps):
        best, row = None, []
        for lr in grid:
            new, sc = advance(state, float(lr), k)
            row.append(float(sc))
            if best is None or _better(row[-1], best[0], higher_is_better):
                best = (row[-1], float(lr), new)
        table.append(row)
        chosen.append(best[1])
        state = best[2]
    return chosen, table


def step_size_record(chosen, grid: Sequence[float], scores, validation_tasks: int, rule: str) -> dict:
    """How every track writes a validated step-size choice into adaptation.json (``step_sizes``):
    ``chosen`` (a size, or one per step), the ``grid``, every candidate's ``validation_scores``,
    the number of ``validation_tasks`` and the ``rule`` ("one size for all steps" or "greedy per
    step")."""
    return {"chosen": chosen, "grid": [float(g) for g in grid], "validation_scores": scores,
            "validation_tasks": int(validation_tasks), "rule": rule}


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


def task_set(cfg, n: int, seed: int, tasks_file: Optional[str] = None) -> dict:
    """What fixes an evaluation's test tasks: the track, its task settings, the seed and count (or
    the tasks file). Two runs with equal task sets were scored on the same tasks."""
    from .config import to_dict

    d = to_dict(cfg)
    fixed = {k: d[k] for k in ("task", "episode", "env", "sine_eval") if k in d}
    if "data" in d:
        fixed["data"] = {k: d["data"][k] for k in ("dataset", "protocol", "test_split")}
    return {"track": cfg.track, "n": int(n), "seed": int(seed), "tasks_file": tasks_file, **fixed}


def compare(results: list[dict], labels: list[str]) -> dict:
    """One adaptation.json-shaped summary holding each run's own method (by its ``algorithm``)
    and the first run's baselines; ValueError unless every run was scored on the same tasks."""
    first = results[0]
    methods: dict = {}
    for data, label in zip(results, labels):
        if data.get("eval_tasks") != first.get("eval_tasks") or data["metric"] != first["metric"]:
            raise ValueError(f"{label} was evaluated on other tasks than {labels[0]}: evaluate both with the same "
                             f"--seed and --tasks (and task settings) before comparing")
        name = data.get("algorithm") or "maml"
        if name in methods:
            raise ValueError(f"two runs of algorithm '{name}' ({label}): compare one run per method, or use `metarl plot`")
        methods[name] = data["methods"][name]
    for name, d in first["methods"].items():
        methods.setdefault(name, d)
    return {**first, "methods": methods, "algorithm": "", "compared": dict(zip(labels, [r.get("algorithm") for r in results]))}


# ------------------------------------------------------------------------------ task shift

def parse_shift(spec: str) -> tuple[str, list[float]]:
    """``"shear=0,0.2,0.4"`` → ("shear", [0.0, 0.2, 0.4]); ValueError with the expected form."""
    from .tasks.warp import KINDS

    kind, _, values = str(spec).partition("=")
    try:
        vals = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        vals = []
    if kind.strip() not in KINDS or not vals:
        raise ValueError(f"--shift takes KIND=V1,V2,... with KIND one of {', '.join(KINDS)}, e.g. shear=0,0.2,0.4,0.6,0.8 "
                         f"or scale=1,0.8,0.6 (got '{spec}')")
    return kind.strip(), vals


def shift_curve(predict: Callable[[Any], Sequence[torch.Tensor]], batches: Callable[[], Iterable], metric,
                kind: str, values: Sequence[float]) -> tuple[np.ndarray, int]:
    """Task shift (Finn & Levine 2018 sec. 7): ([n_tasks, len(values)], stage). Column j is the
    metric of the LAST adaptation stage ``predict`` returns (gradient methods: after the
    evaluation's inner steps; black boxes: with the whole support set seen) on the test episodes
    ``batches()`` with support and query images warped alike by ``kind`` = ``values[j]``
    (``metarl.tasks.warp``); ``stage`` is that stage's index on the adaptation curve."""
    from .tasks.warp import warp_batch

    cols, stage = [], 0
    for v in values:
        def last(b, v=v):
            preds = predict(warp_batch(b, kind, v))
            nonlocal stage
            stage = len(preds) - 1
            return preds[-1:]
        cols.append(curve(last, batches(), metric)[:, 0])
    return np.stack(cols, axis=1), stage


def shift_summary(curves: dict[str, np.ndarray], kind: str, values: Sequence[float], stage: int, axis: str) -> dict:
    """The ``shift`` entry of adaptation.json: per method {kind, values, mean, ci95, step, curve_axis}."""
    out = {}
    for name, vals in curves.items():
        m, c = mean_ci95(vals)
        out[name] = {"kind": kind, "values": [float(v) for v in values], "mean": m.tolist(), "ci95": c.tolist(),
                     "step": int(stage), "curve_axis": axis, "n_tasks": int(vals.shape[0])}
    return out
