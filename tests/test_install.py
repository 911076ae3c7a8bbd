"""Install like a user: build the wheel, install it (not editable) into a fresh virtual environment,
and run ``metarl`` from a directory outside the checkout.

The fresh environment reuses this one's third-party packages through a ``.pth`` line (torch is
gigabytes), but ``metarl`` itself comes only from the wheel: a ``.pth`` path line does not run the
editable install's own ``.pth`` hook, so nothing of the checkout is importable there.
"""
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.setdefault("MPLBACKEND", "Agg")
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the checkout (building in place would leave build/ in it)."""
    src = tmp_path_factory.mktemp("src") / "repo"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    out = tmp_path_factory.mktemp("dist")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(src)], capture_output=True, text=True, timeout=600, env=_clean_env())
    assert p.returncode == 0, p.stderr
    (whl,) = out.glob("*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    Path(purelib, "_third_party.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=600, env=_clean_env())
    assert p.returncode == 0, p.stderr
    return venv


def test_wheel_holds_every_module_and_the_run_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    # independent reference: every module of the source folders, under its installed name
    expected = set()
    for folder, installed in (("metarl", "metarl"), ("envs", "metarl/envs"), ("policies", "metarl/policies")):
        for f in (REPO / folder).rglob("*.py"):
            expected.add(f"{installed}/{f.relative_to(REPO / folder).as_posix()}")
    expected |= {f"metarl/experiments/{f.name}" for f in (REPO / "experiments").iterdir() if f.suffix in (".yaml", ".json")}
    expected |= {f"metarl/splits/vinyals/{n}" for n in ("train.txt", "val.txt", "trainval.txt", "test.txt", "MD5SUMS", "LICENSE")}
    assert "metarl/tracks/__init__.py" in expected and "metarl/experiments/nav2d_paper_goals.json" in expected
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}"
    assert not [n for n in names if n.split("/")[0] in ("tests", "examples", "benchmarks", "envs", "policies")]
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "Name: torch-metarl" in text and "Provides-Extra: baselines" in text


def test_installed_wheel_trains_a_named_config_from_another_directory(fresh_venv, tmp_path):
    py, cli = fresh_venv / "bin" / "python", fresh_venv / "bin" / "metarl"
    where = subprocess.run([str(py), "-c", "import metarl, metarl.tracks; print(metarl.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env=_clean_env())
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(fresh_venv), where.stdout  # the wheel's copy, not the checkout
    p = subprocess.run([str(cli), "train", "sine", "--set", "iterations=20", "--set", "eval.tasks=10",
                        "--set", "sine_eval.validation_tasks=5", "--run-dir", "run", "--evaluate"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_clean_env())
    assert p.returncode == 0, p.stderr
    data = json.loads((tmp_path / "run" / "eval" / "adaptation.json").read_text())
    assert data["metric"] == "mse" and set(data["methods"]) >= {"maml"}
    p = subprocess.run([str(cli), "train", "sinee"], cwd=tmp_path, capture_output=True, text=True, env=_clean_env())
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "did you mean 'sine'" in p.stderr


def test_packaged_split_lists_match_the_data_copy_and_are_used_without_one(tmp_path):
    """Omniglot as its authors distribute it has no split lists: the package's copy is used then,
    and it is byte for byte the data folder's copy (the reference, md5-listed in its MD5SUMS)."""
    from types import SimpleNamespace

    from metarl.tasks.omniglot import _vinyals_classes

    shared = REPO.parent / "shared" / "data" / "omniglot" / "splits" / "vinyals"
    packaged = REPO / "metarl" / "splits" / "vinyals"
    for split in ("train", "val", "trainval", "test"):
        if shared.is_dir():
            assert (packaged / f"{split}.txt").read_bytes() == (shared / f"{split}.txt").read_bytes()
        lines = (packaged / f"{split}.txt").read_text().split()
        names = sorted({line.rpartition("/")[0] for line in lines})
        arrays = SimpleNamespace(data_dir=tmp_path, names=names)  # a data folder with zips only
        chars, turns = _vinyals_classes(arrays, split)
        assert [f"{names[c]}/rot{90 * t:03d}" for c, t in zip(chars, turns)] == lines
