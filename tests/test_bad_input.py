"""Bad input ends with one line naming the fix (a ConfigError, exit status 2), never a traceback:
typed coercion, range checks of the RL sections, malformed files and flags, and property tests of
the parser over arbitrary YAML values and --set strings."""
import math
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metarl import config
from metarl.config import ConfigError

SINE = {"track": "sine"}


def cli(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "metarl.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    return p.returncode, p.stderr


def assert_one_line(rc, err, *fragments):
    assert rc == 2 and err.count("\n") == 1 and err.startswith("metarl: error: "), err
    for f in fragments:
        assert f in err, err


# ------------------------------------------------------------------------------- coercion


def test_integers_are_parsed_exactly():
    big = 2**53 + 1  # float would round this to 2**53
    assert config.from_dict({**SINE, "seed": big}).seed == big
    assert config.from_dict(config.merge(SINE, config.parse_overrides([f"seed={big}"]))).seed == big
    assert config.from_dict({**SINE, "seed": "9007199254740993"}).seed == big
    assert config.from_dict({**SINE, "iterations": 1.0e4}).iterations == 10_000
    with pytest.raises(ConfigError, match="exact integer"):
        config.from_dict({**SINE, "seed": 1.0e17})
    with pytest.raises(ConfigError, match="2\\^63"):
        config.from_dict({**SINE, "seed": 2**70})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_rejected(value):
    with pytest.raises(ConfigError, match="finite"):
        config.from_dict({**SINE, "outer": {"lr": value}})
    with pytest.raises(ConfigError, match="integer"):
        config.from_dict({**SINE, "iterations": value})
    text = {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")  # as YAML spells them after --set
    with pytest.raises(ConfigError, match="finite"):
        config.from_dict(config.merge(SINE, config.parse_overrides([f"outer.lr={text}"])))


def test_a_float_field_can_opt_in_to_inf():
    from dataclasses import dataclass, field

    @dataclass
    class C:
        clip: float = field(default=1.0, metadata={"nonfinite": True})
        lr: float = 1.0

    assert config.build(C, {"clip": math.inf}).clip == math.inf
    with pytest.raises(ConfigError):
        config.build(C, {"lr": math.inf})


def test_booleans_are_not_strings():
    with pytest.raises(ConfigError, match="boolean"):
        config.load("experiments/omniglot_5w1s.yaml", ["data.train_split=yes"])


# ------------------------------------------------------------------------------- RL sections


@pytest.mark.parametrize("override, key", [
    ("inner.lr=-0.1", "inner.lr"), ("inner.lr=0", "inner.lr"), ("inner.steps=1000000", "inner.steps"),
    ("inner.eval_lr=[0.5,-1]", "inner.eval_lr"), ("inner.episodes=0", "inner.episodes"),
    ("advantages.gamma=1.5", "advantages.gamma"), ("advantages.gae_lambda=-0.1", "advantages.gae_lambda"),
    ("outer.max_kl=0", "outer.max_kl"), ("outer.max_kl=-1", "outer.max_kl"), ("outer.ls_ratio=1", "outer.ls_ratio"),
    ("outer.ls_ratio=0", "outer.ls_ratio"), ("outer.ls_steps=0", "outer.ls_steps"),
    ("outer.fvp_subsample=0", "outer.fvp_subsample"), ("outer.fvp_subsample=1.5", "outer.fvp_subsample"),
    ("outer.cg_iters=0", "outer.cg_iters"), ("meta_batch=100000000", "meta_batch"),
    ("policy.hidden=[64,-1]", "policy.hidden"), ("policy.hidden=[1000000000]", "policy.hidden"),
    ("sampler.workers=-1", "sampler.workers"), ("iterations=-1", "iterations"), ("seed=-3", "seed"),
    ("ppo_baselines.timesteps=0", "ppo_baselines.timesteps"),
])
def test_rl_values_out_of_range(override, key):
    with pytest.raises(ConfigError, match=f"'?{key}'? (is|must)"):
        config.load("experiments/nav2d.yaml", [override])


def test_rl_defaults_and_shipped_configs_are_valid():
    for name in ("nav2d", "halfcheetah_vel", "halfcheetah_dir", "ant_vel", "ant_dir", "ant_goal", "pendulum_gravity"):
        config.load(f"experiments/{name}.yaml")


def test_fewshot_q_query_zero_is_rejected():
    with pytest.raises(ConfigError, match="q_query"):
        config.load("experiments/omniglot_5w1s.yaml", ["episode.q_query=0"])
    assert config.load("experiments/omniglot_5w1s.yaml", ["episode.q_query=null"]).episode.q_query is None


# ------------------------------------------------------------------------------- files and flags


def test_top_level_list_and_non_utf8_configs(tmp_path):
    (tmp_path / "list.yaml").write_text("- track: sine\n- iterations: 3\n")
    assert_one_line(*cli("train", str(tmp_path / "list.yaml"), "--run-dir", str(tmp_path / "r")), "mapping")
    (tmp_path / "latin1.yaml").write_bytes("track: sine\n# réglages\n".encode("latin-1"))
    assert_one_line(*cli("train", str(tmp_path / "latin1.yaml"), "--run-dir", str(tmp_path / "r")), "UTF-8")
    assert_one_line(*cli("train", str(tmp_path), "--run-dir", str(tmp_path / "r")), "directory")


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    assert_one_line(*cli("train", "experiments/sine_quick.yaml", "--run-dir", str(tmp_path / "f")), "is a file")
    assert_one_line(*cli("train", "experiments/sine_quick.yaml", "--run-dir", str(tmp_path / "f" / "sub")), "is a file")


def test_baselines_negative_timesteps(tmp_path):
    assert_one_line(*cli("baselines", str(tmp_path), "--timesteps", "-5"), "--timesteps must be >= 1")


def test_bad_set_yaml_is_one_line(tmp_path):
    assert_one_line(*cli("train", "experiments/sine_quick.yaml", "--set", "inner.lr=[0.1", "--run-dir", str(tmp_path / "r")),
                    "not valid YAML")


def test_missing_extra_names_the_pip_install(tmp_path):
    code = ("import sys; sys.modules['stable_baselines3'] = None\n"
            "from metarl import rl_baselines\n"
            "from metarl.cli import _user_errors\n"
            "try:\n    rl_baselines.load_baseline('x.zip')\n"
            "except _user_errors() as e:\n    print(e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("\n") == 1 and "pip install 'torch-metarl[baselines]'" in p.stdout


# ------------------------------------------------------------------------------- properties

YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from(["1e4", "1e30", ".nan", "-.inf", "yes", "0x10", "1_000", "[1, 2]", "{a: 1}", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _keys(cls, prefix=""):
    import dataclasses
    from typing import get_type_hints

    out = []
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        tp = get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _keys(tp, prefix + f.name + ".")
    return out


from metarl import registry  # noqa: E402

registry.load_all()
KEYS = {t: _keys(e.config) for t, e in registry.TRACKS.items()}
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_config_errors(fn):
    try:
        fn()
    except ConfigError as e:
        assert "\n" not in str(e), repr(str(e))


@SETTINGS
@given(track=st.sampled_from(sorted(KEYS)), data=st.data())
def test_any_yaml_value_is_a_config_or_one_config_error(track, data):
    key = data.draw(st.sampled_from(KEYS[track]) | st.text(max_size=8))
    value = data.draw(YAML_VALUES)
    node = raw = {"track": track}
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    _only_config_errors(lambda: config.from_dict(raw))


@SETTINGS
@given(track=st.sampled_from(sorted(KEYS)), data=st.data())
def test_any_set_string_is_a_config_or_one_config_error(track, data):
    key = data.draw(st.sampled_from(KEYS[track]) | st.text(max_size=8))
    raw = data.draw(st.text(max_size=12) | YAML_VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()))
    _only_config_errors(lambda: config.from_dict(config.merge({"track": track}, config.parse_overrides([f"{key}={raw}"]))))


@SETTINGS
@given(document=st.text(max_size=40) | YAML_VALUES.map(yaml.safe_dump))
def test_any_config_file_is_a_config_or_one_config_error(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(document)
    _only_config_errors(lambda: config.load(path))
