"""The preprocess stage's params: params.yaml `preprocess`, checked on loading.

Free of torch, as every stage's params are: pipeline/params.py says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.mnist import NUM_CLASSES
from pipeline.params import check


@dataclass(frozen=True)
class PreprocessParams:
    SECTION: ClassVar[str] = "preprocess"
    val_size: int
    train_limit: int
    test_limit: int
    seed: int

    def __post_init__(self) -> None:
        check(
            self,
            "val_size",
            self.val_size >= NUM_CLASSES,
            f"an integer >= {NUM_CLASSES} (one image per class)",
        )
        for key in ("train_limit", "test_limit"):
            value = getattr(self, key)
            check(
                self,
                key,
                value == 0 or value >= NUM_CLASSES,
                f"0 (all) or an integer >= {NUM_CLASSES}",
            )
