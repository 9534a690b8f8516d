"""One run per GPU: the GPUs a run takes, held until it ends.

A run on CUDA holds one lock per GPU it trains on (pipeline/locks.py's helper), in
a folder that every user's runs of this project share: queued experiments (`dvc
queue start -j N`) run in their own copies of the workspace and would otherwise
all pick the first GPU (DVC issue 4586). Who claims: with several processes, our
launcher claims their GPUs and its workers train on them (claim_for_workers,
training_device); any other process on CUDA claims one for itself (claim_device).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import TextIO

import torch

from pipeline.errors import PipelineError
from pipeline.locks import LAUNCHER_ENV, holder, try_lock

GPU_LOCKS = "resnet18-mnist-gpus"  # folder in the temp folder (TMPDIR), shared by all users
CLAIM_POLL_S = 2.0  # seconds between tries while every GPU is held
_claimed: list[TextIO] = []  # open GPU lock files: held until this process ends


def visible_gpus() -> list[str]:
    """This process's CUDA devices, named as CUDA_VISIBLE_DEVICES names them (else by index)."""
    count = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    return listed[:count] if len(listed) >= count else [str(i) for i in range(count)]


def gpu_ids() -> list[str] | None:
    """The visible GPUs' UUIDs, which name a GPU however CUDA_VISIBLE_DEVICES and
    CUDA_DEVICE_ORDER number it; None where torch does not report them."""
    try:
        return [str(torch.cuda.get_device_properties(i).uuid) for i in range(len(visible_gpus()))]
    except (AttributeError, RuntimeError, AssertionError):
        return None


def _open_shared(path: Path) -> TextIO:
    """The lock file at `path`, made writable by every user (several users' runs share
    the GPUs); read-only if another user made it otherwise: flock works on either. In a
    folder every user writes to, a link could point elsewhere (another user's files):
    only a plain file that nothing else links to is opened, and only our own chmodded."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    mode = "r+"
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | nofollow, 0o666)
        except PermissionError:
            fd, mode = os.open(path, os.O_RDONLY | nofollow), "r"
    except OSError as error:
        if error.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise PipelineError(f"{path} is not a plain lock file (a link?): remove it") from None
        raise PipelineError(
            f"cannot open the GPU lock {path} ({error.strerror}): its folder is shared by "
            f"every user's runs of this project, so it must be a plain file in a folder "
            f"everyone may write to (chmod 1777 {path.parent})"
        ) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise PipelineError(f"{path} is not a plain lock file (a link?): remove it")
    if info.st_uid == os.getuid():
        os.fchmod(fd, 0o666)  # past the umask
    return os.fdopen(fd, mode)


def _try_gpus(count: int, gpus: list[str], keys: list[str], folder: Path) -> list[int] | str:
    """Positions of `count` GPUs now locked by us, or, when too few are free (then none
    is kept), who holds the others."""
    taken: list[tuple[int, TextIO]] = []
    holders = []
    for position, name in enumerate(gpus):
        lock = _open_shared(folder / f"gpu-{keys[position].replace('/', '_')}.lock")
        if not try_lock(lock):
            holders.append(f"GPU {name}: pid {holder(lock)}")
            lock.close()
            continue
        taken.append((position, lock))
        if len(taken) == count:
            _claimed.extend(lock for _, lock in taken)
            return [position for position, _ in taken]
    for _, lock in taken:  # all or none: two runs never hold half each
        lock.close()
    return "; ".join(holders)


def claim_gpus(
    count: int, gpus: list[str] | None = None, lock_dir: str | Path | None = None
) -> list[int]:
    """Positions in `gpus` (default: visible_gpus()) of `count` GPUs that no other run
    of this project holds, now held by this process until it ends. While too few are
    free, wait, saying so once: two runs sharing a GPU each run at about half speed
    (nothing gained), may run it out of memory, and report misleading timings. The
    locks are named by the GPUs' UUIDs (gpu_ids) where torch reports them."""
    gpus = visible_gpus() if gpus is None else gpus
    if count > len(gpus):
        raise PipelineError(f"{count} GPUs wanted, but this machine shows {len(gpus)}")
    ids = gpu_ids()
    keys = ids if ids and len(ids) == len(gpus) else gpus
    folder = Path(lock_dir or Path(tempfile.gettempdir()) / GPU_LOCKS)
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # shared by every user's runs, as /tmp is
        folder.chmod(0o1777)
    waited_since = None
    while isinstance(taken := _try_gpus(count, gpus, keys, folder), str):
        if waited_since is None:
            waited_since = time.monotonic()
            print(
                f"waiting for {count} free GPU(s) of {len(gpus)}: other runs of this project "
                f"hold {taken} (locks in {folder})",
                flush=True,
            )
        time.sleep(CLAIM_POLL_S)
    if waited_since is not None:
        print(f"waited {time.monotonic() - waited_since:.0f} s for free GPUs")
    return taken


def claim_device(device: torch.device) -> torch.device:
    """`device` itself, or for CUDA one GPU that no other run of this project holds,
    made the current device and named on stdout."""
    if device.type != "cuda":
        return device
    gpus = visible_gpus()
    index = claim_gpus(1, gpus)[0]
    torch.cuda.set_device(index)
    print(f"using GPU {gpus[index]} ({torch.cuda.get_device_name(index)}), cuda:{index}")
    return torch.device("cuda", index)


def training_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of one training process: a worker of our launcher trains on the GPU
    the launcher claimed for it (its local rank); any other process claims its own."""
    if device.type == "cuda" and LAUNCHER_ENV in os.environ:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return claim_device(device)


def claim_for_workers(processes: int, device: torch.device) -> list[str] | None:
    """The GPUs (as CUDA_VISIBLE_DEVICES names them) that our launcher's `processes`
    workers will train on, claimed for them; None on a CPU."""
    if device.type != "cuda":
        return None
    gpus = visible_gpus()
    return [gpus[i] for i in claim_gpus(processes, gpus)]
