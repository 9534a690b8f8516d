"""The evaluate stage's params (predict's too): `evaluate`, checked on loading.

Free of torch, as every stage's params are: pipeline/params.py says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pipeline.params import Auto, Device, Precision, check

# Test-time augmentation: the image and copies of it shifted by one pixel, in this
# order, their logits averaged (`evaluate.tta` copies).
TTA_SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))


@dataclass(frozen=True)
class EvaluateParams:
    SECTION: ClassVar[str] = "evaluate"
    batch_size: int | Literal["auto"]
    device: Device
    precision: Precision
    channels_last: Auto
    tta: int

    def __post_init__(self) -> None:
        check(
            self,
            "batch_size",
            self.batch_size == "auto" or self.batch_size >= 1,
            "an integer >= 1 or auto",
        )
        check(self, "tta", 0 <= self.tta <= len(TTA_SHIFTS), f"0..{len(TTA_SHIFTS)} copies")
