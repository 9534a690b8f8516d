"""Augmentation of training batches on the device, for the whole batch at once (no
per-image Python work, as in KellerJordan/cifar10-airbench): each image shifted by
its own random offset; optionally rotated and scaled by its own small random affine
map, bent by its own smooth random displacement field (elastic distortion, Simard et
al. 2003), and given a black Cutout square (DeVries and Taylor 2017). No flips: digits
are not symmetric. Every random draw is made for the global batch, so that each
training process's slice of it is augmented as one process would augment it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Offsets = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Augmentation:
    """How much to augment; every part off at 0."""

    max_shift: int = 0  # pixels, each direction
    max_rotate: float = 0.0  # degrees, each direction
    max_scale: float = 0.0  # fraction: sizes within 1 +- max_scale
    cutout: int = 0  # side of the black square, pixels
    elastic_alpha: float = 0.0  # pixels: scale of the smoothed displacement field
    elastic_sigma: float = 4.0  # pixels: the Gaussian that smooths it

    @property
    def affine(self) -> bool:
        return self.max_rotate > 0 or self.max_scale > 0


@dataclass(frozen=True)
class Draws:
    """The random numbers of one global batch: each image's offsets, affine map, square."""

    offsets: Offsets | None
    affine: Tensor | None  # (B, 2, 3), for F.affine_grid
    cutout: Offsets | None  # each square's centre (row, column)
    elastic: Tensor | None = None  # (B, H, W, 2), added to F.grid_sample's grid

    def part(self, rows: slice) -> Draws:
        """The draws of this process's slice of the global batch."""

        def sliced(pair: Offsets | None) -> Offsets | None:
            return pair and (pair[0][rows], pair[1][rows])

        affine = None if self.affine is None else self.affine[rows]
        elastic = None if self.elastic is None else self.elastic[rows]
        return Draws(sliced(self.offsets), affine, sliced(self.cutout), elastic)


def shift_offsets(batch: int, max_shift: int, generator: torch.Generator) -> Offsets | None:
    """Random (dy, dx) offsets in [0, 2 * max_shift] for `batch` images, each (batch, 1);
    None when max_shift is 0."""
    if max_shift == 0:
        return None
    device = generator.device
    dy = torch.randint(0, 2 * max_shift + 1, (batch, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * max_shift + 1, (batch, 1), generator=generator, device=device)
    return dy, dx


def affine_maps(batch: int, a: Augmentation, generator: torch.Generator) -> Tensor:
    """(batch, 2, 3) maps of F.affine_grid: a rotation by up to +-max_rotate degrees and a
    scaling by 1 +- max_scale, about the image's centre."""
    device = generator.device
    uniform = torch.rand((2, batch), generator=generator, device=device) * 2 - 1  # [-1, 1)
    angle = uniform[0] * math.radians(a.max_rotate)
    scale = 1 + uniform[1] * a.max_scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # the grid samples inversely
    zero = torch.zeros_like(cos)
    return torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)


def cutout_centres(batch: int, size: int, side: int, generator: torch.Generator) -> Offsets:
    """Each square's centre, anywhere in the image (so a square may be cut by the edge)."""
    device = generator.device
    rows = torch.randint(0, size, (batch, 1), generator=generator, device=device)
    cols = torch.randint(0, size, (batch, 1), generator=generator, device=device)
    return rows, cols


@functools.cache
def gaussian_filter_matrix(size: int, sigma: float, device: torch.device) -> Tensor:
    """A Gaussian filter of `sigma` pixels (cut at 4 sigma, zeros beyond the edge) as a
    (size, size) matrix: row i holds the weight of each pixel j for pixel i. Applied by
    matmul, many times faster than a convolution on a CPU; made once per size and sigma."""
    radius = math.ceil(4 * sigma)
    taps = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    weight = torch.exp(-(taps**2) / (2 * sigma**2))
    weight = weight / weight.sum()
    x = torch.arange(size, device=device)
    distance = x[None, :] - x[:, None]
    inside = distance.abs() <= radius
    return torch.where(inside, weight[(distance + radius).clamp(0, 2 * radius)], 0)


