"""Plot stage: matplotlib PNGs of training and evaluation, declared as DVC plots.

Inputs:  `paths.train_report`/plots/metrics/ (DVCLive per-epoch TSVs);
         `paths.eval_report`/{metrics.json,per_class,confusion,misclassified}.csv;
         `paths.processed`/test.pt (the misclassified digits) and stats.json;
         `paths.model` (the params the run used); params.yaml `plot`.
Outputs: `paths.plots`/training_curves.png, confusion_matrix.png,
         misclassified.png, per_class_accuracy.png, each subtitled with the run it shows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.errors import PipelineError
from pipeline.figures import accuracy_axis, error_percent
from pipeline.files import atomic_path, load_torch
from pipeline.mnist import NUM_CLASSES
from pipeline.model import read_model_file
from pipeline.params import load_params, load_paths
from pipeline.plot_params import PlotParams
from pipeline.process import run

# The per-class axis is the same for every run, so that runs compare at a glance;
# a class below its floor is drawn as a marker on the floor with its value.
PER_CLASS_RANGE = (90.0, 100.0)  # accuracy, %


# --------------------------------------------------------------------------- inputs


def read_table(path: Path, columns: list[str], sep: str = ",") -> pd.DataFrame:
    """A CSV/TSV the earlier stages wrote, with the columns this stage needs."""
    if not path.exists():
        raise PipelineError(f"{path} not found: run the stage that writes it first")
    try:
        table = pd.read_csv(path, sep=sep)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path} is not a readable table ({error})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise PipelineError(f"{path} has no column {missing[0]!r} (it has {list(table.columns)})")
    return table


def read_history(metrics_dir: Path) -> pd.DataFrame:
    """Per-epoch train/val loss and accuracy from DVCLive's TSVs, one row per epoch."""
    columns = {}
    for split in ("train", "val"):
        for metric in ("loss", "acc"):
            table = read_table(metrics_dir / split / f"{metric}.tsv", ["step", metric], sep="\t")
            columns[f"{split}/{metric}"] = table.set_index("step")[metric]
    return pd.DataFrame(columns)


def check_labels(confusion: pd.DataFrame, path: Path) -> None:
    for column in ("actual", "predicted"):
        bad = ~confusion[column].isin(range(NUM_CLASSES))
        if bad.any():
            value = confusion[column][bad].iloc[0]
            raise PipelineError(f"{path}: {column} = {value} is not a digit 0..9")


def read_json(path: Path) -> dict:
    if not path.exists():
        raise PipelineError(f"{path} not found: run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PipelineError(f"{path} is not valid JSON ({error})") from None


def field(source: str | Path, data: dict, dotted: str) -> Any:
    """data["a"]["b"] for "a.b", or an error naming the file that lacks it."""
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            raise PipelineError(f"{source} has no {dotted!r}: rerun the stage that writes it")
        data = data[key]
    return data


def run_label(model: Path, stats: Path, metrics: Path) -> str:
    """One line saying which run the figures show: the settings the model was trained
    with (the train stage keeps them in the model file; this stage reads only its own
    params section), the number of training images and the test result."""
    # the model file's params, read without building the network (0.7 s on a CPU)
    params, test = read_model_file(model)["params"], read_json(metrics)
    width, epochs, lr, batch = (
        field(model, params, key)
        for key in ("model.width", "train.epochs", "train.lr", "train.batch_size")
    )
    accuracy, errors, images = (
        field(metrics, test, f"test.{k}") for k in ("accuracy", "errors", "images")
    )
    train_images = field(stats, read_json(stats), "train_size")
    return (
        f"width {width} · {epochs} epochs · lr {lr:g} · batch {batch} · "
        f"{train_images:,} training images · test accuracy {100 * accuracy:.2f}% "
        f"({errors:,} errors in {images:,})"
    )


# --------------------------------------------------------------------------- figures


def training_curves(history: pd.DataFrame, label: str) -> Figure:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4.3), layout="constrained")
    errors = {split: error_percent(history[f"{split}/acc"]) for split in ("train", "val")}
    for split, style in (("train", "-o"), ("val", "--s")):
        ax_loss.plot(history.index, history[f"{split}/loss"], style, label=split, markersize=3)
        ax_acc.plot(history.index, errors[split], style, label=split, markersize=3)
    accuracy_axis(ax_acc, pd.concat(errors.values()))
    ax_loss.set(title="Cross-entropy loss (no smoothing)", xlabel="epoch", ylabel="loss")
    ax_acc.set(
        title="Accuracy (log scale of the error, 100 - accuracy)",
        xlabel="epoch",
        ylabel="accuracy (%)",
    )
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(label, fontsize=9)
    return fig


