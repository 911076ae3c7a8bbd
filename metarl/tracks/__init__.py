"""Tracks: one per benchmark family. Importing this package registers their configs."""
from __future__ import annotations

from . import rl, sine  # noqa: F401  (importing registers the tracks' configs)

_BUILDERS = {"sine": sine.SineTrack, "rl": rl.RLTrack}


def build_track(cfg):
    return _BUILDERS[cfg.track](cfg)
