"""Batching: one epoch's order and augmentation drawn at once, resumable at any batch; schedules."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fwdtrans._errors import FwdTransError
from fwdtrans.app import lr_factor
from fwdtrans.app._batches import _crop, _flip, batches, epoch_generator, num_batches

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def random_images(n: int, seed: int = 0, channels: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, 32, 32), dtype=torch.uint8, generator=generator)


def normalise(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return (x.float() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def epoch(x, y, seed, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    kwargs = {"mean": MEAN, "std": STD, **kwargs}
    return list(batches(x, y, generator=torch.Generator().manual_seed(seed), **kwargs))


def test_same_seed_same_batches_and_different_seed_different():
    x, y = random_images(200), torch.arange(200)
    kwargs = dict(batch_size=64, shuffle=True, augment=True)
    first, again, other = epoch(x, y, 7, **kwargs), epoch(x, y, 7, **kwargs), epoch(x, y, 8, **kwargs)
    assert len(first) == len(again) == len(other) == num_batches(200, 64, drop_last=False)
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(ya, yo) for (_, ya), (_, yo) in zip(first, other, strict=True))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 70), batch_size=st.integers(1, 32), start=st.integers(0, 8), seed=st.integers(0, 2**31 - 1),
       augment=st.booleans(), drop_last=st.booleans())
def test_an_epoch_resumed_at_any_batch_gives_the_same_batches(n, batch_size, start, seed, augment, drop_last):
    x, y = random_images(n, seed % 7), torch.arange(n)
    kwargs = dict(batch_size=batch_size, shuffle=True, augment=augment, drop_last=drop_last)
    whole, resumed = epoch(x, y, seed, **kwargs), epoch(x, y, seed, start=start, **kwargs)
    assert len(resumed) == max(0, len(whole) - start)
    for (xa, ya), (xb, yb) in zip(whole[start:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_epoch_generators_differ_by_epoch_and_seed():
    draws = {(s, e): torch.randperm(50, generator=epoch_generator(s, e)) for s in (0, 1) for e in (0, 1)}
    assert len({tuple(d.tolist()) for d in draws.values()}) == 4
    assert torch.equal(draws[0, 1], torch.randperm(50, generator=epoch_generator(0, 1)))


def test_augmentation_keeps_shape_and_dtype():
    x, y = random_images(150), torch.arange(150)
    out = epoch(x, y, 0, batch_size=64, shuffle=False, augment=True)
    assert [tuple(xb.shape) for xb, _ in out] == [(64, 3, 32, 32)] * 2 + [(22, 3, 32, 32)]
    assert all(xb.dtype == torch.float32 and yb.dtype == torch.int64 for xb, yb in out)
    augmented = torch.cat([xb for xb, _ in out])
    assert torch.equal(torch.cat([yb for _, yb in out]), y)  # labels stay with their images
    assert not torch.equal(augmented, normalise(x))
    # Normalisation follows augmentation: un-normalising gives whole pixel values again.
    pixels = (augmented * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255
    np.testing.assert_allclose(pixels.numpy(), pixels.round().clamp(0, 255).numpy(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("channels", [1, 3])
def test_normalisation_matches_formula(channels):
    x, y = random_images(100, channels=channels), torch.arange(100)
    mean, std = MEAN[:channels], STD[:channels]
    out = list(batches(x, y, 30, mean=mean, std=std, shuffle=False, augment=False))
    got = torch.cat([xb for xb, _ in out])
    np.testing.assert_allclose(got.numpy(), normalise(x, mean, std).numpy(), rtol=0, atol=1e-6)
    assert torch.equal(torch.cat([yb for _, yb in out]), y)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 70), batch_size=st.integers(1, 32), seed=st.integers(0, 2**31 - 1), augment=st.booleans())
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
    kwargs = dict(mean=MEAN, std=STD, shuffle=False, augment=False)
    with pytest.raises(FwdTransError, match="uint8"):
        batches(x.float(), y, 2, **kwargs)
    with pytest.raises(FwdTransError, match="4 samples but y has 3"):
        batches(x, y[:3], 2, **kwargs)
    with pytest.raises(FwdTransError, match="batch_size"):
        batches(x, y, 0, **kwargs)
    with pytest.raises(FwdTransError, match="one value per channel"):
        batches(x, y, 2, **{**kwargs, "mean": (0.5,)})


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


# --- schedules ------------------------------------------------------------------------------------


def test_paper_step_schedule():
    """The paper's CIFAR schedule: x0.2 every 30 epochs over 100 epochs (StepLR(30, 0.2) stepped per epoch)."""
    per_epoch = 390
    rates = [lr_factor("step", s, per_epoch, 100) for s in range(0, 100 * per_epoch, per_epoch)]
    assert rates == [1.0] * 30 + [0.2] * 30 + [0.2 ** 2] * 30 + [0.2 ** 3] * 10
    steps = [lr_factor("step", s, per_epoch, 100) for s in range(29 * per_epoch, 31 * per_epoch)]
    assert steps == [1.0] * per_epoch + [0.2] * per_epoch  # constant within an epoch


def test_imagenet32_step_schedule():
    rates = [lr_factor("step", e, 1, 70, step_size=20, gamma=0.1) for e in range(70)]
    assert rates == [1.0] * 20 + [0.1] * 20 + [0.1 ** 2] * 20 + [0.1 ** 3] * 10


@settings(max_examples=30, deadline=None)
@given(per_epoch=st.integers(1, 50), epochs=st.integers(1, 20))
def test_cosine_schedule(per_epoch, epochs):
    total = per_epoch * epochs
    rates = [lr_factor("cosine", s, per_epoch, epochs) for s in range(total + 1)]
    assert rates[0] == 1.0 and abs(rates[-1]) < 1e-12
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))  # never rises
    assert all(math.isclose(rates[s] + rates[total - s], 1.0, abs_tol=1e-12) for s in range(total + 1))


def test_constant_and_unknown_schedule():
    assert {lr_factor("constant", s, 10, 5) for s in range(50)} == {1.0}
    with pytest.raises(FwdTransError, match="schedule 'linear'"):
        lr_factor("linear", 0, 10, 5)
