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
    LOW_LR,
    TinyRepo,
    built_once,
    command_env,
    copy_repo,
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


def commit(project: Path, message: str) -> None:
    run_cmd(["git", "add", "-A"], cwd=project)
    run_cmd(["git", "commit", "-qm", message], cwd=project)


def test_dvc_repro_runs_every_stage_then_nothing(tiny_repo: TinyRepo) -> None:
    """`dvc repro` from nothing (the fixture's) runs every stage and writes every output;
    the next one, with nothing changed, runs nothing."""
    project = tiny_repo.path
    assert ran(tiny_repo.first_repro) == STAGES
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
    assert not [c for c in (project / "models").glob("checkpoints/*.pt")]
    assert ran(tiny_repo.second_repro) == []
    assert "Data and pipelines are up to date" in tiny_repo.second_repro
    test = json.loads((project / "reports/eval/metrics.json").read_text())["test"]
    assert test["images"] == 200
    assert test["accuracy"] == pytest.approx(1 - test["errors"] / 200)
    confusion = (project / "reports/eval/confusion.csv").read_text().splitlines()
    wrong = sum(a != p for a, p in (line.split(",") for line in confusion[1:]))
    assert len(confusion) == 201 and wrong == test["errors"]


def test_sharing_through_a_dvc_remote_and_a_git_remote(tiny_repo: TinyRepo, tmp_path: Path) -> None:
    """A DVC remote and a git remote: a fresh clone pulls and reruns nothing; the model
    registry's `dvc artifacts get` fetches the model."""
    project = copy_repo(tiny_repo.path, tmp_path / "project")
    dvc = dvc_cli(project, "")
    storage, origin, clone = (tmp_path / name for name in ("storage", "origin", "clone"))
    dvc("remote", "add", "-d", "storage", str(storage))
    run_cmd(["git", "commit", "-qam", "remote"], cwd=project)
    assert "pushed" in dvc("push")
    run_cmd(["git", "init", "-q", "--bare", "--initial-branch=main", str(origin)], cwd=project)
    run_cmd(["git", "remote", "add", "origin", str(origin)], cwd=project)
    run_cmd(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], cwd=project)
    run_cmd(["git", "clone", "-q", "-b", "main", str(origin), str(clone)], cwd=tmp_path)
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
    got = tmp_path / "artifact.pt"
    dvc("artifacts", "get", str(origin), "resnet18-mnist", "-o", str(got))
    assert got.read_bytes() == (project / "models/model.pt").read_bytes()


@pytest.mark.first
def test_a_sweep_runs_through_dvc_s_queue_without_a_mirror(
    tiny_repo: TinyRepo, tmp_path: Path
) -> None:
    """A two-point sweep queued and run by DVC's queue, each point in a temporary copy of
    the workspace that takes the data stages' outputs from the DVC cache (no mirror set);
    the second point trains with two processes, as `dvc exp run -S train.processes=2`
    does in the workspace."""
    project = copy_repo(tiny_repo.path, tmp_path / "project")
    dvc = dvc_cli(project, "")

    def experiments_saved() -> int:
        """Experiments the queue finished and saved (refs/exps/celery/ holds its own)."""
        refs = run_cmd(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project)
        return sum(not ref.startswith("refs/exps/celery/") for ref in refs.stdout.split())

    def queue_settled() -> bool:
        status = dvc("queue", "status")
        return "Queued" not in status and "Running" not in status

    queued = dvc("exp", "run", "--queue", "-S", "train.lr=0.02", "-S", "train.processes=1,2")
    assert queued.count("Queued experiment") == 2, queued
    dvc("queue", "start", "-j", "2")  # the two points side by side
    # looked for cheaply (each `dvc queue status` costs a second of CPU): both saved, or
    # the worker gone (it stops 10 s after the queue empties, after a failure too)
    worker = lambda: processes_running(b"queue-worker", project)  # noqa: E731
    wait_until(lambda: experiments_saved() == 2 or not worker(), seconds=600, every=0.5)
    wait_until(queue_settled, seconds=30, every=1)
    status = dvc("queue", "status")
    assert status.count("Success") == 2, status
    rows = list(csv.DictReader(io.StringIO(dvc("exp", "show", "--csv"))))
    swept = {row["train.processes"]: row for row in rows if row["Experiment"]}
    assert set(swept) == {"1", "2"}, rows
    assert all(row["train.lr"] == "0.02" and row["test.accuracy"] for row in swept.values())
    two = dvc("queue", "logs", swept["2"]["Experiment"])
    assert "starting 2 training processes on the CPU (Gloo)" in two, two
    assert "starting 2 training processes" not in dvc("queue", "logs", swept["1"]["Experiment"])