def confusion_counts(confusion: pd.DataFrame) -> np.ndarray:
    """counts[actual, predicted]: rows are the true class, columns the prediction."""
    return (
        pd.crosstab(confusion["actual"], confusion["predicted"])
        .reindex(index=range(NUM_CLASSES), columns=range(NUM_CLASSES), fill_value=0)
        .to_numpy()
    )


def confusion_heatmap(confusion: pd.DataFrame, label: str) -> Figure:
    counts = confusion_counts(confusion)
    fig, ax = plt.subplots(figsize=(7, 6), layout="constrained")
    # log scale so that the few errors are visible beside ~1000 correct per class;
    # imshow draws counts[row, col] at y=row, x=col: actual down, predicted across
    image = ax.imshow(np.log10(counts + 1), cmap="Blues", vmin=0)
    for (row, col), count in np.ndenumerate(counts):
        if count:
            color = "white" if count > counts.max() / 10 else "black"
            ax.text(col, row, str(count), ha="center", va="center", fontsize=8, color=color)
    ax.set(
        xticks=range(NUM_CLASSES),
        yticks=range(NUM_CLASSES),
        xlabel="predicted",
        ylabel="actual",
        title=f"Confusion matrix ({counts.sum():,} test images)",
    )
    fig.colorbar(image, ax=ax, label="log10(count + 1)")
    fig.suptitle(label, fontsize=8)
    return fig


def misclassified_grid(images: np.ndarray, wrong: pd.DataFrame, limit: int, label: str) -> Figure:
    """The most confidently wrong test digits, with true/predicted label and confidence."""
    shown = wrong.sort_values("confidence", ascending=False, kind="stable").head(limit)
    cols = max(1, min(8, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    size = (max(7.0, 1.4 * cols), 1.6 * rows + 0.7)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, shown.itertuples(), strict=False):
        ax.imshow(images[row.index, 0], cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"{row.actual}→{row.predicted} {row.confidence:.0%}", fontsize=8)
    title = f"{len(shown)} of {len(wrong)} misclassified test digits (true→predicted confidence)"
    fig.suptitle(f"{title if len(wrong) else 'No misclassified test digits'}\n{label}", fontsize=8)
    return fig


def per_class_accuracy(per_class: pd.DataFrame, label: str) -> Figure:
    low, high = PER_CLASS_RANGE
    fig, ax = plt.subplots(figsize=(7, 4.3), layout="constrained")
    accuracy = 100 * per_class["recall"].to_numpy()
    classes = per_class["class"].astype(str).to_numpy()
    below = accuracy < low
    bars = ax.bar(classes, accuracy, color=np.where(below, "tab:red", "tab:blue"))
    ax.bar_label(bars, labels=[f"{a:.2f}" if a >= low else "" for a in accuracy], fontsize=8)
    for x in np.flatnonzero(below):  # off the axis: a marker on its floor, with the value
        ax.text(x, low, f"▼ {accuracy[x]:.1f}", ha="center", va="bottom", color="tab:red")
    ax.set(
        xlabel="digit",
        ylabel="accuracy (%) = recall",
        title=f"Test accuracy per class (▼: below {low:g}%)",
        ylim=(low, high + 0.5),
    )
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(label, fontsize=8)
    return fig


# --------------------------------------------------------------------------- stage


def main() -> None:
    params = load_params(PlotParams)
    paths = load_paths()
    eval_dir = Path(paths.eval_report)
    history = read_history(Path(paths.train_report) / "plots" / "metrics")
    per_class = read_table(eval_dir / "per_class.csv", ["class", "recall"])
    confusion = read_table(eval_dir / "confusion.csv", ["actual", "predicted"])
    check_labels(confusion, eval_dir / "confusion.csv")
    wrong = read_table(
        eval_dir / "misclassified.csv", ["index", "actual", "predicted", "confidence"]
    )
    processed = Path(paths.processed)
    label = run_label(Path(paths.model), processed / "stats.json", eval_dir / "metrics.json")
    images = load_torch(processed / "test.pt")["images"].numpy()
    figures = {
        "training_curves": training_curves(history, label),
        "confusion_matrix": confusion_heatmap(confusion, label),
        "misclassified": misclassified_grid(images, wrong, params.max_misclassified, label),
        "per_class_accuracy": per_class_accuracy(per_class, label),
    }
    with atomic_path(paths.plots) as tmp:
        tmp.mkdir()
        for name, fig in figures.items():
            # no "Software"/date metadata: the same inputs give the same bytes
            fig.savefig(tmp / f"{name}.png", dpi=params.dpi, metadata={"Software": None})
            plt.close(fig)
    print(f"wrote {len(figures)} plots to {paths.plots}")


if __name__ == "__main__":
    run(main, stage="plot")