def elastic_fields(batch: int, size: int, a: Augmentation, generator: torch.Generator) -> Tensor:
    """(batch, size, size, 2) displacements in F.grid_sample's units (2 / size per pixel):
    for each image and direction, uniform noise in [-1, 1] smoothed by a Gaussian of
    elastic_sigma pixels (cut at 4 sigma, zeros beyond the edge) and multiplied by
    elastic_alpha pixels, as Simard et al. 2003 (their alpha 34, sigma 4: about 1.3
    pixels of displacement, standard deviation)."""
    device = generator.device
    noise = torch.rand((batch, 2, size, size), generator=generator, device=device) * 2 - 1
    gauss = gaussian_filter_matrix(size, a.elastic_sigma, device)
    smooth = gauss @ noise @ gauss.T  # the filter down the columns, then along the rows
    return smooth.permute(0, 2, 3, 1) * (a.elastic_alpha * 2 / size)


def draw(batch: int, size: int, a: Augmentation, generator: torch.Generator) -> Draws:
    """Every random number one global batch needs, in a fixed order (nothing is drawn
    for a part that is off, so turning parts on leaves the others' draws as they were)."""
    offsets = shift_offsets(batch, a.max_shift, generator)
    affine = affine_maps(batch, a, generator) if a.affine else None
    cutout = cutout_centres(batch, size, a.cutout, generator) if a.cutout else None
    elastic = elastic_fields(batch, size, a, generator) if a.elastic_alpha else None
    return Draws(offsets, affine, cutout, elastic)


def shift(images: Tensor, offsets: Offsets | None, max_shift: int) -> Tensor:
    """Translate each uint8 image (B,1,H,W) by its offset (shift_offsets) minus max_shift
    pixels, filling with black: one gather for the batch."""
    if offsets is None:
        return images
    dy, dx = offsets
    b, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (max_shift,) * 4)
    rows = (dy + torch.arange(h, device=device))[:, :, None]
    cols = (dx + torch.arange(w, device=device))[:, None, :]
    return padded[torch.arange(b, device=device)[:, None, None], 0, rows, cols].unsqueeze(1)


def warp(images: Tensor, maps: Tensor | None, displacements: Tensor | None = None) -> Tensor:
    """Images (B,1,H,W, float in [0, 255]) through their affine maps (None: the identity)
    and then their displacement fields (elastic_fields), bilinear, black outside."""
    if maps is None:
        maps = torch.eye(2, 3, device=images.device).expand(len(images), 2, 3)
    grid = F.affine_grid(maps, list(images.shape), align_corners=False)
    if displacements is not None:
        grid = grid + displacements
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cut(images: Tensor, centres: Offsets, side: int) -> Tensor:
    """Each image with a black side x side square at its centre (DeVries and Taylor 2017)."""
    rows, cols = centres
    h, w = images.shape[-2:]
    device = images.device
    y = torch.arange(h, device=device)[None, :]
    x = torch.arange(w, device=device)[None, :]
    low = side // 2
    inside_y = (y >= rows - low) & (y < rows - low + side)  # (B, H)
    inside_x = (x >= cols - low) & (x < cols - low + side)  # (B, W)
    square = inside_y[:, None, :, None] & inside_x[:, None, None, :]
    return images.masked_fill(square, 0)


def augment(images: Tensor, draws: Draws, a: Augmentation) -> Tensor:
    """uint8 images (B,1,H,W) augmented by `draws`: shifted, then warped and cut if those
    parts are on (then returned as float in [0, 255], else still uint8)."""
    images = shift(images, draws.offsets, a.max_shift)
    if draws.affine is not None or draws.elastic is not None:
        images = warp(images.float(), draws.affine, draws.elastic)
    if draws.cutout is not None:
        images = cut(images, draws.cutout, a.cutout)
    return images


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift] pixels."""
    return shift(images, shift_offsets(len(images), max_shift, generator), max_shift)