def test_a_refused_value_is_undone_by_git_checkout_every_time(
    tiny_repo: TinyRepo, tmp_path: Path
) -> None:
    """In a fresh clone, `dvc exp run -S train.lr=abc` is refused; DVC leaves `lr: abc` in
    params.yaml, and `git checkout params.yaml` must take it out: DVC refreshed git's
    index within the second it rewrote the file, so without check_params' touch git
    took the changed file for unchanged (docs/faults.md)."""
    clone = tmp_path / "clone"
    run_cmd(["git", "clone", "-q", str(tiny_repo.path), str(clone)], cwd=tmp_path)
    committed = (clone / "params.yaml").read_text()
    for _ in range(2):  # a race of DVC's: it showed in three of three tries before the fix
        refused = run_cmd(
            [sys.executable, "-m", "dvc", "exp", "run", "-S", "train.lr=abc"],
            cwd=clone,
            check=False,
        )
        assert ran(refused.stdout + refused.stderr) == ["check_params"]
        assert "  lr: abc" in (clone / "params.yaml").read_text()
        assert run_cmd(["git", "status", "--short"], cwd=clone).stdout == " M params.yaml\n"
        run_cmd(["git", "checkout", "params.yaml"], cwd=clone)
        assert (clone / "params.yaml").read_text() == committed


def test_bad_values_are_refused_before_any_output_is_touched(
    tiny_repo: TinyRepo, tmp_path: Path, mnist_mirror: str
) -> None:
    """A bad value, a misspelt key or a device this machine lacks fails in the first
    stage, before DVC deletes any stage's outputs."""
    project = copy_repo(tiny_repo.path, tmp_path / "project")
    outputs = ["models/model.pt", "reports/eval/metrics.json", "reports/plots/misclassified.png"]
    before = {path: (project / path).read_bytes() for path in outputs}
    refusals = [
        ("train.lr=abc", "train.lr = 'abc' is not allowed: a finite number"),
        ("+train.learnign_rate=0.1", "unknown key 'train.learnign_rate' (did you mean"),
    ]
    if not torch.cuda.is_available():  # evaluate.device alike: tests/test_check_params.py
        refusals.append(("train.device=cuda", "train.device = 'cuda' is not allowed: torch "))
    for bad, message in refusals:
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


def test_experiments_are_compared_and_shared(
    tiny_experiment: TinyRepo, tmp_path: Path, mnist_mirror: str
) -> None:
    project = copy_repo(tiny_experiment.path, tmp_path / "project")
    dvc = dvc_cli(project, mnist_mirror)
    # an experiment on a train param reran train and its descendants only
    assert ran(tiny_experiment.first_repro) == ["check_params", "train", "evaluate", "plot"]
    shown = dvc("exp", "show", "--csv")
    assert LOW_LR in shown and "0.01" in shown
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
    params = dvc("params", "diff")
    assert "train.lr" in params and "0.01" in params

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
    dvc("plots", "diff", "HEAD", LOW_LR, "-o", "plots_diff")
    diff = plot_data((project / "plots_diff/index.html").read_text())
    assert {row["rev"] for row in diff["Accuracy_per_epoch"]} == {"HEAD", LOW_LR}
    assert len(diff["Confusion_matrix__test_"]) == 400

    # experiments travel through a git remote
    origin, clone = tmp_path / "origin", tmp_path / "clone"
    run_cmd(["git", "init", "-q", "--bare", "--initial-branch=main", str(origin)], cwd=tmp_path)
    run_cmd(["git", "remote", "add", "origin", str(origin)], cwd=project)
    run_cmd(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], cwd=project)
    dvc("exp", "push", "origin", LOW_LR)
    run_cmd(["git", "clone", "-q", "-b", "main", str(origin), str(clone)], cwd=tmp_path)
    in_clone = dvc_cli(clone, "")
    in_clone("exp", "pull", "origin", LOW_LR)
    assert LOW_LR in in_clone("exp", "show", "--csv")


