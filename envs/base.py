"""The task-environment interface shared by every meta-RL environment in metarl.

A meta-RL *task distribution* is an ordinary Gymnasium environment whose
reward (or dynamics) depends on a task parameter: a goal position, a target
velocity, a direction.  The meta-learner samples a batch of tasks, sets one per
environment, collects trajectories, adapts and repeats (Finn et al. 2017,
"Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", sec. 5.3).

:class:`TaskEnv` is the small contract every task env honours:

* ``sample_tasks(n, rng)`` -> ``list[dict]`` -- draw ``n`` tasks from the
  training distribution with an explicit ``np.random.Generator`` (the caller
  owns the randomness, so task batches are reproducible and independent of
  the environment's own ``np_random`` used for resets);
* ``set_task(task)`` / ``get_task()`` -- install / read back the current task;
* ``task_vector(task)`` -> 1-D ``float64`` array of length ``task_dim`` -- the
  flat encoding fed to an *oracle* policy that conditions on the task.

Tasks are plain dicts of python floats or lists of floats, so they are
JSON-serialisable and can be logged, checkpointed and sent between processes
without pickling numpy objects.
"""

from __future__ import annotations

import abc
import functools
import math
import types
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np

__all__ = [
    "TaskEnv",
    "hybridmethod",
    "flatten_task",
    "check_rng",
    "check_num_tasks",
    "sample_split",
]


class hybridmethod:
    """Method descriptor that binds to the instance if there is one, else the class.

    The reward/observation functions of the MuJoCo task envs are pure functions
    of arrays plus a few constants (cost weights, the termination switch).  A
    batched sampler may call them on the class (``HalfCheetahVelEnv.batch_reward``,
    using the registered defaults) or on an instance (honouring constructor
    options such as ``AntGoalEnv(goal_norm="l2")``); both read the constants
    through ``self`` so one implementation serves both call styles.
    """

    def __init__(self, func):
        self.__func__ = func
        functools.update_wrapper(self, func)

    def __get__(self, obj, objtype=None):
        target = obj if obj is not None else objtype
        return types.MethodType(self.__func__, target)


class TaskEnv(abc.ABC):
    """Mixin/ABC for environments parameterised by a task.

    Subclasses set the class attribute ``task_dim`` (length of
    :meth:`task_vector`) and implement the four methods below.  The built-in
    environments implement ``sample_tasks`` and ``task_vector`` as
    :class:`hybridmethod` so they can also be called on the class, e.g.
    ``HalfCheetahVelEnv.sample_tasks(20, rng)`` without building a simulator.
    """

    #: length of the flat task encoding returned by :meth:`task_vector`
    task_dim: ClassVar[int | None] = None
    #: the named splits ``sample_tasks(n, rng, split=...)`` accepts, for a distribution with a
    #: held-out test split (Meta-World: ("train", "test")); empty: one distribution for all uses
    task_splits: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[dict]:
        """Return ``n`` tasks (JSON-serialisable dicts) drawn with ``rng``."""

    @abc.abstractmethod
    def set_task(self, task: Mapping[str, Any]) -> None:
        """Install ``task``; takes effect from the next ``step``."""

    @abc.abstractmethod
    def get_task(self) -> dict:
        """Return a copy of the current task."""

    @abc.abstractmethod
    def task_vector(self, task: Mapping[str, Any]) -> np.ndarray:
        """Flat ``float64`` encoding of ``task`` of shape ``(task_dim,)`` (oracle input)."""


def sample_split(task_env: Any, n: int, rng: np.random.Generator, split: str) -> list[dict]:
    """``n`` tasks of ``split`` ("train" for meta-training and validation, "test" for evaluation)
    from an env that declares that split in ``task_splits`` (Meta-World's held-out goals and
    classes), else from its one distribution (``sample_tasks(n, rng)``: fresh draws, the caller's
    seed stream keeping evaluation tasks apart)."""
    if split in getattr(task_env, "task_splits", ()):
        return task_env.sample_tasks(n, rng, split=split)
    return task_env.sample_tasks(n, rng)


# ---------------------------------------------------------------------------
# helpers shared by the built-in environments, the wrapper and the checker
# ---------------------------------------------------------------------------


def check_rng(rng: Any, owner: str) -> np.random.Generator:
    """Return ``rng`` if it is a ``np.random.Generator``; raise a one-line TypeError otherwise."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"{owner}.sample_tasks needs rng=np.random.Generator, got {type(rng).__name__}; "
            f"pass e.g. rng=np.random.default_rng(0)"
        )
    return rng


def check_num_tasks(n: Any, owner: str) -> int:
    """Validate the number of tasks requested from a sampler."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{owner}.sample_tasks needs a non-negative int n, got {n!r}")
    return int(n)


