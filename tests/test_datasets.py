"""Tests for fwdtrans.app._datasets: the shipped CIFAR-10 subset and the official formats of the paper's data sets.

Each official format is written in miniature (a few images per split, in the exact official layout) with numpy,
pickle and gzip, independently of the reader under test.
"""

import importlib.resources
import io
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from datafiles import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    CIFAR_MEAN,
    CIFAR_STD,
    FASHION_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    assert_holds,
    dump,
    imagenet32_split,
    random_split,
    rows,
    write_cifar10,
    write_cifar100,
    write_fashion,
    write_idx,
    write_imagenet32,
    write_map_clsloc,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fwdtrans._errors import FwdTransError
from fwdtrans.app._datasets import DATASETS, ImageDataset, load_dataset
from fwdtrans.app._formats import _read_idx

SOURCE_NPZ = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10" / "cifar10_jpeg.npz"
@pytest.fixture(scope="module")
def subset() -> ImageDataset:
    return load_dataset("cifar10")


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    """All four data sets in their official layouts, in a folder named after each."""
    root = tmp_path_factory.mktemp("official")
    write_cifar10(root / "cifar10" / "cifar-10-batches-py", random_split(3, 32, 10, n_train=10))
    write_cifar100(root / "cifar100" / "cifar-100-python", random_split(3, 32, 100))
    write_fashion(root / "fashion-mnist", random_split(1, 28, 10), gz="mixed")
    write_imagenet32(root / "imagenet32", imagenet32_split())
    return root


# --- choosing a data set --------------------------------------------------------------------------


def test_unknown_dataset_lists_the_valid_ones(tmp_path):
    with pytest.raises(FwdTransError, match="unknown data set 'mnist'") as info:
        load_dataset("mnist", tmp_path)
    assert all(name in str(info.value) for name in DATASETS)


@pytest.mark.parametrize("name", ["cifar100", "fashion-mnist", "imagenet32"])
def test_only_cifar10_loads_without_data_dir(name):
    with pytest.raises(FwdTransError, match="only cifar10 has one.*--data-dir"):
        load_dataset(name)


@pytest.mark.parametrize("name", DATASETS)
def test_missing_folder(tmp_path, name):
    with pytest.raises(FwdTransError, match="nowhere does not exist or is not a folder; expected DATA_DIR"):
        load_dataset(name, tmp_path / "nowhere")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FwdTransError, match="not a folder"):
        load_dataset(name, tmp_path / "file")


@pytest.mark.parametrize("name, listed", [
    ("cifar10", "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch, batches.meta"),
    ("cifar100", "train, test, meta"),
    ("fashion-mnist", ("train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
                       "t10k-labels-idx1-ubyte[.gz]")),
    ("imagenet32", "train_data_batch_1.npz, train_data_batch_2.npz"),
])
def test_empty_folder_lists_every_file(tmp_path, name, listed):
    with pytest.raises(FwdTransError, match="file\\(s\\) missing from") as info:
        load_dataset(name, tmp_path)
    assert listed in str(info.value)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_truncated_file_is_refused_naming_it(official, data):
    name = data.draw(st.sampled_from(DATASETS))
    files = sorted(p.relative_to(official / name) for p in (official / name).rglob("*") if p.is_file())
    target = data.draw(st.sampled_from(files))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        shutil.copytree(official / name, folder)
        raw = (folder / target).read_bytes()
        (folder / target).write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
        with pytest.raises(FwdTransError, match=re.escape(str(folder / target))):
            load_dataset(name, folder)


@pytest.mark.parametrize("name", DATASETS)
def test_each_fixture_loads_whole(official, name):
    data = load_dataset(name, official / name)
    assert data.name == name and len(data.train_x) > 0 and len(data.test_x) == 4


# --- CIFAR-10: the shipped subset -----------------------------------------------------------------


def test_shipped_subset_shapes_and_balance(subset):
    assert subset.train_x.shape == (5000, 3, 32, 32)
    assert subset.test_x.shape == (1000, 3, 32, 32)
    assert subset.train_x.dtype == subset.test_x.dtype == torch.uint8
    assert subset.train_y.dtype == subset.test_y.dtype == torch.int64
    assert torch.bincount(subset.train_y).tolist() == [500] * 10
    assert torch.bincount(subset.test_y).tolist() == [100] * 10
    assert subset.classes == CIFAR10_CLASSES
    assert subset.name == "cifar10_subset"
    assert (subset.mean, subset.std, subset.augment) == (CIFAR_MEAN, CIFAR_STD, True)
    assert (subset.channels, subset.num_classes, subset.image_shape) == (3, 10, (3, 32, 32))
    assert subset.train_x.float().std() > 30  # real images, not a blank decode


