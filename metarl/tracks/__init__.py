"""Tracks: one per benchmark family. Importing this package registers their configs."""
from __future__ import annotations

from . import fewshot, rl, sine  # noqa: F401  (importing registers the tracks' configs)

_BUILDERS = {"sine": sine.SineTrack, "rl": rl.RLTrack, "fewshot": fewshot.FewShotTrack}


def build_track(cfg):
    return _BUILDERS[cfg.track](cfg)