def test_an_interrupted_experiment_is_undone_to_heads_results(
    tiny_repo: TinyRepo, tmp_path: Path, mnist_mirror: str
) -> None:
    """An experiment stopped in its train stage leaves the workspace without the model
    and the training report (DVC removed them before the stage ran). The README's undo,
    `git checkout HEAD -- params.yaml dvc.lock reports/` then `dvc checkout`, brings
    back HEAD's results: `dvc status` clean, `dvc metrics show` HEAD's metrics."""
    project = copy_repo(tiny_repo.path, tmp_path / "project")
    checkpoints = project / "models/checkpoints"
    run = subprocess.Popen(
        # a checkpoint after each epoch: the sign that the train stage is under way
        [
            sys.executable,
            "-m",
            "dvc",
            "exp",
            "run",
            "-S",
            "train.epochs=60",
            "-S",
            "train.checkpoint_every=1",
        ],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=command_env(MNIST_MIRROR=mnist_mirror),
    )
    try:
        wait_until(lambda: any(checkpoints.glob("*.pt")) or run.poll() is not None, 120)
        assert run.poll() is None, "finished before it could be interrupted"
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
    finally:
        run.kill()
    wait_until(lambda: not stage_pids(project), seconds=10)
    assert not (project / "models/model.pt").exists()
    assert not (project / "reports/train").exists()

    run_cmd(["git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock", "reports/"], cwd=project)
    dvc = dvc_cli(project, mnist_mirror)
    dvc("checkout")
    assert "Data and pipelines are up to date" in dvc("status")
    shown = dvc("metrics", "show", "--json")
    assert "failed to load" not in shown.lower()
    head = json.loads((tiny_repo.path / "reports/eval/metrics.json").read_text())
    assert json.loads((project / "reports/eval/metrics.json").read_text()) == head
    model = (project / "models/model.pt").read_bytes()
    assert model == (tiny_repo.path / "models/model.pt").read_bytes()


# Big enough to learn (the accuracy floor below) and to interrupt in epoch 2 of 4, with
# a checkpoint at every epoch's end (by default they come every 10 minutes).
INTERRUPTED = {
    "preprocess": {"train_limit": 2000},
    "train": {"epochs": 4, "batch_size": 100, "checkpoint_every": 1},
}
ACCURACY_FLOOR = 0.8  # chance is 0.1; this run reached 0.9 (width 4, 2,000 images)


def stage_pids(project: Path) -> list[int]:
    """The processes running one of the project's stage scripts."""
    return processes_running(b"src/", project)


@pytest.fixture(scope="session")
def interrupted_data(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: str) -> Path:
    """A repository with the INTERRUPTED params whose data stages have run (committed):
    where the interrupted runs below start. Built once for all test processes."""
    with built_once(tmp_path_factory, "interrupted-data") as folder:
        project = folder / "project"
        if not project.exists():
            new_repo(make_project(project), INTERRUPTED)
            dvc_cli(project, mnist_mirror)("repro", "preprocess")
            commit(project, "data")
        return project


def interrupted_repro(data: Path, project: Path, mirror: str, target: str, signum: int) -> Path:
    """`dvc repro` in a copy of `data` at `project`, stopped in epoch 2 of 4 by `signum`
    to the `target` ("dvc", or the train "stage"); the checkpoint it left."""
    copy_repo(data, project)
    checkpoints = project / "models/checkpoints"
    repro = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=command_env(MNIST_MIRROR=mirror, PYTHONUNBUFFERED="1"),
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
    return checkpoint