def test_shipped_subset_matches_source_pixels(subset):
    if not SOURCE_NPZ.is_file():
        pytest.skip(f"source data set {SOURCE_NPZ.name} not present beside the repository")
    shipped_file = importlib.resources.files("fwdtrans") / "data" / "cifar10_subset.npz"
    with shipped_file.open("rb") as f, np.load(f) as shipped, np.load(SOURCE_NPZ) as source:
        for split, images in (("train", subset.train_x), ("test", subset.test_x)):
            idx = shipped[f"source_indices_{split}"]
            assert len(np.unique(idx)) == len(idx) == len(images)
            np.testing.assert_array_equal(shipped[f"{split}_labels"], source[f"{split}_labels"][idx])
            blob, offsets = source[f"{split}_jpeg"].tobytes(), source[f"{split}_offsets"]
            for i, j in enumerate(idx):
                with Image.open(io.BytesIO(blob[offsets[j]:offsets[j + 1]])) as img:
                    expected = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
                np.testing.assert_array_equal(images[i].numpy(), expected, err_msg=f"{split} image {i}")


# --- CIFAR-10: the official python version --------------------------------------------------------


@pytest.mark.parametrize("bytes_keys", [True, False])
@pytest.mark.parametrize("point_at_folder", [True, False])
def test_cifar10_official_format(tmp_path, bytes_keys, point_at_folder):
    folder = tmp_path / "cifar-10-batches-py"
    split = random_split(3, 32, 10, n_train=15, n_test=3)
    write_cifar10(folder, split, bytes_keys=bytes_keys)
    data = load_dataset("cifar10", folder if point_at_folder else str(tmp_path))
    assert data.name == "cifar10" and data.classes == CIFAR10_CLASSES
    assert (data.mean, data.std, data.augment) == (CIFAR_MEAN, CIFAR_STD, True)
    assert_holds(data, split)
    # Rows are channel-major: value 1024 + 32 * 2 + 5 of a row is green, row 2, column 5.
    assert data.train_x[0, 1, 2, 5] == rows(split.train_x)[0, 1024 + 32 * 2 + 5]


def test_cifar10_missing_folder_names_expected_files(tmp_path):
    with pytest.raises(FwdTransError, match="data_batch_1") as info:
        load_dataset("cifar10", tmp_path / "nowhere")
    assert "cifar-10-batches-py" in str(info.value)


def test_cifar10_missing_single_file_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, random_split(3, 32, 10))
    (folder / "test_batch").unlink()
    with pytest.raises(FwdTransError, match=f"missing from {re.escape(str(folder))}: test_batch; expected"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_malformed_batch_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, random_split(3, 32, 10))
    dump(folder / "data_batch_2", {"labels": [0]})
    with pytest.raises(FwdTransError, match="data_batch_2 has no 'data' entry"):
        load_dataset("cifar10", folder)
    dump(folder / "data_batch_2", {"labels": [0], "data": np.zeros((1, 3072), dtype=np.int64)})
    with pytest.raises(FwdTransError, match=r"data_batch_2 holds int64 data of shape \(1, 3072\)"):
        load_dataset("cifar10", folder)
    dump(folder / "data_batch_2", {"labels": [0, 1], "data": np.zeros((1, 3072), dtype=np.uint8)})
    with pytest.raises(FwdTransError, match=r"shape \(1, 3072\) for 2 labels; expected \(2, 3072\) uint8 rows"):
        load_dataset("cifar10", folder)
    (folder / "data_batch_2").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(FwdTransError, match="data_batch_2 holds a pickled list, not a dict"):
        load_dataset("cifar10", folder)


def test_cifar10_wrong_meta_or_labels(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, random_split(3, 32, 10))
    dump(folder / "data_batch_5", {b"labels": [10], b"data": np.zeros((1, 3072), dtype=np.uint8)})
    with pytest.raises(FwdTransError, match="data_batch_5 holds labels from 10 to 10; expected labels from 0 to 9"):
        load_dataset("cifar10", folder)
    dump(folder / "batches.meta", {b"label_names": [b"cat", b"dog"]})
    with pytest.raises(FwdTransError, match="batches.meta names 2 classes; expected 10"):
        load_dataset("cifar10", folder)


# --- CIFAR-100 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("point_at_folder", [True, False])
def test_cifar100_official_format(tmp_path, point_at_folder):
    folder = tmp_path / "cifar-100-python"
    split = random_split(3, 32, 100)
    write_cifar100(folder, split)
    data = load_dataset("cifar100", folder if point_at_folder else tmp_path)
    assert data.name == "cifar100" and data.classes == CIFAR100_CLASSES
    assert (data.mean, data.std, data.augment) == (CIFAR_MEAN, CIFAR_STD, True)
    assert (data.channels, data.num_classes, data.image_shape) == (3, 100, (3, 32, 32))
    assert_holds(data, split)  # the fine labels, not the coarse ones


