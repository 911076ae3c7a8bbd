"""Figures show what they claim: masked means for velocity traces, the goal visible on top."""
import numpy as np
import pytest

import metarl.plotting as plotting


@pytest.fixture
def figures(monkeypatch):
    """Figures the plotting functions close, kept for inspection."""
    kept = []
    real = plotting.plt.close
    monkeypatch.setattr(plotting.plt, "close", lambda fig=None: (kept.append(fig), real(fig)))
    return kept


def test_velocity_trace_is_the_mean_over_valid_episodes(tmp_path, figures):
    # one task, 2 episodes, 4 time steps; episode 1 ended after 2 steps (its padding holds junk)
    vel = np.array([[[1.0, 3.0], [2.0, 4.0], [3.0, 99.0], [4.0, 99.0]]])
    mask = np.array([[[1, 1], [1, 1], [1, 0], [1, 0]]], dtype=float)
    plotting.velocity_traces(tmp_path / "v.png", [{"velocity": 1.5}], [vel], [mask])
    (ax,) = figures[-1].axes
    curve = [ln for ln in ax.lines if ln.get_linestyle() != "--"][0]
    np.testing.assert_allclose(curve.get_ydata(), [2.0, 3.0, 3.0, 4.0])  # by hand: (1+3)/2, (2+4)/2, 3, 4


def test_navigation_goal_is_drawn_above_the_paths(tmp_path, figures):
    t, b = 5, 1
    obs = [np.linspace(0, 0.3, t * 2).reshape(1, t, b, 2)] * 3   # every path ends on the goal
    mask = [np.ones((1, t, b))] * 3
    plotting.navigation_trajectories(tmp_path / "n.png", [{"goal": [0.3, 0.3]}], obs, mask)
    ax = figures[-1].axes[0]
    goal = [c for c in ax.collections if c.get_label() == "goal"]
    assert len(goal) == 1
    assert goal[0].get_zorder() > max(ln.get_zorder() for ln in ax.lines)
