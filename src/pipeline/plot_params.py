"""The plot stage's params: params.yaml `plot`, checked on loading.

Apart from the stage script and free of torch and matplotlib, so that the
check_params stage, which checks every section before any stage runs, starts
without importing them.
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