def finished(project: Path) -> dict:
    """What a finished run left: no checkpoint of its own, its model and figures."""
    runs = [c for c in (project / "models/checkpoints").glob("*.pt") if RUN_FILE.fullmatch(c.name)]
    assert runs == []  # deleted once its run completed
    loss = (project / "reports/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in loss[1:]] == ["1", "2", "3", "4"]
    return {
        "model": torch.load(project / "models/model.pt", weights_only=True)["state_dict"],
        "val": (project / "reports/train/plots/metrics/val/acc.tsv").read_text(),
        "test": json.loads((project / "reports/eval/metrics.json").read_text())["test"],
    }


@pytest.fixture(scope="session")
def started_over(
    tmp_path_factory: pytest.TempPathFactory, mnist_mirror: str, interrupted_data: Path
) -> dict:
    """A run stopped by Ctrl-C to its train stage in epoch 2 of 4, whose checkpoint is
    then found cut short (a full disk, a copy that stopped): the next `dvc repro` sets
    it aside, names it and starts over, so the run it finishes is never interrupted.
    Built once for all test processes."""
    with built_once(tmp_path_factory, "started-over") as folder:
        if not (folder / "done.json").exists():
            project = folder / "project"
            checkpoint = interrupted_repro(
                interrupted_data, project, mnist_mirror, "stage", signal.SIGINT
            )
            checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
            again = dvc_cli(project, mnist_mirror)("repro")
            aside = checkpoint.with_name(f"{checkpoint.stem}.unreadable.pt")
            result = finished(project)
            torch.save(result.pop("model"), folder / "model.pt")
            record = result | {"output": again, "aside": str(aside.relative_to(project))}
            (folder / "done.json").write_text(json.dumps(record))
        record = json.loads((folder / "done.json").read_text())
        return record | {"model": torch.load(folder / "model.pt", weights_only=True)}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the stage's process in /proc")
def test_a_checkpoint_cut_short_is_set_aside_and_the_run_learns(started_over: dict) -> None:
    aside = started_over["aside"]
    line = f"set aside as {aside} (delete it when you like); training starts over"
    assert line in started_over["output"]
    assert "training from the start: 4 epochs of 20 steps" in started_over["output"]
    assert started_over["test"]["accuracy"] >= ACCURACY_FLOOR


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the stage's process in /proc")
def test_killed_dvc_resumes_to_the_model_of_an_uninterrupted_run(
    tmp_path: Path, mnist_mirror: str, interrupted_data: Path, request: pytest.FixtureRequest
) -> None:
    """SIGKILL to `dvc` in epoch 2 of 4 (the stage stops with it); an experiment with
    other params runs in between, keeping the checkpoint; `dvc repro` resumes from it
    and ends with the weights and curves of a run never interrupted (CPU, same seed)."""
    project = tmp_path / "resumed"
    checkpoint = interrupted_repro(interrupted_data, project, mnist_mirror, "dvc", signal.SIGKILL)
    dvc = dvc_cli(project, mnist_mirror)
    exp = dvc("exp", "run", "train", "-S", "train.lr=0.05", "-S", "train.epochs=1")
    assert ran(exp) == ["check_params", "train"]
    assert list(checkpoint.parent.glob("*.pt")) == [checkpoint]
    run_cmd(["git", "checkout", "--", "params.yaml"], cwd=project)
    resumed = dvc("repro")
    line = next(ln for ln in resumed.splitlines() if ln.startswith("resuming from"))
    where = checkpoint.relative_to(project)
    assert re.fullmatch(rf"resuming from {where} at epoch [23]/4, step 0/20", line)
    result = finished(project)
    # asked for last: another test process may build it meanwhile
    uninterrupted = request.getfixturevalue("started_over")
    for key, value in uninterrupted["model"].items():
        assert torch.equal(value, result["model"][key]), key
    assert result["val"] == uninterrupted["val"] and result["test"] == uninterrupted["test"]
