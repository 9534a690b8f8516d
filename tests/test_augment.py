"""Augmentation on the device (src/pipeline/augment.py): shifts, rotations and
scalings within their bounds, elastic distortion's smoothed fields and their units,
Cutout's square, each process's slice of the draws."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

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


def test_elastic_fields_are_uniform_noise_through_a_gaussian_filter() -> None:
    """The fields are the zero-padded Gaussian filtering of uniform noise (Simard et al.
    2003), scaled to alpha pixels in the grid's units, so smooth and of the expected size."""
    how = Augmentation(elastic_alpha=34.0, elastic_sigma=4.0)
    fields = augment.elastic_fields(256, 32, how, torch.Generator().manual_seed(0))
    noise = torch.rand((256, 2, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1
    taps = torch.arange(-16, 17, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * 4.0**2))
    kernel = kernel / kernel.sum()
    flat = noise.view(-1, 1, 32, 32)
    flat = F.conv2d(flat, kernel.view(1, 1, 1, -1), padding=(0, 16))
    flat = F.conv2d(flat, kernel.view(1, 1, -1, 1), padding=(16, 0))
    expected = flat.view(256, 2, 32, 32).permute(0, 2, 3, 1) * 34.0 * 2 / 32
    assert fields.shape == (256, 32, 32, 2)
    torch.testing.assert_close(fields, expected, rtol=0, atol=1e-5)
    pixels = fields[:, 8:24, 8:24] * 32 / 2  # away from the edges, in pixels
    # uniform noise has variance 1/3; the separable filter keeps (sum of its squares)^2
    assert math.isclose(pixels.std(), 34.0 * math.sqrt(1 / 3) * kernel.square().sum(), rel_tol=0.1)
    neighbours = torch.corrcoef(torch.stack([pixels[:, :-1].flatten(), pixels[:, 1:].flatten()]))
    assert neighbours[0, 1] > 0.9  # smooth: a pixel moves almost as its neighbour does


def test_a_displacement_field_moves_the_image_by_its_pixels() -> None:
    """The fields' units: a field of one pixel everywhere samples each pixel from its
    right-hand neighbour, after the affine map (here none) or with it."""
    image = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32)
    one_pixel = torch.zeros(1, 32, 32, 2)
    one_pixel[..., 0] = 2 / 32  # x, in grid units
    moved = augment.warp(image, None, one_pixel)[0, 0]
    torch.testing.assert_close(moved[:, :31], image[0, 0, :, 1:])
    assert torch.all(moved[:, 31] == 0)  # black from outside
    identity = torch.eye(2, 3).unsqueeze(0)
    torch.testing.assert_close(augment.warp(image, identity, one_pixel)[0, 0], moved)


def test_elastic_distortion_bends_the_digit_but_keeps_its_ink() -> None:
    images = torch.zeros(16, 1, 32, 32, dtype=torch.uint8)
    images[:, :, 8:24, 14:18] = 255  # a bar, as a 1
    how = Augmentation(elastic_alpha=34.0, elastic_sigma=4.0)
    bent = augment.augment(images, augment.draw(16, 32, how, torch.Generator().manual_seed(2)), how)
    ink = bent.flatten(1).sum(1) / images.flatten(1).float().sum(1)
    assert bent.dtype == torch.float32 and torch.all((ink > 0.5) & (ink < 1.5))  # bent, not lost
    changed = (bent - images.float()).abs().flatten(1).amax(1)
    assert torch.all(changed > 100)  # every image bent
    assert len({tuple(b.flatten().tolist()) for b in bent}) == 16  # each its own way


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
        Augmentation(max_shift=2, max_rotate=10.0, elastic_alpha=34.0),
        Augmentation(elastic_alpha=20.0, elastic_sigma=3.0),
    ],
)
def test_each_process_augments_its_slice_as_one_process_would(how: Augmentation) -> None:
    images = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    draws = augment.draw(8, 32, how, torch.Generator().manual_seed(3))
    whole = augment.augment(images, draws, how)
    halves = [augment.augment(images[p], draws.part(p), how) for p in (slice(0, 4), slice(4, 8))]
    assert torch.equal(torch.cat(halves), whole)
    warped = how.affine or how.elastic_alpha > 0
    assert whole.dtype == (torch.float32 if warped else torch.uint8)


def test_parts_that_are_off_draw_nothing() -> None:
    """Turning rotation, scaling, Cutout or elastic distortion on leaves the draws made
    before as they were, and with everything off but the shift the draws are exactly
    the shift's."""
    shift_only = augment.draw(16, 32, Augmentation(max_shift=2), torch.Generator().manual_seed(1))
    everything = Augmentation(max_shift=2, max_rotate=5.0, max_scale=0.05, cutout=4)
    full = augment.draw(16, 32, everything, torch.Generator().manual_seed(1))
    bent = Augmentation(max_shift=2, max_rotate=5.0, max_scale=0.05, cutout=4, elastic_alpha=9.0)
    with_elastic = augment.draw(16, 32, bent, torch.Generator().manual_seed(1))
    assert shift_only.affine is None and shift_only.cutout is None and shift_only.elastic is None
    assert full.elastic is None and with_elastic.elastic is not None
    for a, b in zip(shift_only.offsets, full.offsets, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(full.affine, with_elastic.affine)
    assert all(torch.equal(a, b) for a, b in zip(full.cutout, with_elastic.cutout, strict=True))
    reference = augment.shift_offsets(16, 2, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(shift_only.offsets, reference, strict=True))
    assert math.isclose(float(full.affine[:, 0, 0].abs().min()), 1, rel_tol=0.1)
