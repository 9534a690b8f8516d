"""Shared by every stage: params loading and validation, seeding, device choice,
atomic writes, and the one-line error that a stage stops with.

Every stage script is run from the repository root (as `dvc repro` does), so
`params.yaml` and the paths in its `paths:` section are relative to that root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

PARAMS_FILE = Path("params.yaml")

# The four MNIST files as the download stage stores them in `paths.raw`
# (decompressed, so their bytes and DVC hashes do not depend on the mirror).
RAW_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Auto = Literal["auto", True, False]
NUM_CLASSES = 10  # digits 0-9


class PipelineError(Exception):
    """An error the user can fix (bad params, bad data, missing device): shown as one line."""


# --------------------------------------------------------------------------- params


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a PipelineError naming the key, its value and what is allowed, unless ok."""
    if not ok:
        shown = list(value) if isinstance(value, tuple) else value
        raise PipelineError(f"{PARAMS_FILE}: {key} = {shown!r} is not allowed: {allowed}")


def check(params: Any, name: str, ok: bool, allowed: str) -> None:
    """require() for field `name` of a params dataclass: `section.name = value`."""
    require(ok, f"{params.SECTION}.{name}", getattr(params, name), allowed)


_PLAIN = (bool, int, float, str)  # the plain types a param may have


def _expected(hint: Any) -> str:
    """What a value of type `hint` may be, for error messages."""
    if typing.get_origin(hint) is Literal:
        return ", ".join(str(c).lower() for c in typing.get_args(hint))
    return {bool: "true or false", int: "an integer", float: "a finite number"}.get(
        hint, "a string"
    )


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check one value against its type hint; return it converted where that is lossless."""
    origin = typing.get_origin(hint)
    union = origin in (typing.Union, types.UnionType)  # int | Literal["auto"]
    options = typing.get_args(hint) if union else (hint,)
    for option in options:  # every member of a union, whichever one matches
        if typing.get_origin(option) not in (Literal, tuple) and option not in _PLAIN:
            raise TypeError(f"{key}: params of type {option!r} are not supported")
    if union:
        for option in options:
            with contextlib.suppress(PipelineError):
                return _coerce(key, value, option)
        require(False, key, value, " or ".join(_expected(o) for o in options))
    if origin is Literal:
        choices = typing.get_args(hint)
        # compare types too: YAML's 1 must not pass for True
        ok = any(value == c and type(value) is type(c) for c in choices)
        require(ok, key, value, "one of " + _expected(hint))
        return value
    if origin is tuple:  # tuple[str, ...]
        item = typing.get_args(hint)[0]
        require(isinstance(value, list), key, value, f"a list of {item.__name__}")
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if hint is bool:
        require(isinstance(value, bool), key, value, _expected(bool))
    elif hint is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, value, _expected(int))
    elif hint is float:
        # `dvc exp run -S train.lr=1e-06` writes `lr: 1e-06`, which YAML 1.1 (PyYAML)
        # reads as a string: accept any string that Python parses as a number.
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(is_number and math.isfinite(value), key, value, _expected(float))
        return float(value)
    elif hint is str:
        require(isinstance(value, str), key, value, _expected(str))
    return value


def parse_section(cls: type, raw: Any) -> Any:
    """Build the frozen dataclass `cls` from the dict `raw`, rejecting unknown,
    missing and mistyped keys; range checks are in the dataclass's __post_init__."""
    section = cls.SECTION
    if not isinstance(raw, dict):
        raise PipelineError(f"{PARAMS_FILE}: section '{section}' is missing or not a mapping")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1) or [
                f for f in fields if f == "".join(w[:1] for w in str(key).split("_"))
            ]  # a spelt-out abbreviation: learning_rate -> lr
            hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
            valid = ", ".join(fields)
            raise PipelineError(
                f"{PARAMS_FILE}: unknown key '{section}.{key}'{hint}; valid keys: {valid}"
            )
    missing = [name for name in fields if name not in raw]
    if missing:
        names = ", ".join(f"{section}.{m}" for m in missing)
        raise PipelineError(f"{PARAMS_FILE}: missing key(s) {names}")
    values = {name: _coerce(f"{section}.{name}", raw[name], hints[name]) for name in fields}
    return cls(**values)


def load_params(cls: type, params_file: Path = PARAMS_FILE) -> Any:
    """Read section `cls.SECTION` of params.yaml into the frozen dataclass `cls`."""
    try:
        with open(params_file) as f:
            document = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise PipelineError(f"{params_file} not found: run from the repository root") from None
    except yaml.YAMLError as error:
        raise PipelineError(f"{params_file} is not valid YAML: {error}") from None
    return parse_section(cls, document.get(cls.SECTION))


@dataclass(frozen=True)
class Paths:
    """Every file and folder the stages exchange; dvc.yaml reads the same section."""

    SECTION: ClassVar[str] = "paths"
    raw: str
    processed: str
    model: str
    checkpoints: str
    params_check: str
    train_report: str
    eval_report: str
    plots: str


def load_paths(params_file: Path = PARAMS_FILE) -> Paths:
    return load_params(Paths, params_file)


