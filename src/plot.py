"""Plot stage: matplotlib PNGs of training and evaluation, declared as DVC plots.

Inputs:  `paths.train_report`/plots/metrics/ (DVCLive per-epoch TSVs);
         `paths.eval_report`/{per_class,confusion,misclassified}.csv;
         `paths.processed`/test.pt (the misclassified digits); params.yaml `plot`.
Outputs: `paths.plots`/training_curves.png, confusion_matrix.png,
         misclassified.png, per_class_accuracy.png
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common import (
    NUM_CLASSES,
    PipelineError,
    atomic_path,
    check,
    load_params,
    load_paths,
    load_torch,
    run,
)


@dataclass(frozen=True)
class PlotParams:
    SECTION: ClassVar[str] = "plot"
    max_misclassified: int
    dpi: int

    def __post_init__(self) -> None:
        check(self, "max_misclassified", 1 <= self.max_misclassified <= 100, "an integer in 1..100")
        check(self, "dpi", 50 <= self.dpi <= 600, "an integer in 50..600")


def read_history(metrics_dir: Path) -> pd.DataFrame:
    """Per-epoch train/val loss and accuracy from DVCLive's TSVs, one row per epoch."""
    columns = {}
    for split in ("train", "val"):
        for metric in ("loss", "acc"):
            path = metrics_dir / split / f"{metric}.tsv"
            if not path.exists():
                raise PipelineError(f"{path} not found: run the train stage first")
            table = pd.read_csv(path, sep="\t")
            columns[f"{split}/{metric}"] = table.set_index("step")[metric]
    return pd.DataFrame(columns)


def training_curves(history: pd.DataFrame) -> Figure:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-o"), ("val", "-s")):
        ax_loss.plot(history.index, history[f"{split}/loss"], style, label=split, markersize=3)
        ax_acc.plot(history.index, 100 * history[f"{split}/acc"], style, label=split, markersize=3)
    ax_loss.set(title="Cross-entropy loss (no smoothing)", xlabel="epoch", ylabel="loss")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def confusion_heatmap(confusion: pd.DataFrame) -> Figure:
    counts = (
        pd.crosstab(confusion["actual"], confusion["predicted"])
        .reindex(index=range(NUM_CLASSES), columns=range(NUM_CLASSES), fill_value=0)
        .to_numpy()
    )
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    # log scale so that the few errors are visible beside ~1000 correct per class
    image = ax.imshow(np.log10(counts + 1), cmap="Blues")
    for (row, col), count in np.ndenumerate(counts):
        if count:
            color = "white" if count > counts.max() / 10 else "black"
            ax.text(col, row, str(count), ha="center", va="center", fontsize=8, color=color)
    ax.set(
        xticks=range(NUM_CLASSES),
        yticks=range(NUM_CLASSES),
        xlabel="predicted",
        ylabel="actual",
        title=f"Confusion matrix ({counts.sum()} test images)",
    )
    fig.colorbar(image, ax=ax, label="log10(count + 1)")
    fig.tight_layout()
    return fig


def misclassified_grid(images: np.ndarray, wrong: pd.DataFrame, limit: int) -> Figure:
    """The most confidently wrong test digits, with true/predicted label and confidence."""
    shown = wrong.sort_values("confidence", ascending=False, kind="stable").head(limit)
    cols = max(1, min(8, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, shown.itertuples(), strict=False):
        ax.imshow(images[row.index, 0], cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"{row.actual}→{row.predicted} {row.confidence:.0%}", fontsize=8)
    title = f"{len(shown)} of {len(wrong)} misclassified test digits (true→predicted confidence)"
    fig.suptitle(title if len(wrong) else "No misclassified test digits", fontsize=9)
    fig.tight_layout()
    return fig


def per_class_accuracy(per_class: pd.DataFrame) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    accuracy = 100 * per_class["recall"]
    bars = ax.bar(per_class["class"].astype(str), accuracy, color="tab:blue")
    ax.bar_label(bars, labels=[f"{a:.2f}" for a in accuracy], fontsize=8)
    ax.set(
        xlabel="digit",
        ylabel="accuracy (%) = recall",
        title="Test accuracy per class",
        ylim=(max(0.0, float(accuracy.min()) - 2), 100.5),
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def main() -> None:
    params = load_params(PlotParams)
    paths = load_paths()
    history = read_history(Path(paths.train_report) / "plots" / "metrics")
    eval_dir = Path(paths.eval_report)
    tables = {}
    for name in ("per_class", "confusion", "misclassified"):
        path = eval_dir / f"{name}.csv"
        if not path.exists():
            raise PipelineError(f"{path} not found: run the evaluate stage first")
        tables[name] = pd.read_csv(path)
    images = load_torch(Path(paths.processed) / "test.pt")["images"].numpy()
    figures = {
        "training_curves": training_curves(history),
        "confusion_matrix": confusion_heatmap(tables["confusion"]),
        "misclassified": misclassified_grid(
            images, tables["misclassified"], params.max_misclassified
        ),
        "per_class_accuracy": per_class_accuracy(tables["per_class"]),
    }
    with atomic_path(paths.plots) as tmp:
        tmp.mkdir()
        for name, fig in figures.items():
            # no "Software"/date metadata: the same inputs give the same bytes
            fig.savefig(tmp / f"{name}.png", dpi=params.dpi, metadata={"Software": None})
            plt.close(fig)
    print(f"wrote {len(figures)} plots to {paths.plots}")


if __name__ == "__main__":
    run(main)
