#!/usr/bin/env python3
"""Build the CIFAR-10 subset that ships with fwdtrans (``fwdtrans/data/cifar10_subset.npz``).

Usage (from the repository root)::

    python scripts/make_cifar_subset.py [SOURCE_NPZ]

``SOURCE_NPZ`` defaults to ``../shared/data/cifar10/cifar10_jpeg.npz``, a JPEG copy (quality 75,
32x32 RGB) of all 60,000 CIFAR-10 images (Krizhevsky, 2009) with arrays ``train_jpeg``,
``train_offsets``, ``train_labels``, ``test_jpeg``, ``test_offsets``, ``test_labels`` (image ``i`` is
bytes ``offsets[i]:offsets[i + 1]``) and ``classes``.

How: a ``numpy.random.default_rng(0)`` generator draws, for each class in label order, 500 train and
100 test images without replacement (5,000 train and 1,000 test in all), then permutes each split so
that the classes are interleaved. The JPEG bytes are copied as they are, never re-encoded, so the
shipped images decode to exactly the pixels of the source images. The output (about 5.5 MB) is
written with ``np.savez`` (uncompressed: JPEG is already compressed) through a temporary file in the
same folder and ``os.replace``, so an interrupted run never leaves a partial file.

Why: the library needs a small, class-balanced data set that installs with it, so that examples and
tests run offline in seconds; the fixed seed makes the file reproducible byte for byte, and
``source_indices_train`` / ``source_indices_test`` record which source images were taken.
"""

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

SEED = 0
TRAIN_PER_CLASS = 500
TEST_PER_CLASS = 100
DEFAULT_SOURCE = Path("..") / "shared" / "data" / "cifar10" / "cifar10_jpeg.npz"
OUTPUT = Path(__file__).resolve().parents[1] / "fwdtrans" / "data" / "cifar10_subset.npz"


def balanced_indices(labels: np.ndarray, per_class: int, n_classes: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Draw ``per_class`` indices of each class without replacement, then permute them all."""
    picks = []
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise SystemExit(f"class {c} has {len(members)} images, fewer than {per_class}")
        picks.append(np.sort(rng.choice(members, size=per_class, replace=False)))
    return rng.permutation(np.concatenate(picks)).astype(np.int64)


def take_jpegs(blob: np.ndarray, offsets: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the JPEG byte strings of ``indices``; return the bytes and their offsets."""
    sizes = offsets[indices + 1] - offsets[indices]
    new_offsets = np.zeros(len(indices) + 1, dtype=np.int64)
    np.cumsum(sizes, out=new_offsets[1:])
    return np.concatenate([blob[offsets[i]:offsets[i + 1]] for i in indices]), new_offsets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default=str(DEFAULT_SOURCE),
                        help=f"the CIFAR-10 JPEG npz (default: {DEFAULT_SOURCE})")
    source = Path(parser.parse_args().source)
    if not source.is_file():
        raise SystemExit(f"{source} not found; pass the path of cifar10_jpeg.npz as the first argument")

    src = np.load(source)
    classes = np.asarray([str(c) for c in src["classes"]])
    rng = np.random.default_rng(SEED)
    arrays = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        labels = src[f"{split}_labels"].astype(np.int64)
        idx = balanced_indices(labels, per_class, len(classes), rng)
        jpeg, offsets = take_jpegs(src[f"{split}_jpeg"], src[f"{split}_offsets"].astype(np.int64), idx)
        arrays[f"{split}_jpeg"] = jpeg
        arrays[f"{split}_offsets"] = offsets
        arrays[f"{split}_labels"] = labels[idx]
        arrays[f"source_indices_{split}"] = idx
    arrays["classes"] = classes

    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=OUTPUT.parent, prefix=".cifar10_subset.", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp creates the file 0600
        os.replace(tmp, OUTPUT)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size / 1e6:.2f} MB): "
          f"{len(arrays['train_labels'])} train, {len(arrays['test_labels'])} test images")


if __name__ == "__main__":
    main()