# --------------------------------------------------------------------------- runtime


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global generators (CPU and every GPU)."""
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


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


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block
    succeeds, so a crash never leaves a half-written file or folder at `path`.

    A folder that `path` replaces is first renamed aside, so a crash at any moment
    leaves either the old or the new output. Temp folders of an earlier, killed
    run of the same output are removed first (DVC runs one stage at a time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            os.replace(path, tmp / "replaced")
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_torch(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | Path) -> Any:
    """Load a tensor file or checkpoint without unpickling arbitrary objects."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the stage that makes it first") from None


# --------------------------------------------------------------------------- interrupts

# Ctrl-C and SIGTERM raise KeyboardInterrupt, except inside interrupts_deferred(),
# where they wait in _pending until the outermost such block ends.
_deferring = 0
_pending: list[int] = []


def _on_interrupt(signum: int, frame: types.FrameType | None) -> None:
    if _deferring:
        _pending.append(signum)
    else:
        _pending.clear()  # one that came as a block ended: raised now, not again later
        raise KeyboardInterrupt(f"signal {signum}")


def install_interrupt_handlers() -> None:
    """SIGTERM and SIGHUP like Ctrl-C (so that `finally` blocks run), all deferrable. A
    SIGINT or SIGHUP that the parent set to be ignored (a background job, nohup) stays
    ignored."""
    signal.signal(signal.SIGTERM, _on_interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_interrupt)
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:  # a closed terminal; not nohup
        signal.signal(signal.SIGHUP, _on_interrupt)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Run the block whole: a Ctrl-C or SIGTERM that arrives inside it is raised as
    KeyboardInterrupt when the block ends (replacing any exception the block raised:
    the user asked to stop). Needs the handlers of install_interrupt_handlers(),
    which run() installs; nests. The count is per process: use it on the main
    thread, which is where signals are handled."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            signum = _pending[0]
            _pending.clear()
            raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------- one run at a time

# How often the watcher checks that the process which started this stage is alive.
WATCH_INTERVAL_S = 0.5


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat), None if it is gone:
    with the pid it identifies a process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _is_dvc(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(a.decode(errors="replace")).name == "dvc" for a in argv[:3])


def _watched_ancestors() -> list[tuple[int, str | None]]:
    """The processes whose death must stop this stage: the parent and, under DVC (which
    sets DVC_STAGE), every ancestor up to the `dvc` process itself, since a shell such
    as dash stays between DVC and the command. Pairs of (pid, start time)."""
    chain = [os.getppid()]
    if os.environ.get("DVC_STAGE") and Path("/proc").is_dir():
        while len(chain) < 8 and not _is_dvc(chain[-1]) and _parent_of(chain[-1]) > 1:
            chain.append(_parent_of(chain[-1]))
        if not _is_dvc(chain[-1]):
            chain = chain[:1]
    return [(pid, _start_time(pid)) for pid in chain]


def _watch(ancestors: list[tuple[int, str | None]], parent: int) -> None:
    while True:
        time.sleep(WATCH_INTERVAL_S)
        gone = os.getppid() != parent or any(
            start is not None and _start_time(pid) != start for pid, start in ancestors
        )
        if gone:  # as SIGTERM: the stage stops the way an interrupt stops it
            os.kill(os.getpid(), signal.SIGTERM)
            return


_watching = False


def stop_with_parent() -> None:
    """Stop this process (as SIGTERM does) when the process that started it dies, by any
    signal, SIGKILL included: else a killed `dvc repro` leaves its stage running on,
    writing outputs that the next run also writes. Linux delivers SIGTERM at the
    parent's death (prctl PR_SET_PDEATHSIG); a watcher thread also covers the ancestors
    up to `dvc` and other systems (a changed parent pid means the parent died)."""
    global _watching
    if _watching:
        return
    _watching = True
    parent = os.getppid()
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    ancestors = _watched_ancestors()
    if os.getppid() != parent:  # it died before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=_watch, args=(ancestors, parent), daemon=True).start()


@contextlib.contextmanager
def exclusive(stage: str, lock_dir: str | Path) -> Iterator[None]:
    """Hold `lock_dir`/`stage`.lock for the block, or fail at once naming the process
    that holds it: two runs of one stage never write one workspace's outputs together.
    An flock, so the operating system releases it when its holder dies, however."""
    import fcntl

    path = Path(lock_dir) / f"{stage}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise PipelineError(
                f"another run of the {stage} stage (pid {holder}) is writing this "
                f"workspace's outputs ({path} is locked): wait for it, or stop it"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def run(main: Callable[[], None], stage: str | None = None) -> None:
    """Run a stage's main(): a PipelineError becomes one line on stderr and exit 1,
    Ctrl-C, SIGTERM or SIGHUP exit 130 (after `finally` blocks ran). The stage stops
    when the process that started it dies; with `stage` named, it runs only if no
    other run of that stage holds this workspace's lock (in `paths.checkpoints`)."""
    install_interrupt_handlers()
    stop_with_parent()
    try:
        if stage is None:
            main()
        else:
            with exclusive(stage, load_paths().checkpoints):
                main()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
