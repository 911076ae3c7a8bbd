"""MiniImageNet and CIFAR-FS as :class:`ClassPool`\\ s, read from their common on-disk layouts.

* MiniImageNet (Vinyals et al. 2016, with the class split of Ravi & Larochelle 2017: 64 train, 16 val,
  20 test classes x 600 images, 84x84 RGB). Either the pickles ``mini-imagenet-cache-{train,val,test}.pkl``
  (dict ``image_data`` uint8 ``[N, 84, 84, 3]`` + ``class_dict`` ``{label: [row indices]}``), or Ravi &
  Larochelle's CSV layout: ``images/*.jpg`` plus ``{train,val,test}.csv`` with header ``filename,label``.
* CIFAR-FS (Bertinetto et al. 2019: CIFAR-100 split 64/16/20 classes x 600 images, 32x32 RGB). Either
  ``cifar100/data/<class>/*.png`` + ``cifar100/splits/bertinetto/{train,val,test}.txt`` (one class name a
  line), or the pickles ``CIFAR_FS_{train,val,test}.pickle`` (``data`` uint8 ``[N, 32, 32, 3]``,
  ``labels`` ints; Python 2 pickles, hence ``encoding="latin1"``).

When both layouts are present the pickle wins (it needs no decoding). Folder layouts are decoded once
(resized with Lanczos to ``image_size`` when needed) and cached like Omniglot (``episodes.cached_arrays``).
Pickles can run code when loaded: only point ``data_dir`` at files you trust.
Location: ``data_dir`` argument, else ``$METARL_DATA``, else ``<repo>/../shared/data/<dataset>``; each may
be the dataset folder or its parent (``episodes.find_dataset_dir`` lists the accepted folder names).
"""
from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from metarl.tasks.episodes import ClassPool, DataError, FIX_HINT, cached_arrays, find_dataset_dir, md5_file, require_file

SPLITS = ("train", "val", "test")
MINI_IMAGENET_NAMES = ("miniimagenet", "mini-imagenet", "mini_imagenet", "miniImageNet")
CIFAR_FS_NAMES = ("cifar-fs", "cifar_fs", "CIFAR-FS", "cifarfs")
_CACHE_VERSION = "folder-v1"  # bump when the decoding changes

PathLike = str | os.PathLike


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")


def _decode(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8)


