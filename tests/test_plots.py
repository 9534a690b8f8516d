"""The plot stage's figures from known inputs, its errors on bad ones, and the offline
page template and vega-lite templates that `dvc plots` uses (no browser: that is
test_plots_browser.py)."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import ROOT, save_untrained_model
from dvc_render.vega import VegaRenderer

import plot
from pipeline.errors import PipelineError
from pipeline.files import save_torch

LABEL = "width 16 · 3 epochs · lr 0.05 · batch 128 · 10,000 training images · test acc"
PLOTS_DIR = ROOT / ".dvc" / "plots"
VENDOR = PLOTS_DIR / "vendor"


def known_confusion() -> pd.DataFrame:
    """Ten correct images per class, and seven 3s taken for 5s."""
    pairs = [(c, c) for c in range(10) for _ in range(10)] + [(3, 5)] * 7
    return pd.DataFrame(pairs, columns=["actual", "predicted"])


def per_class_table(accuracy_percent: list[float]) -> pd.DataFrame:
    recall = np.array(accuracy_percent) / 100
    return pd.DataFrame({"class": range(10), "recall": recall, "support": 100})


# --------------------------------------------------------------------------- figures


def test_confusion_heatmap_has_actual_down_and_predicted_across() -> None:
    assert plot.confusion_counts(known_confusion())[3, 5] == 7  # [actual, predicted]
    fig = plot.confusion_heatmap(known_confusion(), LABEL)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "actual")
    shown = ax.images[0].get_array()  # drawn with row = y, column = x
    assert shown[3, 5] > 0 and shown[5, 3] == 0
    # the count is written in the cell at x = predicted 5, y = actual 3
    (seven,) = [text for text in ax.texts if text.get_text() == "7"]
    assert seven.get_position() == (5, 3)
    assert ax.yaxis_inverted()  # actual 0 at the top, as in the table


def test_epoch_ticks_are_whole_numbers() -> None:
    epochs = [1, 2, 3]
    history = pd.DataFrame(
        {"train/loss": [2.0, 1.0, 0.5], "val/loss": [2.1, 1.2, 0.7]}
        | {"train/acc": [0.5, 0.8, 0.9], "val/acc": [0.4, 0.7, 0.85]},
        index=pd.Index(epochs, name="step"),
    )
    fig = plot.training_curves(history, LABEL)
    fig.canvas.draw()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks == [1, 2, 3], ticks
        shown = [t.get_text() for t in ax.get_xticklabels() if low <= t.get_position()[0] <= high]
        assert shown == ["1", "2", "3"]


def test_late_epochs_are_not_squashed_on_the_accuracy_axis() -> None:
    """Epoch 1 at 60%, then 99% and 99.5%: on a linear axis from 60% to 100% the last
    two lie 1.25% of its height apart; on the log scale of the error, ten times that.
    Higher accuracy is higher up, and the ticks read as accuracies."""
    history = pd.DataFrame(
        {"train/loss": [1.0, 0.2, 0.1], "val/loss": [1.1, 0.3, 0.2]}
        | {"train/acc": [0.6, 0.99, 0.995], "val/acc": [0.62, 0.989, 0.994]},
        index=pd.Index([1, 2, 3], name="step"),
    )
    fig = plot.training_curves(history, LABEL)
    fig.canvas.draw()
    ax = fig.axes[1]
    train = ax.get_lines()[0]
    _, y = ax.transData.transform(train.get_xydata()).T  # display pixels, up is larger
    height = ax.get_window_extent().height
    assert y[2] > y[1] > y[0]  # better accuracy is higher up
    assert (y[2] - y[1]) / height > 0.1  # measured: 0.13
    labels = {t.get_text() for t in ax.get_yticklabels()}
    assert {"99", "99.5"} <= labels and ax.get_ylabel() == "accuracy (%)"
    perfect = history.assign(**{"train/acc": [0.6, 0.99, 1.0]})  # 100%: drawn at the floor
    assert np.isfinite(
        plot.training_curves(perfect, LABEL).axes[1].get_lines()[0].get_ydata()
    ).all()


def test_per_class_axis_is_fixed_and_marks_classes_below_it() -> None:
    good = plot.per_class_accuracy(per_class_table([99.0 + c / 10 for c in range(10)]), LABEL)
    mixed = per_class_table([99.5] * 9 + [62.5])
    bad = plot.per_class_accuracy(mixed, LABEL)
    assert good.axes[0].get_ylim() == bad.axes[0].get_ylim() == (90.0, 100.5)
    marks = [t.get_text() for t in bad.axes[0].texts if "▼" in t.get_text()]
    assert marks == ["▼ 62.5"]
    assert not [t for t in good.axes[0].texts if "▼" in t.get_text()]


# --------------------------------------------------------------------------- inputs


def write_stage_inputs(root: Path) -> None:
    """What the earlier stages leave for the plot stage, small; params.yaml as the repo's."""
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    metrics = root / "reports/train/plots/metrics"
    for split in ("train", "val"):
        (metrics / split).mkdir(parents=True)
        for name, values in (("loss", [2.0, 1.0]), ("acc", [0.5, 0.9])):
            rows = "".join(f"{step}\t{value}\n" for step, value in enumerate(values, 1))
            (metrics / split / f"{name}.tsv").write_text(f"step\t{name}\n{rows}")
    evaluation = root / "reports/eval"
    evaluation.mkdir(parents=True)
    known_confusion().to_csv(evaluation / "confusion.csv", index=False)
    per_class_table([99.0] * 10).to_csv(evaluation / "per_class.csv", index=False)
    wrong = pd.DataFrame({"index": [3], "actual": [3], "predicted": [5], "confidence": [0.8]})
    wrong.to_csv(evaluation / "misclassified.csv", index=False)
    test = {"accuracy": 100 / 107, "loss": 0.3, "errors": 7, "images": 107}
    (evaluation / "metrics.json").write_text(json.dumps({"test": test}))
    (root / "data/processed").mkdir(parents=True)
    (root / "data/processed/stats.json").write_text(json.dumps({"train_size": 400}))
    images = torch.zeros((107, 1, 32, 32), dtype=torch.uint8)
    save_torch({"images": images, "labels": torch.zeros(107)}, root / "data/processed/test.pt")
    save_untrained_model(root / "models/model.pt")  # width 4, 3 epochs, lr 0.05, batch 32


