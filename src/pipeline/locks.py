"""Locks: the one lock helper, and one run of a stage per workspace.

Every lock of this project is an `flock` on a file that names its holder's pid
(try_lock, holder): the operating system releases it when the holder ends,
however it ends, so a stale lock never blocks. A stage holds
`paths.checkpoints`/<stage>.lock while it runs (stage_lock); the GPU locks use the
same helper (pipeline/gpus.py). Of a training run, the first process on its
machine takes the train stage's lock (takes_stage_lock); the workers of our
multi-process launcher, which holds it for them, are told so by LAUNCHER_ENV.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from pipeline.errors import PipelineError

# Set by our launcher for its workers: it holds the workspace's train lock and their GPUs.
LAUNCHER_ENV = "TRAIN_LAUNCHER_PID"


# --------------------------------------------------------------------------- the lock itself


def try_lock(lock: TextIO) -> bool:
    """Take the flock on the open file `lock` if no one holds it, and write our pid
    into it (if it is writable); False, at once, if another process holds it."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    if lock.writable():
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    return True


def holder(lock: TextIO) -> str:
    """The pid written in a lock file by its holder, or '?'."""
    lock.seek(0)
    return lock.read().strip() or "?"


# --------------------------------------------------------------------------- one run per stage


@contextlib.contextmanager
def stage_lock(stage: str, folder: str | Path) -> Iterator[None]:
    """Hold `folder`/`stage`.lock for the block, or fail at once naming the process
    that holds it: two runs of one stage never write one workspace's outputs together."""
    path = Path(folder) / f"{stage}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock:
        if not try_lock(lock):
            raise PipelineError(
                f"another run of the {stage} stage (pid {holder(lock)}) is writing this "
                f"workspace's outputs ({path} is locked): wait for it, or stop it"
            )
        yield


def takes_stage_lock() -> bool:
    """Whether this training process takes the workspace's train lock: not a worker of
    our launcher (the launcher holds it), and the first process on its machine."""
    return LAUNCHER_ENV not in os.environ and os.environ.get("LOCAL_RANK", "0") == "0"
