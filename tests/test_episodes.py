"""EpisodeSampler / ClassPool on small synthetic pools, plus the shared data plumbing (locating data,
md5 checks, the atomic cache). No real dataset is needed here."""
import os
import time
import warnings

import numpy as np
import pytest
import torch

from metarl.tasks.episodes import (ClassPool, DataError, EpisodeSampler, cached_arrays, find_dataset_dir,
                                   read_md5sums, verify_md5)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.setenv("METARL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METARL_DATA", raising=False)


def id_pool(n_classes=6, per_class=8, size=4, channels=None, counts=None):
    """Pool whose image (c, s) is filled with the value 10*c + s: the pixels say where they came from."""
    counts = counts or [per_class] * n_classes
    values = np.concatenate([10 * c + np.arange(n) for c, n in enumerate(counts)]).astype(np.uint8)
    shape = (size, size) if channels is None else (size, size, channels)
    data = np.broadcast_to(values.reshape(-1, *[1] * len(shape)), (len(values), *shape)).copy()
    members = np.split(np.arange(len(values)), np.cumsum(counts)[:-1])
    return ClassPool(data, members, [f"class{c}" for c in range(len(counts))])


def pixel_ids(x):
    """[..., C, H, W] float in [0,1] → the integer id each image was filled with."""
    return torch.round(x[..., 0, 0, 0] * 255).to(torch.int64)