def test_cifar100_refusals(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar100(folder, random_split(3, 32, 100))
    dump(folder / "meta", {b"coarse_label_names": [b"x"] * 20})
    with pytest.raises(FwdTransError, match="meta has no 'fine_label_names' entry; expected DATA_DIR/cifar-100"):
        load_dataset("cifar100", tmp_path)
    (folder / "meta").unlink()
    (folder / "train").unlink()
    with pytest.raises(FwdTransError, match=f"CIFAR-100 file\\(s\\) missing from {re.escape(str(folder))}: "
                                            "train, meta; expected DATA_DIR/cifar-100-python/"):
        load_dataset("cifar100", tmp_path)


def test_cifar100_truncated_pickle(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar100(folder, random_split(3, 32, 100))
    raw = (folder / "train").read_bytes()
    (folder / "train").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(FwdTransError, match="cannot unpickle .*train .*truncated or corrupt"):
        load_dataset("cifar100", tmp_path)


# --- Fashion-MNIST --------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False, "mixed"])
@pytest.mark.parametrize("subfolder", ["", "fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_official_format(tmp_path, gz, subfolder):
    split = random_split(1, 28, 10)
    write_fashion(tmp_path / subfolder, split, gz=gz)
    data = load_dataset("fashion-mnist", tmp_path)
    assert data.name == "fashion-mnist" and data.classes == FASHION_CLASSES
    assert (data.mean, data.std, data.augment) == ((0.0,), (1.0,), False)
    assert (data.channels, data.num_classes, data.image_shape) == (1, 10, (1, 28, 28))
    assert_holds(data, split)


def test_fashion_mnist_prefers_plain_file_to_gz(tmp_path):
    split = random_split(1, 28, 10)
    write_fashion(tmp_path, split, gz=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", 255 - split.train_x[:, 0], gz=True)
    assert_holds(load_dataset("fashion-mnist", tmp_path), split)


def test_fashion_mnist_subfolder_takes_precedence(tmp_path):
    write_fashion(tmp_path, random_split(1, 28, 10))
    (tmp_path / "fashion-mnist").mkdir()
    with pytest.raises(FwdTransError, match=f"missing from {re.escape(str(tmp_path / 'fashion-mnist'))}: "):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_mnist_missing_file_is_named(tmp_path):
    write_fashion(tmp_path, random_split(1, 28, 10))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FwdTransError, match=r"missing from .*: t10k-labels-idx1-ubyte\[\.gz\]; expected"):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_mnist_wrong_magic(tmp_path):
    split = random_split(1, 28, 10)
    write_fashion(tmp_path, split, gz=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", split.train_y, gz=False)  # a labels file in its place
    with pytest.raises(FwdTransError, match="train-images-idx3-ubyte has idx magic number 2049, not 2051"):
        load_dataset("fashion-mnist", tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x1f\x8b\x08\x08" + bytes(100))
    with pytest.raises(FwdTransError, match="magic number 529205256, not 2051"):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_mnist_wrong_sizes(tmp_path):
    split = random_split(1, 28, 10)
    write_fashion(tmp_path, split, gz=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", split.test_x[:, 0, :27], gz=True)
    with pytest.raises(FwdTransError, match="t10k-images-idx3-ubyte.gz holds images of 27x28 pixels"):
        load_dataset("fashion-mnist", tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", split.test_x[:3, 0], gz=True)
    with pytest.raises(FwdTransError, match="holds 3 images but .*t10k-labels-idx1-ubyte.gz holds 4 labels"):
        load_dataset("fashion-mnist", tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", split.test_x[:, 0], gz=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 10, 2]), gz=True)
    with pytest.raises(FwdTransError, match="holds labels from 0 to 10; expected labels from 0 to 9"):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_mnist_truncated_files(tmp_path):
    write_fashion(tmp_path, random_split(1, 28, 10), gz="mixed")
    raw = (tmp_path / "train-labels-idx1-ubyte").read_bytes()
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(raw[:-1])
    with pytest.raises(FwdTransError, match=r"train-labels-idx1-ubyte holds 5 bytes of data but its header "
                                            r"announces shape \(6,\), i.e. 6 bytes; it is truncated"):
        load_dataset("fashion-mnist", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(raw[:5])
    with pytest.raises(FwdTransError, match="holds 5 bytes, fewer than the 8 of an idx header"):
        load_dataset("fashion-mnist", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(raw)
    raw = (tmp_path / "train-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(FwdTransError, match="cannot read .*train-images-idx3-ubyte.gz \\(EOFError"):
        load_dataset("fashion-mnist", tmp_path)


@given(shape=st.lists(st.integers(0, 6), min_size=1, max_size=3), gz=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_idx_round_trip(shape, gz, seed):
    array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_idx(Path(tmp) / "data-idx", array, gz)
        got = _read_idx(path, len(shape))
        other = len(shape) % 3 + 1
        with pytest.raises(FwdTransError, match=f"magic number {0x800 + len(shape)}, not {0x800 + other}"):
            _read_idx(path, other)
    assert got.dtype == np.uint8 and got.shape == tuple(shape) and got.flags.writeable
    np.testing.assert_array_equal(got, array)


# --- ImageNet32 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("subfolders", [True, False])
@pytest.mark.parametrize("with_names", [True, False])
def test_imagenet32_official_format(tmp_path, subfolders, with_names):
    split = imagenet32_split()
    write_imagenet32(tmp_path, split, subfolders=subfolders)
    names = write_map_clsloc(tmp_path) if with_names else tuple(f"class_{i}" for i in range(1000))
    data = load_dataset("imagenet32", tmp_path)
    assert data.name == "imagenet32" and data.classes == names
    assert (data.mean, data.std, data.augment) == (IMAGENET_MEAN, IMAGENET_STD, True)
    assert (data.channels, data.num_classes, data.image_shape) == (3, 1000, (3, 32, 32))
    assert_holds(data, split)  # labels 1..1000 in the files are 0..999 here, batches in order 1..10
    assert data.train_x.is_contiguous()


def test_imagenet32_refusals(tmp_path):
    write_imagenet32(tmp_path, imagenet32_split())
    train = tmp_path / "Imagenet32_train_npz"
    (train / "train_data_batch_7.npz").unlink()
    with pytest.raises(FwdTransError, match="ImageNet32 file\\(s\\) missing from .*: "
                                            "Imagenet32_train_npz/train_data_batch_7.npz; expected"):
        load_dataset("imagenet32", tmp_path)
    np.savez(train / "train_data_batch_7.npz", data=np.zeros((2, 3072), np.uint8), labels=[0, 5])
    with pytest.raises(FwdTransError, match="batch_7.npz holds labels from 0 to 5; expected labels from 1 to 1000"):
        load_dataset("imagenet32", tmp_path)
    np.savez(train / "train_data_batch_7.npz", data=np.zeros((2, 3072), np.uint8))
    with pytest.raises(FwdTransError, match="batch_7.npz has no labels array \\(it has data\\)"):
        load_dataset("imagenet32", tmp_path)
    np.savez(train / "train_data_batch_7.npz", data=np.zeros((3, 3072), np.uint8), labels=[1, 2])
    with pytest.raises(FwdTransError, match=r"batch_7.npz holds uint8 data of shape \(3, 3072\) for 2 labels"):
        load_dataset("imagenet32", tmp_path)
    with open(train / "train_data_batch_7.npz", "wb") as f:
        np.save(f, np.zeros((2, 3072), np.uint8))
    with pytest.raises(FwdTransError, match="batch_7.npz holds a single array, not an npz archive"):
        load_dataset("imagenet32", tmp_path)
    raw = (train / "train_data_batch_1.npz").read_bytes()
    (train / "train_data_batch_7.npz").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(FwdTransError, match="cannot read .*batch_7.npz \\(BadZipFile"):
        load_dataset("imagenet32", tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines[:-1], "names 999 classes; expected one line per class index from 1 to 1000"),
    (lambda lines: [*lines[:-1], lines[0]], r"line 1000 reads 'n\d+ \d+ name_\d+'; expected 'WNID INDEX NAME'"),
    (lambda lines: ["n01440764 kit fox", *lines[1:]], "line 1 reads 'n01440764 kit fox'"),
    (lambda lines: ["n01440764 0 tench", *lines[1:]], "line 1 reads"),
    (lambda lines: ["", *lines, "  "], None),  # blank lines are skipped
])
def test_imagenet32_map_clsloc_format(tmp_path, edit, message):
    write_imagenet32(tmp_path, imagenet32_split())
    names = write_map_clsloc(tmp_path)
    path = tmp_path / "map_clsloc.txt"
    path.write_text("\n".join(edit(path.read_text().splitlines())))
    if message is None:
        assert load_dataset("imagenet32", tmp_path).classes == names
    else:
        with pytest.raises(FwdTransError, match=f"map_clsloc.txt {message}"):
            load_dataset("imagenet32", tmp_path)