def png_chunks(data: bytes) -> list[bytes]:
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunks.append(data[at + 4 : at + 8])
        at += 12 + length
    return chunks


def test_stage_writes_labelled_pngs_with_the_same_bytes_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_stage_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    plot.main()
    names = ["confusion_matrix", "misclassified", "per_class_accuracy", "training_curves"]
    first = {p.name: p.read_bytes() for p in sorted(Path("reports/plots").iterdir())}
    assert list(first) == [f"{name}.png" for name in names]
    plot.main()
    assert {p.name: p.read_bytes() for p in Path("reports/plots").iterdir()} == first
    for data in first.values():  # no text chunks: no software name, no date
        assert not {b"tEXt", b"iTXt", b"zTXt", b"tIME"} & set(png_chunks(data))


def test_every_figure_names_its_run(tmp_path: Path) -> None:
    write_stage_inputs(tmp_path)
    label = plot.run_label(
        tmp_path / "models/model.pt",
        tmp_path / "data/processed/stats.json",
        tmp_path / "reports/eval/metrics.json",
    )
    assert label == (
        "width 4 · 3 epochs · lr 0.05 · batch 32 · 400 training images · "
        "test accuracy 93.46% (7 errors in 107)"
    )
    history = pd.DataFrame(
        {f"{s}/{m}": [1.0, 0.5] for s in ("train", "val") for m in ("loss", "acc")}, index=[1, 2]
    )
    images = np.zeros((10, 1, 32, 32), dtype=np.uint8)
    wrong = pd.DataFrame({"index": [1], "actual": [3], "predicted": [5], "confidence": [0.9]})
    figures = [
        plot.training_curves(history, label),
        plot.confusion_heatmap(known_confusion(), label),
        plot.misclassified_grid(images, wrong, 8, label),
        plot.per_class_accuracy(per_class_table([99.0] * 10), label),
    ]
    for fig in figures:
        assert label in fig.get_suptitle()


@pytest.mark.parametrize(
    ("path", "change", "message"),
    [
        ("reports/train/plots/metrics/val/acc.tsv", None, "val/acc.tsv not found"),
        ("reports/train/plots/metrics/val/acc.tsv", "step\tloss\n1\t2\n", "has no column 'acc'"),
        ("reports/eval/confusion.csv", "actual,predicted\n3,12\n", "predicted = 12 is not a digit"),
        ("reports/eval/confusion.csv", "", "confusion.csv is not a readable table"),
        ("reports/eval/per_class.csv", None, "per_class.csv not found"),
        ("reports/eval/misclassified.csv", "index,actual\n1,2\n", "has no column 'predicted'"),
        ("reports/eval/metrics.json", '{"test": {"accuracy": 0.5}}', "has no 'test.errors'"),
        ("reports/eval/metrics.json", "{", "metrics.json is not valid JSON"),
        ("data/processed/stats.json", "{}", "stats.json has no 'train_size'"),
        ("models/model.pt", None, "models/model.pt not found"),
        ("models/model.pt", {"state_dict": {}}, "model.pt is not a model that src/train.py wrote"),
        ("models/model.pt", "not a model", "(not a file that torch.save writes)"),
    ],
)
def test_missing_or_bad_inputs_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, change: object, message: str
) -> None:
    write_stage_inputs(tmp_path)
    target = tmp_path / path
    if change is None:
        target.unlink()
    elif isinstance(change, dict):
        save_torch(change, target)
    else:
        target.write_text(change)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=re.escape(message)):
        plot.main()
    assert not (tmp_path / "reports/plots").exists()  # nothing half-written


