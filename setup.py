"""Package discovery, kept in code because setup.cfg's ``find:`` cannot map folders.

``envs/`` and ``policies/`` sit at the top of the checkout but install as ``metarl.envs`` and
``metarl.policies``, and ``experiments/`` (the YAML configs and their task files) installs as
``metarl.experiments`` data so ``metarl train sine`` works after ``pip install`` from any
directory. Every package under those folders is found automatically: a new
``metarl/algorithms/<name>.py`` or ``envs/<sub>/`` ships without editing this file. Everything
else (metadata, dependencies, extras) is in setup.cfg.
"""
from setuptools import find_packages, setup

MAPPED = {"envs": "metarl.envs", "policies": "metarl.policies"}


def packages() -> list[str]:
    found = find_packages(include=["metarl", "metarl.*"])
    for folder, name in MAPPED.items():
        found += [name + sub[len(folder):] for sub in find_packages(include=[folder, folder + ".*"])]
    return found + ["metarl.experiments"]


setup(
    packages=packages(),
    package_dir={"metarl": "metarl", **{name: folder for folder, name in MAPPED.items()},
                 "metarl.experiments": "experiments"},
)