def _as_float(value: Any, owner: str, key: str, example: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{owner} task[{key!r}] must be a number, got {value!r}; e.g. set_task({example})"
        ) from None
    if not math.isfinite(out):
        raise ValueError(f"{owner} task[{key!r}] must be finite, got {value!r}; e.g. set_task({example})")
    return out


def parse_task(
    task: Any, owner: str, spec: Mapping[str, int], example: str
) -> dict[str, float | list[float]]:
    """Validate ``task`` against ``spec`` ({key: 0 for a scalar, k for a length-k list}).

    Returns a fresh dict of python floats / lists of python floats, so the stored
    task never aliases a caller's numpy array and is always JSON-serialisable.
    Extra keys are rejected: a typo such as ``{"vel": 1.0}`` must not silently
    leave the previous task in place.
    """
    if not isinstance(task, Mapping):
        raise ValueError(f"{owner} task must be a dict, got {type(task).__name__}; e.g. set_task({example})")
    missing = [k for k in spec if k not in task]
    extra = [k for k in task if k not in spec]
    if missing or extra:
        raise ValueError(
            f"{owner} task must have exactly the keys {sorted(spec)}, got {sorted(map(str, task))}; "
            f"e.g. set_task({example})"
        )
    out: dict[str, float | list[float]] = {}
    for key, size in spec.items():
        value = task[key]
        if size == 0:
            out[key] = _as_float(value, owner, key, example)
        else:
            arr = np.asarray(value, dtype=object).reshape(-1) if not np.isscalar(value) else None
            if arr is None or arr.size != size:
                raise ValueError(
                    f"{owner} task[{key!r}] must be a list of {size} numbers, got {value!r}; "
                    f"e.g. set_task({example})"
                )
            out[key] = [_as_float(v, owner, key, example) for v in arr]
    return out


def flatten_task(task: Mapping[str, Any]) -> np.ndarray:
    """Default task encoding: numeric values concatenated in sorted-key order.

    Used by :class:`~metarl.envs.wrapper.TaskWrapper` when no ``task_vector_fn``
    is given.  Sorting the keys makes the layout independent of dict insertion
    order, so the same task always maps to the same vector.
    """
    if not isinstance(task, Mapping):
        raise TypeError(f"task must be a dict to be flattened, got {type(task).__name__}")
    parts: list[np.ndarray] = []
    for key in sorted(task):
        try:
            parts.append(np.asarray(task[key], dtype=np.float64).reshape(-1))
        except (TypeError, ValueError):
            raise ValueError(
                f"cannot flatten task[{key!r}]={task[key]!r} to floats; pass task_vector_fn=... to TaskWrapper"
            ) from None
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)


def to_builtin(value: Any) -> Any:
    """Convert numpy scalars/arrays (possibly nested in dicts/lists) to python builtins."""
    if isinstance(value, Mapping):
        return {str(k): to_builtin(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [to_builtin(v) for v in value]
    return value


def _iter_columns(x: np.ndarray) -> Iterable[np.ndarray]:
    for j in range(x.shape[1]):
        yield x[:, j]


def rowwise_sum_of_squares(x: np.ndarray) -> np.ndarray:
    """``sum(x**2, axis=1)`` accumulated left to right, column by column.

    ``np.sum`` may pick a different summation order (pairwise, SIMD lanes)
    depending on the array's shape, so a batch of B rows is not guaranteed to
    reproduce a batch of one row bit-for-bit.  Accumulating columns in a fixed
    order makes ``batch_reward`` on B states equal, exactly, to B calls of
    ``step``.  ``x`` has at most a handful of columns (actuators), so the python
    loop is cheap.
    """
    out = np.zeros(x.shape[0], dtype=np.float64)
    for col in _iter_columns(x):
        out = out + col * col
    return out


def rowwise_abs_sum(x: np.ndarray) -> np.ndarray:
    """``sum(|x|, axis=1)`` in a fixed left-to-right order (see :func:`rowwise_sum_of_squares`)."""
    out = np.zeros(x.shape[0], dtype=np.float64)
    for col in _iter_columns(x):
        out = out + np.abs(col)
    return out


def as_batch(x: Any, name: str, width: int | None, owner: str) -> np.ndarray:
    """Return ``x`` as a float64 ``[B, width]`` array or raise a one-line ValueError."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or (width is not None and arr.shape[1] != width):
        want = f"[B, {width}]" if width is not None else "[B, k]"
        raise ValueError(
            f"{owner}: {name} must have shape {want}, got {arr.shape}; add a batch axis with x[None]"
        )
    return arr
