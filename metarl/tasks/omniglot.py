"""Omniglot (Lake et al. 2015) for few-shot classification, read straight from the two original zips.

:func:`load_omniglot` decodes all 1,623 characters x 20 drawers once into uint8 ``[1623, 20, S, S]``
(S = 28 by default, the size Vinyals et al. 2016 and MAML use) and caches that array (see
``episodes.cached_arrays``); :func:`omniglot_split` then makes a :class:`ClassPool` for one split.

Pixel convention: the PNGs are 1-bit with white background and black ink. We convert to 8-bit
grayscale, resize with Lanczos (antialiased, so thin strokes survive the 105 → 28 reduction as grey
levels instead of vanishing), and *invert*, so ink is high (255, i.e. 1.0 after the sampler's /255)
and the background is 0. A zero background is what zero padding in a conv net assumes.

Location: ``data_dir`` argument, else ``$METARL_DATA``, else ``<repo>/../shared/data/omniglot``; each
may be the folder holding the zips or its parent (see ``episodes.find_dataset_dir``).
"""
from __future__ import annotations

import io
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from metarl.tasks.episodes import (ClassPool, DataError, FIX_HINT, cached_arrays, find_dataset_dir, read_md5sums,
                                   require_file, verify_md5)

BACKGROUND, EVALUATION = "images_background", "images_evaluation"
ZIPS = (BACKGROUND, EVALUATION)
DRAWERS = 20
PROTOCOLS = {"vinyals": ("train", "val", "trainval", "test"), "lake": ("train", "val", "trainval", "test")}
LAKE_VAL_EVERY = 6
"""Lake protocol validation split: every 6th background alphabet in name order (5 of 30)."""
_CACHE_VERSION = "omniglot-v1"  # bump when the decoding changes


@dataclass(frozen=True)
class OmniglotArrays:
    """Every Omniglot character, background alphabets first (then evaluation), each sorted by name.

    ``images`` is uint8 ``[n_characters, 20, S, S]``, ink = 255, background = 0; row ``i`` is the
    character ``alphabets[i]/characters[i]`` from zip ``sources[i]`` (``images_background`` or
    ``images_evaluation``), and drawer ``d`` (0-based) is file ``XXXX_{d+1:02d}.png``.
    """

    images: np.ndarray
    alphabets: tuple[str, ...]
    characters: tuple[str, ...]
    sources: tuple[str, ...]
    data_dir: Path

    @property
    def n_characters(self) -> int:
        return len(self.images)

    @property
    def names(self) -> tuple[str, ...]:
        """``Alphabet/characterNN``, the names the split lists use."""
        return tuple(f"{a}/{c}" for a, c in zip(self.alphabets, self.characters))


