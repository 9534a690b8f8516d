"""Train stage: ResNet-18 from scratch on the preprocessed MNIST tensors.

The whole dataset lives on the device as uint8; each step takes a batch by
`randperm` indexing, shifts it at random and normalises it there, in one go
(no DataLoader, no per-image Python work: the KellerJordan/cifar10-airbench
data path). SGD with Nesterov momentum, linear warm-up then cosine decay per
step, label smoothing; mixed precision, channels_last and torch.compile where
the device gains from them (`train.precision/channels_last/compile: auto`); on
several processes, data-parallel (src/distributed.py).
A resumable checkpoint is written after every epoch, so an interrupted run
resumes from its last complete epoch and ends with the same weights.

Inputs:  `paths.processed`/{train,val}.pt, stats.json; params.yaml `model`, `train`.
Outputs: `paths.model` ({"state_dict", "params", "stats"}); `paths.train_report`/
         (DVCLive: metrics.json and per-epoch plots/metrics/*.tsv).
Scratch: `paths.checkpoints`/<run fingerprint>.pt, deleted once the run completes
         (src/checkpoint.py); `paths.checkpoints`/train.lock while it runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import distributed
from checkpoint import TrainingState, checkpoint_path, fingerprint, prune_other_runs
from common import (
    Auto,
    Paths,
    PipelineError,
    atomic_path,
    check,
    load_params,
    load_paths,
    load_torch,
    save_torch,
    seed_everything,
)
from device import (
    Device,
    Precision,
    autocast_dtype_of,
    claim_device,
    claim_gpus,
    gpu_ids,
    memory_format_of,
    pick_device,
    resolve_channels_last,
    resolve_eval_batch,
    resolve_precision,
    visible_gpus,
)
from distributed import World
from model import normalise, predict_logits, resnet18
from process import interrupts_deferred, run


@dataclass(frozen=True)
class ModelParams:
    SECTION: ClassVar[str] = "model"
    width: int

    def __post_init__(self) -> None:
        check(self, "width", self.width >= 1, "an integer >= 1 (64 = ResNet-18)")


@dataclass(frozen=True)
class TrainParams:
    SECTION: ClassVar[str] = "train"
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    label_smoothing: float
    warmup_epochs: float
    max_shift: int
    seed: int
    device: Device
    precision: Precision
    channels_last: Auto
    compile: Auto
    cuda_graphs: Auto
    fused_optimizer: Auto
    deterministic: bool
    eval_batch_size: int | Literal["auto"]
    checkpoint_every: int
    processes: int | Literal["auto"]
    sync_batchnorm: Auto

    def __post_init__(self) -> None:
        check(self, "epochs", self.epochs >= 1, "an integer >= 1")
        check(self, "batch_size", self.batch_size >= 1, "an integer >= 1")
        check(self, "lr", self.lr > 0, "a number > 0")
        check(self, "momentum", 0 <= self.momentum < 1, "a number in [0, 1)")
        check(
            self,
            "nesterov",
            not self.nesterov or self.momentum > 0,
            "false when train.momentum is 0",
        )
        check(self, "weight_decay", self.weight_decay >= 0, "a number >= 0")
        check(self, "label_smoothing", 0 <= self.label_smoothing < 1, "a number in [0, 1)")
        check(
            self,
            "warmup_epochs",
            0 <= self.warmup_epochs <= self.epochs,
            f"a number in [0, train.epochs = {self.epochs}]",
        )
        check(self, "max_shift", 0 <= self.max_shift <= 8, "0..8 pixels")
        check(
            self,
            "eval_batch_size",
            self.eval_batch_size == "auto" or self.eval_batch_size >= 1,
            "an integer >= 1 or auto",
        )
        check(
            self,
            "checkpoint_every",
            self.checkpoint_every >= 0,
            "an integer >= 0 (epochs; 0 = never)",
        )
        check(
            self,
            "processes",
            self.processes == "auto" or self.processes >= 1,
            "an integer >= 1 or auto",
        )


@dataclass(frozen=True)
class Settings:
    """What `auto` resolved to on this device."""

    device: torch.device
    precision: str  # fp32, bf16 or fp16 (autocast)
    channels_last: bool
    compile: bool
    cuda_graphs: bool
    fused_optimizer: bool
    eval_batch_size: int

    @property
    def memory_format(self) -> torch.memory_format:
        return memory_format_of(self.channels_last)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """None for plain fp32."""
        return autocast_dtype_of(self.precision)

    def autocast(self) -> torch.autocast:
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled)

    def compiled(self, net: nn.Module) -> nn.Module:
        """`net` as the training step calls it: compiled, with CUDA graphs, or as is."""
        if not self.compile:
            return net
        return torch.compile(net, mode="reduce-overhead" if self.cuda_graphs else None)

    def describe(self) -> str:
        return (
            f"device {self.device}, precision {self.precision}, "
            f"channels_last {self.channels_last}, "
            f"compile {self.compile}, cuda_graphs {self.cuda_graphs}, "
            f"fused_optimizer {self.fused_optimizer}, eval_batch_size {self.eval_batch_size}"
        )


def resolve_settings(p: TrainParams, device: torch.device) -> Settings:
    """Resolve the `auto` options for `device`, as measured (README, "Speed")."""
    cuda = device.type == "cuda"
    precision = resolve_precision(p.precision, device)
    channels_last = resolve_channels_last(p.channels_last, device)
    # torch.compile pays only in long runs. On the H200 the default 15 epochs took 38.7 s
    # compiled (24.9 s of it in epoch 1, compiling) and 16.4 s eager; compiled steps ran
    # 1.06x, with CUDA graphs 1.37x, as fast (reports/runs/gpu-h200-session.txt). On a
    # small CPU compiling takes minutes. So auto is off: set both true for long runs.
    compile_model = p.compile if p.compile != "auto" else False
    cuda_graphs = p.cuda_graphs if p.cuda_graphs != "auto" else False
    if cuda_graphs and not (cuda and compile_model):
        raise PipelineError("train.cuda_graphs = true needs a CUDA device and train.compile")
    # one fused update kernel instead of foreach's several: on the 2-core CPU it measured
    # 1.00x to 1.05x foreach (within noise), and it is the fast path on CUDA
    fused = p.fused_optimizer if p.fused_optimizer != "auto" else device.type in ("cuda", "cpu")
    eval_batch = resolve_eval_batch(p.eval_batch_size, device)
    return Settings(device, precision, channels_last, compile_model, cuda_graphs, fused, eval_batch)


# --------------------------------------------------------------------------- data on the device


def shift_offsets(
    batch: int, max_shift: int, generator: torch.Generator
) -> tuple[Tensor, Tensor] | None:
    """Random (dy, dx) offsets in [0, 2 * max_shift] for `batch` images, each (batch, 1);
    None when max_shift is 0. Drawn for the global batch in every process, so that each
    process's slice of it is shifted as one process would shift it."""
    if max_shift == 0:
        return None
    device = generator.device
    dy = torch.randint(0, 2 * max_shift + 1, (batch, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * max_shift + 1, (batch, 1), generator=generator, device=device)
    return dy, dx


def shift(images: Tensor, offsets: tuple[Tensor, Tensor] | None, max_shift: int) -> Tensor:
    """Translate each uint8 image (B,1,H,W) by its offset (shift_offsets) minus max_shift
    pixels, filling with black: one gather for the batch."""
    if offsets is None:
        return images
    dy, dx = offsets
    b, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (max_shift,) * 4)
    rows = (dy + torch.arange(h, device=device))[:, :, None]
    cols = (dx + torch.arange(w, device=device))[:, None, :]
    return padded[torch.arange(b, device=device)[:, None, None], 0, rows, cols].unsqueeze(1)


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift] pixels."""
    return shift(images, shift_offsets(len(images), max_shift, generator), max_shift)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index tensors of full batches of a fresh permutation (the remainder is dropped,
    so every step has the same shape)."""
    perm = torch.randperm(n, generator=generator, device=generator.device)
    for start in range(0, n - batch_size + 1, batch_size):
        yield perm[start : start + batch_size]