def test_shapes_dtypes_and_default_query_equals_shot():
    pool = id_pool(channels=3, size=5)
    ep = EpisodeSampler(pool, n_way=4, k_shot=2, seed=0).sample(3)
    assert ep.x_support.shape == (3, 8, 3, 5, 5) and ep.x_query.shape == (3, 8, 3, 5, 5)  # Q defaults to K
    assert ep.x_support.dtype == torch.float32 and ep.y_support.dtype == torch.int64
    assert ep.y_support.shape == (3, 8) and ep.y_query.shape == (3, 8)
    assert 0.0 <= float(ep.x_support.min()) and float(ep.x_support.max()) <= 1.0
    assert ep.y_support[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # class-major
    gray = EpisodeSampler(id_pool(), 3, 1, q_query=4).sample(2)
    assert gray.x_support.shape == (2, 3, 1, 4, 4) and gray.x_query.shape == (2, 12, 1, 4, 4)


def test_images_come_from_the_labelled_class_and_support_query_are_disjoint():
    pool = id_pool(n_classes=6, per_class=8)
    sampler = EpisodeSampler(pool, n_way=5, k_shot=3, q_query=5, seed=1)
    classes, samples = sampler.sample_indices(40)
    ep = sampler.episodes(classes, samples)
    sup, qry = pixel_ids(ep.x_support), pixel_ids(ep.x_query)
    for e in range(40):
        assert len(set(classes[e].tolist())) == 5
        for label in range(5):
            s_ids = sup[e][ep.y_support[e] == label]
            q_ids = qry[e][ep.y_query[e] == label]
            assert set((s_ids // 10).tolist()) == set((q_ids // 10).tolist()) == {int(classes[e, label])}
            assert len(set(s_ids.tolist()) | set(q_ids.tolist())) == 3 + 5  # all distinct images
    assert (np.sort(samples, axis=-1)[..., 1:] != np.sort(samples, axis=-1)[..., :-1]).all()


def test_labels_are_permuted_across_episodes():
    sampler = EpisodeSampler(id_pool(n_classes=5), n_way=5, k_shot=1, seed=2)
    classes, _ = sampler.sample_indices(200)
    assert len({tuple(c) for c in classes.tolist()}) > 50  # many class -> label assignments
    for c in range(5):  # every class gets every label, roughly uniformly
        counts = np.bincount(np.argmax(classes == c, axis=1), minlength=5)
        assert counts.min() > 15


def test_support_and_query_positions_are_unbiased():
    sampler = EpisodeSampler(id_pool(n_classes=2, per_class=4), n_way=1, k_shot=1, q_query=1, seed=3)
    _, samples = sampler.sample_indices(2000)
    support_first = np.bincount(samples[:, 0, 0], minlength=4)
    assert support_first.min() > 400  # each of the 4 images is the support image ~1/4 of the time


def test_deterministic_by_seed_and_fixed_episodes():
    pool = id_pool()
    a = EpisodeSampler(pool, 3, 2, seed=7).sample(5)
    b = EpisodeSampler(pool, 3, 2, seed=7).sample(5)
    c = EpisodeSampler(pool, 3, 2, seed=8).sample(5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(pixel_ids(a.x_support), pixel_ids(c.x_support))

    sampler = EpisodeSampler(pool, 3, 2, seed=0)
    whole = next(sampler.fixed_episodes(10, seed=42))
    sampler.sample(3)  # the sampler's own state must not matter
    batches = list(sampler.fixed_episodes(10, seed=42, batch_size=4))
    assert [len(b.x_support) for b in batches] == [4, 4, 2]
    for field in ("x_support", "y_support", "x_query", "y_query"):
        assert torch.equal(getattr(whole, field), torch.cat([getattr(b, field) for b in batches]))
    other = next(sampler.fixed_episodes(10, seed=43))
    assert not torch.equal(whole.x_support, other.x_support)


def test_rng_arguments():
    sampler = EpisodeSampler(id_pool(), 3, 1, seed=0)
    by_int = sampler.sample(2, rng=5)
    by_np = sampler.sample(2, rng=np.random.default_rng(5))
    assert torch.equal(by_int.x_support, by_np.x_support)
    t1 = sampler.sample(2, rng=torch.Generator().manual_seed(1))
    t2 = sampler.sample(2, rng=torch.Generator().manual_seed(1))
    assert torch.equal(t1.x_support, t2.x_support)
    with pytest.raises(TypeError):
        sampler.sample(1, rng="seed")


def test_uneven_class_sizes_only_draw_existing_images():
    pool = id_pool(counts=[3, 9, 4, 5])
    sampler = EpisodeSampler(pool, n_way=4, k_shot=1, q_query=2, seed=0)
    classes, samples = sampler.sample_indices(300)
    assert (samples < pool.counts[classes][..., None]).all()
    assert set(samples[classes == 1].ravel().tolist()) == set(range(9))  # all images reachable
    ep = sampler.episodes(classes, samples)
    assert ((pixel_ids(ep.x_query) % 10) < 9).all()


def test_invalid_configurations():
    pool = id_pool(n_classes=4, per_class=5)
    with pytest.raises(ValueError, match="n_way"):
        EpisodeSampler(pool, n_way=5, k_shot=1)
    with pytest.raises(ValueError, match="smallest class"):
        EpisodeSampler(pool, n_way=2, k_shot=3)  # K + Q = 6 > 5
    with pytest.raises(IndexError):
        pool.gather(np.array([0]), np.array([[5]]))


def test_rotations_and_channels_first_gather():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (4, 6, 6), dtype=np.uint8)
    pool = ClassPool(data, [[0, 1], [0, 1], [2, 3], [2, 3]], ["a0", "a1", "b0", "b3"], rotations=[0, 1, 0, 3])
    assert pool.image_shape == (1, 6, 6)
    np.testing.assert_array_equal(pool.images(1)[:, 0], np.rot90(data[:2], 1, axes=(1, 2)))
    np.testing.assert_array_equal(pool.images(3)[:, 0], np.rot90(data[2:], 3, axes=(1, 2)))
    np.testing.assert_array_equal(pool.images(0)[:, 0], data[:2])
    rgb = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    pool = ClassPool.from_labels(rgb, np.array([1, 0, 1]), ["x", "y"])
    assert pool.image_shape == (3, 5, 7) and pool.counts.tolist() == [1, 2]
    np.testing.assert_array_equal(pool.images(1), rgb[[0, 2]].transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="non-square"):
        ClassPool(rgb, [[0]], ["x"], rotations=[1])


def test_sampling_from_an_omniglot_sized_rotated_pool():
    """32 episodes of 20-way 5-shot from 1,200 characters x 4 rotations (the shape of Omniglot's
    meta-training pool): every image is the right member of its label's class, rotated by that
    class's quarter turns, with no image twice in an episode. (Its speed is measured in
    benchmarks/data_speed.py, not here.) Each stored image encodes its own row index and an
    orientation mark, so the check is independent of the sampler's gathers."""
    n_chars, drawers = 1200, 20
    data = np.zeros((n_chars * drawers, 28, 28), dtype=np.uint8)
    rows = np.arange(n_chars * drawers)
    data[:, 0, 0], data[:, 0, 1], data[:, 0, 2] = rows // 256, rows % 256, 255
    members = np.repeat(np.arange(n_chars), 4)[:, None] * drawers + np.arange(drawers)
    pool = ClassPool(data, members, [str(i) for i in range(4 * n_chars)], rotations=np.tile(np.arange(4), n_chars))
    ep = EpisodeSampler(pool, n_way=20, k_shot=5, seed=0).sample(32)
    assert ep.x_support.shape == (32, 100, 1, 28, 28) and ep.x_query.shape == (32, 100, 1, 28, 28)

    def decode(img):
        """(row, quarter turns) of one sampled image."""
        img = np.rint(img[0].numpy() * 255).astype(np.int64)
        for turns in range(4):
            u = np.rot90(img, -turns)
            if u[0, 2] == 255:
                return u[0, 0] * 256 + u[0, 1], turns
        raise AssertionError("not an image of the pool")

    for t in range(32):
        x = torch.cat([ep.x_support[t], ep.x_query[t]])
        y = torch.cat([ep.y_support[t], ep.y_query[t]]).tolist()
        assert sorted(y) == sorted(list(range(20)) * 10)
        seen, class_of = set(), {}
        for img, label in zip(x, y):
            row, turns = decode(img)
            pool_class = (row // drawers) * 4 + turns  # character, then its rotation
            assert class_of.setdefault(label, pool_class) == pool_class, "one label, one class"
            assert (row, turns) not in seen
            seen.add((row, turns))
        assert len(set(class_of.values())) == 20, "twenty distinct classes"


# ----------------------------------------------------------------------------- plumbing


def test_find_dataset_dir_accepts_folder_or_parent(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "marker.bin").write_bytes(b"x")
    assert find_dataset_dir(("ds",), ["marker.bin"], "marker.bin", tmp_path) == tmp_path / "ds"
    assert find_dataset_dir(("ds",), ["marker.bin"], "marker.bin", tmp_path / "ds") == tmp_path / "ds"
    monkeypatch.setenv("METARL_DATA", str(tmp_path))
    assert find_dataset_dir(("ds",), ["marker.bin"], "marker.bin") == tmp_path / "ds"
    monkeypatch.setenv("METARL_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(DataError) as err:
        find_dataset_dir(("ds",), ["marker.bin"], "marker.bin")
    msg = str(err.value)
    assert "\n" not in msg and "METARL_DATA" in msg and "--data-dir" in msg and "elsewhere" in msg


def test_md5_helpers(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello")
    (tmp_path / "MD5SUMS").write_text("5d41402abc4b2a76b9719d911017c592  a.bin\n"
                                      "00000000000000000000000000000000 *sub/b.txt\n")
    sums = read_md5sums(tmp_path)
    assert sums == {"a.bin": "5d41402abc4b2a76b9719d911017c592", "sub/b.txt": "0" * 32}
    assert verify_md5(f, sums["a.bin"]) == sums["a.bin"]
    with pytest.raises(DataError, match="a.bin is corrupt: md5 5d41.*expected 0000"):
        verify_md5(f, "0" * 32)


def test_cache_round_trip_and_invalidation(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"v1")
    calls = []

    def build():
        calls.append(1)
        return {"x": np.arange(5, dtype=np.uint8), "names": np.array(["a", "bb"])}

    first = cached_arrays("t", "key", [src], build)
    second = cached_arrays("t", "key", [src], build)
    assert len(calls) == 1 and np.array_equal(first["x"], second["x"]) and second["names"].tolist() == ["a", "bb"]
    files = os.listdir(tmp_path / "cache")  # METARL_CACHE from the autouse fixture
    assert len(files) == 1 and files[0].startswith("t-") and files[0].endswith(".npz")  # no temp files left
    src.write_bytes(b"v2 changed")  # new size → stale
    cached_arrays("t", "key", [src], build)
    assert len(calls) == 2
    cached_arrays("t", "other key", [src], build)
    assert len(calls) == 3 and len(os.listdir(tmp_path / "cache")) == 2


def test_unwritable_cache_warns_but_returns_data(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = cached_arrays("t", "k", [blocker], lambda: {"x": np.zeros(2)}, cache_dir=blocker / "sub")
    assert out["x"].shape == (2,) and any("METARL_CACHE" in str(w.message) for w in caught)
