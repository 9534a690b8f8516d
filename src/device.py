"""The device a stage runs on, and what `auto` means there: precision, memory layout
and evaluation batch size, from measurements (docs/speed.md); on a machine with
several GPUs, the one each run takes. Read by the train and evaluate stages, the
predict command and the benchmark.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from common import PipelineError

Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


def pick_device(requested: str) -> Any:
    """'auto' picks CUDA, then Apple MPS, then CPU; a named device that is absent is an error."""
    import torch

    has = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if requested == "auto":
        name = next((n for n in ("cuda", "mps") if has[n]), "cpu")
        return torch.device(name)
    if requested != "cpu" and not has[requested]:
        raise PipelineError(
            f"device '{requested}' was asked for but torch sees none on this machine "
            f"(torch {torch.__version__}); use 'auto' or 'cpu'"
        )
    return torch.device(requested)


def cpu_has_amx() -> bool:
    """Intel AMX: tile matrix units that run bf16 matmuls and convolutions in hardware."""
    import torch

    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(supported and supported())


def resolve_precision(requested: str, device: Any) -> str:
    """'fp32', 'bf16' or 'fp16': what `requested` (a Precision) means on `device`.

    bf16 autocast under `auto`: on GPUs it doubles tensor-core throughput; on the
    2-core Xeon with AMX it trained 2.3-2.4x and evaluated 3.1x faster than fp32,
    channels_last on in both (README, "Speed"); on CPUs without AVX-512/AMX it ran
    ~14x slower, and on MPS it is unmeasured, so those keep fp32."""
    import torch

    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_amx() else "fp32"


def autocast_dtype_of(precision: str) -> Any:
    """The torch.autocast dtype of a resolved precision; None for plain fp32."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def memory_format_of(channels_last: bool) -> Any:
    """The torch memory format of a resolved channels_last."""
    import torch

    return torch.channels_last if channels_last else torch.contiguous_format


def resolve_channels_last(requested: bool | str, device: Any) -> bool:
    """NHWC layout under `auto` on CUDA and CPUs; not on MPS. On the 2-core Xeon it
    trained 1.2-1.3x and evaluated 1.35x faster in bf16; fp32 inference there ran
    0.96x (width 64) to 1.33x (width 16) as fast (README, "Speed")."""
    return device.type in ("cuda", "cpu") if requested == "auto" else bool(requested)


# `auto` images per evaluation batch: large batches fill a GPU, while on the 2-core
# Xeon inference ran 1.2x to 1.6x slower at batch 256 and up than at 32 or 64
# (README, "Speed"; reports/bench/cpu-eval-batch.txt), so a CPU takes 64.
EVAL_BATCH_AUTO = {"cpu": 64, "cuda": 1024, "mps": 1024}


def resolve_eval_batch(requested: int | Literal["auto"], device: Any) -> int:
    """The evaluation batch size that `requested` ('auto' or a number) means on `device`."""
    return EVAL_BATCH_AUTO[device.type] if requested == "auto" else int(requested)


# --------------------------------------------------------------------------- one GPU per run

# Locks of the GPUs that runs of this project hold, machine-wide: queued experiments
# run in their own copies of the workspace (.dvc/tmp/exps/...), so not in the workspace.
GPU_LOCKS = "resnet18-mnist-gpus"  # in the temp folder (TMPDIR)
CLAIM_POLL_S = 2.0  # seconds between tries while every GPU is held
_claimed: list[Any] = []  # open lock files: held until this process ends


def visible_gpus() -> list[str]:
    """This process's CUDA devices, named as CUDA_VISIBLE_DEVICES names them (else by index)."""
    import torch

    count = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    return listed[:count] if len(listed) >= count else [str(i) for i in range(count)]


def gpu_ids() -> list[str] | None:
    """The visible GPUs' UUIDs, which name a GPU however CUDA_VISIBLE_DEVICES and
    CUDA_DEVICE_ORDER number it; None where torch does not report them."""
    import torch

    try:
        return [str(torch.cuda.get_device_properties(i).uuid) for i in range(len(visible_gpus()))]
    except (AttributeError, RuntimeError):
        return None


def _open_lock(path: Path) -> Any:
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


def claim_gpus(
    count: int, gpus: list[str], lock_dir: str | Path | None = None, ids: list[str] | None = None
) -> list[int]:
    """Positions in `gpus` of `count` GPUs that no other run of this project holds,
    now held by this process: one flock per GPU, which the operating system releases
    when its holder ends, however it ends. `dvc queue start -j N` starts N runs that
    would all pick the first GPU (DVC issue 4586). While too few are free, wait,
    saying so once: two runs sharing a GPU each run at about half speed (so nothing is
    gained), may run it out of memory, and report misleading timings. `ids` name the
    lock files (gpu_ids(): UUIDs), else `gpus` do."""
    import fcntl

    if count > len(gpus):
        raise PipelineError(f"{count} GPUs wanted, but this machine shows {len(gpus)}")
    folder = Path(lock_dir or Path(tempfile.gettempdir()) / GPU_LOCKS)
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # shared by every user's runs, as /tmp is
        folder.chmod(0o1777)
    keys = ids or gpus
    waited_since = None
    while True:
        taken: list[tuple[int, Any]] = []
        holders = []
        for position, name in enumerate(gpus):
            lock = _open_lock(folder / f"gpu-{keys[position].replace('/', '_')}.lock")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holders.append(f"GPU {name}: pid {lock.read().strip() or '?'}")
                lock.close()
                continue
            taken.append((position, lock))
            if len(taken) == count:
                break
        if len(taken) == count:
            for _, lock in (t for t in taken if t[1].writable()):
                lock.seek(0)
                lock.truncate()
                lock.write(f"{os.getpid()}\n")
                lock.flush()
            _claimed.extend(lock for _, lock in taken)
            if waited_since is not None:
                print(f"waited {time.monotonic() - waited_since:.0f} s for free GPUs")
            return [position for position, _ in taken]
        for _, lock in taken:  # take all or none: two runs never hold half each
            lock.close()
        if waited_since is None:
            waited_since = time.monotonic()
            print(
                f"waiting for {count} free GPU(s) of {len(gpus)}: other runs of this project "
                f"hold {'; '.join(holders)} (locks in {folder})",
                flush=True,
            )
        time.sleep(CLAIM_POLL_S)


def claim_device(device: Any) -> Any:
    """`device` itself, or for CUDA one GPU that no other run of this project holds
    (claim_gpus), made the current device and named on stdout."""
    import torch

    if device.type != "cuda":
        return device
    gpus = visible_gpus()
    index = claim_gpus(1, gpus, ids=gpu_ids())[0]
    torch.cuda.set_device(index)
    print(f"using GPU {gpus[index]} ({torch.cuda.get_device_name(index)}), cuda:{index}")
    return torch.device("cuda", index)