# --------------------------------------------------------------------------- optimisation


def make_optimizer(net: nn.Module, p: TrainParams, fused: bool) -> torch.optim.SGD:
    """SGD; no weight decay on BatchNorm and biases ("no bias decay", He et al. 2019, sec. 3.1)."""
    decay = [t for t in net.parameters() if t.ndim > 1]
    no_decay = [t for t in net.parameters() if t.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": p.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(
        groups,
        lr=p.lr,
        momentum=p.momentum,
        nesterov=p.nesterov,
        fused=fused or None,  # None: torch's default, foreach
    )


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ~0 to 1 over `warmup_steps`, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def mean_lr_factor(epoch: int, steps: int, warmup_steps: int, total_steps: int) -> float:
    """lr_factor averaged over the steps of `epoch` (from 1): what the lr plot shows."""
    first = (epoch - 1) * steps
    factors = [lr_factor(step, warmup_steps, total_steps) for step in range(first, first + steps)]
    return sum(factors) / steps


# --------------------------------------------------------------------------- the loop


@dataclass
class Data:
    """Tensors already on the training device."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    mean: float
    std: float


TRAINING_CODE = ("train.py", "model.py", "checkpoint.py", "distributed.py")  # beside this file
PROGRESS_EVERY_S = 60.0  # seconds between progress lines when stdout is no terminal


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


class Progress:
    """A tqdm bar with ETA on a terminal; elsewhere (a log, CI, `dvc queue logs`, where
    tqdm stays silent) a line with speed and ETA every PROGRESS_EVERY_S seconds."""

    def __init__(self, total: int, done: int, images_per_step: int, shown: bool = True) -> None:
        self.bar = tqdm(total=total, initial=done, unit="step", disable=None if shown else True)
        self.shown = shown
        self.total, self.done, self.first = total, done, done
        self.images_per_step = images_per_step
        self.start = self.last = time.perf_counter()
        self.label = ""

    def set_epoch(self, label: str) -> None:
        self.label = label
        self.bar.set_description(label)

    def update(self) -> None:
        self.bar.update()
        self.done += 1
        now = time.perf_counter()
        if self.shown and self.bar.disable and now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            steps_per_s = (self.done - self.first) / (now - self.start)
            print(
                f"{self.label}: step {self.done}/{self.total} of the run, "
                f"{steps_per_s * self.images_per_step:.0f} img/s, "
                f"ETA {format_duration((self.total - self.done) / steps_per_s)}",
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()


def fit(
    net: nn.Module,
    data: Data,
    p: TrainParams,
    s: Settings,
    checkpoint: Path,
    run_id: str,
    world: World = distributed.ONE_PROCESS,
) -> Iterator[dict[str, float]]:
    """Train `net` in place. After each epoch (and its checkpoint) yield its metrics;
    a checkpoint of the same run is resumed first, its epochs yielded again.

    In several processes (`world`), each takes its slice of every global batch (the
    same permutation and shifts in all); gradients are averaged over the processes
    and the epoch's figures summed over them. The main process alone validates and
    writes the checkpoints."""
    n = len(data.train_y)
    check(p, "batch_size", p.batch_size <= n, f"at most the {n} training images")
    check(
        p,
        "batch_size",
        p.batch_size % world.size == 0,
        f"a multiple of the {world.size} training processes",
    )
    steps, local_batch = n // p.batch_size, p.batch_size // world.size
    part = slice(world.rank * local_batch, (world.rank + 1) * local_batch)
    net.to(s.device, memory_format=s.memory_format)
    optimizer = make_optimizer(net, p, s.fused_optimizer)
    warmup_steps, total_steps = round(p.warmup_epochs * steps), p.epochs * steps
    state = TrainingState(
        net,
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, warmup_steps, total_steps)
        ),
        torch.amp.GradScaler(s.device.type, enabled=s.autocast_dtype == torch.float16),
        torch.Generator(device=s.device).manual_seed(p.seed),
        [],
    )
    # the main process reads the checkpoint and hands it to the others: any number of
    # processes, on any number of machines, resumes it
    resumed = distributed.from_main(TrainingState.read(checkpoint, run_id) if world.main else None)
    if resumed is not None:
        state.restore(resumed)
        if world.main:
            print(f"resuming from {checkpoint} after epoch {len(state.history)}/{p.epochs}")
    yield from state.history

    loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    forward = s.compiled(distributed.data_parallel(net, s.device, world))
    progress = Progress(total_steps, len(state.history) * steps, p.batch_size, world.main)
    for epoch in range(len(state.history) + 1, p.epochs + 1):
        progress.set_epoch(f"epoch {epoch}/{p.epochs}")
        net.train()
        # per-step figures stay on the device: no synchronisation until the epoch ends
        losses = torch.zeros(steps, device=s.device)
        correct = torch.zeros(steps, device=s.device, dtype=torch.long)
        start = time.perf_counter()
        for step, idx in enumerate(epoch_batches(n, p.batch_size, state.generator)):
            offsets = shift_offsets(p.batch_size, p.max_shift, state.generator)
            offsets = offsets and (offsets[0][part], offsets[1][part])
            idx = idx[part]  # this rank's slice of the global batch
            x = shift(data.train_x[idx], offsets, p.max_shift)
            x = normalise(x, data.mean, data.std).contiguous(memory_format=s.memory_format)
            y = data.train_y[idx]
            with s.autocast():
                logits = forward(x)
                loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            state.scaler.scale(loss).backward()
            state.scaler.step(optimizer)
            state.scaler.update()
            state.scheduler.step()
            with torch.no_grad():  # plain cross-entropy, comparable with the validation loss
                losses[step] = F.cross_entropy(logits.float(), y)
                correct[step] = (logits.argmax(1) == y).sum()
            progress.update()
        # each process's mean loss per step, averaged; correct predictions, summed
        losses = distributed.sum_over_processes(losses).cpu() / world.size
        correct = distributed.sum_over_processes(correct)
        seconds = time.perf_counter() - start
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        if bad:
            raise PipelineError(
                f"loss became {losses[bad[0]].item()} at epoch {epoch}, step {bad[0] + 1} of "
                f"{steps} (train.lr = {p.lr}): try a smaller train.lr; no model was written"
            )
        if not world.main:
            state.history.append({"epoch": epoch})  # the main process keeps the figures
            continue
        # validation runs the plain module: no recompiling for eval mode or a short batch
        val_logits = predict_logits(
            net,
            data.val_x,
            data.mean,
            data.std,
            s.eval_batch_size,
            s.autocast_dtype,
            s.memory_format,
        )
        record = {
            "epoch": epoch,
            "train/loss": losses.mean().item(),
            "train/acc": correct.sum().item() / (steps * p.batch_size),
            "val/loss": F.cross_entropy(val_logits, data.val_y).item(),
            "val/acc": (val_logits.argmax(1) == data.val_y).double().mean().item(),
            "lr": p.lr * mean_lr_factor(epoch, steps, warmup_steps, total_steps),
            "epoch_time_s": seconds,
            "images_per_s": steps * p.batch_size / seconds,
        }
        state.history.append(record)
        if p.checkpoint_every and epoch % p.checkpoint_every == 0 and epoch < p.epochs:
            state.save(checkpoint, run_id)
        yield record
    progress.close()


def load_data(processed: Path, device: torch.device) -> Data:
    train, val = load_torch(processed / "train.pt"), load_torch(processed / "val.pt")
    stats = json.loads((processed / "stats.json").read_text())
    return Data(
        train["images"].to(device),
        train["labels"].to(device),
        val["images"].to(device),
        val["labels"].to(device),
        stats["mean"],
        stats["std"],
    )


def log_epoch(live: Any, record: dict[str, float], epochs: int) -> None:
    """One DVCLive step (x = epoch) and one console line per epoch.

    Not interruptible: `Live.next_step()` puts an item on a queue that `Live.end()`
    joins (treeverse/dvclive#827); a KeyboardInterrupt inside it can leave an item
    that no worker thread ever takes (none started, or none woken), and the join then
    waits forever. So Ctrl-C right after a checkpoint could hang the stage (seen in
    the interrupted-training test; a loop that interrupts logging at random moments
    hung within 10 to 39 tries in five runs, and never in 900 tries with this).
    """
    with interrupts_deferred():
        live.step = int(record["epoch"])
        for name, value in record.items():
            if name != "epoch":
                live.log_metric(name, value)
        live.next_step()
    print(
        f"epoch {record['epoch']}/{epochs}: train loss {record['train/loss']:.4f} "
        f"acc {record['train/acc']:.4f} | val loss {record['val/loss']:.4f} "
        f"acc {record['val/acc']:.4f} | {record['epoch_time_s']:.1f} s, "
        f"{record['images_per_s']:.0f} img/s",
        flush=True,
    )


def batchnorm_batch(batch_size: int, world: World, sync_batchnorm: bool) -> int:
    """The images BatchNorm computes its statistics over in training."""
    return batch_size if sync_batchnorm or world.size == 1 else batch_size // world.size


def run_settings(settings: Settings, batchnorm_batch: int) -> str:
    """What identifies a run besides its params, data and code: the resolved settings
    on this kind of device (not which GPU), BatchNorm's batch and torch's version. Not
    the number of processes: N train as one does if BatchNorm sees the same batches."""
    one_device = dataclasses.replace(settings, device=torch.device(settings.device.type))
    return f"{one_device.describe()}, BatchNorm batch {batchnorm_batch}, torch {torch.__version__}"


def main() -> None:
    model_p, p = load_params(ModelParams), load_params(TrainParams)
    paths = load_paths()
    device = pick_device(p.device)
    world = distributed.world_from_env()  # set by torchrun or by our launcher
    if world is None:
        cuda = device.type == "cuda"
        gpu_count = torch.cuda.device_count() if cuda else 0
        processes = distributed.resolve_processes(p.processes, gpu_count, p.batch_size)
        if processes > 1:
            gpus = visible_gpus() if cuda else None
            if gpus is not None:
                gpus = [gpus[i] for i in claim_gpus(processes, gpus, ids=gpu_ids())]
            where = f"GPUs {', '.join(gpus)} (NCCL)" if gpus else "the CPU (Gloo)"
            print(f"starting {processes} training processes on {where}", flush=True)
            distributed.launch(processes, __file__, gpus)
            return
        world = distributed.ONE_PROCESS
    if device.type == "cuda" and distributed.LAUNCHER_ENV in os.environ:
        device = torch.device("cuda", world.local_rank)  # the launcher claimed our GPUs
        torch.cuda.set_device(device)
    else:
        device = claim_device(device)
    settings = resolve_settings(p, device)
    sync_batchnorm = distributed.resolve_sync_batchnorm(p.sync_batchnorm, world, device.type)
    distributed.start(world, device)
    try:
        checkpoint = train(model_p, p, paths, settings, world, sync_batchnorm)
        # the resume state goes only once every process is done: should one fail first,
        # the stage fails and `dvc repro` resumes rather than training again from nothing
        distributed.all_done()
        if world.main:
            checkpoint.unlink(missing_ok=True)
    finally:
        distributed.finish()


def train(
    model_p: ModelParams,
    p: TrainParams,
    paths: Paths,
    settings: Settings,
    world: World,
    sync_batchnorm: bool,
) -> Path:
    """Train and, on the main process, write the model and the report; the path of the
    run's checkpoint, for main() to remove once every process is done."""
    if p.deterministic:  # exact repeats on GPU, at some speed cost (README, "Reproducibility")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not p.deterministic
    processed = Path(paths.processed)
    data = load_data(processed, settings.device)  # each process keeps all: 56 MB of uint8
    data_files = [processed / name for name in ("train.pt", "val.pt", "stats.json")]
    # the training code and torch too: after a change to either, no checkpoint resumes
    code_files = [Path(__file__).with_name(name) for name in TRAINING_CODE]
    same_run = {k: v for k, v in dataclasses.asdict(p).items() if k != "processes"}
    bn_batch = batchnorm_batch(p.batch_size, world, sync_batchnorm)
    run_id = fingerprint(
        [model_p, same_run], run_settings(settings, bn_batch), data_files + code_files
    )
    checkpoint = checkpoint_path(paths.checkpoints, run_id)
    others = sorted(str(c) for c in prune_other_runs(checkpoint)) if world.main else []
    if others:
        print(f"removed the checkpoints of older unfinished runs: {', '.join(others)}")
    seed_everything(p.seed)
    net = resnet18(width=model_p.width)
    if sync_batchnorm:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    records = out_of_memory_named(
        fit(net, data, p, settings, checkpoint, run_id, world), p, settings
    )
    if not world.main:
        for _ in records:  # the main process logs and writes
            pass
        return checkpoint
    processes = (
        f"; {world.size} processes, BatchNorm "
        + ("synchronised" if sync_batchnorm else f"over each one's {bn_batch} images")
        if world.size > 1
        else ""
    )
    print(
        f"ResNet-18 width {model_p.width}: {sum(t.numel() for t in net.parameters()):,} "
        f"parameters; {len(data.train_y)} train / {len(data.val_y)} val images; "
        f"{settings.describe()}{processes}"
    )

    from dvclive import Live

    # DVCLive writes into a temp folder that replaces the report only once training is
    # done, so a failed or interrupted run leaves no partial report.
    history = []
    with atomic_path(paths.train_report) as report_dir:
        with Live(dir=str(report_dir), dvcyaml=False, save_dvc_exp=False, report=None) as live:
            for record in records:
                log_epoch(live, record, p.epochs)
                history.append(record)
            seconds = sum(r["epoch_time_s"] for r in history)
            images = p.epochs * (len(data.train_y) // p.batch_size) * p.batch_size
            live.log_metric("train_time_s", seconds, plot=False)
            live.log_metric("train_images_per_s", images / seconds, plot=False)
        save_torch(
            {
                "state_dict": net.state_dict(),
                "params": {"model": dataclasses.asdict(model_p), "train": dataclasses.asdict(p)},
                "stats": {"mean": data.mean, "std": data.std},
            },
            paths.model,
        )
    print(f"wrote {paths.model} and {paths.train_report}")
    return checkpoint


def out_of_memory_named(
    records: Iterator[dict], p: TrainParams, settings: Settings
) -> Iterator[dict]:
    """`records`, with running out of device memory (on any process) made one clear error."""
    try:
        yield from records
    except torch.OutOfMemoryError:
        raise PipelineError(
            f"out of memory on {settings.device} with train.batch_size = {p.batch_size}"
            f" (train.eval_batch_size = {settings.eval_batch_size}): try smaller ones"
        ) from None


if __name__ == "__main__":
    # the workers of our launcher run under its lock
    run(main, stage="train" if distributed.holds_workspace() else None)
