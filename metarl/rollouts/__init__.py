"""Episode collection for meta-RL: :class:`Collector` fills :class:`Episodes` (task, time, episode).

See :mod:`metarl.rollouts.collector` for the design contract and
:mod:`metarl.rollouts.mujoco_batch` for the exact MuJoCo fast path.
"""
from .collector import Collector, EnvOutputError, episode_seeds
from .episodes import Episodes

__all__ = ["Collector", "Episodes", "EnvOutputError", "episode_seeds"]
