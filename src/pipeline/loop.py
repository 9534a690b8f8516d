"""The training loop: epochs of steps over data kept on the device, validation after
each epoch, resumable state saved as it goes.

The whole training set lives on the device as uint8. Each epoch draws a fresh
permutation; each step takes its batch by indexing, shifts it (pipeline/augment.py)
and normalises it there, then runs one SGD step under the resolved settings. On
several processes (pipeline/distributed.py) every process draws the same
permutation and shifts and takes its slice of each global batch; gradients are
averaged over the processes and the epoch's figures summed over them. The main
process alone validates and writes checkpoints. A checkpoint is written every
`train.checkpoint_minutes`: at an epoch's end once that long has passed since the
last and, in one process, inside an epoch too; and every `train.checkpoint_every`
epochs where that is set. A run shorter than the interval writes none (the H200
trained the default 8 epochs in 10 s; a checkpoint at width 64 is about 134 MB). A
resumed run continues from the very step it stopped at, with the same random draws,
so it ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import distributed
from pipeline.augment import Augmentation, augment, draw
from pipeline.checkpoint import Checkpoint, EpochInProgress, TrainingState
from pipeline.distributed import World
from pipeline.ema import WeightAverage
from pipeline.errors import PipelineError
from pipeline.model import normalise, predict_logits
from pipeline.optim import make_optimizer, make_scheduler, mean_lr
from pipeline.params import check
from pipeline.progress import Progress, say
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.train_params import TrainParams


@dataclass
class Data:
    """The training and validation images (uint8) and labels, already on the device,
    with the normalisation stats of the training images."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    mean: float
    std: float


