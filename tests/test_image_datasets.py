"""MiniImageNet and CIFAR-FS loaders on tiny fixtures written to tmp_path in each supported layout
(5 classes x 6 random images; train gets 3 classes, val and test 1 each)."""
import csv
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from metarl.tasks import image_datasets
from metarl.tasks.episodes import DataError, EpisodeSampler
from metarl.tasks.image_datasets import load_cifar_fs, load_mini_imagenet

CLASSES = {"train": ["n01", "n02", "n03"], "val": ["n04"], "test": ["n05"]}
PER_CLASS = 6


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.setenv("METARL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METARL_DATA", raising=False)


def random_images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture
def mini_csv(tmp_path):
    root = tmp_path / "miniimagenet"
    (root / "images").mkdir(parents=True)
    pixels = random_images(5 * PER_CLASS, 90, 100)  # not 84x84: the loader must resize
    i = 0
    for split, classes in CLASSES.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            for wnid in classes:
                for j in range(PER_CLASS):
                    name = f"{wnid}{j:08d}.jpg"
                    Image.fromarray(pixels[i]).save(root / "images" / name)
                    writer.writerow([name, wnid])
                    i += 1
    return root


@pytest.fixture
def mini_pickle(tmp_path):
    root = tmp_path / "mini-imagenet"
    root.mkdir()
    images = random_images(3 * PER_CLASS, 84, 84, seed=1)
    class_dict = {wnid: list(range(c, len(images), 3)) for c, wnid in enumerate(CLASSES["train"])}  # interleaved
    with open(root / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": images, "class_dict": class_dict}, f)
    return root, images, class_dict


@pytest.fixture
def cifar_folder(tmp_path):
    base = tmp_path / "cifar-fs" / "cifar100"
    (base / "splits" / "bertinetto").mkdir(parents=True)
    pixels = random_images(5 * PER_CLASS, 32, 32, seed=2)
    i = 0
    for split, classes in CLASSES.items():
        names = [f"thing_{c}" for c in classes]
        (base / "splits" / "bertinetto" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            (base / "data" / name).mkdir(parents=True)
            for j in range(PER_CLASS):
                Image.fromarray(pixels[i]).save(base / "data" / name / f"{name}_s_{j:06d}.png")
                i += 1
    return tmp_path / "cifar-fs", pixels


@pytest.fixture
def cifar_pickle(tmp_path):
    root = tmp_path / "cifar_fs"
    root.mkdir()
    images = random_images(3 * PER_CLASS, 32, 32, seed=3)
    labels = [[42, 7, 99][i % 3] for i in range(len(images))]
    with open(root / "CIFAR_FS_train.pickle", "wb") as f:
        pickle.dump({"data": images, "labels": labels}, f, protocol=2)
    return root, images, labels


def check_pool(pool, n_classes, shape):
    assert pool.n_classes == n_classes and pool.counts.tolist() == [PER_CLASS] * n_classes
    assert pool.image_shape == shape
    imgs = pool.images(0)
    assert imgs.shape == (PER_CLASS, *shape) and imgs.dtype == np.uint8
    ep = EpisodeSampler(pool, n_way=n_classes, k_shot=2, q_query=3, seed=0).sample(4)
    assert ep.x_support.shape == (4, 2 * n_classes, *shape) and ep.x_query.shape == (4, 3 * n_classes, *shape)
    assert ep.x_support.dtype == torch.float32 and 0 <= float(ep.x_query.min()) <= float(ep.x_query.max()) <= 1


def test_mini_imagenet_csv_layout(mini_csv, tmp_path, monkeypatch):
    pool = load_mini_imagenet("train", data_dir=mini_csv)
    check_pool(pool, 3, (3, 84, 84))
    assert pool.class_names == ("n01", "n02", "n03")
    for split in ("val", "test"):
        assert load_mini_imagenet(split, data_dir=tmp_path).class_names == tuple(CLASSES[split])  # parent works
    assert len(list((tmp_path / "cache").glob("mini-imagenet-*.npz"))) == 3

    def no_decoding(*args):
        raise AssertionError("second load must come from the cache")

    monkeypatch.setattr(image_datasets, "_decode", no_decoding)
    again = load_mini_imagenet("train", data_dir=mini_csv)
    np.testing.assert_array_equal(again.images(2), pool.images(2))


def test_mini_imagenet_cache_notices_a_changed_image(mini_csv):
    before = load_mini_imagenet("test", data_dir=mini_csv, image_size=20)
    path = mini_csv / "images" / "n0500000000.jpg"
    Image.fromarray(np.zeros((90, 100, 3), np.uint8)).save(path)
    after = load_mini_imagenet("test", data_dir=mini_csv, image_size=20)
    assert after.images(0).shape == (PER_CLASS, 3, 20, 20)
    assert after.images(0)[0].max() < 10 and not np.array_equal(before.images(0)[0], after.images(0)[0])


def test_mini_imagenet_pickle_layout(mini_pickle):
    root, images, class_dict = mini_pickle
    pool = load_mini_imagenet("train", data_dir=root)
    check_pool(pool, 3, (3, 84, 84))
    np.testing.assert_array_equal(pool.images(1), images[class_dict["n02"]].transpose(0, 3, 1, 2))
    with pytest.raises(DataError, match="val"):  # this copy has no val split at all
        load_mini_imagenet("val", data_dir=root)


def test_cifar_fs_folder_layout(cifar_folder, monkeypatch):
    root, pixels = cifar_folder
    monkeypatch.setenv("METARL_DATA", str(root.parent))  # a folder holding cifar-fs/
    pool = load_cifar_fs("train")
    check_pool(pool, 3, (3, 32, 32))
    assert pool.class_names == ("thing_n01", "thing_n02", "thing_n03")
    np.testing.assert_array_equal(pool.images(0), pixels[:PER_CLASS].transpose(0, 3, 1, 2))  # PNG is lossless
    assert load_cifar_fs("test", data_dir=root / "cifar100").n_classes == 1  # pointing at cifar100/ works too


def test_cifar_fs_pickle_layout(cifar_pickle):
    root, images, labels = cifar_pickle
    pool = load_cifar_fs("train", data_dir=root)
    check_pool(pool, 3, (3, 32, 32))
    assert pool.class_names == ("7", "42", "99")
    np.testing.assert_array_equal(pool.images(0), images[np.array(labels) == 7].transpose(0, 3, 1, 2))
    assert load_cifar_fs("train", data_dir=root, image_size=16).image_shape == (3, 16, 16)


@pytest.mark.parametrize("loader", [load_mini_imagenet, load_cifar_fs])
def test_missing_data_errors(loader, tmp_path):
    with pytest.raises(DataError) as err:
        loader("train", data_dir=tmp_path / "missing")
    msg = str(err.value)
    assert "\n" not in msg and "--data-dir" in msg and "METARL_DATA" in msg
    with pytest.raises(ValueError, match="unknown split"):
        loader("trainval", data_dir=tmp_path)


def test_bad_pickle_and_missing_images(mini_csv, cifar_pickle):
    root, _, _ = cifar_pickle
    with open(root / "CIFAR_FS_val.pickle", "wb") as f:
        pickle.dump({"data": [1, 2, 3]}, f)
    with pytest.raises(DataError, match="labels"):
        load_cifar_fs("val", data_dir=root)
    (mini_csv / "images" / "n0100000003.jpg").unlink()
    with pytest.raises(DataError, match="n0100000003.jpg is missing"):
        load_mini_imagenet("train", data_dir=mini_csv)
