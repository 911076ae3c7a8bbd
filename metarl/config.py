"""Typed run configuration: YAML in ``experiments/`` → nested dataclasses, with ``--set`` overrides.

Every config has a top-level ``track`` (which problem it runs), ``algorithm`` (which method,
default ``maml``), ``iterations`` and ``seed``; each track declares its own dataclass and each
method may add a section of its own and per-track defaults (:mod:`metarl.registry`). Values
are layered: dataclass defaults < the method's defaults < the YAML file < ``--set``. Unknown keys
and badly typed values stop the run with one line naming the key and the closest valid names,
because a typo in a hyper-parameter that is silently ignored costs a researcher a whole run. The
resolved config is saved in every run directory and checkpoint.

Config sections live beside the code they configure, each field with a one-line docstring; a field
that may change on ``--resume`` says so itself (:func:`resumable`).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config problem, reported as one line that says how to fix it."""


def resumable(default: Any = dataclasses.MISSING, *, why: str, default_factory: Any = dataclasses.MISSING):
    """A config field that ``--resume`` may change (``why``: "evaluation only", "speed only", "length
    of the run"): it does not alter the trained numbers up to that point."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"resumable": why})


def resumable_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of ``cls`` (a config dataclass) declared with :func:`resumable`."""
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("resumable"):
            out.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            out += resumable_keys(hints[f.name], f"{prefix}{f.name}.")
    return out


def closest(word: str, options) -> str:
    near = difflib.get_close_matches(word, list(options), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(n) for n in near)}? " if near else ""
    return f"{hint}valid: {', '.join(sorted(options))}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping of {sorted(f.name for f in dataclasses.fields(tp))}")
        return build(tp, value, prefix=where + ".")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"'{where}' is {value!r}: {closest(str(value), [str(a) for a in get_args(tp)])}")
        return value
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"'{where}' has a bad value {value!r}")
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and inner is not str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}' must be a list, got {value!r}")
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"'{where}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"'{where}' must be an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"'{where}' must be an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"'{where}' must be an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"'{where}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{where}' must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"'{where}' must be a string, got {value!r}")
        return str(value)
    return value


def build(cls: type, data: dict, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data``, checking every key and type. A section given
    in part keeps the rest of *this* field's default, not its class's: ``inner: {steps: 5}`` in a
    few-shot config keeps the few-shot inner defaults (lr 0.4, ...), not InnerConfig's."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}': {closest(prefix + key, [prefix + n for n in fields])}")
        factory = fields[key].default_factory
        if dataclasses.is_dataclass(hints[key]) and factory is not dataclasses.MISSING and isinstance(value, (dict, type(None))):
            value = merge(dataclasses.asdict(factory()), value or {})
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def parse_overrides(pairs: list[str]) -> dict:
    """``["inner.lr=0.1", "seed=3"]`` → nested dict with YAML-parsed values."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got '{pair}' (e.g. --set inner.lr=0.1)")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is set twice as a value and a section")
        node[parts[-1]] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    """``extra`` laid over ``base``, recursively for sections."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(data: dict) -> Any:
    """Resolve a raw mapping (YAML content plus overrides) into the typed config of its track and
    algorithm, the method's own defaults filling the keys the mapping leaves out."""
    from . import registry

    registry.load_all()
    tracks = registry.TRACKS
    if not isinstance(data, dict) or "track" not in data:
        raise ConfigError(f"config needs a top-level 'track:' key, one of: {', '.join(sorted(tracks))}")
    track = data["track"]
    if not isinstance(track, str) or track not in tracks:
        raise ConfigError(f"unknown track '{track}': {closest(str(track), tracks)}")
    name = data.get("algorithm", "maml")
    if not isinstance(name, str):
        raise ConfigError(f"'algorithm' must be a name, got {name!r}: valid: {', '.join(registry.names(tracks[track].kind))}")
    cls = registry.config_class(track, name)
    return build(cls, merge(registry.method_defaults(track, name), data))


def load(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Load ``experiments/NAME.yaml`` (or any path), apply ``--set`` overrides and validate."""
    path = Path(path)
    if not path.exists():
        alt = Path("experiments") / f"{path.name}.yaml"
        if alt.exists():
            path = alt
        else:
            known = sorted(p.stem for p in Path("experiments").glob("*.yaml")) if Path("experiments").is_dir() else []
            raise ConfigError(f"config file '{path}' not found" + (f": {closest(path.stem, known)}" if known else ""))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from None
    return from_dict(merge(data, parse_overrides(overrides or [])))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

