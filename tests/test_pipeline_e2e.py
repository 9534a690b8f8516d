"""The real `dvc` CLI in a temporary git repository, on real MNIST (from
MNIST_MIRROR) with the tiny params: what a user does, end to end."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    command_env,
    init_repo,
    make_project,
    processes_running,
    run_cmd,
    wait_until,
    write_params,
)

from pipeline.checkpoint import RUN_FILE

pytestmark = pytest.mark.slow

STAGES = ["check_params", "download", "preprocess", "train", "evaluate", "plot"]


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


def dvc_cli(project: Path, mirror: str) -> Callable[..., str]:
    def dvc(*args: str) -> str:
        result = run_cmd([sys.executable, "-m", "dvc", *args], cwd=project, MNIST_MIRROR=mirror)
        return result.stdout + result.stderr

    return dvc


def new_repo(project: Path, params: dict) -> None:
    write_params(project, params)
    init_repo(project)


def test_dvc_workflow(project: Path, mnist_mirror: str) -> None:
    dvc = dvc_cli(project, mnist_mirror)

    init_repo(project)

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
    assert not list((project / "models").glob("checkpoints/*.pt"))
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

    # sharing: a DVC remote and a git remote; a fresh clone pulls and reruns nothing
    storage, origin, clone = (project.parent / name for name in ("storage", "origin", "clone"))
    dvc("remote", "add", "-d", "storage", str(storage))
    run_cmd(["git", "commit", "-qam", "remote"], cwd=project)
    assert "pushed" in dvc("push")
    run_cmd(["git", "init", "-q", "--bare", "--initial-branch=main", str(origin)], cwd=project)
    run_cmd(["git", "remote", "add", "origin", str(origin)], cwd=project)
    run_cmd(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], cwd=project)
    run_cmd(["git", "clone", "-q", "-b", "main", str(origin), str(clone)], cwd=project.parent)
    in_clone = dvc_cli(clone, "")
    in_clone("pull")
    assert "Data and pipelines are up to date" in in_clone("status")
    assert ran(in_clone("repro")) == []
    for path in ("models/model.pt", "data/processed/train.pt", "reports/eval/metrics.json"):
        assert (clone / path).read_bytes() == (project / path).read_bytes(), path
    # the model registry's view: the artifact declared in dvc.yaml, a version registered
    # as GTO does it (an annotated git tag), fetched from the DVC remote
    run_cmd(["git", "tag", "-a", "resnet18-mnist@v0.1.0", "-m", "baseline"], cwd=project)
    run_cmd(["git", "push", "-q", "origin", "resnet18-mnist@v0.1.0"], cwd=project)
    got = project.parent / "artifact.pt"
    dvc("artifacts", "get", str(origin), "resnet18-mnist", "-o", str(got))
    assert got.read_bytes() == (project / "models/model.pt").read_bytes()

    # from clean again: byte-identical data, model and test metrics (CPU, same seed)
    first = lock_hashes(project)
    assert ran(dvc("repro", "--force")) == STAGES
    again = lock_hashes(project)
    for path in ("data/raw", "data/processed", "models/model.pt", "reports/eval"):
        assert again[path] == first[path], path
    run_cmd(["git", "checkout", "--", "."], cwd=project)  # the baseline's timing figures

    # a bad value, or a misspelt key, fails before any stage's outputs are touched
    outputs = ["models/model.pt", "reports/eval/metrics.json", "reports/plots/misclassified.png"]
    before = {path: (project / path).read_bytes() for path in outputs}
    for bad, message in (
        ("train.lr=abc", "train.lr = 'abc' is not allowed: a finite number"),
        ("+train.learnign_rate=0.1", "unknown key 'train.learnign_rate' (did you mean"),
    ):
        result = run_cmd(
            [sys.executable, "-m", "dvc", "exp", "run", "-S", bad],
            cwd=project,
            check=False,
            MNIST_MIRROR=mnist_mirror,
        )
        assert result.returncode != 0
        assert ran(result.stdout + result.stderr) == ["check_params"]
        assert f"error: params.yaml: {message}" in result.stderr
        assert {path: (project / path).read_bytes() for path in outputs} == before, bad
        run_cmd(["git", "checkout", "--", "params.yaml"], cwd=project)

    # an experiment on a train param reruns train and its descendants only
    exp = dvc("exp", "run", "-S", "train.lr=0.01", "-n", "low-lr")
    assert ran(exp) == ["check_params", "train", "evaluate", "plot"]
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

    # experiments travel through the git remote; a sweep runs through DVC's queue, in
    # temporary copies of the clone that take the data from the DVC cache (no mirror)
    dvc("exp", "push", "origin", "low-lr")
    in_clone("exp", "pull", "origin", "low-lr")
    assert "low-lr" in in_clone("exp", "show", "--csv")
    queued = in_clone("exp", "run", "--queue", "-S", "train.lr=0.02,0.05")
    assert queued.count("Queued experiment") == 2, queued
    in_clone("queue", "start", "-j", "1")
    wait_until(
        lambda: (
            "Queued" not in in_clone("queue", "status")
            and "Running" not in in_clone("queue", "status")
        ),
        seconds=600,
    )
    status = in_clone("queue", "status")
    assert status.count("Success") == 2, status
    rows = list(csv.DictReader(io.StringIO(in_clone("exp", "show", "--csv"))))
    swept = {row["train.lr"]: row["test.accuracy"] for row in rows if row["Experiment"]}
    assert {"0.02", "0.05"} <= set(swept) and all(swept[lr] for lr in ("0.02", "0.05")), swept


# Big enough to learn (the accuracy floor below) and to interrupt in epoch 2 of 4.
INTERRUPTED = {"preprocess": {"train_limit": 2000}, "train": {"epochs": 4, "batch_size": 100}}
ACCURACY_FLOOR = 0.8  # chance is 0.1; this run reached 0.9 (width 4, 2,000 images)


def stage_pids(project: Path) -> list[int]:
    """The processes running one of the project's stage scripts."""
    return processes_running(b"src/", project)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: str) -> dict:
    """The model, validation curve and test accuracy of a run never interrupted."""
    project = make_project(tmp_path_factory.mktemp("straight") / "project")
    new_repo(project, INTERRUPTED)
    out = dvc_cli(project, mnist_mirror)("repro")
    assert ran(out) == STAGES and "resuming" not in out
    return {
        "model": torch.load(project / "models/model.pt", weights_only=True)["state_dict"],
        "val": (project / "reports/train/plots/metrics/val/acc.tsv").read_text(),
        "test": json.loads((project / "reports/eval/metrics.json").read_text())["test"],
    }


