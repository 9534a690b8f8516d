"""Data-parallel training (src/pipeline/distributed.py) with Gloo on the CPU: what two
processes train (failures, signals and resume: test_distributed_faults.py; GPU
claims: test_gpus.py).

Two processes must train the model that one process trains with the same global
batch. On CPUs torch has no SyncBatchNorm, so each process normalises its own half
of the batch: the one-process reference runs each half through the network on its
own (EachHalfAlone below), and a plain one-process run must differ, or the
comparison could not tell them apart.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    TWO,
    largest_difference,
    make_project,
    processes_running,
    run_cmd,
    tiny_train_params,
    write_params,
    write_processed,
)
from torch import nn

import train
from pipeline import distributed
from pipeline.files import load_torch
from pipeline.identity import training_recipe
from pipeline.loop import Run, fit, seed_everything
from pipeline.model import resnet18
from pipeline.params import load_params
from pipeline.settings import Settings, training_settings

# Two processes (TWO in conftest, the fixture below: 2 epochs of 2 steps on 100 images, the default
# recipe with its rotation, scaling and weights' average) must end with the weights of
# the reference bit for bit. A reference that ran the whole batch of 50 with BatchNorm
# alone per half came within 3e-8 after one step, but its convolutions ran over 50
# images where each process's run over 25, and that rounding difference let a ReLU
# input near zero change sign a few steps later: up to 5e-3 after 4 steps, by seed.
# Run as the processes run (EachHalfAlone), the reference gives identical weights:
# measured 0 after 4 steps for seeds 1, 2 and 42 at this lr (0.2), 1-8 and 42 at 0.01,
# and after 12 steps for seeds 1 and 2 at 0.01.
# A plain one-process run (BatchNorm over all 50 images) differed by 0.46 to 1.8 (seeds
# 42, 1, 2), beyond the 5e-3 that rounding alone reached in the comparison above.
BATCHNORM_OVER_50 = 0.1


class EachHalfAlone(nn.Module):
    """`net` run as two data-parallel processes run it on one machine: in training, each
    half of the batch through the network on its own (its convolutions over 25 images,
    BatchNorm over its own half), the logits joined. The gradients then equal the
    processes' averaged ones bit for bit: each half's loss is half of theirs, and
    halving is exact in floating point, as is a sum of two terms in either order (with
    three parts or more neither holds). BatchNorm's running statistics are the first
    half's: DistributedDataParallel broadcasts process 0's buffers before each forward,
    and process 0 saves the model. The second half updates copies of them (replacing
    the buffers in place would change tensors autograd saved for the backward pass)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.net(x)
        first, second = x.chunk(2)
        logits = [self.net(first)]
        norms = [m for m in self.net.modules() if isinstance(m, nn.BatchNorm2d)]
        kept = [dict(m._buffers) for m in norms]
        try:
            for m in norms:
                m._buffers.update({name: b.clone() for name, b in m._buffers.items()})
            logits.append(self.net(second))
        finally:
            for m, buffers in zip(norms, kept, strict=True):
                m._buffers.update(buffers)
        return torch.cat(logits)


def one_process_weights(project: Path, halves: bool) -> dict[str, torch.Tensor]:
    """Train in this process, with the project's params and data, as train.py does, on
    as many threads as each of two training processes takes: the summation order
    inside a kernel depends on them."""
    model_p = load_params(train.ModelParams, project / "params.yaml")
    p = load_params(train.TrainParams, project / "params.yaml")
    settings = training_settings(p, torch.device("cpu"))
    data = train.load_data(project / "data/processed", torch.device("cpu"))
    seed_everything(p.seed)
    net = resnet18(width=model_p.width)
    trained = EachHalfAlone(net) if halves else net
    threads = torch.get_num_threads()
    torch.set_num_threads(distributed.threads_per_process(2))
    try:
        for _ in fit(trained, data, Run(p, settings)):
            pass
    finally:
        torch.set_num_threads(threads)
    return net.state_dict()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny project trained by `python src/train.py` with train.processes = 2."""
    project = make_project(tmp_path_factory.mktemp("ddp") / "project")
    write_processed(project, n_train=100)
    write_params(project, TWO)
    result = run_cmd([sys.executable, "src/train.py"], cwd=project)
    return project, result.stdout


def test_two_gloo_processes_train_the_model_that_one_process_trains(
    two_process_run: tuple[Path, str], tmp_path: Path
) -> None:
    project, stdout = two_process_run
    assert "starting 2 training processes on the CPU (Gloo)" in stdout
    assert "2 processes, BatchNorm over each one's 25 images" in stdout
    two = load_torch(project / "models/model.pt")["state_dict"]
    reference = one_process_weights(project, halves=True)
    assert largest_difference(two, reference) == 0
    # the comparison tells BatchNorm over 25 images from BatchNorm over 50
    plain = one_process_weights(project, halves=False)
    assert largest_difference(two, plain) > BATCHNORM_OVER_50


def test_only_the_main_process_prints_logs_and_writes(two_process_run: tuple[Path, str]) -> None:
    project, stdout = two_process_run
    lines = stdout.splitlines()
    for epoch in (1, 2):
        assert sum(line.startswith(f"epoch {epoch}/2:") for line in lines) == 1
    assert sum(line.startswith("wrote models/model.pt") for line in lines) == 1
    assert sum(line.startswith("ResNet-18 width") for line in lines) == 1
    loss = project / "reports/train/plots/metrics/train/loss.tsv"
    assert len(loss.read_text().splitlines()) == 1 + 2  # a header and one row per epoch
    metrics = json.loads((project / "reports/train/metrics.json").read_text())
    assert metrics["step"] == 2
    assert list((project / "models/checkpoints").glob("*.pt")) == []  # done: removed
    assert {p.name for p in (project / "models").iterdir()} == {"checkpoints", "model.pt"}


def test_a_run_is_the_same_run_with_any_number_of_processes() -> None:
    """On GPUs with SyncBatchNorm, 4 processes train what 1 does (whichever GPUs): one
    run, resumable by either. Without it each normalises its share: another run."""
    p = tiny_train_params(batch_size=512)
    sections = {"model": train.ModelParams(width=4), "train": p}
    gpu = Settings(torch.device("cuda", 0), "bf16", True, 1024, fused_optimizer=True)
    on_fourth_gpu = dataclasses.replace(gpu, device=torch.device("cuda", 3))
    synced = dataclasses.replace(on_fourth_gpu, sync_batchnorm=True)
    one = training_recipe(sections, gpu, processes=1)
    assert training_recipe(sections, synced, processes=4) == one
    ghost = training_recipe(sections, on_fourth_gpu, processes=4)
    assert ghost != one and ghost["batchnorm_batch"] == 128


def test_a_batch_that_the_processes_cannot_share_is_refused(project: Path) -> None:
    write_processed(project)
    write_params(project, {"train": TWO["train"] | {"processes": 3, "batch_size": 50}})
    result = run_cmd([sys.executable, "src/train.py"], cwd=project, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [  # one line, before any process starts
        "error: params.yaml: train.processes = 3 does not divide train.batch_size = 50 "
        "(each process takes an equal share of every batch)"
    ]
    assert result.stdout == ""
    assert processes_running(b"src/train.py", project) == []
