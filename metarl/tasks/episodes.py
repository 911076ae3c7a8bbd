"""N-way K-shot episodes for any few-shot image dataset, and the plumbing every loader shares.

The loaders (``omniglot.py``, ``image_datasets.py``) all produce a :class:`ClassPool`: one uint8 image
array plus, per class, which of its rows belong to that class (and, for Omniglot, how many quarter
turns to rotate them). :class:`EpisodeSampler` turns a pool into float episodes with vectorised numpy
gathers, so it never loops over images in Python. Keeping images as uint8 until the gather means a
pool costs 1 byte per pixel and rotated classes cost no memory at all.

This module also holds what the loaders would otherwise duplicate: :class:`DataError`, locating a
dataset folder (``data_dir`` argument > ``METARL_DATA`` > the repo's shared data folder), md5 checks
against an ``MD5SUMS`` file, and an atomic ``.npz`` cache in ``METARL_CACHE`` (default
``~/.cache/metarl``) so images are decoded once, not on every run.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .batch import TaskBatch

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()
FIX_HINT = "pass --data-dir DIR or set METARL_DATA=DIR"


class DataError(Exception):
    """A dataset is missing, incomplete or corrupt. The message is one line that names the fix."""


# ----------------------------------------------------------------------------- locating data


def find_dataset_dir(names: Sequence[str], markers: Sequence[str], what: str,
                     data_dir: str | os.PathLike | None = None) -> Path:
    """Folder of one dataset, from ``data_dir``, else ``$METARL_DATA``, else ``<repo>/../shared/data``.

    Each of those may point at the dataset folder itself or at a parent holding it as ``names[i]``
    (e.g. ``omniglot/``); a folder counts as the dataset if any of ``markers`` (relative paths)
    exists in it. An explicit location that does not hold the dataset is an error rather than a
    silent fallback, so a typo in ``--data-dir`` cannot train on some other copy. ``what`` describes
    the expected content for the error message.
    """
    if data_dir is not None:
        base, source = Path(data_dir).expanduser(), "--data-dir"
    elif os.environ.get("METARL_DATA"):
        base, source = Path(os.environ["METARL_DATA"]).expanduser(), "METARL_DATA"
    else:
        base, source = SHARED_DATA, "the default location"
    for folder in (base, *(base / n for n in names)):
        if any((folder / m).exists() for m in markers):
            return folder
    raise DataError(f"{names[0]} not found at {base} ({source}; also looked in {base / names[0]}): "
                    f"{FIX_HINT} (a folder holding {what}, or its parent)")


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a one-line :class:`DataError` naming the fix."""
    if not path.is_file():
        raise DataError(f"{path} is missing ({what}): {FIX_HINT} (a folder holding it)")
    return path


# ----------------------------------------------------------------------------- checksums


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_md5sums(folder: Path) -> dict[str, str]:
    """``{relative path: md5}`` from ``folder/MD5SUMS`` (``md5sum`` output format); empty if absent."""
    path = folder / "MD5SUMS"
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text().splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2:
            sums[parts[1].lstrip("*").strip()] = parts[0].lower()
    return sums


def verify_md5(path: Path, expected: str | None) -> str:
    """md5 of ``path``; a one-line :class:`DataError` if ``expected`` is given and differs."""
    actual = md5_file(path)
    if expected is not None and actual != expected:
        raise DataError(f"{path} is corrupt: md5 {actual}, expected {expected} (MD5SUMS); "
                        f"copy it again, or {FIX_HINT} pointing at a good copy")
    return actual


