"""Resume state of the train stage: what a checkpoint holds and where it is kept.

A run (pipeline/identity.py) keeps one checkpoint, `paths.checkpoints`/<run>.pt,
written every `train.checkpoint_minutes` (and every `train.checkpoint_every` epochs
where set: pipeline/loop.py); it is deleted when the run completes. Checkpoints of
other runs are left alone, so an experiment with other params never destroys the
resume state of an interrupted run; at most KEEP_OTHER_RUNS of them are kept, the
least recently written removed first (a width-64 checkpoint is about 134 MB: the
weights, their moving average and the optimiser's momentum). A
checkpoint that cannot be read is set aside under a name that says so, and the
run starts over.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.ema import WeightAverage
from pipeline.errors import PipelineError
from pipeline.files import load_torch, save_torch
from pipeline.progress import say

KEEP_OTHER_RUNS = 3  # unfinished runs besides the current one: ~400 MB at width 64
# (~270 MB without train.ema_decay: the average is a third copy of the weights)
RUN_FILE = re.compile(r"[0-9a-f]{16}\.pt")  # what Checkpoint.of_run names; nothing else goes
UNREADABLE = ".unreadable"  # suffix of a checkpoint set aside (<run>.unreadable.pt)
# Read errors of the disk, the network or the system, not of the file's bytes: a
# checkpoint that fails so is kept and the stage stops, as it may be read next time.
NOT_THE_FILES_FAULT = {
    errno.EIO,
    errno.EACCES,
    errno.EPERM,
    errno.EMFILE,
    errno.ENFILE,
    errno.ENOMEM,
    errno.EAGAIN,
    errno.EBUSY,
    errno.ESTALE,
    errno.ETIMEDOUT,
}


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
    if "cuda" in states and torch.cuda.is_available():  # as many GPUs as this process sees
        torch.cuda.set_rng_state_all(states["cuda"][: torch.cuda.device_count()])


@dataclass
class EpochInProgress:
    """How far an epoch got: its batch order, the steps done, their figures so far."""

    epoch: int
    order: Tensor  # the epoch's permutation of the training images
    step: int  # steps done
    losses: Tensor  # per step (the rest still 0), on the device
    correct: Tensor
    seconds: float  # of training so far in this epoch

    def snapshot(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "order": self.order.cpu(),
            "step": self.step,
            "losses": self.losses.cpu(),
            "correct": self.correct.cpu(),
            "seconds": self.seconds,
        }


@dataclass
class TrainingState:
    """Everything that changes while training, as a checkpoint stores it."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    history: list[dict[str, float]]  # one record per finished epoch
    in_progress: EpochInProgress | None = None
    ema: WeightAverage | None = None  # the weights' average, where train.ema_decay keeps one
    saved_at: float = field(default_factory=lambda: time.perf_counter())  # last written

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states(self.generator),
            "history": self.history,
            "in_progress": self.in_progress and self.in_progress.snapshot(),
            "ema": self.ema and self.ema.state_dict(),
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Load what snapshot() saved (tensors on the CPU) into this state."""
        self.net.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        set_rng_states(saved["rng"], self.generator)
        self.history = saved["history"]
        if self.ema:
            self.ema.load_state_dict(saved["ema"])
        partial = saved["in_progress"]
        self.in_progress = partial and EpochInProgress(
            partial["epoch"],
            partial["order"].to(self.generator.device),
            partial["step"],
            partial["losses"].to(self.generator.device),
            partial["correct"].to(self.generator.device),
            partial["seconds"],
        )


@dataclass(frozen=True)
class Checkpoint:
    """The checkpoint file of one run."""

    path: Path
    run_id: str

    @staticmethod
    def of_run(folder: str | Path, run_id: str) -> Checkpoint:
        return Checkpoint(Path(folder) / f"{run_id[:16]}.pt", run_id)

    def save(self, state: TrainingState) -> None:
        save_torch({"run_id": self.run_id} | state.snapshot(), self.path)

    def read(self) -> dict[str, Any] | None:
        """The saved state of this run (tensors on the CPU), or None: no file, another
        run's, or unreadable (then set aside, with a line naming it)."""
        if not self.path.exists():
            return None
        try:
            saved = load_torch(self.path)
        except OSError as error:
            if error.errno in NOT_THE_FILES_FAULT:  # the file may well be good: keep it
                raise PipelineError(f"cannot read {self.path} ({error.strerror})") from None
            saved = error  # torch reads a zip cut short as EINVAL, say
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as error:
            saved = error  # cut short, or not a checkpoint at all
        if not isinstance(saved, dict) or "run_id" not in saved:
            self.set_aside(saved)
            return None
        if saved["run_id"] != self.run_id:
            say(f"ignoring {self.path}: it belongs to another run (params, code or data differ)")
            return None
        return saved

    def set_aside(self, error: object) -> None:
        """Move an unreadable checkpoint out of the way, saying so: training starts over."""
        aside = self.path.with_name(f"{self.path.stem}{UNREADABLE}.pt")
        os.replace(self.path, aside)
        failed = isinstance(error, Exception)
        why = str(error).strip().splitlines()[0][:120] if failed and str(error).strip() else ""
        why = why or (type(error).__name__ if failed else "no run in it")
        say(
            f"{self.path} could not be read ({why}): set aside as {aside} (delete it when "
            "you like); training starts over"
        )

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def prune_other_runs(self, keep: int = KEEP_OTHER_RUNS) -> list[Path]:
        """Delete all but the `keep` most recently written checkpoints beside this one
        (never this one); return those deleted."""
        folder = self.path.parent
        others = [p for p in folder.glob("*.pt") if RUN_FILE.fullmatch(p.name) and p != self.path]
        others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for path in others[keep:]:
            path.unlink(missing_ok=True)
        return others[keep:]
