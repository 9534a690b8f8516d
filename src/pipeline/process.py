"""A stage's process: how it stops and what it refuses. Every stage runs its main()
through run(): an error the user can fix is one line and exit 1; Ctrl-C, SIGTERM or
SIGHUP stop it as an interrupt (exit 130, `finally` blocks run, so no half-written
output stays); it stops when the `dvc` process that started it dies; and a second
run of a stage in the same workspace is refused (pipeline/locks.py, docs/faults.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.errors import ERROR_PREFIX, EXIT_ERROR, EXIT_INTERRUPTED, PipelineError
from pipeline.locks import stage_lock
from pipeline.params import load_paths

# --------------------------------------------------------------------------- interrupts

# Ctrl-C and SIGTERM raise KeyboardInterrupt, except inside interrupts_deferred(),
# where they wait in _pending until the outermost such block ends.
_deferring = 0
_pending: list[int] = []
# Set once a stop was raised: the stage is running its `finally` blocks. A SIGTERM or
# SIGHUP then is ignored, not raised in the middle of that clean-up: the death of the
# `dvc` process sends two (PR_SET_PDEATHSIG and the watcher's), and SLURM or systemd
# may repeat theirs. Only a second Ctrl-C cuts the clean-up short.
_stopping = False


def _interrupt(signum: int) -> KeyboardInterrupt:
    global _stopping
    _stopping = True
    return KeyboardInterrupt(f"signal {signum}")


def _on_interrupt(signum: int, frame: types.FrameType | None) -> None:
    if _stopping and signum != signal.SIGINT:
        return
    if _deferring:
        _pending.append(signum)
    else:
        _pending.clear()  # one that came as a block ended: raised now, not again later
        raise _interrupt(signum)


def install_interrupt_handlers() -> None:
    """SIGTERM and SIGHUP like Ctrl-C (so that `finally` blocks run), all deferrable. A
    SIGINT or SIGHUP that the parent set to be ignored (a background job, nohup) stays
    ignored. The process is not stopping yet."""
    global _stopping
    _stopping = False
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
            raise _interrupt(signum)


# --------------------------------------------------------------------------- one run at a time

# How often the watcher checks that the process which started this stage is alive.
WATCH_INTERVAL_S = 0.5


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first); [] if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat), None if it is gone
    or a zombie (dead, not yet reaped): with the pid it identifies a process even after
    the pid is reused."""
    fields = _stat(pid)
    return fields[19] if fields and fields[0] not in ("Z", "X") else None


def _parent_of(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if fields else 0


def _is_dvc(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(a.decode(errors="replace")).name == "dvc" for a in argv[:3])


def _watched_ancestors() -> list[tuple[int, str | None]] | None:
    """The processes whose death must stop this stage: the parent and, under DVC (which
    sets DVC_STAGE), every ancestor up to the `dvc` process itself, since a shell such
    as dash stays between DVC and the command. Pairs of (pid, start time); None when
    DVC has already died (killed while this stage was still importing its modules:
    the chain then ends at init, or at a subreaper, without a `dvc`)."""
    chain = [os.getppid()]
    if os.environ.get("DVC_STAGE") and Path("/proc").is_dir():
        while len(chain) < 8 and not _is_dvc(chain[-1]) and _parent_of(chain[-1]) > 1:
            chain.append(_parent_of(chain[-1]))
        if not _is_dvc(chain[-1]):
            if _parent_of(chain[-1]) <= 1 and len(chain) < 8:
                return None
            chain = chain[:1]
    return [(pid, _start_time(pid)) for pid in chain]


# Seconds a stage has, once told to stop, to finish its atomic writes before it is ended.
STOP_GRACE_S = 30.0


def _stop_self() -> None:
    """SIGTERM to this process: the stage stops as an interrupt stops it. If it has not
    ended STOP_GRACE_S later (stuck in a C call, or in a hang), end it outright, so
    that an orphaned stage never runs on holding its lock."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_S)
    os._exit(EXIT_INTERRUPTED)


def _watch(ancestors: list[tuple[int, str | None]], parent: int) -> None:
    while True:
        time.sleep(WATCH_INTERVAL_S)
        gone = os.getppid() != parent or any(
            start is not None and _start_time(pid) != start for pid, start in ancestors
        )
        if gone:
            _stop_self()


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
    if ancestors is None or os.getppid() != parent:  # dvc died before we watched
        threading.Thread(target=_stop_self, daemon=True).start()
        return
    threading.Thread(target=_watch, args=(ancestors, parent), daemon=True).start()


def run(main: Callable[[], None], stage: str | None = None) -> None:
    """Run a stage's main(): a PipelineError becomes one line on stderr and exit
    EXIT_ERROR; Ctrl-C, SIGTERM or SIGHUP exit EXIT_INTERRUPTED at once after the
    `finally` blocks ran. The stage stops when the process that started it dies; with
    `stage` named, it runs only if no other run of that stage holds this workspace's
    lock (in `paths.checkpoints`)."""
    install_interrupt_handlers()
    stop_with_parent()
    try:
        with stage_lock(stage, load_paths().checkpoints) if stage else contextlib.nullcontext():
            main()
    except PipelineError as error:
        print(f"{ERROR_PREFIX}{error}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        # every `finally` has run: exit now, without the interpreter's shutdown (a second
        # or more with torch loaded, over 5 s on a loaded machine), so that a stopped
        # stage is gone at once and frees its lock and its GPU
        print("interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
