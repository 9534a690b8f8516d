"""Train stage: ResNet-18 from scratch on the preprocessed MNIST tensors.

The recipe: SGD with Nesterov momentum, a linear warm-up then a cosine or linear
decay of the learning rate to 0 per step (pipeline/optim.py), label smoothing, no
weight decay on BatchNorm and biases, random shifts of up to `train.max_shift`
pixels and, where set, small rotations, scalings and Cutout (pipeline/augment.py),
none of it in the last `train.unaugmented_epochs`, all on data kept on the device
(pipeline/loop.py); where `train.ema_decay` is set,
a moving average of the weights is validated and saved (pipeline/ema.py). Mixed
precision, channels_last and torch.compile where the device gains from them
(`auto`: pipeline/settings.py); on several GPUs, one process each, data-parallel
(pipeline/distributed.py). An interrupted run resumes
from its checkpoint and ends with the same weights (pipeline/checkpoint.py).

Inputs:  `paths.processed`/{train,val}.pt, stats.json; params.yaml `model`, `train`.
Outputs: `paths.model` (pipeline/model.py: weights, params, normalisation stats);
         `paths.train_report`/ (DVCLive: metrics.json and per-epoch plots/metrics/*.tsv).
Scratch: `paths.checkpoints`/<run>.pt, deleted once the run completes;
         `paths.checkpoints`/train.lock while it runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from dvclive import Live
from torch import nn

from pipeline import distributed, gpus, locks
from pipeline.checkpoint import Checkpoint
from pipeline.ema import unreached_note
from pipeline.files import atomic_path, load_torch
from pipeline.identity import run_id, stage_code, training_recipe
from pipeline.loop import Data, Run, fit, out_of_memory_named, seed_everything
from pipeline.model import resnet18, save_model
from pipeline.params import Paths, load_params, load_paths
from pipeline.process import interrupts_deferred, run
from pipeline.progress import say
from pipeline.settings import Settings, pick_device, training_settings
from pipeline.train_params import ModelParams, TrainParams


def load_data(processed: Path, device: torch.device) -> Data:
    """The training and validation splits, on `device` (each process keeps all: 56 MB)."""
    train, val = load_torch(processed / "train.pt"), load_torch(processed / "val.pt")
    stats = json.loads((processed / "stats.json").read_text())
    on_device = [t.to(device) for t in (train["images"], train["labels"], val["images"])]
    return Data(*on_device, val["labels"].to(device), stats["mean"], stats["std"])


def build_model(
    width: int, bn_momentum: float, sync_batchnorm: bool, zero_init_residual: bool = False
) -> nn.Module:
    """ResNet-18 at `width`, initialised from the global generator (seeded first), each
    residual block's last BatchNorm scale at 0 if `zero_init_residual`, its BatchNorm
    running statistics updated with `bn_momentum` per step."""
    net = resnet18(width=width, zero_init_residual=zero_init_residual)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = bn_momentum
    return nn.SyncBatchNorm.convert_sync_batchnorm(net) if sync_batchnorm else net


def log_epoch(live: Live, record: dict[str, float], epochs: int) -> None:
    """One DVCLive step (x = epoch) and one console line per epoch.

    Not interruptible: `Live.next_step()` puts an item on a queue that `Live.end()`
    joins (treeverse/dvclive#827); a KeyboardInterrupt inside it can leave an item
    that no worker thread ever takes, and the join then waits forever. A Ctrl-C
    arriving here takes effect once the step is logged."""
    with interrupts_deferred():
        live.step = int(record["epoch"])
        for name, value in record.items():
            if name != "epoch":
                live.log_metric(name, value)
        live.next_step()
    say(
        f"epoch {record['epoch']}/{epochs}: train loss {record['train/loss']:.4f} "
        f"acc {record['train/acc']:.4f} | val loss {record['val/loss']:.4f} "
        f"acc {record['val/acc']:.4f} | {record['epoch_time_s']:.1f} s, "
        f"{record['images_per_s']:.0f} img/s"
    )


def train_and_report(
    model_p: ModelParams, net: nn.Module, data: Data, run: Run, paths: Paths
) -> None:
    """Fit `net`; on the main process log each epoch with DVCLive and write the model.
    DVCLive writes into a temp folder that replaces the report only once training is
    done, so a failed or interrupted run leaves no partial report."""
    records = out_of_memory_named(fit(net, data, run), run)
    if not run.world.main:
        for _ in records:  # the main process logs and writes
            pass
        return
    p, history = run.p, []
    with atomic_path(paths.train_report) as report:
        with Live(dir=str(report), dvcyaml=False, save_dvc_exp=False, report=None) as live:
            for record in records:
                log_epoch(live, record, p.epochs)
                history.append(record)
            seconds = sum(r["epoch_time_s"] for r in history)
            images = p.epochs * (len(data.train_y) // p.batch_size) * p.batch_size
            live.log_metric("train_time_s", seconds, plot=False)
            live.log_metric("train_images_per_s", images / seconds, plot=False)
        stats = {"mean": data.mean, "std": data.std}
        save_model(paths.model, net, {"model": model_p, "train": p}, stats)
    say(f"wrote {paths.model} and {paths.train_report}")


def describe(model_p: ModelParams, net: nn.Module, data: Data, run: Run) -> str:
    world, s = run.world, run.settings
    bn = (
        "synchronised"
        if s.sync_batchnorm
        else f"over each one's {run.p.batch_size // world.size} images"
    )
    processes = f"; {world.size} processes, BatchNorm {bn}" if world.size > 1 else ""
    return (
        f"ResNet-18 width {model_p.width}: {sum(t.numel() for t in net.parameters()):,} "
        f"parameters; {len(data.train_y)} train / {len(data.val_y)} val images; "
        f"{s.describe()}{processes}"
    )


def checkpoint_of_run(
    model_p: ModelParams, p: TrainParams, settings: Settings, processes: int, paths: Paths
) -> Checkpoint:
    """The checkpoint file of this run: named by its params, settings, data and the code
    this script runs (pipeline/identity.py)."""
    recipe = training_recipe({"model": model_p, "train": p}, settings, processes)
    processed = Path(paths.processed)
    inputs = [processed / name for name in ("train.pt", "val.pt", "stats.json")]
    return Checkpoint.of_run(paths.checkpoints, run_id(recipe, inputs + stage_code(__file__)))


def main() -> None:
    model_p, p = load_params(ModelParams), load_params(TrainParams)
    paths = load_paths()
    device = pick_device(p.device)
    if distributed.launch_if_several(p.processes, p.batch_size, device, __file__):
        return
    world = distributed.world_from_env() or distributed.ONE_PROCESS
    device = gpus.training_device(device, world.local_rank)
    settings = training_settings(p, device, world.size)
    if p.deterministic:  # exact repeats on GPU, at some speed cost (docs/reproducibility.md)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not p.deterministic

    distributed.start(world, device)
    try:
        data = load_data(Path(paths.processed), device)
        checkpoint = checkpoint_of_run(model_p, p, settings, world.size, paths)
        if world.main and (removed := checkpoint.prune_other_runs()):
            say(f"removed the checkpoints of older unfinished runs: {', '.join(map(str, removed))}")
        seed_everything(p.seed)
        net = build_model(
            model_p.width, p.bn_momentum, settings.sync_batchnorm, p.zero_init_residual
        )
        this_run = Run(p, settings, checkpoint, world)
        if world.main:
            say(describe(model_p, net, data, this_run))
            steps = p.epochs * (len(data.train_y) // p.batch_size)
            if note := unreached_note(p.ema_decay, steps):
                say(note)
        train_and_report(model_p, net, data, this_run, paths)
        # the resume state goes only once every process is done: should one fail first,
        # the stage fails and `dvc repro` resumes rather than training again from nothing
        distributed.all_done()
        if world.main:
            checkpoint.remove()
    finally:
        distributed.finish()


if __name__ == "__main__":
    # the workers of our launcher run under its lock
    run(main, stage="train" if locks.takes_stage_lock() else None)
