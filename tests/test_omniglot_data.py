"""Omniglot loader against the real shared zips: counts, splits, rotations, cache, md5 and missing-data
errors. The decoded cache is built once per session (~5 s) into a temporary folder, never the user's."""
import shutil
import zipfile

import numpy as np
import pytest
import torch

from metarl.tasks.episodes import SHARED_DATA, DataError, EpisodeSampler
from metarl.tasks.omniglot import load_omniglot, omniglot_split

OMNIGLOT = SHARED_DATA / "omniglot"
pytestmark = pytest.mark.skipif(not (OMNIGLOT / "images_background.zip").is_file(),
                                reason=f"shared Omniglot not at {OMNIGLOT}")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.setenv("METARL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METARL_DATA", raising=False)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.fixture(scope="session")
def omniglot(cache_dir):
    return load_omniglot(OMNIGLOT, cache_dir=cache_dir)  # decoding time: benchmarks/data_speed.py


@pytest.fixture(scope="session")
def vinyals(omniglot):
    return {s: omniglot_split(omniglot, s) for s in ("train", "val", "trainval", "test")}


def characters(pool):
    """Character names (rotation suffix dropped) of a pool's classes."""
    return {name.rsplit("/", 1)[0] for name in pool.class_names}


def test_counts_shapes_and_ink_convention(omniglot):
    assert omniglot.images.shape == (1623, 20, 28, 28) and omniglot.images.dtype == np.uint8
    sources = np.array(omniglot.sources)
    assert (sources == "images_background").sum() == 964 and (sources == "images_evaluation").sum() == 659
    assert len(set(np.array(omniglot.alphabets)[sources == "images_background"])) == 30
    assert len(set(np.array(omniglot.alphabets)[sources == "images_evaluation"])) == 20
    assert len(set(omniglot.names)) == 1623
    # ink high, background 0: most pixels are background, strokes reach full intensity
    sample = omniglot.images[::50]
    assert np.median(sample) == 0 and sample.max() == 255 and 0.05 < (sample > 127).mean() < 0.3


def test_vinyals_split_sizes_and_no_overlap(vinyals):
    sizes = {s: (p.n_classes, len(characters(p))) for s, p in vinyals.items()}
    assert sizes == {"train": (4112, 1028), "val": (688, 172), "trainval": (4800, 1200), "test": (1692, 423)}
    assert characters(vinyals["train"]) | characters(vinyals["val"]) == characters(vinyals["trainval"])
    assert not characters(vinyals["train"]) & characters(vinyals["val"])
    assert not characters(vinyals["trainval"]) & characters(vinyals["test"])
    assert all(p.counts.tolist() == [20] * p.n_classes for p in vinyals.values())


def test_vinyals_without_rotations(omniglot):
    pool = omniglot_split(omniglot, "train", rotations=False)
    assert pool.n_classes == 1028 and all(n.endswith("/rot000") for n in pool.class_names)


def test_lake_protocol(omniglot):
    """Lake et al.'s split: background vs evaluation alphabets; val holds out 5 whole background
    alphabets (every 6th by name), train the other 25, trainval all 30 (964 characters)."""
    trainval, test = omniglot_split(omniglot, "trainval", "lake"), omniglot_split(omniglot, "test", "lake")
    train, val = omniglot_split(omniglot, "train", "lake"), omniglot_split(omniglot, "val", "lake")
    assert (trainval.n_classes, test.n_classes) == (964, 659)
    alphabets = lambda pool: {n.split("/")[0] for n in pool.class_names}
    assert not characters(trainval) & characters(test) and alphabets(trainval).isdisjoint(alphabets(test))
    assert len(alphabets(trainval)) == 30 and len(alphabets(val)) == 5 and alphabets(train).isdisjoint(alphabets(val))
    assert sorted(alphabets(val)) == sorted(alphabets(trainval))[5::6]
    assert train.n_classes + val.n_classes == 964 and characters(train) | characters(val) == characters(trainval)
    assert omniglot_split(omniglot, "trainval", "lake", rotations=True).n_classes == 4 * 964
    with pytest.raises(ValueError, match="lake/train"):
        omniglot_split(omniglot, "valid", "lake")


