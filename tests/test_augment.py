"""Augmentation on the device (src/pipeline/augment.py): shifts, rotations and
scalings within their bounds, Cutout's square, each process's slice of the draws."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import augment
from pipeline.augment import Augmentation


def test_random_shift_moves_each_image_within_bounds() -> None:
    images = torch.zeros(64, 1, 32, 32, dtype=torch.uint8)
    images[:, :, 15, 15] = 255
    shifted = augment.random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    positions = shifted[:, 0].flatten(1).argmax(1)
    rows, cols = positions // 32, positions % 32
    assert rows.min() >= 13 and rows.max() <= 17 and cols.min() >= 13 and cols.max() <= 17
    assert len(set(positions.tolist())) > 10  # each image has its own offset
    assert torch.all(shifted.flatten(1).sum(1) == 255)  # content moved, not lost
    assert augment.random_shift(images, 0, torch.Generator()) is images


def test_rotations_and_scalings_stay_within_their_bounds() -> None:
    how = Augmentation(max_rotate=10.0, max_scale=0.1)
    maps = augment.affine_maps(4096, how, torch.Generator().manual_seed(0))
    # the grid samples the inverse map: cos/scale and sin/scale
    angles = torch.rad2deg(torch.atan2(maps[:, 1, 0], maps[:, 0, 0]))
    scales = 1 / maps[:, 0, :2].norm(dim=1)
    assert angles.abs().max() <= 10 and angles.abs().max() > 9.5  # the whole range is used
    assert (scales - 1).abs().max() <= 0.1 + 1e-6 and (scales - 1).abs().max() > 0.09
    assert torch.all(maps[:, :, 2] == 0)  # about the centre: no translation here


def test_a_quarter_turn_turns_the_image() -> None:
    """The warp really rotates: a bar across becomes a bar down (90 degrees, no scaling)."""
    image = torch.zeros(1, 1, 32, 32)
    image[0, 0, 16, 4:28] = 255.0  # a horizontal bar
    quarter = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]])
    turned = augment.warp(image, quarter)[0, 0]
    rows, cols = (turned > 128).nonzero().unbind(1)
    assert cols.unique().numel() <= 2 and rows.unique().numel() >= 20  # now vertical


def test_cutout_blackens_one_square_per_image_and_nothing_else() -> None:
    images = torch.full((3, 1, 32, 32), 200, dtype=torch.uint8)
    centres = torch.tensor([[16], [0], [31]]), torch.tensor([[16], [0], [10]])
    cut = augment.cut(images, centres, side=8)
    black = (cut == 0).flatten(1).sum(1).tolist()
    assert black == [64, 16, 40]  # inside; at a corner 4 x 4; at the bottom edge 5 x 8
    assert torch.equal(cut[0, 0, 12:20, 12:20], torch.zeros(8, 8, dtype=torch.uint8))
    assert torch.all(cut[cut != 0] == 200)


@pytest.mark.parametrize(
    "how",
    [
        Augmentation(max_shift=2),
        Augmentation(max_shift=2, max_rotate=10.0, max_scale=0.1, cutout=8),
        Augmentation(cutout=6),
    ],
)
def test_each_process_augments_its_slice_as_one_process_would(how: Augmentation) -> None:
    images = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    draws = augment.draw(8, 32, how, torch.Generator().manual_seed(3))
    whole = augment.augment(images, draws, how)
    halves = [augment.augment(images[p], draws.part(p), how) for p in (slice(0, 4), slice(4, 8))]
    assert torch.equal(torch.cat(halves), whole)
    assert whole.dtype == (torch.float32 if how.affine else torch.uint8)


def test_parts_that_are_off_draw_nothing() -> None:
    """Turning rotation, scaling or Cutout on leaves the shifts drawn before as they were,
    and with everything off but the shift the draws are exactly the shift's."""
    shift_only = augment.draw(16, 32, Augmentation(max_shift=2), torch.Generator().manual_seed(1))
    everything = Augmentation(max_shift=2, max_rotate=5.0, max_scale=0.05, cutout=4)
    full = augment.draw(16, 32, everything, torch.Generator().manual_seed(1))
    assert shift_only.affine is None and shift_only.cutout is None
    for a, b in zip(shift_only.offsets, full.offsets, strict=True):
        assert torch.equal(a, b)
    reference = augment.shift_offsets(16, 2, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(shift_only.offsets, reference, strict=True))
    assert math.isclose(float(full.affine[:, 0, 0].abs().min()), 1, rel_tol=0.1)