def _decode_png(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        small = im.convert("L").resize((size, size), Image.Resampling.LANCZOS)
    return 255 - np.asarray(small, dtype=np.uint8)


def _decode_zip(path: Path, size: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """([n_chars, 20, size, size] uint8, [(alphabet, character)]) from one ``images_*.zip``.

    Without an ``MD5SUMS`` beside the zips nothing has checked them before decoding, so a
    truncated or damaged zip surfaces here (``BadZipFile``, ``Bad CRC-32``, a broken PNG): one line."""
    try:
        return _decode_zip_unchecked(path, size)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, SyntaxError) as e:  # PIL: OSError/SyntaxError
        raise DataError(f"{path} is damaged ({type(e).__name__}: {' '.join(str(e).split())}): copy it again, or "
                        f"{FIX_HINT} pointing at a good copy (an MD5SUMS file beside it checks copies)") from None


def _decode_zip_unchecked(path: Path, size: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
    groups: dict[tuple[str, str], dict[int, str]] = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if not name.endswith(".png"):
                continue
            parts = name.split("/")
            try:
                _, alphabet, character, fname = parts
                drawer = int(fname[:-4].rsplit("_", 1)[1])
            except ValueError:
                raise DataError(f"{path} has an unexpected entry {name!r} (want <zip>/<Alphabet>/characterNN/"
                                f"XXXX_YY.png): use the original Omniglot zips") from None
            groups.setdefault((alphabet, character), {})[drawer] = name
        keys = sorted(groups)
        images = np.empty((len(keys), DRAWERS, size, size), dtype=np.uint8)
        for i, key in enumerate(keys):
            files = groups[key]
            if sorted(files) != list(range(1, DRAWERS + 1)):
                raise DataError(f"{path}: {'/'.join(key)} has drawers {sorted(files)}, expected 1..{DRAWERS}: "
                                f"use the original Omniglot zips")
            for drawer, name in files.items():
                images[i, drawer - 1] = _decode_png(zf.read(name), size)
    return images, keys


def _build(zips: dict[str, Path], md5s: dict[str, str | None], size: int) -> dict[str, np.ndarray]:
    parts, meta = [], []
    for source, path in zips.items():
        verify_md5(path, md5s[source])  # before decoding: a corrupt zip must not end up in the cache
        images, keys = _decode_zip(path, size)
        parts.append(images)
        meta += [(a, c, source) for a, c in keys]
    alphabets, characters, sources = (np.array(col) for col in zip(*meta))
    return {"images": np.concatenate(parts), "alphabets": alphabets, "characters": characters, "sources": sources}


def load_omniglot(data_dir: str | os.PathLike | None = None, image_size: int = 28,
                  cache_dir: str | os.PathLike | None = None) -> OmniglotArrays:
    """All 1,623 Omniglot characters as :class:`OmniglotArrays` (decoded once, then cached).

    The zips are md5-checked against the folder's ``MD5SUMS`` when the cache is built; later loads
    only compare their size and mtime with those recorded in the cache. The cache file name is keyed
    by the md5s listed in ``MD5SUMS`` (computed if it lists none), ``image_size`` and the folder, so
    other data never reuses a stale cache and two copies do not keep overwriting one cache file.
    ``cache_dir`` overrides ``$METARL_CACHE``.
    """
    folder = find_dataset_dir(("omniglot",), [f"{z}.zip" for z in ZIPS], "images_background.zip and "
                              "images_evaluation.zip", data_dir)
    zips = {z: require_file(folder / f"{z}.zip", f"Omniglot {z} zip") for z in ZIPS}
    listed = read_md5sums(folder)
    md5s = {z: listed.get(f"{z}.zip") for z in ZIPS}
    key = "|".join([_CACHE_VERSION, str(image_size), str(folder.resolve()),
                    *(md5s[z] or verify_md5(zips[z], None) for z in ZIPS)])
    arrays = cached_arrays("omniglot", key, list(zips.values()), lambda: _build(zips, md5s, image_size), cache_dir)
    return OmniglotArrays(arrays["images"], *(tuple(arrays[k].tolist()) for k in ("alphabets", "characters",
                                                                                     "sources")), folder)


def _vinyals_classes(arrays: OmniglotArrays, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(character index, quarter turns) per line of ``splits/vinyals/<split>.txt``: the data
    folder's copy if it has one, else the copy shipped in the package (Omniglot as downloaded from
    its authors has no split lists)."""
    rel = f"splits/vinyals/{split}.txt"
    folder = arrays.data_dir if (arrays.data_dir / rel).exists() else Path(__file__).resolve().parents[1]
    path = require_file(folder / rel, "the Vinyals et al. 2016 split list")
    verify_md5(path, read_md5sums(folder).get(rel) or read_md5sums(path.parent).get(path.name))
    index = {name: i for i, name in enumerate(arrays.names)}
    chars, turns = [], []
    for line in filter(None, map(str.strip, path.read_text().splitlines())):
        name, _, rot = line.rpartition("/")
        if name not in index or rot not in ("rot000", "rot090", "rot180", "rot270"):
            raise DataError(f"{path}: unknown class {line!r}; its lines must be Alphabet/characterNN/rotDDD "
                            f"naming characters in the zips ({FIX_HINT})")
        chars.append(index[name])
        turns.append(int(rot[3:]) // 90)
    return np.array(chars, dtype=np.int64), np.array(turns, dtype=np.int64)


def omniglot_split(arrays: OmniglotArrays, split: str = "train", protocol: str = "vinyals",
                   rotations: bool | None = None) -> ClassPool:
    """The classes of one split as a :class:`ClassPool`, class names ``Alphabet/characterNN/rotDDD``.

    ``protocol="vinyals"`` (default) is the split of Vinyals et al. 2016 used by Matching Nets,
    ProtoNets and MAML: all 1,623 characters pooled, 1,200 for meta-training (``train`` 1,028 +
    ``val`` 172 = ``trainval``) and 423 for ``test``, each rotated by 0/90/180/270 degrees as four
    separate classes (4,112 / 688 / 4,800 / 1,692 classes), read from ``splits/vinyals/``.
    ``protocol="lake"`` is Lake et al.'s original split: ``trainval`` = the 964 background characters,
    ``test`` = the 659 evaluation characters, i.e. meta-test alphabets are never seen in training;
    ``val`` holds out whole background alphabets (every 6th in name order: 5 of the 30) and
    ``train`` is the other 25, so a step size chosen on ``val`` was chosen on unseen alphabets.
    ``rotations`` defaults to on for vinyals and off for lake; ``False`` keeps only the rot000 classes,
    ``True`` makes four classes per character. Rotations are applied lazily when images are gathered.
    """
    if protocol not in PROTOCOLS or split not in PROTOCOLS[protocol]:
        raise ValueError(f"unknown Omniglot split {protocol}/{split}: choose one of "
                         + ", ".join(f"{p}/{s}" for p, ss in PROTOCOLS.items() for s in ss))
    if protocol == "vinyals":
        chars, turns = _vinyals_classes(arrays, split)
        if rotations is False:
            chars, turns = chars[turns == 0], turns[turns == 0]
    else:
        sources, alphabets = np.array(arrays.sources), np.array(arrays.alphabets)
        base = np.flatnonzero(sources == (EVALUATION if split == "test" else BACKGROUND))
        if split in ("train", "val"):
            names = sorted(set(alphabets[base].tolist()))
            held = {a for i, a in enumerate(names) if i % LAKE_VAL_EVERY == LAKE_VAL_EVERY - 1}
            base = base[np.isin(alphabets[base], list(held)) == (split == "val")]
        n_rot = 4 if rotations else 1
        chars, turns = np.repeat(base, n_rot), np.tile(np.arange(n_rot), len(base))
    names = arrays.names
    class_names = [f"{names[c]}/rot{90 * t:03d}" for c, t in zip(chars.tolist(), turns.tolist())]
    size = arrays.images.shape[-1]
    members = chars[:, None] * DRAWERS + np.arange(DRAWERS)
    return ClassPool(arrays.images.reshape(-1, size, size), members, class_names, turns)
