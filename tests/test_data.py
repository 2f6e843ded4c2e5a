"""Tests for fwdtrans._data: the shipped CIFAR-10 subset, the official-format reader and batching."""

import importlib.resources
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fwdtrans._data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ImageDataset,
    _crop,
    _flip,
    batches,
    load_cifar10,
    num_batches,
)
from fwdtrans._errors import FwdTransError

SOURCE_NPZ = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10" / "cifar10_jpeg.npz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def subset() -> ImageDataset:
    return load_cifar10()


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - MEAN) / STD


def epoch(x, y, seed, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(batches(x, y, generator=torch.Generator().manual_seed(seed), **kwargs))


# --- the shipped subset ---------------------------------------------------------------------------


def test_shipped_subset_shapes_and_balance(subset):
    assert subset.train_x.shape == (5000, 3, 32, 32)
    assert subset.test_x.shape == (1000, 3, 32, 32)
    assert subset.train_x.dtype == subset.test_x.dtype == torch.uint8
    assert subset.train_y.dtype == subset.test_y.dtype == torch.int64
    assert torch.bincount(subset.train_y).tolist() == [500] * 10
    assert torch.bincount(subset.test_y).tolist() == [100] * 10
    assert subset.classes == CLASSES
    assert subset.name == "cifar10_subset"
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


# --- the official python format -------------------------------------------------------------------


def write_official(folder: Path, per_batch: int = 3,
                   bytes_keys: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Write a tiny CIFAR-10 in the official layout; return its (N, 3072) rows and labels, train first."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (6 * per_batch, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, 6 * per_batch)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        s = slice(b * per_batch, (b + 1) * per_batch)
        entry = {key("data"): rows[s], key("labels"): [int(v) for v in labels[s]]}
        (folder / name).write_bytes(pickle.dumps(entry))
    names = [c.encode() for c in CLASSES] if bytes_keys else list(CLASSES)
    (folder / "batches.meta").write_bytes(pickle.dumps({key("label_names"): names}))
    return rows, labels


@pytest.mark.parametrize("bytes_keys", [True, False])
@pytest.mark.parametrize("point_at_folder", [True, False])
def test_official_format(tmp_path, bytes_keys, point_at_folder):
    folder = tmp_path / "cifar-10-batches-py"
    rows, labels = write_official(folder, per_batch=3, bytes_keys=bytes_keys)
    data = load_cifar10(folder if point_at_folder else str(tmp_path))
    assert data.name == "cifar10" and data.classes == CLASSES
    assert data.train_x.shape == (15, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    # Rows are channel-major: 1024 red values, then green, then blue, each row by row.
    np.testing.assert_array_equal(data.train_x.numpy(), rows[:15].reshape(15, 3, 32, 32))
    np.testing.assert_array_equal(data.test_x.numpy(), rows[15:].reshape(3, 3, 32, 32))
    np.testing.assert_array_equal(data.train_y.numpy(), labels[:15])
    np.testing.assert_array_equal(data.test_y.numpy(), labels[15:])


def test_missing_directory_names_expected_file(tmp_path):
    with pytest.raises(FwdTransError, match="data_batch_1") as info:
        load_cifar10(tmp_path / "nowhere")
    assert "cifar-10-batches-py" in str(info.value)


def test_missing_single_file_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_official(folder)
    (folder / "test_batch").unlink()
    with pytest.raises(FwdTransError, match="test_batch"):
        load_cifar10(tmp_path)


def test_malformed_batch_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_official(folder)
    (folder / "data_batch_2").write_bytes(pickle.dumps({"labels": [0]}))
    with pytest.raises(FwdTransError, match="data_batch_2.*'data'"):
        load_cifar10(folder)


# --- batching -------------------------------------------------------------------------------------


def test_same_seed_same_batches_and_different_seed_different(subset):
    x, y = subset.train_x[:200], subset.train_y[:200]
    kwargs = dict(batch_size=64, shuffle=True, augment=True)
    first, again, other = epoch(x, y, 7, **kwargs), epoch(x, y, 7, **kwargs), epoch(x, y, 8, **kwargs)
    assert len(first) == len(again) == len(other) == num_batches(200, 64, drop_last=False)
    for (xa, ya), (xb, yb) in zip(first, again):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(ya, yo) for (_, ya), (_, yo) in zip(first, other))
    assert not torch.equal(first[0][0], other[0][0])


def test_augmentation_keeps_shape_and_dtype(subset):
    x, y = subset.train_x[:150], subset.train_y[:150]
    out = epoch(x, y, 0, batch_size=64, shuffle=False, augment=True)
    assert [tuple(xb.shape) for xb, _ in out] == [(64, 3, 32, 32)] * 2 + [(22, 3, 32, 32)]
    assert all(xb.dtype == torch.float32 and yb.dtype == torch.int64 for xb, yb in out)
    augmented = torch.cat([xb for xb, _ in out])
    assert torch.isfinite(augmented).all()
    assert torch.equal(torch.cat([yb for _, yb in out]), y)  # labels stay with their images
    assert not torch.equal(augmented, normalise(x))
    # Normalisation follows augmentation: un-normalising gives whole pixel values again.
    pixels = (augmented * STD + MEAN) * 255
    np.testing.assert_allclose(pixels.numpy(), pixels.round().clamp(0, 255).numpy(), rtol=0, atol=1e-3)


def test_normalisation_matches_formula(subset):
    x, y = subset.test_x[:100], subset.test_y[:100]
    out = list(batches(x, y, 30, shuffle=False, augment=False))
    got = torch.cat([xb for xb, _ in out])
    np.testing.assert_allclose(got.numpy(), normalise(x).numpy(), rtol=0, atol=1e-6)
    assert torch.equal(torch.cat([yb for _, yb in out]), y)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 70), batch_size=st.integers(1, 32), seed=st.integers(0, 2**31 - 1),
       augment=st.booleans())
