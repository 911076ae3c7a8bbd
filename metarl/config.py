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
import math
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config problem, reported as one line that says how to fix it (line breaks in the
    message, e.g. from a key or value the user typed, are folded into spaces)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


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


#: Every integer of a config fits in 64 bits (torch and NumPy seeds, counts and sizes); larger
#: ones are typos, and would fail deep inside torch instead of here.
INT_LIMIT = 2**63 - 1


def _to_int(value: Any, where: str) -> int:
    """An integer, parsed exactly: ``9007199254740993`` (2^53 + 1) keeps every digit (going through
    float would round it to 2^53 precision, silently changing a seed). A float is accepted only
    if it is a whole number below 2^53, where float is exact (YAML reads ``1.0e4`` as a float)."""
    bad = f"'{where}' must be an integer, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(bad)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            try:
                value = float(value)  # "1e4" from --set
            except ValueError:
                raise ConfigError(bad) from None
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ConfigError(bad)
        if abs(value) >= 2**53:
            raise ConfigError(f"'{where}' is {value!r}, too large to be an exact integer as a float: write its digits")
        value = int(value)
    if abs(value) > INT_LIMIT:
        raise ConfigError(f"'{where}' is {value}: integers must lie within ±(2^63 - 1)")
    return value


def _to_float(value: Any, where: str, allow_nonfinite: bool = False) -> float:
    """A finite number. NaN and inf pass every ``<= 0`` check and then poison a run, so they are
    refused unless the field opts in (``field(metadata={"nonfinite": True})``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"'{where}' must be a number, got {value!r}")
    try:
        out = float(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"'{where}' must be a number, got {value!r}") from None
    if not math.isfinite(out) and not allow_nonfinite:
        raise ConfigError(f"'{where}' must be a finite number, got {value!r}")
    return out


def in_range(key: str, value: Any, low: float | None = None, high: float | None = None, *,
             open_low: bool = False, open_high: bool = False) -> None:
    """One-line :class:`ConfigError` unless ``value`` (or every item of a list; None is skipped)
    lies between ``low`` and ``high`` (inclusive unless ``open_low`` / ``open_high``). The upper
    bounds keep absurd values (``inner.steps=1e15``, a hidden layer of 10^9 units) from starting
    a run that never ends or exhausts memory; they are far above any published setting."""
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if v is None:
            continue
        if (low is not None and (v <= low if open_low else v < low)) or \
                (high is not None and (v >= high if open_high else v > high)):
            lo = "" if low is None else f"{'>' if open_low else '>='} {low:g}"
            hi = "" if high is None else f"{'<' if open_high else '<='} {high:g}"
            raise ConfigError(f"'{key}' is {value!r}: it must be {' and '.join(filter(None, (lo, hi)))}")


def _coerce(value: Any, tp: Any, where: str, allow_nonfinite: bool = False) -> Any:
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
                return _coerce(value, a, where, allow_nonfinite)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"'{where}' has a bad value {value!r}")
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and inner is not str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}' must be a list, got {value!r}")
        items = [_coerce(v, inner, f"{where}[{i}]", allow_nonfinite) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}")
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"'{where}' keys must be names (strings), got {sorted(map(repr, value))}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"'{where}' must be true or false, got {value!r}")
    if tp is int:
        return _to_int(value, where)
    if tp is float:
        return _to_float(value, where, allow_nonfinite)
    if tp is str:
        if isinstance(value, bool):  # YAML reads yes/no/on/off as booleans
            raise ConfigError(f"'{where}' must be a string, got the boolean {value!r}: quote the value "
                              f"(YAML reads yes/no/on/off/true/false as booleans)")
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
        kwargs[key] = _coerce(value, hints[key], prefix + key, fields[key].metadata.get("nonfinite", False))
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
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: the value {raw!r} is not valid YAML ({' '.join(str(e).split())[:120]}); "
                              f"quote it, e.g. --set '{key}=\"...\"'") from None
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



def packaged_file(name: str) -> Path | None:
    """``name`` (``sine.yaml``, ``nav2d_paper_goals.json``) among the files shipped with the package
    (the checkout's ``experiments/``, installed as ``metarl.experiments``), or None."""
    from importlib import resources

    try:
        path = resources.files("metarl.experiments") / name
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


def _packaged_configs() -> list[str]:
    from importlib import resources

    try:
        return [p.name[:-5] for p in resources.files("metarl.experiments").iterdir() if p.name.endswith(".yaml")]
    except ModuleNotFoundError:
        return []


def find_config(path: str | Path) -> Path:
    """The file a ``metarl train CONFIG`` argument means: the path itself; else, for a name,
    ``./experiments/NAME.yaml``; else the config of that name shipped with the package, so that
    ``metarl train sine`` works from any directory after ``pip install``."""
    path = Path(path)
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"config '{path}' is a directory: give a YAML file, e.g. {path / 'sine.yaml'}")
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    local = Path("experiments") / name
    if local.is_file():
        return local
    shipped = packaged_file(name)
    if shipped is not None and path.parent in (Path("."), Path("experiments")):
        return shipped
    local_names = [p.stem for p in Path("experiments").glob("*.yaml")] if Path("experiments").is_dir() else []
    known = sorted(set(local_names) | set(_packaged_configs()))
    raise ConfigError(f"config file '{path}' not found" + (f": {closest(path.stem, known)}" if known else ""))


def load(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Load a config (see :func:`find_config`), apply ``--set`` overrides and validate."""
    path = find_config(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({' '.join(str(e).split())[:200]}): fix the file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a YAML {type(data).__name__}; a config is a mapping of keys "
                          f"('track: sine', 'iterations: 100', ...)")
    return from_dict(merge(data, parse_overrides(overrides or [])))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