def _resize(data: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] → [N, size, size, 3] (no copy if already that size)."""
    if data.shape[1:3] == (size, size):
        return data
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.Resampling.LANCZOS)) for x in data])


def _load_pickle(path: Path, keys: Sequence[str]) -> dict:
    with open(path, "rb") as f:
        try:
            obj = pickle.load(f, encoding="latin1")
        except Exception as e:  # pickle raises many types for damaged files
            raise DataError(f"{path} could not be unpickled ({type(e).__name__}: {e}): copy it again, or "
                            f"{FIX_HINT}") from None
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise DataError(f"{path} is not the expected pickle (a dict with keys {', '.join(keys)}): {FIX_HINT}")
    data = np.asarray(obj[keys[0]])
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] != 3:
        raise DataError(f"{path}: {keys[0]} is {data.dtype} {data.shape}, expected uint8 [N, H, W, 3]: {FIX_HINT}")
    return {**obj, keys[0]: data}


def _folder_pool(name: str, list_file: Path, files: Mapping[str, Sequence[Path]], image_size: int,
                 cache_dir: PathLike | None) -> ClassPool:
    """Pool of ``files[class name]``, decoded to ``image_size`` once and cached.

    The cache key covers the split list's md5, the image size and the folder (so two copies of a
    dataset do not keep overwriting each other's cache); every image's size and mtime are checked on
    load, so an edited image triggers a rebuild.
    """
    class_names = sorted(files)
    paths = [p for c in class_names for p in files[c]]
    for p in paths:
        require_file(p, f"an image listed for {name}")

    def build() -> dict[str, np.ndarray]:
        data = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
        for i, p in enumerate(paths):
            data[i] = _decode(p, image_size)
        labels = np.repeat(np.arange(len(class_names)), [len(files[c]) for c in class_names])
        return {"data": data, "labels": labels}

    key = "|".join([_CACHE_VERSION, name, str(list_file.resolve()), md5_file(list_file), str(image_size)])
    slug = f"{name}-{list_file.stem}-{image_size}px"
    arrays = cached_arrays(slug, key, [list_file, *paths], build, cache_dir)
    return ClassPool.from_labels(arrays["data"], arrays["labels"], class_names)


def load_mini_imagenet(split: str = "train", data_dir: PathLike | None = None, image_size: int = 84,
                       cache_dir: PathLike | None = None) -> ClassPool:
    """One MiniImageNet split (Ravi & Larochelle 2017 classes) as a ClassPool of [3, S, S] images.
    Class names are the ImageNet wnids (CSV layout) or the pickle's ``class_dict`` keys."""
    _check_split(split)
    root = find_dataset_dir(MINI_IMAGENET_NAMES, [f"mini-imagenet-cache-{s}.pkl" for s in SPLITS]
                            + [f"{s}.csv" for s in SPLITS], "mini-imagenet-cache-{train,val,test}.pkl, or "
                            "images/ with train.csv, val.csv and test.csv", data_dir)
    pkl = root / f"mini-imagenet-cache-{split}.pkl"
    if pkl.is_file():
        obj = _load_pickle(pkl, ("image_data", "class_dict"))
        names = sorted(obj["class_dict"])
        return ClassPool(_resize(obj["image_data"], image_size), [obj["class_dict"][n] for n in names],
                         [str(n) for n in names])
    list_file = require_file(root / f"{split}.csv", f"MiniImageNet {split} list, or {pkl.name}")
    files: dict[str, list[Path]] = {}
    with open(list_file, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"filename", "label"} <= set(reader.fieldnames):
            raise DataError(f"{list_file} must have the header 'filename,label': {FIX_HINT}")
        for row in reader:
            files.setdefault(row["label"], []).append(root / "images" / row["filename"])
    return _folder_pool("mini-imagenet", list_file, files, image_size, cache_dir)


def load_cifar_fs(split: str = "train", data_dir: PathLike | None = None, image_size: int = 32,
                  cache_dir: PathLike | None = None) -> ClassPool:
    """One CIFAR-FS split (Bertinetto et al. 2019) as a ClassPool of [3, S, S] images. Class names are
    the CIFAR-100 class names (folder layout) or the CIFAR-100 label numbers as strings (pickles)."""
    _check_split(split)
    root = find_dataset_dir(CIFAR_FS_NAMES, ["cifar100/splits/bertinetto", "splits/bertinetto"]
                            + [f"CIFAR_FS_{s}.pickle" for s in SPLITS], "cifar100/data/ and "
                            "cifar100/splits/bertinetto/, or CIFAR_FS_{train,val,test}.pickle", data_dir)
    pkl = root / f"CIFAR_FS_{split}.pickle"
    if pkl.is_file():
        obj = _load_pickle(pkl, ("data", "labels"))
        values, labels = np.unique(np.asarray(obj["labels"], dtype=np.int64), return_inverse=True)
        if len(labels) != len(obj["data"]):
            raise DataError(f"{pkl}: {len(labels)} labels for {len(obj['data'])} images: {FIX_HINT}")
        return ClassPool.from_labels(_resize(obj["data"], image_size), labels, [str(v) for v in values])
    base = root / "cifar100" if (root / "cifar100").is_dir() else root
    list_file = require_file(base / "splits" / "bertinetto" / f"{split}.txt", f"CIFAR-FS {split} class list")
    files = {}
    for cls in (line.strip() for line in list_file.read_text().splitlines() if line.strip()):
        files[cls] = sorted((base / "data" / cls).glob("*.png"))
        if not files[cls]:
            raise DataError(f"{base / 'data' / cls} has no .png images (class listed in {list_file}): {FIX_HINT}")
    return _folder_pool("cifar-fs", list_file, files, image_size, cache_dir)
