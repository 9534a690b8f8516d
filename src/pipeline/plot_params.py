"""The plot stage's params: params.yaml `plot`, checked on loading.

Free of torch, as every stage's params are: pipeline/params.py says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.params import check


@dataclass(frozen=True)
class PlotParams:
    SECTION: ClassVar[str] = "plot"
    max_misclassified: int
    dpi: int

    def __post_init__(self) -> None:
        check(self, "max_misclassified", 1 <= self.max_misclassified <= 100, "an integer in 1..100")
        check(self, "dpi", 50 <= self.dpi <= 600, "an integer in 50..600")
