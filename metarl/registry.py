"""The one registry: which tracks (problems) and which algorithms (methods) a config may name.

A config names a ``track:`` (the problem: sine, fewshot, rl) and an ``algorithm:`` (the method:
maml, fomaml, reptile, ...). A track registers its config dataclass and its class with
:func:`track`; a method is one module in ``metarl/algorithms/`` whose class carries
``@algorithm("name", kinds=(...))``. Algorithm modules are found by listing that package, so adding
a method is adding its file, nothing else. ``kinds`` says which problems a method solves:
``"supervised"`` (sine, few-shot: the horizon-1 case) or ``"rl"``; one name may have one
implementation per kind (``maml`` is the supervised engine in ``maml.py`` and MAML-TRPO in
``maml_trpo.py``).

A method may own a config section named after it (its ``Config`` dataclass, e.g. ``reptile:``)
and per-track ``defaults``: config values used where the YAML and ``--set`` say nothing, so
``--set algorithm=reptile`` on an Omniglot config runs Reptile's own settings for every key the
file leaves out.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class TrackEntry:
    name: str
    kind: str           # "supervised" | "rl"
    config: type        # the track's config dataclass
    cls: type           # its Track class


TRACKS: dict[str, TrackEntry] = {}
ALGORITHMS: dict[tuple[str, str], type] = {}   # (name, kind) -> method class
_CONFIGS: dict[tuple[str, str], type] = {}


def register_track(name: str, *, kind: str, config: type, cls: type) -> None:
    """``track: name`` loads ``config`` and runs ``cls`` (called at the end of each track module)."""
    TRACKS[name] = TrackEntry(name, kind, config, cls)


def algorithm(name: str, *, kinds: tuple[str, ...] = ("supervised",)) -> Callable[[type], type]:
    """Method-class decorator: ``@algorithm("reptile")`` makes ``algorithm: reptile`` select it."""
    def deco(cls: type) -> type:
        cls.name = name
        for kind in kinds:
            ALGORITHMS[(name, kind)] = cls
        return cls
    return deco


def load_all() -> None:
    """Import every track and every module of ``metarl/algorithms/`` (each registers itself)."""
    import metarl.algorithms as pkg

    importlib.import_module("metarl.tracks")
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


def names(kind: str | None = None) -> list[str]:
    """Algorithm names, all or those for one kind of track."""
    return sorted({n for n, k in ALGORITHMS if kind is None or k == kind})


def find_algorithm(name: str, track_name: str) -> type:
    """The method class ``algorithm: name`` selects for ``track: track_name``, or a ConfigError
    that lists the valid names."""
    from .config import ConfigError, closest

    kind = TRACKS[track_name].kind
    cls = ALGORITHMS.get((name, kind))
    if cls is not None:
        return cls
    if any(n == name for n, _ in ALGORITHMS):
        raise ConfigError(f"algorithm '{name}' does not support track '{track_name}': valid for it: {', '.join(names(kind))}")
    raise ConfigError(f"unknown algorithm '{name}': {closest(str(name), names(kind))}")


def config_class(track_name: str, algorithm_name: str) -> type:
    """The track's config dataclass, with the method's own section (if it has a ``Config``) as a
    field named after the method, so that section is typed and validated like every other."""
    key = (track_name, algorithm_name)
    if key not in _CONFIGS:
        base = TRACKS[track_name].config
        method = find_algorithm(algorithm_name, track_name)
        own = getattr(method, "Config", None)
        if own is None:
            _CONFIGS[key] = base
        else:
            _CONFIGS[key] = dataclasses.make_dataclass(
                base.__name__, [(algorithm_name, own, dataclasses.field(default_factory=own))], bases=(base,))
    return _CONFIGS[key]


def method_defaults(track_name: str, algorithm_name: str) -> dict[str, Any]:
    """The method's config values for this track (a nested mapping; empty if none)."""
    defaults = getattr(find_algorithm(algorithm_name, track_name), "defaults", None) or {}
    return dict(defaults.get(track_name, {}))


def build_track(cfg):
    """The track object for a resolved config."""
    load_all()
    return TRACKS[cfg.track].cls(cfg)
