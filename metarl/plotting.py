"""Figures: adaptation curves (mean ± 95% CI vs inner steps) and the sine panels of Finn et al. 2017, fig. 2."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

LABELS = {"mse": "mean squared error", "accuracy": "accuracy", "return": "average return"}


def adaptation_plot(runs: dict[str, dict], path: str | Path, title: str = "") -> None:
    """``runs``: label → adaptation.json content; every method of every run is one curve."""
    fig, ax = plt.subplots(figsize=(6, 4))
    metric, axis = None, "inner gradient steps"
    for run_label, data in runs.items():
        metric = data["metric"]
        if data.get("curve_axis", "inner steps") != "inner steps":
            axis = data["curve_axis"]
        steps = np.asarray(data["steps"])
        for method, d in data["methods"].items():
            m, c = np.asarray(d["mean"], dtype=float), np.asarray(d["ci95"], dtype=float)  # null (overshot) -> NaN: a gap
            label = f"{run_label}: {method}" if run_label else method
            x = steps[:len(m)] if len(m) <= len(steps) else np.arange(len(m))  # a black box's curve stops at K shots
            line, = ax.plot(x, m, marker="o", ms=3, label=label)
            ax.fill_between(x, m - c, m + c, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(axis)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel(LABELS.get(metric, metric or ""))
    if metric == "mse":
        ax.set_yscale("log")
    n = next(iter(runs.values()))["n_tasks"] if runs else 0
    ax.set_title(title or f"adaptation on {n} fresh tasks (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sine_panels(path: str | Path, x_grid: np.ndarray, y_true: np.ndarray, x_support: np.ndarray,
                y_support: np.ndarray, fits: dict[str, dict[int, np.ndarray]]) -> None:
    """One panel per method: true curve, the K support points, and the fit after 0, 1 and 10 steps."""
    fig, axes = plt.subplots(1, len(fits), figsize=(5 * len(fits), 3.6), sharey=True, squeeze=False)
    for ax, (method, by_step) in zip(axes[0], fits.items()):
        ax.plot(x_grid, y_true, color="red", lw=2, label="ground truth")
        ax.scatter(x_support, y_support, marker="^", color="purple", zorder=5, label=f"{len(x_support)} points used for gradient")
        for step, y in sorted(by_step.items()):
            style = ":" if step == 0 else "--" if step == 1 else "-"
            ax.plot(x_grid, y, ls=style, label=f"{'pre-update' if step == 0 else f'{step} grad step' + ('s' if step > 1 else '')}")
        ax.set_title(method)
        ax.set_xlabel("x")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def navigation_trajectories(path: str | Path, tasks: list[dict], obs_by_step: list, mask_by_step: list,
                            n_show: int = 4) -> None:
    """2D navigation: one panel per task, the first episode's path before and after each inner step, and the goal."""
    n = min(n_show, len(tasks))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for i, ax in enumerate(axes[0]):
        for s, (obs, mask) in enumerate(zip(obs_by_step, mask_by_step)):
            valid = np.asarray(mask[i, :, 0]) > 0
            xy = np.asarray(obs[i, :, 0, :2])[valid]
            ax.plot(xy[:, 0], xy[:, 1], lw=1.2, label="pre-update" if s == 0 else f"{s} step{'s' if s > 1 else ''}")
        goal = np.asarray(tasks[i]["goal"], dtype=float)
        # start and goal on top of the paths (scatter's default zorder 1 is below lines' 2, and
        # adapted paths end on the goal, so it used to be hidden exactly where it matters)
        ax.scatter([0], [0], color="black", marker="o", s=15, zorder=5)
        ax.scatter([goal[0]], [goal[1]], color="red", marker="*", s=120, label="goal", zorder=6)
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(-0.6, 0.6)
        ax.set_aspect("equal")
        ax.set_title(f"task {i}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def velocity_traces(path: str | Path, tasks: list[dict], velocity_by_step: list, mask_by_step: list,
                    n_show: int = 4) -> None:
    """Locomotion: forward velocity over an episode (mean over episodes) before and after each
    inner step, with the task's target velocity or direction (HalfCheetahVel/Dir, AntVel/Dir)."""
    n = min(n_show, len(tasks))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.0), squeeze=False, sharey=True)
    for i, ax in enumerate(axes[0]):
        for s, (vel, mask) in enumerate(zip(velocity_by_step, mask_by_step)):
            v, m = np.asarray(vel[i], dtype=float), np.asarray(mask[i], dtype=float)
            mean = (v * m).sum(-1) / np.maximum(m.sum(-1), 1)
            ax.plot(mean[m.sum(-1) > 0], lw=1.2, label="pre-update" if s == 0 else f"{s} step{'s' if s > 1 else ''}")
        task = tasks[i]
        if "velocity" in task:
            ax.axhline(task["velocity"], color="red", ls="--", label="target")
            ax.set_title(f"target velocity {task['velocity']:.2f}")
        elif "direction" in task:
            ax.set_title(f"direction {task['direction']:+.0f}")
        ax.set_xlabel("time step")
    axes[0][0].set_ylabel("forward velocity")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def shift_plot(entries: dict[str, dict], path: str | Path, metric: str = "accuracy", title: str = "") -> None:
    """Metric vs warp factor (Finn & Levine 2018 sec. 7): ``entries`` label → adaptation.json
    ``shift`` entry of one method ({kind, values, mean, ci95, step, curve_axis})."""
    fig, ax = plt.subplots(figsize=(6, 4))
    kind = ""
    for label, d in entries.items():
        kind = d["kind"]
        v, m, c = np.asarray(d["values"]), np.asarray(d["mean"]), np.asarray(d["ci95"])
        axis = d.get("curve_axis", "inner steps")
        if "step" not in d or axis.startswith("closed-form"):
            at = "closed-form head" if axis.startswith("closed-form") else ""
        else:  # "3 inner steps", "1 support examples per class seen", "12 meta-learner (LSTM) updates"
            at = f"{d['step']} {axis}"
        line, = ax.plot(v, m, marker="o", ms=3, label=f"{label} ({at})" if at else label)
        ax.fill_between(v, m - c, m + c, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(f"{kind} factor of the test episodes (support and query)")
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title(title or "accuracy under task shift (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