def test_a_run_never_interrupted_learns(straight_run: dict) -> None:
    assert straight_run["test"]["accuracy"] >= ACCURACY_FLOOR


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the stage's process in /proc")
@pytest.mark.parametrize(
    ("target", "signum"),
    [
        ("stage", signal.SIGINT),  # Ctrl-C; then the checkpoint is found truncated
        ("dvc", signal.SIGKILL),  # dvc dies outright; an experiment runs in between
    ],
)
def test_interrupted_training_resumes_to_the_same_model(
    project: Path, mnist_mirror: str, straight_run: dict, target: str, signum: int
) -> None:
    new_repo(project, INTERRUPTED)
    dvc = dvc_cli(project, mnist_mirror)
    checkpoints = project / "models/checkpoints"
    repro = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=command_env(MNIST_MIRROR=mnist_mirror, PYTHONUNBUFFERED="1"),
        # Ctrl-C as in a terminal, even where pytest itself runs with SIGINT ignored (`&`)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_until(lambda: any(checkpoints.glob("*.pt")) or repro.poll() is not None, 300)
        stages = stage_pids(project)
        assert len(stages) == 1, stages  # train, in epoch 2 of 4
        os.kill(repro.pid if target == "dvc" else stages[0], signum)
        repro.wait(timeout=60)
        wait_until(lambda: not stage_pids(project), seconds=5)
        assert stage_pids(project) == [], f"the stage outlived {target} by 5 s"
    finally:
        repro.kill()
        for pid in stage_pids(project):
            os.kill(pid, signal.SIGKILL)
    output = repro.stdout.read()
    assert ("interrupted" in output) == (signum != signal.SIGKILL or target == "dvc"), output
    assert not (project / "models/model.pt").exists()
    [checkpoint] = checkpoints.glob("*.pt")

    if target == "dvc" and signum == signal.SIGKILL:
        # an experiment with other params in between keeps the interrupted run's state
        exp = dvc("exp", "run", "-S", "train.lr=0.05", "-S", "train.epochs=1")
        assert ran(exp) == ["check_params", "train", "evaluate", "plot"]
        assert list(checkpoints.glob("*.pt")) == [checkpoint]
        run_cmd(["git", "checkout", "--", "params.yaml"], cwd=project)

    if target == "stage":
        # a checkpoint cut short (a full disk, a copy that stopped): set aside, named, and
        # the run starts over, to the same model
        checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
        again = dvc("repro")
        aside = checkpoint.with_name(f"{checkpoint.stem}.unreadable.pt").relative_to(project)
        assert f"set aside as {aside} (delete it when you like); training starts over" in again
        assert "training from the start: 4 epochs of 20 steps" in again
    else:
        resumed = dvc("repro")
        line = next(ln for ln in resumed.splitlines() if ln.startswith("resuming from"))
        assert re.fullmatch(
            rf"resuming from {checkpoint.relative_to(project)} at epoch [23]/4, step 0/20", line
        )
    runs = [c for c in checkpoints.glob("*.pt") if RUN_FILE.fullmatch(c.name)]
    assert runs == []  # deleted once its run completed
    loss = (project / "reports/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in loss[1:]] == ["1", "2", "3", "4"]
    # the same as a run that was never interrupted (CPU, same seed)
    model = torch.load(project / "models/model.pt", weights_only=True)["state_dict"]
    for key, value in straight_run["model"].items():
        assert torch.equal(value, model[key]), key
    assert (project / "reports/train/plots/metrics/val/acc.tsv").read_text() == straight_run["val"]