def test_every_sample_once_per_epoch(n, batch_size, seed, augment):
    x = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    y = torch.arange(n)
    out = epoch(x, y, seed, batch_size=batch_size, shuffle=True, augment=augment)
    assert len(out) == num_batches(n, batch_size, drop_last=False)
    assert all(len(yb) == batch_size for _, yb in out[:-1])
    seen = torch.cat([yb for _, yb in out])
    assert sorted(seen.tolist()) == list(range(n))
    # The images travel with their labels: the centre pixel is never moved off the image.
    centre = torch.cat([xb for xb, _ in out])[:, :, 16, 16]
    np.testing.assert_allclose(centre.numpy(), normalise(x[seen])[:, :, 16, 16].numpy(), rtol=0, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(0, 70), batch_size=st.integers(1, 32), seed=st.integers(0, 2**31 - 1))
def test_drop_last_yields_only_full_batches(n, batch_size, seed):
    x, y = torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.arange(n)
    out = epoch(x, y, seed, batch_size=batch_size, shuffle=True, augment=False, drop_last=True)
    assert len(out) == num_batches(n, batch_size, drop_last=True) == n // batch_size
    assert all(len(yb) == batch_size for _, yb in out)
    seen = torch.cat([yb for _, yb in out]) if out else torch.empty(0, dtype=torch.int64)
    assert len(set(seen.tolist())) == len(seen)


def test_num_batches():
    assert num_batches(1000, 128, drop_last=False) == 8
    assert num_batches(1000, 128, drop_last=True) == 7
    assert num_batches(1024, 128, drop_last=False) == num_batches(1024, 128, drop_last=True) == 8
    assert num_batches(0, 5, drop_last=False) == 0
    with pytest.raises(FwdTransError, match="batch_size"):
        num_batches(10, 0, drop_last=False)


def test_batches_rejects_bad_input():
    x, y = random_images(4), torch.arange(4)
    with pytest.raises(FwdTransError, match="uint8"):
        batches(x.float(), y, 2, shuffle=False, augment=False)
    with pytest.raises(FwdTransError, match="4 samples but y has 3"):
        batches(x, y[:3], 2, shuffle=False, augment=False)
    with pytest.raises(FwdTransError, match="batch_size"):
        batches(x, y, 0, shuffle=False, augment=False)


# --- the augmentation helpers ---------------------------------------------------------------------


def test_crop_with_zero_shift_is_identity():
    x = random_images(8)
    assert torch.equal(_crop(x, torch.zeros(8, 2, dtype=torch.int64), 4), x)


def test_crop_matches_padded_slices():
    x = random_images(16, seed=1)
    shifts = torch.randint(-4, 5, (16, 2), generator=torch.Generator().manual_seed(2))
    padded = F.pad(x, (4, 4, 4, 4))
    expected = torch.stack([padded[i, :, 4 + dy:36 + dy, 4 + dx:36 + dx]
                            for i, (dy, dx) in enumerate(shifts.tolist())])
    assert torch.equal(_crop(x, shifts, 4), expected)
    down = _crop(x, torch.tensor([[1, 0]] * 16), 4)  # output row r is input row r + 1
    assert torch.equal(down[:, :, :31], x[:, :, 1:]) and not down[:, :, 31].any()


def test_flip():
    x = random_images(6)
    mask = torch.tensor([True, False, True, True, False, False])
    once = _flip(x, mask)
    assert torch.equal(_flip(once, mask), x)
    assert torch.equal(once[mask], x[mask].flip(-1)) and torch.equal(once[~mask], x[~mask])
