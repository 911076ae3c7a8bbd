"""Tracks: one per problem family. Importing this package registers them (metarl.registry)."""
from __future__ import annotations

from . import fewshot, rl, sine  # noqa: F401  (importing registers the tracks)
