"""The real `dvc` CLI in a temporary git repository, on real MNIST (from
MNIST_MIRROR) with the tiny params: what a user does, end to end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cmd, wait_until, write_params

pytestmark = pytest.mark.slow

STAGES = ["download", "preprocess", "train", "evaluate", "plot"]


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def lock_hashes(project: Path) -> dict[str, str]:
    """md5 of every output in dvc.lock, by path."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage["outs"]}


def plot_data(page: str) -> dict[str, list[dict]]:
    """The data rows of every vega plot in a `dvc plots` HTML page, by plot id."""
    plots, decoder = {}, json.JSONDecoder()
    for match in re.finditer(r'<div id = "([^"]+)">\s*<script[^>]*>\s*var spec = ', page):
        spec, _ = decoder.raw_decode(page, match.end())
        plots[match.group(1)] = spec["data"]["values"]
    return plots


def test_dvc_workflow(project: Path, mnist_mirror: str) -> None:
    def dvc(*args: str) -> str:
        result = run_cmd(
            [sys.executable, "-m", "dvc", *args], cwd=project, MNIST_MIRROR=mnist_mirror
        )
        return result.stdout + result.stderr

    run_cmd(["git", "init", "-q"], cwd=project)
    dvc("init", "-q")
    run_cmd(["git", "add", "-A"], cwd=project)
    run_cmd(["git", "commit", "-qm", "project"], cwd=project)

    # dvc repro runs every stage; a second one runs nothing
    assert ran(dvc("repro")) == STAGES
    for path in (
        "data/raw/train-images-idx3-ubyte",
        "data/processed/train.pt",
        "models/model.pt",
        "reports/train/metrics.json",
        "reports/eval/metrics.json",
        "reports/eval/per_class.csv",
        "reports/eval/confusion.csv",
        "reports/eval/misclassified.csv",
        "reports/plots/training_curves.png",
        "reports/plots/confusion_matrix.png",
        "reports/plots/misclassified.png",
        "reports/plots/per_class_accuracy.png",
    ):
        assert (project / path).exists(), path
    assert not (project / "models/checkpoint.pt").exists()
    second = dvc("repro")
    assert ran(second) == [] and "Data and pipelines are up to date" in second
    test = json.loads((project / "reports/eval/metrics.json").read_text())["test"]
    assert test["images"] == 200
    assert test["accuracy"] == pytest.approx(1 - test["errors"] / 200)
    confusion = (project / "reports/eval/confusion.csv").read_text().splitlines()
    wrong = sum(a != p for a, p in (line.split(",") for line in confusion[1:]))
    assert len(confusion) == 201 and wrong == test["errors"]
    run_cmd(["git", "add", "-A"], cwd=project)
    run_cmd(["git", "commit", "-qm", "baseline"], cwd=project)

    # from clean again: byte-identical data, model and test metrics (CPU, same seed)
    first = lock_hashes(project)
    assert ran(dvc("repro", "--force")) == STAGES
    again = lock_hashes(project)
    for path in ("data/raw", "data/processed", "models/model.pt", "reports/eval"):
        assert again[path] == first[path], path
    run_cmd(["git", "checkout", "--", "."], cwd=project)  # the baseline's timing figures

    # an experiment on a train param reruns train and its descendants only
    exp = dvc("exp", "run", "-S", "train.lr=0.01", "-n", "low-lr")
    assert ran(exp) == ["train", "evaluate", "plot"]
    shown = dvc("exp", "show", "--csv")
    assert "low-lr" in shown and "0.01" in shown
    header = shown.splitlines()[0]
    for column in (
        "test.accuracy",
        "test.loss",
        "val.acc",
        "train_time_s",
        "train_images_per_s",
        "train.lr",
    ):
        assert column in header, column
    metrics = dvc("metrics", "diff", "--all")
    assert "test.accuracy" in metrics and "test.loss" in metrics and "val.acc" in metrics
    assert "train.lr" in dvc("params", "diff") and "0.01" in dvc("params", "diff")

    # plots: the curves, the confusion matrix and the images, for one run or compared
    dvc("plots", "show", "-o", "plots_show")
    page = (project / "plots_show/index.html").read_text()
    for image in ("confusion_matrix", "misclassified", "per_class_accuracy", "training_curves"):
        assert f"reports/plots/{image}.png" in page, image
    data = plot_data(page)
    accuracy = {(row["filename"], row["step"]) for row in data["Accuracy_per_epoch"]}
    assert accuracy == {(f"{split}/acc.tsv", step) for split in ("train", "val") for step in "12"}
    assert len(data["Confusion_matrix__test_"]) == 200
    assert {row["filename"] for row in data["Loss_per_epoch"]} == {"train/loss.tsv", "val/loss.tsv"}
    dvc("plots", "diff", "HEAD", "low-lr", "-o", "plots_diff")
    diff = plot_data((project / "plots_diff/index.html").read_text())
    assert {row["rev"] for row in diff["Accuracy_per_epoch"]} == {"HEAD", "low-lr"}
    assert len(diff["Confusion_matrix__test_"]) == 400


@pytest.mark.parametrize(
    ("signum", "returncode"),
    [(signal.SIGINT, 130), (signal.SIGTERM, 130), (signal.SIGKILL, -signal.SIGKILL)],
)
def test_interrupted_training_resumes_to_the_same_model(
    project: Path, mnist_mirror: str, signum: int, returncode: int
) -> None:
    write_params(
        project, {"preprocess": {"train_limit": 2000}, "train": {"epochs": 4, "batch_size": 100}}
    )
    env = {"MNIST_MIRROR": mnist_mirror}
    run_cmd([sys.executable, "src/download.py"], cwd=project, **env)
    run_cmd([sys.executable, "src/preprocess.py"], cwd=project, **env)
    checkpoint, model = project / "models/checkpoint.pt", project / "models/model.pt"
    process = subprocess.Popen(
        [sys.executable, "src/train.py"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
        # Ctrl-C as in a terminal, even where pytest itself runs with SIGINT ignored (`&`)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_until(lambda: checkpoint.exists() or process.poll() is not None, seconds=120)
    process.send_signal(signum)  # during epoch 2 of 4
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # fail, and leave no stuck process behind
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"train.py still running 60 s after signal {signum}:\n{out}{err}")
    assert process.returncode == returncode, out + err
    assert checkpoint.exists() and not model.exists()

    resumed = run_cmd([sys.executable, "src/train.py"], cwd=project)
    assert "resuming from models/checkpoint.pt after epoch" in resumed.stdout
    assert model.exists() and not checkpoint.exists()
    loss = (project / "reports/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in loss[1:]] == ["1", "2", "3", "4"]

    # the same as a run that was never interrupted (CPU, same seed)
    resumed_model = torch.load(model, weights_only=True)
    resumed_val = (project / "reports/train/plots/metrics/val/acc.tsv").read_text()
    model.unlink()
    straight = run_cmd([sys.executable, "src/train.py"], cwd=project)
    assert "resuming" not in straight.stdout
    straight_model = torch.load(model, weights_only=True)
    for key, value in straight_model["state_dict"].items():
        assert torch.equal(value, resumed_model["state_dict"][key]), key
    assert (project / "reports/train/plots/metrics/val/acc.tsv").read_text() == resumed_val
