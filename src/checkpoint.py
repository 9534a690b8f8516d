"""Resume state of the train stage: one checkpoint file per training run.

A run is identified by its fingerprint: the `model`/`train` params, what `auto`
resolved to on this device, and the training data. Its checkpoint
`paths.checkpoints`/<fingerprint>.pt is written after every epoch and deleted
when the run completes. Checkpoints of other runs are left alone, so an
experiment with other params never destroys the resume state of an interrupted
run; at most KEEP_OTHER_RUNS of them are kept, the least recently written
removed first (a width-64 checkpoint is about 90 MB: weights and momentum).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import load_torch, save_torch

KEEP_OTHER_RUNS = 3  # unfinished runs besides the current one: ~270 MB at width 64
RUN_FILE = re.compile(r"[0-9a-f]{16}\.pt")  # what checkpoint_path() names; nothing else goes


def fingerprint(params: list[Any], settings: str, files: list[Path]) -> str:
    """Identifies a training run: its params (dataclasses or dicts), its resolved settings and the
    bytes of its files (data and code). A checkpoint is resumed only by the same run."""
    run = [p if isinstance(p, dict) else dataclasses.asdict(p) for p in params] + [settings]
    h = hashlib.sha256(json.dumps(run, sort_keys=True).encode())
    for path in files:
        h.update(path.read_bytes())
    return h.hexdigest()


def checkpoint_path(folder: str | Path, run_id: str) -> Path:
    return Path(folder) / f"{run_id[:16]}.pt"


def prune_other_runs(own: Path, keep: int = KEEP_OTHER_RUNS) -> list[Path]:
    """Delete all but the `keep` most recently written checkpoints beside `own` (never
    `own` itself); return those deleted."""
    others = [p for p in own.parent.glob("*.pt") if RUN_FILE.fullmatch(p.name) and p != own]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for path in others[keep:]:
        path.unlink(missing_ok=True)
    return others[keep:]


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
class TrainingState:
    """Everything that changes while training, as a checkpoint stores it."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    history: list[dict[str, float]]

    def snapshot(self, run_id: str) -> dict[str, Any]:
        return {
            "run_id": run_id,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states(self.generator),
            "history": self.history,
        }

    def save(self, path: Path, run_id: str) -> None:
        save_torch(self.snapshot(run_id), path)

    @staticmethod
    def read(path: Path, run_id: str) -> dict[str, Any] | None:
        """The checkpoint at `path` (tensors on the CPU) if there is one of this run."""
        if not path.exists():
            return None
        state = load_torch(path)
        if state.get("run_id") != run_id:
            print(f"ignoring {path}: it belongs to another run (params, device or data differ)")
            return None
        return state

    def restore(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"], self.generator)
        self.history = state["history"]
