"""Augmentation of training batches on the device: each image shifted by its own
random offset, for the whole batch in one gather (no per-image Python work, as in
KellerJordan/cifar10-airbench). Images stay uint8 until normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Offsets = tuple[Tensor, Tensor]


def shift_offsets(batch: int, max_shift: int, generator: torch.Generator) -> Offsets | None:
    """Random (dy, dx) offsets in [0, 2 * max_shift] for `batch` images, each (batch, 1);
    None when max_shift is 0. Drawn for the global batch in every process, so that each
    process's slice of it is shifted as one process would shift it."""
    if max_shift == 0:
        return None
    device = generator.device
    dy = torch.randint(0, 2 * max_shift + 1, (batch, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * max_shift + 1, (batch, 1), generator=generator, device=device)
    return dy, dx


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


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift] pixels."""
    return shift(images, shift_offsets(len(images), max_shift, generator), max_shift)
