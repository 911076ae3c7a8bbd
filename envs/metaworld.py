"""Meta-World's ML1, ML10 and ML45 benchmarks as metarl task envs (the ``metaworld`` extra).

Yu et al. 2019, "Meta-World: A Benchmark and Evaluation for Multi-Task and Meta Reinforcement
Learning" (sec. 4.3): a Sawyer arm, 39-d observations (the goal hidden in the meta-learning
benchmarks), 4-d actions in [-1, 1], 500-step episodes (``max_path_length``), and a task
*success* flag in ``info["success"]``. A benchmark has a train split and a held-out test split:

- **ML1** (``metarl/MetaWorldML1-v0``, ``env_name`` e.g. ``reach-v3``): one manipulation task;
  the train and test splits are 50 goals each, drawn by ``metaworld.ML1(env_name, seed)``
  (the test goals from ``seed + 1``);
- **ML10** / **ML45** (``metarl/MetaWorldML10-v0``, ``metarl/MetaWorldML45-v0``): 10 / 45
  train task classes, 5 held-out test classes (never seen in training), 50 goals per class.

Tasks come from the benchmark objects (``metaworld.ML1/ML10/ML45(seed=...)``:
``train_classes``/``train_tasks``, ``test_classes``/``test_tasks``), never from Meta-World's
``Meta-World/ML1-train`` gymnasium entry: in metaworld 3.1.1 both its ``ML1-train`` and
``ML1-test`` entries close over the same loop variable and build the *test* split. The split is
the ``split`` argument of :meth:`MetaWorldEnv.sample_tasks`; the RL track passes "train" in
meta-training and "test" at evaluation (:func:`metarl.envs.base.sample_split`).

A metarl task is a JSON dict ``{"env_name", "split", "index", "rand_vec"}``: the class, the
split and position in the benchmark's task list it came from (provenance), and Meta-World's
``rand_vec`` (object and goal positions), from which :meth:`MetaWorldEnv.set_task` rebuilds the
Meta-World task exactly as ``metaworld._make_tasks`` encodes it (checked against the benchmark's
own tasks by tests/test_metaworld.py). Nothing is unpickled from a task, so a ``--tasks-file``
cannot run code, and workers need no benchmark object.

One Meta-World simulator per task class is built on demand and kept (an LRU of ``class_cache``
classes per env: a Meta-World env takes ~25 MB, measured); :meth:`MetaWorldEnv.sample_tasks`
returns tasks grouped by class in a fixed class order, so when the meta-batch is a multiple of
the number of classes each collector slot sees the same class at every iteration.
"""
from __future__ import annotations

import collections
import difflib
import pickle
from typing import Any, ClassVar, Mapping, Optional

import gymnasium as gym
import numpy as np

from ..extras import require
from .base import TaskEnv, check_num_tasks, check_rng

__all__ = ["MetaWorldEnv", "MetaWorldML1Env", "MetaWorldML10Env", "MetaWorldML45Env", "benchmark", "SPLITS"]

SPLITS = ("train", "test")
_BENCHMARKS: dict[tuple, Any] = {}


def _metaworld():
    return require("metaworld", "metaworld", "the Meta-World envs (metarl/MetaWorldML1-v0, ...)")


def benchmark(kind: str, env_name: Optional[str] = None, seed: int = 0):
    """The ``metaworld.ML1(env_name, seed)`` / ``ML10(seed)`` / ``ML45(seed)`` benchmark, built once
    per process (ML10 takes ~10 s, ML45 ~1 min: 50 resets per class to draw its goals)."""
    key = (kind, env_name, int(seed))
    if key not in _BENCHMARKS:
        mw = _metaworld()
        if kind == "ML1":
            if env_name not in mw.ML1.ENV_NAMES:
                close = difflib.get_close_matches(str(env_name), mw.ML1.ENV_NAMES, n=3)
                hint = f"did you mean {', '.join(close)}?" if close else f"valid: {', '.join(sorted(mw.ML1.ENV_NAMES))}"
                raise ValueError(f"MetaWorldML1: unknown env_name {env_name!r}; {hint}")
            _BENCHMARKS[key] = mw.ML1(env_name, seed=int(seed))
        else:
            _BENCHMARKS[key] = getattr(mw, kind)(seed=int(seed))
    return _BENCHMARKS[key]


def _classes(kind: str, env_name: Optional[str]) -> dict[str, dict[str, type]]:
    """{"train": {name: class}, "test": {...}} without building the benchmark (no goals drawn)."""
    from metaworld import env_dict

    if kind == "ML1":
        if env_name not in env_dict.ALL_V3_ENVIRONMENTS:
            benchmark(kind, env_name)  # raises the one-line error with the close names
        cls = env_dict.ALL_V3_ENVIRONMENTS[env_name]
        return {"train": {env_name: cls}, "test": {env_name: cls}}
    table = {"ML10": env_dict.ML10_V3, "ML45": env_dict.ML45_V3}[kind]
    return {split: dict(table[split]) for split in SPLITS}


