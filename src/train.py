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
Scratch: `paths.checkpoint`, deleted once training completes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from common import (
    Device,
    PipelineError,
    check,
    load_params,
    load_paths,
    load_torch,
    pick_device,
    run,
    save_torch,
    seed_everything,
)
from model import normalise, predict_logits, resnet18

Auto = Literal["auto", True, False]


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
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    channels_last: Auto
    compile: Auto
    deterministic: bool
    eval_batch_size: int
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
        check(self, "eval_batch_size", self.eval_batch_size >= 1, "an integer >= 1")
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
    autocast_dtype: torch.dtype | None  # None = plain fp32
    channels_last: bool
    compile: bool

    def describe(self) -> str:
        dtype = str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else "fp32"
        return (
            f"device {self.device}, precision {dtype}, "
            f"channels_last {self.channels_last}, compile {self.compile}"
        )


def cpu_has_amx() -> bool:
    """Intel AMX: tile matrix units that run bf16 matmuls and convolutions in hardware."""
    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(supported and supported())


def resolve_settings(p: TrainParams, device: torch.device) -> Settings:
    """Resolve the `auto` options for `device`, as measured (README, "Speed")."""
    cuda = device.type == "cuda"
    # bf16 autocast: on GPUs it doubles tensor-core throughput; on a CPU with AMX it
    # trained 2.35x faster than fp32 (Xeon, 2 threads, width 64); on CPUs without
    # AVX-512/AMX it is ~14x slower; on MPS it is unmeasured. So: per device.
    precision = p.precision
    if precision == "auto":
        gains = torch.cuda.is_bf16_supported() if cuda else device.type == "cpu" and cpu_has_amx()
        precision = "bf16" if gains else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    channels_last = p.channels_last if p.channels_last != "auto" else device.type in ("cuda", "cpu")
    # compiling costs minutes on a small CPU and pays off only on GPUs
    compile_model = p.compile if p.compile != "auto" else cuda
    return Settings(device, dtype, channels_last, compile_model)


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


def make_optimizer(net: nn.Module, p: TrainParams, device: torch.device) -> torch.optim.SGD:
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
        fused=device.type == "cuda" or None,
    )


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ~0 to 1 over `warmup_steps`, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- checkpoints


def fingerprint(model_p: ModelParams, p: TrainParams, data_files: list[Path]) -> str:
    """Identifies a training run: a checkpoint is resumed only by the same run."""
    h = hashlib.sha256(
        json.dumps([dataclasses.asdict(model_p), dataclasses.asdict(p)], sort_keys=True).encode()
    )
    for path in data_files:
        h.update(path.read_bytes())
    return h.hexdigest()


