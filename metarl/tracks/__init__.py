"""Tracks: one per benchmark family. Importing this package registers their configs."""
from __future__ import annotations

from . import sine  # noqa: F401  (registers track "sine")

_BUILDERS = {"sine": sine.SineTrack}


def build_track(cfg):
    return _BUILDERS[cfg.track](cfg)
