"""Train stage: ResNet-18 from scratch on the preprocessed MNIST tensors.

The whole dataset lives on the device as uint8; each step takes a batch by
`randperm` indexing, shifts it at random and normalises it there, in one go
(no DataLoader, no per-image Python work: the KellerJordan/cifar10-airbench
data path). SGD with Nesterov momentum, linear warm-up then cosine decay per
step, label smoothing; mixed precision, channels_last and torch.compile where
the device gains from them (`train.precision/channels_last/compile: auto`).
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

from checkpoint import TrainingState, checkpoint_path, fingerprint, prune_other_runs
from common import (
    Auto,
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
    memory_format_of,
    pick_device,
    resolve_channels_last,
    resolve_eval_batch,
    resolve_precision,
)
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
    # compiling costs minutes on a small CPU and pays off only on GPUs
    compile_model = p.compile if p.compile != "auto" else cuda
    # CUDA graphs (torch.compile's "reduce-overhead") are not yet measured: off under auto
    cuda_graphs = p.cuda_graphs if p.cuda_graphs != "auto" else False
    if cuda_graphs and not (cuda and compile_model):
        raise PipelineError("train.cuda_graphs = true needs a CUDA device and train.compile")
    # one fused update kernel instead of foreach's several: on the 2-core CPU it measured
    # 1.00x to 1.05x foreach (within noise), and it is the fast path on CUDA
    fused = p.fused_optimizer if p.fused_optimizer != "auto" else device.type in ("cuda", "cpu")
    eval_batch = resolve_eval_batch(p.eval_batch_size, device)
    return Settings(device, precision, channels_last, compile_model, cuda_graphs, fused, eval_batch)


# --------------------------------------------------------------------------- data on the device


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each uint8 image (B,1,H,W) by its own random offset in
    [-max_shift, max_shift] pixels, filling with black: one gather for the batch."""
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * max_shift + 1, (b, 1), generator=generator, device=device)
    rows = (dy + torch.arange(h, device=device))[:, :, None]
    cols = (dx + torch.arange(w, device=device))[:, None, :]
    return padded[torch.arange(b, device=device)[:, None, None], 0, rows, cols].unsqueeze(1)


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


TRAINING_CODE = ("train.py", "model.py", "checkpoint.py")  # beside this file
PROGRESS_EVERY_S = 60.0  # seconds between progress lines when stdout is no terminal


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


class Progress:
    """A tqdm bar with ETA on a terminal; elsewhere (a log, CI, `dvc queue logs`, where
    tqdm stays silent) a line with speed and ETA every PROGRESS_EVERY_S seconds."""

    def __init__(self, total: int, done: int, images_per_step: int) -> None:
        self.bar = tqdm(total=total, initial=done, unit="step", disable=None)
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
        if self.bar.disable and now - self.last >= PROGRESS_EVERY_S:
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
    net: nn.Module, data: Data, p: TrainParams, s: Settings, checkpoint: Path, run_id: str
) -> Iterator[dict[str, float]]:
    """Train `net` in place. After each epoch (and its checkpoint) yield its metrics;
    a checkpoint of the same run is resumed first, its epochs yielded again."""
    n = len(data.train_y)
    check(p, "batch_size", p.batch_size <= n, f"at most the {n} training images")
    steps = n // p.batch_size
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
    if state.resume(checkpoint, run_id):
        print(f"resuming from {checkpoint} after epoch {len(state.history)}/{p.epochs}")
    yield from state.history

    loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    forward = s.compiled(net)
    progress = Progress(total_steps, len(state.history) * steps, p.batch_size)
    for epoch in range(len(state.history) + 1, p.epochs + 1):
        progress.set_epoch(f"epoch {epoch}/{p.epochs}")
        net.train()
        # per-step figures stay on the device: no synchronisation until the epoch ends
        losses = torch.zeros(steps, device=s.device)
        correct = torch.zeros(steps, device=s.device, dtype=torch.long)
        start = time.perf_counter()
        for step, idx in enumerate(epoch_batches(n, p.batch_size, state.generator)):
            x = random_shift(data.train_x[idx], p.max_shift, state.generator)
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
        losses = losses.cpu()  # waits for the device: the epoch's work is done
        seconds = time.perf_counter() - start
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        if bad:
            raise PipelineError(
                f"loss became {losses[bad[0]].item()} at epoch {epoch}, step {bad[0] + 1} of "
                f"{steps} (train.lr = {p.lr}): try a smaller train.lr; no model was written"
            )
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


def main() -> None:
    model_p, p = load_params(ModelParams), load_params(TrainParams)
    paths = load_paths()
    settings = resolve_settings(p, pick_device(p.device))
    if p.deterministic:  # exact repeats on GPU, at some speed cost (README, "Reproducibility")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not p.deterministic
    processed = Path(paths.processed)
    data = load_data(processed, settings.device)
    data_files = [processed / name for name in ("train.pt", "val.pt", "stats.json")]
    # the training code and torch too: after a change to either, no checkpoint resumes
    code_files = [Path(__file__).with_name(name) for name in TRAINING_CODE]
    run_id = fingerprint(
        [model_p, p], f"{settings.describe()}, torch {torch.__version__}", data_files + code_files
    )
    checkpoint = checkpoint_path(paths.checkpoints, run_id)
    others = sorted(str(c) for c in prune_other_runs(checkpoint))
    if others:
        print(f"removed the checkpoints of older unfinished runs: {', '.join(others)}")
    seed_everything(p.seed)
    net = resnet18(width=model_p.width)
    print(
        f"ResNet-18 width {model_p.width}: {sum(t.numel() for t in net.parameters()):,} "
        f"parameters; {len(data.train_y)} train / {len(data.val_y)} val images; "
        f"{settings.describe()}"
    )

    from dvclive import Live

    # DVCLive writes into a temp folder that replaces the report only once training is
    # done, so a failed or interrupted run leaves no partial report.
    history = []
    with atomic_path(paths.train_report) as report_dir:
        with Live(dir=str(report_dir), dvcyaml=False, save_dvc_exp=False, report=None) as live:
            try:
                for record in fit(net, data, p, settings, checkpoint, run_id):
                    log_epoch(live, record, p.epochs)
                    history.append(record)
            except torch.OutOfMemoryError:
                raise PipelineError(
                    f"out of memory on {settings.device} with train.batch_size = {p.batch_size}"
                    f" (train.eval_batch_size = {settings.eval_batch_size}): try smaller ones"
                ) from None
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
    checkpoint.unlink(missing_ok=True)
    print(f"wrote {paths.model} and {paths.train_report}")


if __name__ == "__main__":
    run(main, stage="train")