def rng_states(generator: torch.Generator) -> dict[str, Any]:
    states = {
        "torch": torch.get_rng_state(),
        "data": generator.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["data"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


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


def fit(
    net: nn.Module, data: Data, p: TrainParams, s: Settings, checkpoint: Path, run_id: str
) -> Iterator[dict[str, float]]:
    """Train `net` in place. After each epoch (and its checkpoint) yield its metrics;
    a checkpoint of the same run is resumed first, its epochs yielded again."""
    n = len(data.train_y)
    check(p, "batch_size", p.batch_size <= n, f"at most the {n} training images")
    steps = n // p.batch_size
    total_steps = p.epochs * steps
    memory_format = torch.channels_last if s.channels_last else torch.contiguous_format
    net.to(s.device, memory_format=memory_format)
    optimizer = make_optimizer(net, p, s.device)
    warmup_steps = round(p.warmup_epochs * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps)
    )
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.autocast_dtype == torch.float16)
    generator = torch.Generator(device=s.device).manual_seed(p.seed)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    forward = torch.compile(net) if s.compile else net

    history: list[dict[str, float]] = []
    if checkpoint.exists():
        state = load_torch(checkpoint)
        if state.get("run_id") == run_id:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            set_rng_states(state["rng"], generator)
            history = state["history"]
            print(f"resuming from {checkpoint} after epoch {len(history)}/{p.epochs}")
        else:
            print(f"ignoring {checkpoint}: it belongs to another run (params or data differ)")
    yield from history

    bar = tqdm(total=total_steps, initial=len(history) * steps, unit="step", disable=None)
    for epoch in range(len(history) + 1, p.epochs + 1):
        bar.set_description(f"epoch {epoch}/{p.epochs}")
        net.train()
        losses = torch.zeros(steps, device=s.device)
        correct = torch.zeros(steps, device=s.device, dtype=torch.long)
        lr = scheduler.get_last_lr()[0]
        start = time.perf_counter()
        for step, idx in enumerate(epoch_batches(n, p.batch_size, generator)):
            x = random_shift(data.train_x[idx], p.max_shift, generator)
            x = normalise(x, data.mean, data.std).contiguous(memory_format=memory_format)
            y = data.train_y[idx]
            with torch.autocast(
                s.device.type, dtype=s.autocast_dtype, enabled=s.autocast_dtype is not None
            ):
                logits = forward(x)
                loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses[step] = loss.detach()
            correct[step] = (logits.argmax(1) == y).sum()
            bar.update()
        losses = losses.cpu()  # waits for the device: the epoch's work is done
        seconds = time.perf_counter() - start
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        if bad:
            raise PipelineError(
                f"loss became {losses[bad[0]].item()} at epoch {epoch}, step {bad[0] + 1} of "
                f"{steps} (train.lr = {p.lr}): try a smaller train.lr; no model was written"
            )
        val_logits = predict_logits(
            forward,
            data.val_x,
            data.mean,
            data.std,
            p.eval_batch_size,
            s.autocast_dtype,
            memory_format,
        )
        record = {
            "epoch": epoch,
            "train/loss": losses.mean().item(),
            "train/acc": correct.sum().item() / (steps * p.batch_size),
            "val/loss": F.cross_entropy(val_logits, data.val_y).item(),
            "val/acc": (val_logits.argmax(1) == data.val_y).double().mean().item(),
            "lr": lr,
            "epoch_time_s": seconds,
            "images_per_s": steps * p.batch_size / seconds,
        }
        history.append(record)
        if p.checkpoint_every and epoch % p.checkpoint_every == 0 and epoch < p.epochs:
            save_torch(
                {
                    "run_id": run_id,
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rng_states(generator),
                    "history": history,
                },
                checkpoint,
            )
        yield record
    bar.close()


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
    run_id = fingerprint(model_p, p, [processed / f for f in ("train.pt", "val.pt", "stats.json")])
    seed_everything(p.seed)
    net = resnet18(width=model_p.width)
    print(
        f"ResNet-18 width {model_p.width}: {sum(t.numel() for t in net.parameters()):,} "
        f"parameters; {len(data.train_y)} train / {len(data.val_y)} val images; "
        f"{settings.describe()}"
    )

    from dvclive import Live

    checkpoint = Path(paths.checkpoint)
    total_time = 0.0
    with Live(dir=paths.train_report, dvcyaml=False, save_dvc_exp=False, report=None) as live:
        try:
            for record in fit(net, data, p, settings, checkpoint, run_id):
                live.step = int(record["epoch"])
                for name, value in record.items():
                    if name != "epoch":
                        live.log_metric(name, value)
                live.next_step()
                total_time += record["epoch_time_s"]
                print(
                    f"epoch {record['epoch']}/{p.epochs}: train loss {record['train/loss']:.4f} "
                    f"acc {record['train/acc']:.4f} | val loss {record['val/loss']:.4f} "
                    f"acc {record['val/acc']:.4f} | {record['epoch_time_s']:.1f} s, "
                    f"{record['images_per_s']:.0f} img/s"
                )
        except torch.OutOfMemoryError:
            raise PipelineError(
                f"out of memory on {settings.device} with train.batch_size = "
                f"{p.batch_size}: try a smaller train.batch_size"
            ) from None
        live.log_metric("train_time_s", total_time, plot=False)
        live.log_metric(
            "train_images_per_s",
            p.epochs * (len(data.train_y) // p.batch_size) * p.batch_size / total_time,
            plot=False,
        )
    save_torch(
        {
            "state_dict": net.state_dict(),
            "params": {"model": dataclasses.asdict(model_p), "train": dataclasses.asdict(p)},
            "stats": {"mean": data.mean, "std": data.std},
        },
        paths.model,
    )
    checkpoint.unlink(missing_ok=True)
    print(f"wrote {paths.model}")


if __name__ == "__main__":
    run(main)