class MetaWorldEnv(gym.Env, TaskEnv):
    """One Meta-World benchmark as a task distribution with a train and a test split.

    Args:
        kind: "ML1", "ML10" or "ML45".
        env_name: the ML1 task (``reach-v3``, ``push-v3``, ``pick-place-v3``, any of
            ``metaworld.ML1.ENV_NAMES``); None for ML10/ML45.
        benchmark_seed: the seed of ``metaworld.ML1/ML10/ML45(seed=...)``, which fixes the goals
            of both splits (not the run's seed: the benchmark is the same across runs).
        horizon: episode length (Meta-World's ``max_path_length``, 500); shorter for smoke tests.
        class_cache: simulators kept per env, one per task class (least recently used dropped).
    """

    task_splits: ClassVar[tuple[str, ...]] = SPLITS
    metadata = {"render_modes": []}

    def __init__(self, kind: str = "ML1", env_name: Optional[str] = "reach-v3", benchmark_seed: int = 0,
                 horizon: int = 500, class_cache: int = 2):
        _metaworld()
        if kind not in ("ML1", "ML10", "ML45"):
            raise ValueError(f"MetaWorldEnv: kind must be ML1, ML10 or ML45, got {kind!r}")
        for name, value, low in (("horizon", horizon, 1), ("class_cache", class_cache, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"MetaWorld{kind}: {name} must be an int >= {low}, got {value!r}")
        self.kind, self.env_name = kind, env_name if kind == "ML1" else None
        self.benchmark_seed, self.horizon, self.max_path_length = int(benchmark_seed), int(horizon), int(horizon)
        self.class_cache = int(class_cache)
        self.split_classes = _classes(kind, self.env_name)
        self.class_names = list(dict.fromkeys([*self.split_classes["train"], *self.split_classes["test"]]))
        self._cls = {**self.split_classes["train"], **self.split_classes["test"]}
        self._sims: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
        self._task: Optional[dict] = None
        first = self._sim(next(iter(self.split_classes["train"])))
        self.observation_space = gym.spaces.Box(first.observation_space.low, first.observation_space.high,
                                                dtype=np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), dtype=np.float32)
        self._current = None
        # oracle encoding: one-hot class (ML10/ML45) + rand_vec zero-padded to the longest (object + goal)
        self._rand_len = 6
        self.task_dim = (0 if kind == "ML1" else len(self.class_names)) + self._rand_len

    # ------------------------------------------------------------------ simulators
    def _sim(self, name: str):
        """The cached Meta-World env of class ``name`` (built on first use, LRU-bounded)."""
        if name in self._sims:
            self._sims.move_to_end(name)
            return self._sims[name]
        sim = self._cls[name]()
        sim.max_path_length = self.horizon
        self._sims[name] = sim
        while len(self._sims) > self.class_cache:
            _, old = self._sims.popitem(last=False)
            old.close()
        return sim

    # ------------------------------------------------------------------ task interface
    def sample_tasks(self, n: int, rng: Optional[np.random.Generator] = None, split: str = "train") -> list[dict]:
        """``n`` tasks of ``split``: the classes take turns (each gets ``n // C`` tasks, the ``n % C``
        left over go to classes drawn with ``rng``), goals drawn within a class without replacement
        (with, past its 50); grouped by class in the benchmark's class order."""
        n = check_num_tasks(n, f"MetaWorld{self.kind}")
        rng = check_rng(self.np_random if rng is None else rng, f"MetaWorld{self.kind}")
        if split not in SPLITS:
            raise ValueError(f"MetaWorld{self.kind}.sample_tasks: split must be 'train' or 'test', got {split!r}")
        bench = benchmark(self.kind, self.env_name, self.benchmark_seed)
        all_tasks = bench.train_tasks if split == "train" else bench.test_tasks
        names = list(self.split_classes[split])
        per_class = {c: [i for i, t in enumerate(all_tasks) if t.env_name == c] for c in names}
        counts = np.full(len(names), n // len(names))
        counts[rng.choice(len(names), n % len(names), replace=False)] += 1
        out = []
        for name, count in zip(names, counts):
            pool = per_class[name]
            for j in rng.choice(len(pool), int(count), replace=int(count) > len(pool)):
                i = pool[int(j)]
                rand_vec = pickle.loads(all_tasks[i].data)["rand_vec"]
                out.append({"env_name": name, "split": split, "index": i,
                            "rand_vec": [float(v) for v in np.asarray(rand_vec, dtype=np.float64)]})
        return out

    def meta_world_task(self, task: Mapping[str, Any]):
        """The Meta-World ``Task`` for ``task``, encoded as ``metaworld._make_tasks`` does for the
        meta-learning benchmarks (goal hidden: ``partially_observable=True``)."""
        from metaworld.types import Task

        data = {"rand_vec": np.asarray(task["rand_vec"], dtype=np.float64), "env_cls": self._cls[task["env_name"]],
                "partially_observable": True}
        return Task(env_name=task["env_name"], data=pickle.dumps(data))

    def _check_task(self, task: Any) -> dict:
        owner = f"MetaWorld{self.kind}"
        example = '{"env_name": "reach-v3", "split": "train", "index": 0, "rand_vec": [...]} from sample_tasks'
        keys = {"env_name", "split", "index", "rand_vec"}
        if not isinstance(task, Mapping) or set(task) != keys:
            got = sorted(map(str, task)) if isinstance(task, Mapping) else type(task).__name__
            raise ValueError(f"{owner} task must have exactly the keys {sorted(keys)}, got {got}; e.g. {example}")
        name, split = task["env_name"], task["split"]
        if split not in SPLITS:
            raise ValueError(f"{owner} task['split'] must be 'train' or 'test', got {split!r}")
        if name not in self.split_classes[split]:
            raise ValueError(f"{owner} task: {name!r} is not a {split} class of {self.kind}; "
                             f"{split} classes: {', '.join(self.split_classes[split])}")
        index = task["index"]
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"{owner} task['index'] must be an int >= 0, got {index!r}")
        try:
            rand_vec = np.asarray(task["rand_vec"], dtype=np.float64)
        except (TypeError, ValueError):
            rand_vec = np.zeros(0)
        if rand_vec.ndim != 1 or not 1 <= rand_vec.size <= self._rand_len or not np.isfinite(rand_vec).all():
            raise ValueError(f"{owner} task['rand_vec'] must be a list of at most {self._rand_len} finite numbers "
                             f"(Meta-World's object and goal positions), got {task['rand_vec']!r}")
        return {"env_name": name, "split": split, "index": int(index), "rand_vec": [float(v) for v in rand_vec]}

    def set_task(self, task: Mapping[str, Any]) -> None:
        task = self._check_task(task)
        sim = self._sim(task["env_name"])
        sim.set_task(self.meta_world_task(task))
        self._task, self._current = task, sim

    def get_task(self) -> Optional[dict]:
        return None if self._task is None else {**self._task, "rand_vec": list(self._task["rand_vec"])}

    def task_vector(self, task: Mapping[str, Any]) -> np.ndarray:
        task = self._check_task(task)
        onehot = np.zeros(0 if self.kind == "ML1" else len(self.class_names))
        if onehot.size:
            onehot[self.class_names.index(task["env_name"])] = 1.0
        goal = np.zeros(self._rand_len)
        goal[: len(task["rand_vec"])] = task["rand_vec"]
        return np.concatenate([onehot, goal])

    # ------------------------------------------------------------------ gymnasium
    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        if options and "task" in options:
            self.set_task(options["task"])
        if self._current is None:
            raise RuntimeError(f"MetaWorld{self.kind}: no task set; call set_task(env.sample_tasks(1, rng)[0]) first")
        if seed is not None:
            self._current.seed(int(seed))  # Meta-World ignores reset's seed; its start state is the task's
        obs, info = self._current.reset()
        return np.asarray(obs, dtype=np.float64), dict(info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self._current.step(np.asarray(action, dtype=np.float32))
        return np.asarray(obs, dtype=np.float64), float(reward), bool(terminated), bool(truncated), dict(info)

    def close(self):
        for sim in self._sims.values():
            sim.close()
        self._sims.clear()
        self._current = None


class MetaWorldML1Env(MetaWorldEnv):
    """``metarl/MetaWorldML1-v0``: one Meta-World task, 50 train goals, 50 held-out test goals."""

    def __init__(self, env_name: str = "reach-v3", benchmark_seed: int = 0, horizon: int = 500, class_cache: int = 1):
        super().__init__("ML1", env_name, benchmark_seed, horizon, class_cache)


class MetaWorldML10Env(MetaWorldEnv):
    """``metarl/MetaWorldML10-v0``: 10 train classes, 5 held-out test classes."""

    def __init__(self, benchmark_seed: int = 0, horizon: int = 500, class_cache: int = 2):
        super().__init__("ML10", None, benchmark_seed, horizon, class_cache)


class MetaWorldML45Env(MetaWorldEnv):
    """``metarl/MetaWorldML45-v0``: 45 train classes, 5 held-out test classes."""

    def __init__(self, benchmark_seed: int = 0, horizon: int = 500, class_cache: int = 2):
        super().__init__("ML45", None, benchmark_seed, horizon, class_cache)
