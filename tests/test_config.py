"""Config errors: one line naming the key and the closest valid names."""
import pytest

from metarl import config
from metarl.config import ConfigError


def test_loads_every_experiment_config():
    import glob
    paths = glob.glob("experiments/*.yaml")
    assert paths
    import yaml

    from metarl.envs.registration import missing_extra

    for p in paths:
        env_id = ((yaml.safe_load(open(p)) or {}).get("env") or {}).get("id", "")
        if env_id and missing_extra(env_id):  # e.g. the Meta-World configs without the metaworld extra
            with pytest.raises(ConfigError, match=r"pip install -e '\.\[\w+\]'"):
                config.load(p)
            continue
        cfg = config.load(p)
        assert cfg.iterations >= 1 and isinstance(cfg.seed, int)


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.lrr': did you mean 'inner.lr'"):
        config.load("experiments/sine.yaml", ["inner.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'iteratons'.*'iterations'"):
        config.from_dict({"track": "sine", "iteratons": 5})


def test_bad_values_and_tracks():
    with pytest.raises(ConfigError, match="'meta_batch' must be an integer"):
        config.load("experiments/sine.yaml", ["meta_batch=abc"])
    with pytest.raises(ConfigError, match="'model.activation' is 'sigmoid'"):
        config.load("experiments/sine.yaml", ["model.activation=sigmoid"])
    with pytest.raises(ConfigError, match="unknown track 'sin'.*'sine'"):
        config.from_dict({"track": "sin"})
    with pytest.raises(ConfigError, match="'inner.lr' is .*: it must be > 0"):
        config.load("experiments/sine.yaml", ["inner.lr=-1"])
    with pytest.raises(ConfigError, match="--set expects key=value"):
        config.load("experiments/sine.yaml", ["inner.lr"])
    with pytest.raises(ConfigError, match="not found"):
        config.load("experiments/nope.yaml")


def test_overrides_are_typed_and_round_trip():
    cfg = config.load("experiments/sine.yaml", ["inner.lr=0.02", "task.k_shot=5", "inner.first_order=true"])
    assert cfg.inner.lr == 0.02 and cfg.task.k_shot == 5 and cfg.inner.first_order is True
    again = config.from_dict(config.to_dict(cfg))
    assert again == cfg


def test_a_partial_section_keeps_the_tracks_own_defaults():
    """A few-shot config that sets only inner.steps keeps the few-shot inner defaults (lr 0.4,
    3 evaluation steps, task workers 0), not the generic InnerConfig ones (lr 0.01, 10, 1)."""
    cfg = config.from_dict({"track": "fewshot", "inner": {"steps": 5}})
    assert (cfg.inner.steps, cfg.inner.lr, cfg.inner.eval_steps, cfg.inner.task_workers) == (5, 0.4, 3, 0)
    assert config.from_dict({"track": "fewshot", "inner": None}).inner.lr == 0.4
    assert config.from_dict({"track": "sine", "inner": {"steps": 5}}).inner.lr == 0.01
    with pytest.raises(ConfigError, match="'inner.task_workers' is -1: it must be >= 0"):
        config.from_dict({"track": "fewshot", "inner": {"task_workers": -1}})


def test_algorithm_key_selects_a_registered_method_or_says_which_exist():
    """`algorithm:` picks a method file of metarl/algorithms/; a typo or a method that does not
    solve the track is one line listing the valid names for that track."""
    from metarl import registry

    assert config.from_dict({"track": "sine"}).algorithm == "maml"
    assert config.from_dict({"track": "sine", "algorithm": "fomaml"}).algorithm == "fomaml"
    with pytest.raises(ConfigError, match=r"unknown algorithm 'fomam'.*did you mean 'fomaml'.*valid: .*maml"):
        config.from_dict({"track": "sine", "algorithm": "fomam"})
    from metarl.algorithms.maml import MAML

    registry.algorithm("supervised_only_probe")(type("Probe", (MAML,), {}))
    with pytest.raises(ConfigError, match="algorithm 'supervised_only_probe' does not support track 'rl': valid for it: .*fomaml, .*maml"):
        config.from_dict({"track": "rl", "algorithm": "supervised_only_probe"})
    with pytest.raises(ConfigError, match="'algorithm' must be a name"):
        config.from_dict({"track": "sine", "algorithm": 3})
    assert set(registry.names("rl")) >= {"maml", "fomaml"} and set(registry.names("supervised")) >= {"maml", "fomaml"}


def test_cli_unknown_algorithm_is_one_line(tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "metarl.cli", "train", "experiments/sine_quick.yaml", "--set", "algorithm=reptil",
                        "--run-dir", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "unknown algorithm 'reptil'" in p.stderr, p.stderr
    assert not (tmp_path / "r").exists()


def _field_docstrings(cls) -> set[str]:
    """Names of the fields that ``cls``'s own source follows with a docstring."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {st.target.id for st, nxt in zip(body, body[1:] + [None]) if isinstance(st, ast.AnnAssign)
            and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)}


def test_every_config_field_has_a_one_line_docstring_where_it_is_declared():
    """Config sections live beside their code, and every field says what it is (the --help of a
    config): checked for every track's config and every method's own section."""
    import dataclasses
    from typing import get_type_hints

    from metarl import registry

    registry.load_all()
    roots = [e.config for e in registry.TRACKS.values()] + [c.Config for c in registry.ALGORITHMS.values() if getattr(c, "Config", None)]
    missing, seen = [], set()
    stack = list(roots)
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                stack.append(hints[f.name])
            owner = next(c for c in reversed(cls.__mro__) if f.name in getattr(c, "__annotations__", {}))
            if f.name not in _field_docstrings(owner) and f.name not in ("track",):
                missing.append(f"{owner.__name__}.{f.name}")
    assert not missing, sorted(set(missing))