def test_rotated_classes_are_rot90_of_the_original(vinyals):
    pool = vinyals["test"]
    index = {n: i for i, n in enumerate(pool.class_names)}
    name = pool.class_names[0].rsplit("/", 1)[0]
    upright = pool.images(index[f"{name}/rot000"])
    assert upright.shape == (20, 1, 28, 28) and upright.dtype == np.uint8
    for k in (1, 2, 3):
        rotated = pool.images(index[f"{name}/rot{90 * k:03d}"])
        np.testing.assert_array_equal(rotated[:, 0], np.rot90(upright[:, 0], k, axes=(1, 2)))


def test_images_match_the_pngs(omniglot):
    """Row/drawer bookkeeping: the cached array equals a fresh decode of the file it claims to be."""
    from PIL import Image
    i = omniglot.names.index("Greek/character03")
    with zipfile.ZipFile(OMNIGLOT / "images_background.zip") as zf:
        name = next(n for n in zf.namelist() if n.startswith("images_background/Greek/character03/")
                    and n.endswith("_07.png"))
        with zf.open(name) as f:
            img = Image.open(f).convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(omniglot.images[i, 6], 255 - np.asarray(img))


def test_cache_round_trip_does_not_decode_again(omniglot, cache_dir, monkeypatch):
    """A second load reads the cache: no zip is opened for decoding (load time: benchmarks/data_speed.py)."""
    import metarl.tasks.omniglot as omniglot_module

    assert len(list(cache_dir.glob("omniglot-*.npz"))) == 1 and not list(cache_dir.glob("*.tmp"))

    def no_decoding(*args):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(omniglot_module, "_decode_zip", no_decoding)
    again = load_omniglot(OMNIGLOT, cache_dir=cache_dir)
    np.testing.assert_array_equal(again.images, omniglot.images)
    assert again.names == omniglot.names and again.sources == omniglot.sources


def test_location_from_env_folder_or_parent_and_default(omniglot, cache_dir, monkeypatch):
    for value in (OMNIGLOT, OMNIGLOT.parent):  # METARL_DATA may be the folder or hold omniglot/
        monkeypatch.setenv("METARL_DATA", str(value))
        assert load_omniglot(cache_dir=cache_dir).data_dir.resolve() == OMNIGLOT.resolve()
    monkeypatch.delenv("METARL_DATA")
    assert load_omniglot(cache_dir=cache_dir).data_dir.resolve() == OMNIGLOT.resolve()


def test_missing_folder_error_names_the_fix(tmp_path, monkeypatch):
    with pytest.raises(DataError) as err:
        load_omniglot(tmp_path / "nowhere")
    msg = str(err.value)
    assert "\n" not in msg and "--data-dir" in msg and "METARL_DATA" in msg and "images_background.zip" in msg
    monkeypatch.setenv("METARL_DATA", str(tmp_path / "also-nowhere"))
    with pytest.raises(DataError, match="also-nowhere"):
        load_omniglot()


def test_missing_zip_error(tmp_path):
    (tmp_path / "images_background.zip").symlink_to(OMNIGLOT / "images_background.zip")
    with pytest.raises(DataError, match="images_evaluation.zip is missing"):
        load_omniglot(tmp_path)


def test_md5_mismatch_names_the_file(tmp_path):
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as zf:
        zf.writestr("images_background/A/character01/0001_01.png", b"not a png")
    (tmp_path / "images_evaluation.zip").symlink_to(OMNIGLOT / "images_evaluation.zip")
    shutil.copy(OMNIGLOT / "MD5SUMS", tmp_path / "MD5SUMS")
    with pytest.raises(DataError) as err:
        load_omniglot(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "images_background.zip is corrupt" in msg
    assert "expected e4afdd985f403b62e1e2a23108ab30f6" in msg
    assert not list((tmp_path / "cache").glob("*.npz"))  # nothing cached from a bad zip


def test_episodes_from_real_omniglot(vinyals):
    sampler = EpisodeSampler(vinyals["test"], n_way=20, k_shot=5, seed=0)
    ep = sampler.sample(32)
    assert ep.x_support.shape == (32, 100, 1, 28, 28) and ep.x_query.shape == (32, 100, 1, 28, 28)
    assert 0.0 <= float(ep.x_support.min()) and float(ep.x_support.max()) == 1.0
    assert 0.02 < float(ep.x_support.mean()) < 0.3  # mostly background (0), some ink (1)
    fixed = [next(EpisodeSampler(vinyals["test"], 5, 1, seed=s).fixed_episodes(600, seed=0)) for s in (1, 2)]
    assert fixed[0].x_query.shape == (600, 5, 1, 28, 28)
    assert torch.equal(fixed[0].x_query, fixed[1].x_query)