# --------------------------------------------------------------------------- dvc plots


def declared_plots() -> list[tuple[str, dict]]:
    """(id, properties) of every vega plot in dvc.yaml, with ${paths.*} filled in."""
    paths = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]
    text = re.sub(
        r"\$\{paths\.(\w+)\}", lambda m: paths[m.group(1)], (ROOT / "dvc.yaml").read_text()
    )
    return [next(iter(p.items())) for p in yaml.safe_load(text)["plots"] if isinstance(p, dict)]


def test_page_template_carries_the_scripts_dvc_render_would_fetch() -> None:
    page = (PLOTS_DIR / "page.html").read_text(encoding="utf-8")
    assert "{plot_divs}" in page and "{scripts}" not in page  # no CDN tags put in
    sums = {
        line.split()[1]: line.split()[0]
        for line in (VENDOR / "SHA256SUMS").read_text().splitlines()
    }
    readme = (VENDOR / "README.md").read_text()
    # dvc-render's page loads e.g. https://cdn.jsdelivr.net/npm/vega@5.20.2
    cdn = dict(re.findall(r"npm/([a-z-]+)@(\d+)\.", VegaRenderer.SCRIPTS))
    assert sorted(cdn) == ["vega", "vega-embed", "vega-lite"]
    for name, major in cdn.items():
        (version,) = re.findall(rf'<script data-package="{name}" data-version="([\d.]+)">', page)
        assert version.split(".")[0] == major, (name, version)
        start = page.index(f'data-version="{version}">\n') + len(f'data-version="{version}">\n')
        code = page[start : page.index("\n</script>", start)]
        assert hashlib.sha256(code.encode()).hexdigest() == sums[f"{name}@{version}"], name
        assert (VENDOR / f"LICENSE.{name}").read_text().startswith("Copyright (c)")
        assert f"{name}@{version}" in readme
    markup = re.sub(r"(<script[^>]*>).*?</script>", r"\1", page, flags=re.DOTALL)
    assert markup.count("<script") == 4  # the three packages and our vegaEmbed options
    assert not re.search(r"<[^>]+ (src|href)=", markup)  # nothing loaded from anywhere


def test_dvc_reads_the_page_template_from_its_config() -> None:
    from dvc.config import Config

    template = Config(dvc_dir=ROOT / ".dvc", validate=True)["plots"]["html_template"]
    assert (ROOT / ".dvc" / template).resolve() == (PLOTS_DIR / "page.html").resolve()


def test_every_declared_plot_fills_its_template() -> None:
    rows = [
        {"step": "1", "loss": "2.3", "acc": "0.5", "lr": "0.1", "actual": "3", "predicted": "5"}
        | {"rev": rev, "filename": "train/loss.tsv"}
        for rev in ("HEAD", "exp")
    ]
    plots, specs = dict(declared_plots()), {}
    for name, props in plots.items():
        assert (PLOTS_DIR / f"{props['template']}.json").is_file(), name
        (field,) = set(props["y"].values())
        renderer = VegaRenderer(rows, name, template_dir=str(PLOTS_DIR), **props | {"y": field})
        specs[name] = renderer.get_filled_template()
        assert "<DVC_METRIC_" not in json.dumps(specs[name]), name
    for name in ("Loss per epoch", "Accuracy per epoch", "Learning rate"):
        axis = specs[name]["encoding"]["x"]["axis"]
        assert axis["format"] == "d" and "span(domain('x'))" in axis["tickCount"]["expr"], name
    # accuracy on a log scale of the error, best at the top, labelled in accuracy
    accuracy = specs["Accuracy per epoch"]
    error = next(t for t in accuracy["transform"] if "error" in t["as"])
    assert error["calculate"] == "100 * max(1 - datum['acc'], 0.0001)"
    assert accuracy["encoding"]["y"]["field"] == error["as"]
    assert accuracy["encoding"]["y"]["scale"] == {"type": "log", "reverse": True}
    assert "100 - datum.value" in accuracy["encoding"]["y"]["axis"]["labelExpr"]
    confusion = plots["Confusion matrix (test)"]
    assert confusion["x"] == "predicted" and set(confusion["y"].values()) == {"actual"}
