"""The accuracy axis that the plot stage's training curves and the report's curves share:
the error (100 - accuracy, %) on a log scale, labelled in accuracy, best at the top.

99% and 99.7% then lie as far apart as 70% and 90%, so the late epochs, where runs
differ, are not squashed under the first one's 50%.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

# Ticks at these errors (100 - accuracy, %), labelled as accuracies; an error of 0 is
# drawn at the floor.
ERROR_TICKS = (90, 50, 20, 10, 5, 2, 1, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01)
ERROR_FLOOR = 0.01


def error_percent(accuracy: pd.Series) -> pd.Series:
    """100 - accuracy in %, floored so that a perfect epoch still has a place on a log axis."""
    return (100 * (1 - accuracy)).clip(lower=ERROR_FLOOR)


def accuracy_axis(ax: plt.Axes, errors: pd.Series) -> None:
    """Make `ax`'s y axis the accuracy axis for the errors (%) plotted on it."""
    ax.set_yscale("log")
    low, high = errors.min() / 1.5, min(100.0, errors.max() * 1.5)
    ax.set_ylim(high, low)  # inverted: a smaller error is higher up
    ticks = [e for e in ERROR_TICKS if low <= e <= high]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda e, _: f"{100 - e:.4g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