@dataclass(frozen=True)
class Run:
    """One training run: its recipe (the train params), how it runs here (the resolved
    settings and its place among the processes) and its checkpoint (None: never saved)."""

    p: TrainParams
    settings: Settings
    checkpoint: Checkpoint | None = None
    world: World = distributed.ONE_PROCESS


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global generators (CPU and every GPU)."""
    random.seed(seed)
    torch.manual_seed(seed)


def steps_per_epoch(n: int, run: Run) -> int:
    """Full batches per epoch (the remainder is dropped: every step has one shape)."""
    p, processes = run.p, run.world.size
    check(p, "batch_size", p.batch_size <= n, f"at most the {n} training images")
    multiple = f"a multiple of the {processes} training processes"
    check(p, "batch_size", p.batch_size % processes == 0, multiple)
    return n // p.batch_size


def new_state(net: nn.Module, run: Run, steps: int) -> TrainingState:
    """The state of a run before its first step: `net` on the device, the optimiser,
    the schedule, the gradient scaler (fp16 only) and the data generator, seeded."""
    s = run.settings
    net.to(s.device, memory_format=s.memory_format)
    optimizer = make_optimizer(net, run.p, s.fused_optimizer)
    return TrainingState(
        net,
        optimizer,
        make_scheduler(optimizer, run.p, steps),
        torch.amp.GradScaler(s.device.type, enabled=s.autocast_dtype == torch.float16),
        torch.Generator(device=s.device).manual_seed(run.p.seed),
        [],
        ema=WeightAverage(net, run.p.ema_decay) if run.p.ema_decay else None,
    )


def augmentation(p: TrainParams, epoch: int) -> Augmentation:
    """The augmentation of `epoch` (from 1): the one params.yaml asks for (Augmentation's
    fields are train.* keys), or none in the last train.unaugmented_epochs, which fit
    the images as they are, as the test images come (He et al. 2019, "Data augmentation
    revisited": a model trained on augmented images, fine-tuned on clean ones)."""
    if epoch > p.epochs - p.unaugmented_epochs:
        return Augmentation()
    return Augmentation(**{f.name: getattr(p, f.name) for f in fields(Augmentation)})


def evaluated(state: TrainingState) -> nn.Module:
    """The network that is validated and saved: the weights' average when kept, else
    the weights themselves."""
    return state.ema.net if state.ema else state.net


def resume(state: TrainingState, run: Run, steps: int) -> None:
    """Continue from the run's checkpoint if there is one, and say where it starts.
    The main process reads it and hands it to the others: any number of processes,
    on any number of machines, resumes it."""
    saved = None
    if run.checkpoint and run.world.main:
        saved = run.checkpoint.read()
    saved = distributed.from_main(saved)
    if saved is None:
        if run.checkpoint and run.world.main:  # a run that keeps none (bench) says nothing
            say(f"training from the start: {run.p.epochs} epochs of {steps} steps")
        return
    state.restore(saved)
    partial = state.in_progress
    if partial and not run.world.main:
        partial.correct.zero_()  # summed over the processes at the epoch's end: once
    epoch, step = (partial.epoch, partial.step) if partial else (len(state.history) + 1, 0)
    if run.world.main:
        say(
            f"resuming from {run.checkpoint.path} at epoch {epoch}/{run.p.epochs}, "
            f"step {step}/{steps}"
        )


def train_step(
    forward: nn.Module, x: Tensor, y: Tensor, state: TrainingState, loss_fn: nn.Module, s: Settings
) -> Tensor:
    """One optimisation step on the batch (x, y): forward, backward, update, schedule,
    and the weights' average if kept. Returns the logits, for the step's figures."""
    with s.autocast():
        logits = forward(x)
        loss = loss_fn(logits, y)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    if state.ema:
        state.ema.update(state.net)
    return logits


def batch(
    data: Data, indices: Tensor, run: Run, generator: torch.Generator, how: Augmentation
) -> tuple[Tensor, Tensor]:
    """This process's slice of the global batch `indices`, augmented as `how` says and
    normalised."""
    p, world, s = run.p, run.world, run.settings
    draws = draw(p.batch_size, data.train_x.shape[-1], how, generator)  # the global batch's
    local = p.batch_size // world.size
    part = slice(world.rank * local, (world.rank + 1) * local)
    indices = indices[part]
    x = augment(data.train_x[indices], draws.part(part), how)
    x = normalise(x, data.mean, data.std).contiguous(memory_format=s.memory_format)
    return x, data.train_y[indices]


def start_epoch(
    state: TrainingState, epoch: int, n: int, steps: int, device: torch.device
) -> EpochInProgress:
    """The epoch in progress: resumed from the checkpoint, or a fresh permutation."""
    if state.in_progress and state.in_progress.epoch == epoch:
        return state.in_progress
    order = torch.randperm(n, generator=state.generator, device=state.generator.device)
    zeros = torch.zeros(steps, device=device)
    return EpochInProgress(epoch, order, 0, zeros, zeros.long(), 0.0)


def train_one_epoch(
    forward: nn.Module,
    data: Data,
    state: TrainingState,
    run: Run,
    epoch: int,
    progress: Progress,
) -> EpochInProgress:
    """Train through `epoch`, from where it stands; the epoch's per-step figures."""
    p, s = run.p, run.settings
    steps = len(data.train_y) // p.batch_size
    loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    current = start_epoch(state, epoch, len(data.train_y), steps, s.device)
    how = augmentation(p, epoch)
    state.net.train()
    start = time.perf_counter()
    for step in range(current.step, steps):
        indices = current.order[step * p.batch_size : (step + 1) * p.batch_size]
        x, y = batch(data, indices, run, state.generator, how)
        logits = train_step(forward, x, y, state, loss_fn, s)
        with torch.no_grad():  # plain cross-entropy, comparable with the validation loss
            current.losses[step] = F.cross_entropy(logits.float(), y)
            current.correct[step] = (logits.argmax(1) == y).sum()
        progress.update()
        now = time.perf_counter()
        if due_mid_epoch(run, now - state.saved_at) and step + 1 < steps:
            current.step, current.seconds = step + 1, current.seconds + now - start
            start = now
            state.in_progress = current
            save(state, run)
    current.step, current.seconds = steps, current.seconds + time.perf_counter() - start
    state.in_progress = None
    return current


def save(state: TrainingState, run: Run) -> None:
    """Write the run's checkpoint; the clock of checkpoint_minutes starts again."""
    run.checkpoint.save(state)
    state.saved_at = time.perf_counter()


def due_mid_epoch(run: Run, since_saved_s: float) -> bool:
    """Whether a checkpoint is due inside the epoch: in one process only (every
    process's figures would otherwise have to be gathered), every checkpoint_minutes."""
    minutes = run.p.checkpoint_minutes
    return (
        run.checkpoint is not None
        and minutes > 0
        and run.world.size == 1
        and since_saved_s >= minutes * 60
    )


def due_at_epoch_end(run: Run, epoch: int, since_saved_s: float) -> bool:
    """Whether a checkpoint is due after `epoch` (never the last: the model is written
    then): every checkpoint_every epochs, or once checkpoint_minutes have passed since
    the last, by the main process's clock (it alone writes; the others go on)."""
    p = run.p
    every = p.checkpoint_every > 0 and epoch % p.checkpoint_every == 0
    late = p.checkpoint_minutes > 0 and since_saved_s >= p.checkpoint_minutes * 60
    return run.checkpoint is not None and run.world.main and epoch < p.epochs and (every or late)


def epoch_record(net: nn.Module, data: Data, run: Run, done: EpochInProgress) -> dict[str, float]:
    """The epoch's figures: its training loss and accuracy over every process, the
    validation loss and accuracy (main process), the mean learning rate, its speed."""
    p, world, s = run.p, run.world, run.settings
    steps = len(done.losses)
    # each process's mean loss per step, averaged; correct predictions, summed
    losses = distributed.sum_over_processes(done.losses).cpu() / world.size
    correct = distributed.sum_over_processes(done.correct)
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad:
        raise PipelineError(
            f"loss became {losses[bad[0]].item()} at epoch {done.epoch}, step {bad[0] + 1} of "
            f"{steps} (train.lr = {p.lr}): try a smaller train.lr; no model was written"
        )
    if not world.main:
        return {"epoch": done.epoch}  # the main process keeps the figures
    # validation runs the plain module: no recompiling for eval mode or a short batch
    val_logits = predict_logits(
        net, data.val_x, data.mean, data.std, s.eval_batch_size, s.autocast_dtype, s.memory_format
    )
    return {
        "epoch": done.epoch,
        "train/loss": losses.mean().item(),
        "train/acc": correct.sum().item() / (steps * p.batch_size),
        "val/loss": F.cross_entropy(val_logits, data.val_y).item(),
        "val/acc": (val_logits.argmax(1) == data.val_y).double().mean().item(),
        "lr": mean_lr(p, done.epoch, steps),
        "epoch_time_s": done.seconds,
        "images_per_s": steps * p.batch_size / done.seconds,
    }


def fit(net: nn.Module, data: Data, run: Run) -> Iterator[dict[str, float]]:
    """Train `net` in place. After each epoch (and its checkpoint, if due) yield its figures;
    a resumed run first yields those of the epochs its checkpoint had done."""
    p = run.p
    steps = steps_per_epoch(len(data.train_y), run)
    state = new_state(net, run, steps)
    resume(state, run, steps)
    yield from state.history
    forward = run.settings.compiled(distributed.data_parallel(net, run.settings.device, run.world))
    done = len(state.history) * steps + (state.in_progress.step if state.in_progress else 0)
    with Progress(p.epochs * steps, done, p.batch_size, run.world.main) as progress:
        for epoch in range(len(state.history) + 1, p.epochs + 1):
            progress.set_epoch(f"epoch {epoch}/{p.epochs}")
            finished = train_one_epoch(forward, data, state, run, epoch, progress)
            record = epoch_record(evaluated(state), data, run, finished)
            state.history.append(record)
            if due_at_epoch_end(run, epoch, time.perf_counter() - state.saved_at):
                save(state, run)
            if run.world.main:
                yield record
    if state.ema:  # the model is the weights' average
        net.load_state_dict(state.ema.net.state_dict())


def out_of_memory_named(records: Iterator[dict], run: Run) -> Iterator[dict]:
    """`records`, with running out of device memory (on any process) made one clear error."""
    try:
        yield from records
    except torch.OutOfMemoryError:
        raise PipelineError(
            f"out of memory on {run.settings.device} with train.batch_size = "
            f"{run.p.batch_size} (train.eval_batch_size = {run.settings.eval_batch_size}): "
            "try smaller ones"
        ) from None