# ----------------------------------------------------------------------------- decoded-array cache


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$METARL_CACHE``, else ``~/.cache/metarl``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("METARL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "metarl"


def file_stamps(paths: Sequence[Path]) -> np.ndarray:
    """[n, 2] int64 (size, mtime_ns): a cheap "has any source file changed?" check for cache loads."""
    stats = [p.stat() for p in paths]
    return np.array([[s.st_size, s.st_mtime_ns] for s in stats], dtype=np.int64).reshape(-1, 2)


def cached_arrays(name: str, key: str, sources: Sequence[Path], build: Callable[[], dict[str, np.ndarray]],
                  cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Arrays from ``<cache>/<name>-<md5(key)[:16]>.npz``, or ``build()`` them and write that file.

    ``key`` should hold everything the decoded arrays depend on (source md5s, image size, format
    version); the sizes and mtimes of ``sources`` are stored too, and a cached file whose stamps no
    longer match is rebuilt, so a replaced source is noticed without re-hashing it on every load.
    The file is written to a temporary name in the same folder and ``os.replace``-d, so concurrent
    runs never read half a cache. Uncompressed ``np.savez`` keeps loading well under a second.
    A cache folder that cannot be written only costs a warning: the data is still returned.
    """
    path = cache_root(cache_dir) / f"{name}-{hashlib.md5(key.encode()).hexdigest()[:16]}.npz"
    stamps = file_stamps(sources)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                if np.array_equal(f["_stamps"], stamps):
                    return {k: f[k] for k in f.files if k != "_stamps"}
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable (a 0-byte file is EOFError), damaged or stale: rebuild below
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, _stamps=stamps, **arrays)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(f"could not write cache {path} ({e}); set METARL_CACHE to a writable folder", stacklevel=2)
    return arrays


# ----------------------------------------------------------------------------- class pool


class ClassPool:
    """Images grouped by class: what an episode sampler draws from.

    ``data`` is uint8 ``[n_images, H, W]`` (grayscale) or ``[n_images, H, W, C]`` (the on-disk layout
    of every format we read); ``members[c]`` lists the rows of ``data`` in class ``c``, so pools of
    different splits can share one array without copying it. ``rotations[c]`` (optional) is a number
    of counter-clockwise quarter turns (``np.rot90``) applied at gather time, which is how Omniglot's
    rotated classes (Vinyals et al. 2016) cost no memory. Output is always channels-first.
    """

    def __init__(self, data: np.ndarray, members: Sequence[Sequence[int]], class_names: Sequence[str],
                 rotations: Sequence[int] | None = None):
        if data.dtype != np.uint8 or data.ndim not in (3, 4):
            raise ValueError(f"data must be uint8 [n, H, W] or [n, H, W, C], got {data.dtype} {data.shape}")
        if len(members) != len(class_names):
            raise ValueError(f"{len(members)} classes but {len(class_names)} class names")
        if len(members) == 0:
            raise ValueError("a ClassPool needs at least one class")
        self.data = data
        self.class_names = tuple(class_names)
        rows = [np.asarray(m, dtype=np.int64).reshape(-1) for m in members]
        self.counts = np.array([len(r) for r in rows], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self._rows = np.concatenate(rows)
        if self._rows.size and (self._rows.min() < 0 or self._rows.max() >= len(data)):
            raise ValueError("members index rows outside data")
        self.rotations = None
        if rotations is not None:
            self.rotations = np.asarray(rotations, dtype=np.int64) % 4
            if self.rotations.shape != (self.n_classes,):
                raise ValueError(f"rotations must have one entry per class ({self.n_classes})")
            if self.rotations.any() and data.shape[1] != data.shape[2]:
                raise ValueError(f"rotating non-square images {data.shape[1:3]} would change their shape")

    @classmethod
    def from_labels(cls, data: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> "ClassPool":
        """Pool where row ``i`` of ``data`` belongs to class ``labels[i]`` (0..len(class_names)-1)."""
        labels = np.asarray(labels, dtype=np.int64)
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=len(class_names))
        return cls(data, np.split(order, np.cumsum(counts)[:-1]), class_names)

    def without(self, class_names: Sequence[str]) -> "ClassPool":
        """The same images without the named classes (e.g. a training pool minus the validation
        classes it contains); shares ``data``, copies nothing."""
        drop = set(class_names)
        keep = [i for i, name in enumerate(self.class_names) if name not in drop]
        if not keep:
            raise ValueError("without() would remove every class of the pool")
        members = [self._rows[self._offsets[i]:self._offsets[i] + self.counts[i]] for i in keep]
        rotations = None if self.rotations is None else self.rotations[keep]
        return ClassPool(self.data, members, [self.class_names[i] for i in keep], rotations)

    @property
    def n_classes(self) -> int:
        return len(self.counts)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images :meth:`gather` returns."""
        h, w = self.data.shape[1:3]
        return (1 if self.data.ndim == 3 else self.data.shape[3], h, w)

    def gather(self, classes: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """uint8 ``[*B, S, C, H, W]``: image ``samples[..., s]`` of class ``classes[...]`` (rotated).

        ``classes`` has shape ``[*B]`` and ``samples`` ``[*B, S]``, with ``samples < counts[classes]``.
        One fancy-index gather plus at most three ``rot90`` calls, whatever the batch size.
        """
        classes = np.asarray(classes, dtype=np.int64)
        samples = np.asarray(samples, dtype=np.int64)
        if samples.shape[:-1] != classes.shape:
            raise ValueError(f"samples {samples.shape} must be classes {classes.shape} + [S]")
        if samples.size and ((samples < 0) | (samples >= self.counts[classes][..., None])).any():
            raise IndexError("sample index out of range for its class")
        x = self.data[self._rows[self._offsets[classes][..., None] + samples]]
        x = x[..., None, :, :] if self.data.ndim == 3 else np.moveaxis(x, -1, -3)
        if self.rotations is not None:
            turns = self.rotations[classes]
            for k in (1, 2, 3):
                sel = turns == k
                if sel.any():
                    x[sel] = np.rot90(x[sel], k, axes=(-2, -1))
        return np.ascontiguousarray(x)

    def images(self, class_idx: int) -> np.ndarray:
        """All images of one class: uint8 ``[counts[class_idx], C, H, W]``."""
        return self.gather(np.array([class_idx]), np.arange(self.counts[class_idx])[None])[0]

    def __repr__(self) -> str:
        return (f"ClassPool({self.n_classes} classes, {int(self.counts.sum())} images, "
                f"image_shape={self.image_shape})")


# ----------------------------------------------------------------------------- episodes


RngLike = np.random.Generator | torch.Generator | int | None


def _choose(rng: np.random.Generator, keys_shape: tuple[int, ...], k: int,
            valid: np.ndarray | None = None) -> np.ndarray:
    """``k`` distinct indices along the last axis, in uniformly random order, for every leading index.

    Random keys + ``argpartition`` selects a uniform random subset in one vectorised call; the final
    ``permuted`` makes the order uniform too (argpartition's order is not), which matters because
    position decides support vs query. ``valid`` masks out slots beyond a class's image count.
    """
    keys = rng.random(keys_shape)
    if valid is not None:
        keys[~valid] = np.inf
    chosen = np.argpartition(keys, k - 1, axis=-1)[..., :k]
    return rng.permuted(chosen, axis=-1)


class EpisodeSampler:
    """N-way K-shot episodes from a :class:`ClassPool`.

    Each episode draws ``n_way`` distinct classes and, per class, ``k_shot + q_query`` distinct images:
    the first ``k_shot`` are the support set and the rest the query set, so support and query never
    share an image. Labels 0..N-1 go to the classes in the random order they were drawn, i.e. the
    class → label assignment is a fresh random permutation per episode, so a model cannot memorise
    labels across episodes. ``q_query`` defaults to ``k_shot``, as in MAML's few-shot classification
    setup (Finn et al. 2017).
    """

    def __init__(self, pool: ClassPool, n_way: int, k_shot: int, q_query: int | None = None, seed: int = 0):
        q_query = k_shot if q_query is None else q_query
        if not 1 <= n_way <= pool.n_classes:
            raise ValueError(f"n_way={n_way} but the pool has {pool.n_classes} classes: use 1 <= n_way <= "
                             f"{pool.n_classes}")
        if k_shot < 1 or q_query < 0:
            raise ValueError(f"need k_shot >= 1 and q_query >= 0, got k_shot={k_shot}, q_query={q_query}")
        if k_shot + q_query > pool.counts.min():
            raise ValueError(f"k_shot + q_query = {k_shot + q_query} but the smallest class has "
                             f"{pool.counts.min()} images: lower k_shot or q_query")
        self.pool, self.n_way, self.k_shot, self.q_query = pool, n_way, k_shot, q_query
        self._rng = np.random.default_rng(seed)
        self._max_count = int(pool.counts.max())
        self._uneven = bool((pool.counts != self._max_count).any())

    def _generator(self, rng: RngLike) -> np.random.Generator:
        if rng is None:
            return self._rng
        if isinstance(rng, np.random.Generator):
            return rng
        if isinstance(rng, torch.Generator):
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=rng)))
        if isinstance(rng, (int, np.integer)):
            return np.random.default_rng(int(rng))
        raise TypeError(f"rng must be a numpy Generator, torch Generator, int seed or None, got {type(rng)}")

    def sample_indices(self, n_episodes: int, rng: RngLike = None) -> tuple[np.ndarray, np.ndarray]:
        """(classes ``[E, N]``, samples ``[E, N, K+Q]``): which images :meth:`sample` would return.
        ``classes[e, j]`` is the pool class given label ``j`` in episode ``e``."""
        g = self._generator(rng)
        # One choice() per episode (not per image): with thousands of classes this is ~6x faster than
        # random keys over all classes. shuffle=True makes the class -> label order uniformly random.
        classes = np.array([g.choice(self.pool.n_classes, self.n_way, replace=False, shuffle=True)
                            for _ in range(n_episodes)], dtype=np.int64).reshape(n_episodes, self.n_way)
        valid = None
        if self._uneven:
            valid = np.arange(self._max_count) < self.pool.counts[classes][..., None]
        samples = _choose(g, (n_episodes, self.n_way, self._max_count), self.k_shot + self.q_query, valid)
        return classes, samples

    def episodes(self, classes: np.ndarray, samples: np.ndarray) -> TaskBatch:
        """Gather the episodes named by :meth:`sample_indices` as a :class:`TaskBatch`: images float32
        in [0, 1], ``[E, N*S, C, H, W]``, class-major (the ``S`` images of label 0 first, then label
        1, ...); labels int64 ``[E, N*S]``; ``info`` holds each episode's pool classes ``[E, N]``."""
        e, n = classes.shape
        k, q = self.k_shot, self.q_query
        x = self.pool.gather(classes, samples)  # uint8 [E, N, K+Q, C, H, W]
        shape = x.shape[-3:]

        def part(xs: np.ndarray, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
            # numpy, not torch: one single-threaded pass, which stays fast when the other core is busy
            # (torch's multi-threaded cast slowed ~10x under load on a shared 2-core machine)
            pixels = np.divide(xs.reshape(e, n * per_class, *shape), np.float32(255), dtype=np.float32)
            images = torch.from_numpy(pixels)
            labels = torch.arange(n, dtype=torch.int64).repeat_interleave(per_class).repeat(e, 1)
            return images, labels

        return TaskBatch(*part(x[:, :, :k], k), *part(x[:, :, k:], q), info=classes)

    def sample(self, n_episodes: int, rng: RngLike = None) -> TaskBatch:
        """``n_episodes`` random episodes. ``rng`` (numpy/torch generator or int seed) defaults to the
        sampler's own generator, seeded at construction, so a fixed seed gives a fixed sequence."""
        return self.episodes(*self.sample_indices(n_episodes, rng))

    def fixed_episodes(self, n: int, seed: int, batch_size: int | None = None) -> Iterator[TaskBatch]:
        """The same ``n`` episodes for the same ``seed``, e.g. the 600 test episodes of an evaluation.

        All indices are drawn up front from ``seed`` alone (not the sampler's own state), then gathered
        ``batch_size`` episodes at a time (default: all in one batch), so the episodes do not depend on
        ``batch_size`` or on how often :meth:`sample` was called, and memory stays bounded.
        """
        classes, samples = self.sample_indices(n, np.random.default_rng(seed))
        step = n if batch_size is None else batch_size
        for i in range(0, n, max(step, 1)):
            yield self.episodes(classes[i:i + step], samples[i:i + step])
